"""The means job: the mean over valid rows of every direct-effect and second-order array (for mean-ablation)."""

from clipscope.pipelines.jobs.means import report
from clipscope.pipelines.jobs.means.job import run
from clipscope.pipelines.jobs.means.result import Result
from clipscope.pipelines.jobs.means.settings import Settings

NAME = "means"

__all__ = ["NAME", "Result", "Settings", "report", "run"]
