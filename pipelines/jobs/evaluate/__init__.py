"""`clipscope evaluate`: zero-shot accuracy under mean-ablation of direct effects, from the store."""

from clipscope.pipelines.jobs.evaluate import report
from clipscope.pipelines.jobs.evaluate.job import run
from clipscope.pipelines.jobs.evaluate.result import Result
from clipscope.pipelines.jobs.evaluate.settings import Settings

NAME = "evaluate"

__all__ = ["NAME", "Result", "Settings", "report", "run"]
