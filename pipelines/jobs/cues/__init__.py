"""`clipscope cues`: spurious-cue mining (second-order paper §5.1, Eq. 6): the words whose neurons push the
class c_true towards c_wrong, the prompt for a text-to-image model, and the fooling rate of generated images."""

from clipscope.pipelines.jobs.cues import report
from clipscope.pipelines.jobs.cues.job import cue_direction_of, fooling_rate, run
from clipscope.pipelines.jobs.cues.result import Result
from clipscope.pipelines.jobs.cues.settings import Settings

NAME = "cues"

__all__ = ["NAME", "Result", "Settings", "cue_direction_of", "fooling_rate", "report", "run"]
