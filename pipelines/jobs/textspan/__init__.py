"""The textspan job: every head of chosen layers described by texts of a pool (TextSpan); its
reconstruction curve (`textspan --curve`) is the sub-job `textspan.curve`."""

from clipscope.pipelines.jobs.textspan import report
from clipscope.pipelines.jobs.textspan.job import run
from clipscope.pipelines.jobs.textspan.result import Result
from clipscope.pipelines.jobs.textspan.settings import Settings, TextSpanSettings

NAME = "textspan"

__all__ = ["NAME", "Result", "Settings", "TextSpanSettings", "report", "run"]
