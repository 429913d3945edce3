"""`clipscope rosetta`: Rosetta Neurons over a model zoo — exact global Pearson best buddies, multi-model
tuples, concepts and a dictionary, streamed in tiles over the executor, resumable per tile."""

from clipscope.pipelines.jobs.rosetta import report
from clipscope.pipelines.jobs.rosetta.job import run
from clipscope.pipelines.jobs.rosetta.result import Result
from clipscope.pipelines.jobs.rosetta.settings import Settings

NAME = "rosetta"

__all__ = ["NAME", "Result", "Settings", "report", "run"]
