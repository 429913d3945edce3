"""`clipscope neurons`: every neuron of a layer as a sparse set of texts (OMP of its second-order PC) and the
zero-shot accuracy of that text reconstruction (second-order paper §4)."""

from clipscope.pipelines.jobs.neurons import report
from clipscope.pipelines.jobs.neurons.job import run
from clipscope.pipelines.jobs.neurons.result import Result
from clipscope.pipelines.jobs.neurons.settings import Settings

NAME = "neurons"

__all__ = ["NAME", "Result", "Settings", "report", "run"]
