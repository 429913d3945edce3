"""Every reduction command on a two-node Ray cluster started on this machine (ray.cluster_utils.Cluster)
writes the same bytes as the in-process run, one of them also through `ray job submit`; and an embedded
Ray (`--workers N`) never attaches to a cluster that is already running here (slow).

One cluster serves the whole module: a head (1 CPU, dashboard for the job API) and a worker node
(1 CPU), token authentication on with a token only this module's processes hold (as in
test_job_submit.py). The driver computes with one torch thread (`one_thread`) and OMP_NUM_THREADS=1 is
in the cluster's environment, so driver-side work (text embeddings) gives the same floats everywhere.
"""

from __future__ import annotations

import logging
import os
import secrets
import shutil
import socket
import sys
import time
from pathlib import Path

import pytest

from clipscope.cluster import runtime
from clipscope.cluster.executor import open_executor
from clipscope.cluster.runtime import cluster_nodes
from clipscope.pipelines.cli import main as cli_main
from clipscope.pipelines.worlds.shapes.world import write_world

from test_extract_on_ray import arrays_of
from test_job_submit import JOB_TIMEOUT_S, TERMINAL_STATES, job_status, ray_cli

pytestmark = pytest.mark.slow

MODEL = "clipscope-tiny"
LAYER = "1"
# command -> its arguments after STORE (a run on the cluster adds --address)
COMMANDS = {
    "textspan": ["--layers", "2", "3", "--pool", "shapes-all", "-m", "4", "--curve", "--curve-sizes", "2", "4",
                 "--task", "shapes"],
    "evaluate": ["--task", "shapes", "--keep-last", "2"],
    "second-order": ["--layer", LAYER, "--top-k", "5", "--task", "shapes"],
    "neurons": ["--layer", LAYER, "--m", "4", "--task", "shapes"],
}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def cluster_env():
    """The module's environment: a fresh token, one thread per process, no RAY_ADDRESS."""
    with pytest.MonkeyPatch.context() as patch:
        for name in ("RAY_ADDRESS", "RAY_AUTH_TOKEN_PATH"):
            patch.delenv(name, raising=False)
        patch.setenv("RAY_AUTH_MODE", "token")
        patch.setenv("RAY_AUTH_TOKEN", secrets.token_hex(32))
        patch.setenv("OMP_NUM_THREADS", "1")
        patch.setenv("MKL_NUM_THREADS", "1")
        patch.setenv("PATH", f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
        runtime._reset_token_cache()
        try:
            yield dict(os.environ)
        finally:
            patch.undo()
            runtime._reset_token_cache()


@pytest.fixture(scope="module")
def two_nodes(cluster_env):
    """(cluster, job API URL): a head and a worker node of 1 CPU each, on this machine."""
    import ray
    from ray.cluster_utils import Cluster

    assert not ray.is_initialized()
    dashboard_port = free_port()
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 1, "include_dashboard": True, "dashboard_host": "127.0.0.1", "dashboard_port": dashboard_port})
    try:
        cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        yield cluster, f"http://127.0.0.1:{dashboard_port}"
    finally:
        cluster.shutdown()


@pytest.fixture(scope="module")
def extracted(tmp_path_factory, cluster_env, one_thread) -> str:
    """Labelled shapes-world shards extracted in-process with the tiny model (second-order layer 1)."""
    folder = tmp_path_factory.mktemp("cluster-world")
    write_world(folder, 2, 12, seed=3)
    out = str(folder / "store.zarr")
    code = cli_main(["extract", str(folder / "shapes-{00000..00001}.tar"), "--out", out, "--model", MODEL,
                     "--pretrained", "none", "--second-order-layers", LAYER, "--rows-per-chunk", "4",
                     "--batch-size", "8", "--device", "cpu"])
    assert code == 0
    return out


def copy_of(store: str, folder: Path, name: str) -> str:
    target = folder / name
    shutil.copytree(store, target)
    return str(target)


