"""The store_url fixture: one fresh store location per backend (local path, file:// URL, memory:// URL)."""

from __future__ import annotations

import fsspec
import pytest
from storage_helpers import BACKENDS, make_url


@pytest.fixture(params=BACKENDS)
def store_url(request, tmp_path):
    url = make_url(request.param, tmp_path)
    yield url
    if request.param == "memory":
        fs = fsspec.filesystem("memory")
        root = url.split("://", 1)[1]
        if fs.exists(root):
            fs.rm(root, recursive=True)
