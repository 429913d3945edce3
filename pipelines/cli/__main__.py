"""`python -m clipscope.pipelines.cli …` = the `clipscope` command."""

from clipscope.pipelines.cli import entry

entry()
