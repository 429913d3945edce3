"""A store written under an older schema version (the old `split` convention) is refused on
open with one line that says why and how to re-extract."""

import json
import os

import numpy as np
import pytest

from clipscope.errors import StoreError
from clipscope.storage.layout import SCHEMA_ATTR, SCHEMA_VERSION, ArraySpec, schema_mismatch_message
from clipscope.storage.store import RunStore


def _store_with_version(tmp_path, version) -> str:
    url = str(tmp_path / "store")
    RunStore.create(url, arrays=[ArraySpec("image_embedding", ("sample", "embed"), (4,), np.float32)], n_rows=4,
                    rows_per_chunk=4, attrs={})
    path = os.path.join(url, "zarr.json")
    with open(path) as fh:
        meta = json.load(fh)
    assert meta["attributes"][SCHEMA_ATTR] == SCHEMA_VERSION == 2
    meta["attributes"][SCHEMA_ATTR] = version
    with open(path, "w") as fh:
        json.dump(meta, fh)
    return url


def test_an_older_store_is_refused_with_how_to_re_extract(tmp_path):
    url = _store_with_version(tmp_path, 1)
    with pytest.raises(StoreError) as err:
        RunStore.open(url, "r")
    message = str(err.value)
    assert "\n" not in message and "schema version 1" in message and "`split`" in message
    assert "re-extract it by running `clipscope extract` again" in message and "new --out store" in message


def test_a_newer_or_odd_version_is_refused_too(tmp_path):
    url = _store_with_version(tmp_path, 3)
    with pytest.raises(StoreError, match="schema version 3, this clipscope reads version 2"):
        RunStore.open(url, "r")
    assert "\n" not in schema_mismatch_message("s3://b/run", "v1")
