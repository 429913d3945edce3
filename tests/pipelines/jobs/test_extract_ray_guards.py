"""Shards that Ray workers could not open are refused before a Ray run writes anything."""

import pytest

from clipscope.cluster import runtime
from clipscope.errors import ConfigError
from clipscope.pipelines.jobs.extract.job import _require_readable_by_workers


@pytest.fixture
def three_nodes(monkeypatch):
    monkeypatch.setattr(runtime, "cluster_nodes", lambda: ("head", "worker-1", "worker-2"))


def test_in_process_shards_are_refused(three_nodes):
    with pytest.raises(ConfigError, match=r"shard 'memory://d/a.tar' lives in this Python process"):
        _require_readable_by_workers(("memory://d/a.tar",), allow_local=True)


def test_local_shards_on_a_multi_node_cluster_need_the_shared_mount_flag(three_nodes):
    with pytest.raises(ConfigError, match=r"shard '/data/a.tar': .*3 alive nodes.*--allow-local-store"):
        _require_readable_by_workers(("/data/a.tar",), allow_local=False)
    _require_readable_by_workers(("/data/a.tar", "s3://b/x.tar", "pipe:cat x.tar"), allow_local=True)


def test_local_shards_on_one_node_are_fine(monkeypatch):
    monkeypatch.setattr(runtime, "cluster_nodes", lambda: ("head",))
    _require_readable_by_workers(("/data/a.tar",), allow_local=False)