def assert_same_arrays(url: str, reference: str, prefixes: tuple[str, ...]) -> list[str]:
    """Same array names, dtypes, shapes and bytes; returns the names under `prefixes` (the results)."""
    got, want = arrays_of(url), arrays_of(reference)
    assert sorted(got) == sorted(want)
    for name, expected in want.items():
        assert got[name].dtype == expected.dtype and got[name].shape == expected.shape, name
        assert got[name].tobytes() == expected.tobytes(), f"{name} differs from the in-process run"
    return [name for name in want if name.startswith(prefixes)]


def test_every_reduction_on_two_nodes_writes_the_in_process_bytes(two_nodes, extracted, tmp_path, caplog):
    cluster, _ = two_nodes
    assert len(cluster.list_all_nodes()) == 2
    local, remote = copy_of(extracted, tmp_path, "local.zarr"), copy_of(extracted, tmp_path, "cluster.zarr")
    caplog.set_level(logging.INFO, logger="clipscope")
    for command, args in COMMANDS.items():
        plot = ["--plot", str(tmp_path / f"{command}.png")] if command == "textspan" else []
        assert cli_main([command, local, *args, *plot]) == 0, command
        caplog.clear()
        assert cli_main([command, remote, *args, *plot, "--address", cluster.address]) == 0, command
        joined = [r.getMessage() for r in caplog.records if r.getMessage().startswith("running on the Ray cluster")]
        assert joined and "2 nodes, 2 CPUs" in joined[0], (command, joined)
        results = assert_same_arrays(remote, local, ("reductions/", "text_embeddings/"))
        assert results, command
    kinds = {name.split("/")[1] for name in results if name.startswith("reductions/")}
    assert {"textspan", "evaluation", "second_order", "omp", "means"} <= kinds


def test_an_embedded_ray_never_attaches_to_a_running_cluster(two_nodes):
    """Cluster() wrote /tmp/ray/ray_current_cluster, where a bare ray.init() looks for a cluster to join (and
    then refuses num_cpus); `--workers 1` must start its own Ray."""
    import ray

    cluster, _ = two_nodes
    theirs = {node.node_id for node in cluster.list_all_nodes()}
    assert not ray.is_initialized()
    with open_executor(1, object_store_memory=100 * 1024 * 1024, progress="off") as executor:
        assert executor.runtime.mode == "embedded"
        nodes = cluster_nodes()
        assert len(nodes) == 1 and nodes[0].num_cpus == 1 and nodes[0].node_id not in theirs
    assert not ray.is_initialized()


def test_a_reduction_submitted_as_a_ray_job_writes_the_in_process_bytes(two_nodes, extracted, cluster_env,
                                                                       tmp_path):
    _, jobs = two_nodes
    local, remote = copy_of(extracted, tmp_path, "local.zarr"), copy_of(extracted, tmp_path, "job.zarr")
    args = COMMANDS["evaluate"]
    assert cli_main(["evaluate", local, *args]) == 0
    job_id = f"clipscope-evaluate-{secrets.token_hex(4)}"
    submitted = ray_cli(cluster_env, "job", "submit", "--address", jobs, "--submission-id", job_id, "--no-wait",
                        "--", sys.executable, "-m", "clipscope.pipelines.cli", "evaluate", remote, *args)
    assert submitted.returncode == 0, submitted.stderr[-3000:]
    deadline, status = time.monotonic() + JOB_TIMEOUT_S, None
    while time.monotonic() < deadline:
        status = job_status(cluster_env, jobs, job_id)
        if status in TERMINAL_STATES:
            break
        time.sleep(2)
    logs = ray_cli(cluster_env, "job", "logs", "--address", jobs, job_id).stdout
    assert status == "SUCCEEDED", f"job {job_id} ended {status}:\n{logs[-3000:]}"
    # The job's CLI joined the cluster through the RAY_ADDRESS the job supervisor set.
    assert "running on the Ray cluster" in logs and "2 nodes, 2 CPUs" in logs, logs[-3000:]
    assert assert_same_arrays(remote, local, ("reductions/evaluation/",))
