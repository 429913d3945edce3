"""clipscope: dataset-scale interpretability of CLIP-like vision models.

The repo's top-level folders are installed as subpackages:
``clipscope.kernels`` (pure math), ``clipscope.storage`` (the zarr store),
``clipscope.cluster`` (Ray), ``clipscope.pipelines`` (jobs and the CLI).
"""

from clipscope.errors import ClipscopeError
from clipscope.version import __version__


def import_open_clip():
    """``import open_clip`` in a way that also works next to a CPU-only torch (see README)."""
    from clipscope._torchvision_compat import import_open_clip as _import

    return _import()


__all__ = ["ClipscopeError", "__version__", "import_open_clip"]
