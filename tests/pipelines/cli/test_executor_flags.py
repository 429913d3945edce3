"""--workers / --address: the same flags, with the same help, on every command that does work; bad
values and unreachable clusters are one line naming the flag or the address, exit 2."""

from __future__ import annotations

import socket

import pytest

from clipscope.pipelines.cli import build_parser, main
from clipscope.pipelines.cli._executor_args import ADDRESS_HELP, WORKERS_HELP

WORKING_COMMANDS = ("extract", "textspan", "evaluate", "second-order", "neurons", "demo",
                    "concepts", "cues", "worst-group",  # the applications
                    "roles", "segment")  # CLIP-InterpreT, segmentation
# the arguments each command needs besides the flag under test (a store that does not exist: the flags
# are checked before it is opened)
REQUIRED = {
    "extract": ["/nonexistent/shard.tar", "--out", "/nonexistent/store", "--model", "clipscope-tiny"],
    "textspan": ["/nonexistent/store"],
    "evaluate": ["/nonexistent/store"],
    "second-order": ["/nonexistent/store", "--layer", "1"],
    "neurons": ["/nonexistent/store", "--layer", "1"],
    "demo": ["--out", "/nonexistent/demo"],
    "concepts": ["/nonexistent/store", "--layer", "1"],
    "cues": ["/nonexistent/store", "--true", "star", "--wrong", "heart"],
    "worst-group": ["/nonexistent/store", "--task", "shapes"],
    "roles": ["/nonexistent/store"],
    "segment": ["/nonexistent/store"],
}


def help_of(command: str, capsys) -> str:
    with pytest.raises(SystemExit):
        build_parser().parse_args([command, "--help"])
    return " ".join(capsys.readouterr().out.split())


@pytest.mark.parametrize("command", WORKING_COMMANDS)
def test_help_lists_both_flags_with_the_same_text(command, capsys):
    text = help_of(command, capsys)
    assert "--workers N" in text and "--address ADDRESS" in text
    assert " ".join(WORKERS_HELP.split()) in text and " ".join(ADDRESS_HELP.split()) in text


@pytest.mark.parametrize("command", WORKING_COMMANDS)
@pytest.mark.parametrize("flag, value, message", [
    ("--workers", "0", "--workers must be an integer ≥ 1, got 0"),
    ("--workers", "two", "--workers must be an integer ≥ 1, got two"),
    ("--address", "nonsense", "--address must be auto, HOST:PORT or ray://HOST:10001, got 'nonsense'"),
    ("--address", "http://head:8265", "--address must be auto, HOST:PORT or ray://HOST:10001, got 'http://head:8265'"),
])
def test_bad_values_name_the_flag(command, flag, value, message, capsys, monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert main([command, *REQUIRED[command], flag, value]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err


def unused_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.parametrize("flags, env, message", [
    (["--address", "127.0.0.1:{port}"], None, "cannot reach the Ray cluster at '127.0.0.1:{port}' (connection refused)"),
    (["--address", "ray://127.0.0.1:{port}"], None, "cannot reach the Ray cluster at 'ray://127.0.0.1:{port}'"),
    ([], "127.0.0.1:{port}", "cannot reach the Ray cluster at '127.0.0.1:{port}'"),
    (["--workers", "2"], "not an address", "RAY_ADDRESS must be auto, HOST:PORT or ray://HOST:10001, got 'not an address'"),
])
def test_an_unreachable_or_bad_cluster_is_one_line_naming_it(split_store, tmp_path, capsys, monkeypatch, flags, env,
                                                            message):
    import shutil

    import ray

    port = unused_port()
    if env is None:
        monkeypatch.delenv("RAY_ADDRESS", raising=False)
    else:
        monkeypatch.setenv("RAY_ADDRESS", env.format(port=port))
    store = tmp_path / "store.zarr"
    shutil.copytree(split_store, store)
    assert main(["evaluate", str(store), *[f.format(port=port) for f in flags]]) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("clipscope evaluate: error:")]
    assert len(errors) == 1 and "Traceback" not in err, err
    assert message.format(port=port) in errors[0]
    assert not ray.is_initialized()
