"""`clipscope worst-group`: zero-shot accuracy per (class, group) and the worst group under mean-ablations of
head sets, the reference's combined ablation, heads chosen by role or at random (thesis §2.4, Table 2.3)."""

from clipscope.pipelines.jobs.worst_group import report
from clipscope.pipelines.jobs.worst_group.job import run
from clipscope.pipelines.jobs.worst_group.result import Result
from clipscope.pipelines.jobs.worst_group.settings import Settings

NAME = "worst-group"

__all__ = ["NAME", "Result", "Settings", "report", "run"]
