"""ray_runtime: address resolution, store reachability rules, the auth token file, one embedded start."""

from __future__ import annotations

import os
import stat
import subprocess
import sys

import pytest

from clipscope.cluster import runtime
from clipscope.cluster.runtime import (
    check_shared_store,
    cluster_nodes,
    describe_cluster,
    ensure_local_auth_token,
    ray_runtime,
    require_shared_store,
    store_url_scope,
)
from clipscope.errors import ConfigError

AUTH_VARIABLES = ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")


def clear_auth_variables(monkeypatch) -> None:
    """Unset Ray's auth variables for one test; set-then-delete so that monkeypatch also removes any
    value the code under test writes (a plain delenv of an absent name records nothing to undo)."""
    for name in AUTH_VARIABLES:
        monkeypatch.setenv(name, "placeholder")
        monkeypatch.delenv(name)


@pytest.mark.parametrize(
    "address, env, expected",
    [
        (None, None, None),
        (None, "10.0.0.1:6379", "10.0.0.1:6379"),
        ("auto", "10.0.0.1:6379", "auto"),
        ("ray://head:10001", None, "ray://head:10001"),
        ("local", "10.0.0.1:6379", None),
    ],
)
def test_address_resolution(monkeypatch, address, env, expected):
    if env is None:
        monkeypatch.delenv("RAY_ADDRESS", raising=False)
    else:
        monkeypatch.setenv("RAY_ADDRESS", env)
    assert runtime._resolve_address(address) == expected


@pytest.mark.parametrize(
    "url, scope",
    [
        ("/data/run.zarr", "local"),
        ("relative/run.zarr", "local"),
        ("file:///data/run.zarr", "local"),
        ("memory://run", "process"),
        ("s3://bucket/run.zarr", "shared"),
        ("gs://bucket/run.zarr", "shared"),
    ],
)
def test_store_url_scope(url, scope):
    assert store_url_scope(url) == scope


def test_local_store_is_refused_on_a_multi_node_cluster_unless_allowed(tmp_path):
    check_shared_store(tmp_path, alive_nodes=1)
    check_shared_store("s3://bucket/run.zarr", alive_nodes=4)
    check_shared_store("file:///shared/run.zarr", alive_nodes=4, allow_local=True)
    with pytest.raises(ConfigError, match=r"has 4 alive nodes; use s3:// or gs://.*--allow-local-store"):
        check_shared_store("file:///data/run.zarr", alive_nodes=4)
    with pytest.raises(ConfigError, match="lives in one Python process"):
        check_shared_store("memory://run", alive_nodes=1)
    with pytest.raises(ConfigError, match="store url must be a non-empty path or URL string"):
        check_shared_store("", alive_nodes=1)


def test_auth_token_file_is_created_once_and_private(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    clear_auth_variables(monkeypatch)
    path = ensure_local_auth_token()
    assert path == tmp_path / ".ray" / "auth_token"
    token = path.read_text()
    assert len(token) == 64 and stat.S_IMODE(path.stat().st_mode) == 0o600
    assert ensure_local_auth_token() is None
    assert path.read_text() == token
    assert sorted(p.name for p in path.parent.iterdir()) == ["auth_token"]


@pytest.mark.parametrize("env", [{"RAY_AUTH_MODE": "disabled"}, {"RAY_AUTH_TOKEN": "abc"}])
def test_no_token_file_when_auth_is_off_or_configured(monkeypatch, tmp_path, env):
    monkeypatch.setenv("HOME", str(tmp_path))
    clear_auth_variables(monkeypatch)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert ensure_local_auth_token() is None
    assert not (tmp_path / ".ray").exists()


def test_sizes_are_refused_with_a_cluster_address(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    import ray

    assert not ray.is_initialized()
    with pytest.raises(ConfigError, match="num_cpus size an embedded local Ray only"):
        with ray_runtime("auto", num_cpus=2):
            pass
    with pytest.raises(ConfigError, match="num_gpus must be an integer ≥ 0 or None, got -1"):
        with ray_runtime(num_gpus=-1):
            pass


def test_import_does_not_import_ray():
    code = "import sys, clipscope.cluster.runtime, clipscope.cluster.shard_pool, clipscope.cluster.reduce; print('ray' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_embedded_runtime_starts_is_reused_inside_and_stops(monkeypatch, tmp_path):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    import ray

    assert not ray.is_initialized()
    with ray_runtime(num_cpus=1, object_store_memory=100 * 1024 * 1024) as outer:
        assert outer.mode == "embedded" and outer.owns_ray
        nodes = cluster_nodes()
        assert len(nodes) == 1 and nodes[0].is_head and nodes[0].num_cpus == 1
        assert describe_cluster(nodes).startswith("Ray: 1 node, 1 CPUs, 0 GPUs")
        require_shared_store(tmp_path)
        with ray_runtime() as inner:
            assert inner.mode == "reused" and not inner.owns_ray
        assert ray.is_initialized()
    assert not ray.is_initialized()
    with pytest.raises(ConfigError, match=r"cluster_nodes\(\) needs a running Ray"):
        cluster_nodes()


def test_unwritable_home_falls_back_to_a_token_in_the_environment(monkeypatch, tmp_path):
    not_a_folder = tmp_path / "home-is-a-file"
    not_a_folder.write_text("")
    monkeypatch.setenv("HOME", str(not_a_folder))
    clear_auth_variables(monkeypatch)
    try:
        runtime.prepare_embedded_auth()
        assert len(os.environ["RAY_AUTH_TOKEN"]) == 64
    finally:
        # Ray's loader now caches this token; later Ray starts in this process must not use it.
        monkeypatch.undo()
        runtime._reset_token_cache()
    assert "RAY_AUTH_TOKEN" not in os.environ
