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


class FakeRay:
    """Records ray.init's arguments (for the choice of address, without starting anything)."""

    def __init__(self) -> None:
        self.calls: list[dict] = []
        self.up = False

    def is_initialized(self) -> bool:
        return self.up

    def init(self, **kwargs) -> None:
        self.calls.append(kwargs)
        self.up = True

    def shutdown(self) -> None:
        self.up = False


def test_the_embedded_ray_is_always_a_new_local_instance(monkeypatch):
    """A bare ray.init() joins a Ray that `ray start` left on this machine (/tmp/ray/ray_current_cluster)
    and then refuses num_cpus; the embedded mode must ask for address="local". (The real thing, next
    to a running cluster: tests/cluster/test_reductions_on_cluster.py.)"""
    fake = FakeRay()
    monkeypatch.setattr(runtime, "_import_ray", lambda: fake)
    monkeypatch.setattr(runtime, "prepare_embedded_auth", lambda: None)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    with ray_runtime(num_cpus=2) as info:
        assert info.mode == "embedded"
    assert fake.calls[0]["address"] == "local" and fake.calls[0]["num_cpus"] == 2


@pytest.mark.parametrize("value, expected", [
    ("auto", "auto"), ("10.0.0.1:6379", "10.0.0.1:6379"), ("head.example:6379", "head.example:6379"),
    ("ray://head:10001", "ray://head:10001"), ("ray://head", "ray://head"),
])
def test_check_address_accepts_the_cluster_forms(value, expected):
    assert runtime.check_address(value) == expected


@pytest.mark.parametrize("value", ["", "local", "head", "head:port", "head:0", "http://head:8265", "ray://", 6379, None])
def test_check_address_refuses_anything_else(value):
    with pytest.raises(ConfigError, match=r"--address must be auto, HOST:PORT or ray://HOST:10001, got"):
        runtime.check_address(value, "--address")


def test_joining_needs_the_address_to_answer(monkeypatch):
    fake = FakeRay()
    monkeypatch.setattr(runtime, "_import_ray", lambda: fake)

    def refused(*args, **kwargs):
        raise ConnectionRefusedError(111, "Connection refused")

    monkeypatch.setattr("socket.create_connection", refused)
    with pytest.raises(ConfigError, match=r"^cannot reach the Ray cluster at 'head:6379' \(connection refused\)"):
        with ray_runtime("head:6379"):
            pass
    assert fake.calls == []
