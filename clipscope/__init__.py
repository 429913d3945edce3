"""clipscope: dataset-scale interpretability of CLIP-like vision models.

The repo's top-level folders are installed as subpackages:
``clipscope.kernels`` (pure math), ``clipscope.storage`` (the zarr store),
``clipscope.cluster`` (Ray), ``clipscope.pipelines`` (jobs and the CLI).
"""

from clipscope.errors import ClipscopeError

__version__ = "0.1.0"

__all__ = ["ClipscopeError", "__version__"]
