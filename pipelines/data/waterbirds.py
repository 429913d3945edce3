"""The Waterbirds file layout (Sagawa et al.'s `waterbird_complete95_forest2water2`) as webdataset shards with groups.

The folder holds `metadata.csv` (columns `img_filename`, `y`, `split`, `place`; others ignored) and the images
under the relative paths of `img_filename`. `split` is 0 = train, 1 = val, 2 = test; `y` is the class (0 =
landbird, 1 = waterbird), `place` the background (0 = land, 1 = water). Each kept row becomes a sample: the
image file's bytes unchanged (member suffix from its extension), `cls` = y, and a JSON member with `group` =
place (what `extract --group-key group` stores), `place`, `y` and `img_filename`. Group 2·y + place is what the
papers call the (y, place) group; clipscope keeps class and group apart ([class, group] cells).
"""

from __future__ import annotations

import csv
import os
from collections.abc import Iterator

from clipscope.errors import DataError, ParameterError
from clipscope.pipelines.data.webdataset_input import IMAGE_EXTENSIONS, write_shard

SPLITS = {"train": 0, "val": 1, "test": 2}
CLASSES = ("landbird", "waterbird")
REQUIRED = ("img_filename", "y", "split", "place")


def read_metadata(root: str, split: str) -> list[dict[str, str]]:
    """The rows of ROOT/metadata.csv in `split`, in file order (DataError naming the file and line otherwise)."""
    if split not in SPLITS:
        raise ParameterError("split", f"must be one of {', '.join(SPLITS)}, got {split!r}")
    path = os.path.join(root, "metadata.csv")
    try:
        with open(path, newline="", encoding="utf-8") as fh:
            reader = csv.DictReader(fh)
            missing = [c for c in REQUIRED if c not in (reader.fieldnames or [])]
            if missing:
                raise DataError(f"{path} lacks the column(s) {', '.join(missing)} (Waterbirds metadata has "
                                f"{', '.join(REQUIRED)})")
            rows = []
            for line, row in enumerate(reader, start=2):
                try:
                    if int(row["split"]) != SPLITS[split]:
                        continue
                    y, place = int(row["y"]), int(row["place"])
                except ValueError:
                    raise DataError(f"{path}:{line}: y, split and place must be integers, got {row}") from None
                if y not in (0, 1) or place not in (0, 1):
                    raise DataError(f"{path}:{line}: y and place must be 0 or 1, got y={y}, place={place}")
                rows.append(row)
    except FileNotFoundError:
        raise DataError(f"no metadata.csv in {root} (the Waterbirds folder holds metadata.csv and the images)") from None
    return rows


def _samples(root: str, rows: list[dict[str, str]]) -> Iterator[dict]:
    for row in rows:
        name = row["img_filename"]
        suffix = name.rsplit(".", 1)[-1].lower() if "." in name else ""
        if suffix not in IMAGE_EXTENSIONS:
            raise DataError(f"{name}: not an image file name (suffixes: {', '.join(IMAGE_EXTENSIONS)})")
        try:
            with open(os.path.join(root, name), "rb") as fh:
                data = fh.read()
        except FileNotFoundError:
            raise DataError(f"metadata.csv names {name}, which is not in {root}") from None
        key = os.path.splitext(name)[0].replace("/", "_").replace(".", "_")
        y, place = int(row["y"]), int(row["place"])
        yield {"__key__": key, suffix: data, "cls": y,
               "json": {"group": place, "place": place, "y": y, "img_filename": name}}


def convert_waterbirds(root: str, out_dir: str, *, split: str = "test", per_shard: int = 1000) -> list[str]:
    """Shards `waterbirds-{split}-{k:05d}.tar` of `split`'s images, `per_shard` samples each; their paths."""
    if isinstance(per_shard, bool) or not isinstance(per_shard, int) or per_shard < 1:
        raise ParameterError("per_shard", f"must be an integer ≥ 1, got {per_shard!r}")
    rows = read_metadata(root, split)
    if not rows:
        raise DataError(f"{root}/metadata.csv has no rows of the {split} split")
    os.makedirs(out_dir, exist_ok=True)
    paths = []
    for shard, start in enumerate(range(0, len(rows), per_shard)):
        path = os.path.join(out_dir, f"waterbirds-{split}-{shard:05d}.tar")
        write_shard(path, _samples(root, rows[start:start + per_shard]))
        paths.append(path)
    return paths
