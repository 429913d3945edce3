"""The segment job: zero-shot segmentation of every stored image by a registered method (tokens, attention,
random; the neuron-segmentation methods plug in through `methods.register_method`) with the official protocol's
metrics (pixel accuracy, mIoU, mAP; spec S7)."""

from clipscope.pipelines.jobs.segment import methods, report
from clipscope.pipelines.jobs.segment.job import run
from clipscope.pipelines.jobs.segment.result import Result
from clipscope.pipelines.jobs.segment.settings import SegmentSettings, Settings

NAME = "segment"

# the neuron methods (second-order neurons and their random baseline) register themselves on import, so the CLI
# and every Ray worker know them
from clipscope.pipelines.jobs.segment import neurons as _neurons  # noqa: E402,F401

__all__ = ["NAME", "Result", "SegmentSettings", "Settings", "methods", "report", "run"]
