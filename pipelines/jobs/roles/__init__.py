"""The roles job: each head of chosen layers labelled with a property from its TextSpan texts, and the
CLIP-InterpreT entanglement and association scores (spec S6)."""

from clipscope.pipelines.jobs.roles import report
from clipscope.pipelines.jobs.roles.job import run
from clipscope.pipelines.jobs.roles.result import Result
from clipscope.pipelines.jobs.roles.settings import RolesSettings, Settings

NAME = "roles"

__all__ = ["NAME", "Result", "RolesSettings", "Settings", "report", "run"]
