"""The reduction jobs, one package each, found by their anatomy rather than by a hand-kept list.

A job package ``pipelines/jobs/<job>/`` (or a package inside one, such as ``textspan/curve``) declares
``NAME`` (its CLI command) in its ``__init__`` and re-exports:

- ``Settings``: a frozen ``clipscope.params.Validated`` dataclass holding every parameter of the job;
- ``run(store, settings, executor=None) -> Result``: the single entry point (takes the reduction,
  computes, writes the result, returns it);
- ``Result``: the job's arrays and the settings they were made with, ``write`` and ``read(store, settings)``;
- ``report``: the module with its ``format_…``/``plot_…`` functions.

Packages without ``NAME`` (extraction) are not reduction jobs.
"""

from __future__ import annotations

import importlib
import pkgutil
from types import ModuleType

from clipscope.errors import ConfigError


def _job_packages() -> dict[str, ModuleType]:
    found: dict[str, ModuleType] = {}
    for info in pkgutil.walk_packages(__path__, prefix=f"{__name__}."):
        if not info.ispkg:
            continue
        module = importlib.import_module(info.name)
        name = getattr(module, "NAME", None)
        if name is not None:
            found[name] = module
    return found


def list_jobs() -> list[str]:
    """The NAMEs of every job package, sorted."""
    return sorted(_job_packages())


def get_job(name: str) -> ModuleType:
    """The job package whose NAME is `name` (it exports Settings, run, Result and report)."""
    jobs = _job_packages()
    if name not in jobs:
        raise ConfigError(f"no job named {name!r}; jobs: {', '.join(sorted(jobs))}")
    return jobs[name]
