"""The `clipscope` command line: bad input gives one clear line on stderr, exit code 2 and no
store; `status`, `query` and `models` read what `extract` wrote."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest
import zarr

from clipscope.pipelines.models.loading import CONFIG_DIR

from extract_helpers import TINY_MODEL, extract_args, run_cli


def one_error_line(capsys, command: str) -> str:
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith(f"clipscope {command}: error: "), lines[0]
    return lines[0]


def store_values(url: str, name: str) -> np.ndarray:
    return np.asarray(zarr.open_group(url, mode="r")[name][...])


# ----------------------------------------------------------------------------------------------
# Bad extract flags

BAD_FLAGS = [
    (["--batch-size", "0"], "--batch-size must be an integer ≥ 1 or 'auto', got 0"),
    (["--rows-per-chunk", "-4"], "--rows-per-chunk must be an integer ≥ 1, got -4"),
    (["--ln-convention", "mean"], "--ln-convention must be split or center, got 'mean'"),
    (["--dtype", "int8"], "--dtype must be one of float16, float32, got 'int8'"),
    (["--second-order-layers", "9"], "layer 9 is out of range; this model has layers 0..3"),
    (["--second-order-layers", "3"], "layer 3 is the last layer"),
    (["--token-layers", "4"], "layer 4 is out of range"),
    (["--heads-layers", "none"], "--heads-layers none would store no direct effects"),
    (["--model", "clipscope-tinny"], "unknown model 'clipscope-tinny'; did you mean clipscope-tiny"),
    (["--pretrained", "/missing.pt"], "checkpoint not found: /missing.pt"),
]


@pytest.mark.parametrize("flags,message", BAD_FLAGS, ids=[" ".join(f) for f, _ in BAD_FLAGS])
def test_bad_extract_flags_give_one_line_and_create_nothing(flags, message, tiny_dataset, tmp_path, capsys,
                                                            fast_models):
    out = tmp_path / "never.zarr"
    assert run_cli(*extract_args(tiny_dataset.pattern, out, *flags)) == 2
    assert message in one_error_line(capsys, "extract")
    assert not out.exists()


def test_a_missing_shard_is_named(tiny_dataset, tmp_path, capsys, fast_models):
    missing = tmp_path / "nowhere" / "shard-000.tar"
    out = tmp_path / "never.zarr"
    assert run_cli(*extract_args([tiny_dataset.paths[0], str(missing)], out)) == 2
    assert f"shard file not found: {missing}" in one_error_line(capsys, "extract")
    assert not out.exists()


def test_the_installed_entry_point_reports_errors_the_same_way(tmp_path):
    out = tmp_path / "never.zarr"
    result = subprocess.run([sys.executable, "-m", "clipscope.pipelines.cli", "extract", "x.tar", "--out", str(out),
                             "--model", TINY_MODEL, "--batch-size", "0"], capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.strip() == "clipscope extract: error: --batch-size must be an integer ≥ 1 or 'auto', got 0"
    assert not out.exists()


# ----------------------------------------------------------------------------------------------
# status


def test_status_of_a_missing_store_exits_2(tmp_path, capsys):
    assert run_cli("status", tmp_path / "absent.zarr") == 2
    assert "no run store at" in one_error_line(capsys, "status")


def test_status_reports_shards_rows_and_arrays(split_store, capsys):
    assert run_cli("status", split_store) == 0
    text = capsys.readouterr().out
    assert "rows       24 (4 per chunk): 17 valid, 7 invalid or padding" in text
    assert "samples    18 indexed, 1 with errors" in text
    assert "extract  3/3" in text and "direct/heads" in text and "second_order/layer_1/weights" in text
    assert run_cli("status", split_store, "--json") == 0
    status = json.loads(capsys.readouterr().out)
    assert status["stages"]["extract"]["done"] == 3 and status["stages"]["extract"]["pending"] == []
    assert status["valid_rows"] == 17 and status["samples"] == 18 and status["lock"] is None
    assert status["arrays"]["direct/heads"]["dims"] == ["sample", "layer", "head", "embed"]


# ----------------------------------------------------------------------------------------------
# query


def test_query_of_an_unknown_key_names_it(split_store, capsys):
    assert run_cli("query", split_store, "image", "no-such-key") == 2
    assert "'no-such-key'" in one_error_line(capsys, "query")


def test_query_image_by_key_and_by_row(split_store, capsys, fast_models):
    embedding = store_values(split_store, "image_embedding")
    for sample, row in (("s0-001", 1), ("9", 9)):
        assert run_cli("query", split_store, "image", sample, "--top", "5") == 0
        lines = capsys.readouterr().out.splitlines()
        norm = float(np.linalg.norm(embedding[row].astype(np.float64)))
        assert lines[0] == (f"sample {sample}: ‖embedding‖ = {norm:.4f}; components along it sum to {norm:.4f}")
        assert lines[1].split() == ["component", "layer", "head", "along_embedding", "norm"]
        assert len(lines) == 3 + 5
    assert run_cli("query", split_store, "image", "s1-002") == 2  # the corrupt sample has no values
    assert "valid=False" in one_error_line(capsys, "query")


def test_query_image_prefers_an_all_digit_key_over_a_row_number(tmp_path, capsys):
    from clipscope.storage.layout import ArraySpec
    from clipscope.storage.store import RunStore

    # img2dataset names samples 000010, 000011, …: "000012" is a key (row 2), "5" is a row number.
    dims = {"image_embedding": ("sample", "embed"), "direct/embedding": ("sample", "embed"),
            "direct/bias": ("sample", "embed"), "direct/mlps": ("sample", "layer", "embed"),
            "direct/heads": ("sample", "layer", "head", "embed")}
    tails = {"image_embedding": (4,), "direct/embedding": (4,), "direct/bias": (4,), "direct/mlps": (1, 4),
             "direct/heads": (1, 2, 4)}
    url = str(tmp_path / "digits.zarr")
    store = RunStore.create(url, arrays=[ArraySpec(n, dims[n], tails[n], "float32") for n in dims], n_rows=8,
                            rows_per_chunk=4, attrs={"layers": {"heads": [0]}})
    rng = np.random.default_rng(0)
    parts = {n: rng.standard_normal((8, *tails[n])).astype(np.float32) for n in dims if n != "image_embedding"}
    parts["image_embedding"] = (parts["direct/embedding"] + parts["direct/bias"] + parts["direct/mlps"].sum(1)
                                + parts["direct/heads"].sum((1, 2)))
    store.write_rows(0, parts, np.ones(8, bool))
    store.write_samples_part(0, [{"row": r, "key": f"{r + 10:06d}", "shard": "digits.tar"} for r in range(8)])
    store.merge_samples()
    for sample, row in (("000012", 2), ("5", 5)):
        assert run_cli("query", url, "image", sample) == 0
        norm = float(np.linalg.norm(parts["image_embedding"][row].astype(np.float64)))
        assert capsys.readouterr().out.startswith(f"sample {sample}: ‖embedding‖ = {norm:.4f};")


def test_query_text_and_neuron_print_top_k_tables(split_store, capsys, fast_models):
    assert run_cli("query", split_store, "text", "--layer", "3", "--head", "1", "--text", "a red circle",
                   "-k", "4") == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["row", "key", "shard", "shard_index", "label", "caption", "error", "group", "score"]
    assert len(lines) == 2 + 4
    scores = [float(line.split()[-1]) for line in lines[2:]]
    assert scores == sorted(scores, reverse=True)
    assert run_cli("query", split_store, "neuron", "--layer", "1", "--neuron", "5", "-k", "3") == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[-1] == "norm" and len(lines) == 2 + 3
    assert run_cli("query", split_store, "text", "--layer", "7", "--head", "1", "--text", "x") == 2
    assert "--layer 7 is not stored" in one_error_line(capsys, "query")
    assert run_cli("query", split_store, "neuron", "--layer", "2", "--neuron", "5") == 2
    assert "--layer 2 has no second-order data" in one_error_line(capsys, "query")


def test_query_export_to_parquet_and_npy(split_store, tmp_path, capsys):
    dest = tmp_path / "out.parquet"
    assert run_cli("query", split_store, "export", "--keys", "s2-003", "s0-001", "--rows", "8",
                   "--arrays", "image_embedding", "direct/heads", "--to", dest) == 0
    assert "exported 3 rows of image_embedding, direct/heads" in capsys.readouterr().out
    table = pq.read_table(dest)
    assert table["row"].to_pylist() == [8, 19, 1]  # --rows first, then --keys in their order
    assert table["key"].to_pylist() == ["s1-000", "s2-003", "s0-001"]
    heads = table["direct/heads"].combine_chunks().to_numpy_ndarray()
    np.testing.assert_array_equal(heads, store_values(split_store, "direct/heads")[[8, 19, 1]])
    embedding = table["image_embedding"].combine_chunks().to_numpy_ndarray()
    np.testing.assert_array_equal(embedding, store_values(split_store, "image_embedding")[[8, 19, 1]])

    folder = tmp_path / "npy"
    assert run_cli("query", split_store, "export", "--rows", "2", "3", "--arrays", "direct/mlps",
                   "--to", folder) == 0
    np.testing.assert_array_equal(np.load(folder / "direct__mlps.npy"), store_values(split_store, "direct/mlps")[[2, 3]])
    np.testing.assert_array_equal(np.load(folder / "rows.npy"), [2, 3])
    capsys.readouterr()
    assert run_cli("query", split_store, "export", "--arrays", "image_embedding", "--to", tmp_path / "x.parquet") == 2
    assert "export needs --rows or --keys" in one_error_line(capsys, "query")
    assert not os.path.exists(tmp_path / "x.parquet")


# ----------------------------------------------------------------------------------------------
# models


def test_models_tiny_lists_the_tiny_configs(capsys):
    assert run_cli("models", "--tiny") == 0
    listed = capsys.readouterr().out.split()
    assert listed == sorted(p.stem for p in CONFIG_DIR.glob("*.json"))
    assert TINY_MODEL in listed and "clipscope-tiny-ls" in listed and "clipscope-tiny-quickgelu" in listed
