"""ImageNet-segmentation (Guillaumin et al.; the `gtsegs_ijcv.mat` file of Chefer et al.'s evaluation) →
webdataset shards with masks, for `clipscope extract --masks` and `clipscope segment`.

The file is MATLAB v7.3, i.e. HDF5: ``/value/img`` and ``/value/gt`` are [N, 1] arrays of object
references. Image i is the dataset ``f[f['value/img'][i, 0]]``, stored column-major as [3, W, H] (read as
[H, W, 3] uint8 after transposing); its mask is reached through a 1 × 1 cell, ``f[f[f['value/gt'][i, 0]][0,
0]]``, stored as [W, H] (0 = background, 1 = the object). Samples are written as ``{key}.jpg`` (quality 95)
or ``.png`` and ``{key}.mask.png`` (0/1 values), keys ``imagenet-seg-{i:05d}``, `per_shard` per shard.
Reading needs h5py (an optional dependency: ``pip install h5py``).
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import numpy as np

from clipscope.errors import DataError, ParameterError


def _h5py():
    try:
        import h5py
    except ImportError:
        raise ConfigError("reading gtsegs_ijcv.mat (HDF5) needs h5py: pip install h5py") from None
    return h5py


def read_samples(path: str) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(image [H W 3] uint8, mask [H W] uint8) of every sample of the file, in file order."""
    h5py = _h5py()
    if not os.path.isfile(path):
        raise ConfigError(f"no file at {path} (the ImageNet-segmentation gtsegs_ijcv.mat)")
    try:
        f = h5py.File(path, "r")
    except OSError as err:
        raise DataError(f"{path} is not an HDF5 (MATLAB v7.3) file: {err}") from None
    with f:
        if "value/img" not in f or "value/gt" not in f:
            raise DataError(f"{path} has no /value/img and /value/gt: not the gtsegs_ijcv.mat layout")
        images, masks = f["value/img"], f["value/gt"]
        if images.shape[0] != masks.shape[0]:
            raise DataError(f"{path}: {images.shape[0]} images but {masks.shape[0]} masks")
        for i in range(images.shape[0]):
            image = np.asarray(f[images[i, 0]]).transpose(2, 1, 0)
            mask = np.asarray(f[f[masks[i, 0]][0, 0]]).transpose(1, 0)
            if image.ndim != 3 or image.shape[2] != 3 or image.shape[:2] != mask.shape:
                raise DataError(f"{path} sample {i}: image {image.shape} and mask {mask.shape} do not match")
            yield image.astype(np.uint8), mask.astype(np.uint8)


def convert(path: str, out: str, *, per_shard: int = 1000, image_format: str = "jpg") -> list[str]:
    """Write the file's samples as shards ``imagenet-seg-{k:05d}.tar`` under `out`; returns their paths."""
    from PIL import Image

    from clipscope.pipelines.data.webdataset_input import write_shard

    if isinstance(per_shard, bool) or not isinstance(per_shard, int) or per_shard < 1:
        raise ParameterError("per_shard", f"must be an integer ≥ 1, got {per_shard!r}")
    if image_format not in ("jpg", "png"):
        raise ParameterError("image_format", f"must be jpg or png, got {image_format!r}")
    os.makedirs(out, exist_ok=True)
    paths: list[str] = []
    batch: list[dict] = []

    def flush() -> None:
        path = os.path.join(out, f"imagenet-seg-{len(paths):05d}.tar")
        write_shard(path, batch)
        paths.append(path)
        batch.clear()

    for i, (image, mask) in enumerate(read_samples(path)):
        batch.append({"__key__": f"imagenet-seg-{i:05d}", image_format: Image.fromarray(image),
                      "mask.png": Image.fromarray(mask)})
        if len(batch) == per_shard:
            flush()
    if batch:
        flush()
    return paths
