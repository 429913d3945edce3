"""`clipscope second-order`: norms, sparsity, top images and rank-1 PCs of a layer's neurons' second-order
effects, then zero-shot accuracy under their mean-ablations."""

from clipscope.pipelines.jobs.second_order import report
from clipscope.pipelines.jobs.second_order.job import run
from clipscope.pipelines.jobs.second_order.result import Result
from clipscope.pipelines.jobs.second_order.settings import Settings

NAME = "second-order"

__all__ = ["NAME", "Result", "Settings", "report", "run"]
