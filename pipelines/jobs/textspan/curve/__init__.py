"""The textspan curve (`textspan --curve`): zero-shot accuracy with every head of chosen layers projected
onto its first m TextSpan texts, every other term mean-ablated (thesis §2.4, Fig. 2.3)."""

from clipscope.pipelines.jobs.textspan.curve import report
from clipscope.pipelines.jobs.textspan.curve.job import run
from clipscope.pipelines.jobs.textspan.curve.result import Result
from clipscope.pipelines.jobs.textspan.curve.settings import Settings

NAME = "textspan --curve"

__all__ = ["NAME", "Result", "Settings", "report", "run"]
