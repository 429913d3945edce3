"""`clipscope concepts`: the concepts active in every image of a store (second-order paper App. A.5), from
the neurons' second-order norms and their OMP text decompositions, without materialising φ."""

from clipscope.pipelines.jobs.concepts import report
from clipscope.pipelines.jobs.concepts.job import image_concepts, run
from clipscope.pipelines.jobs.concepts.result import Result
from clipscope.pipelines.jobs.concepts.settings import Settings

NAME = "concepts"

__all__ = ["NAME", "Result", "Settings", "image_concepts", "report", "run"]
