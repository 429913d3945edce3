"""`clipscope shapes …`: options reach the generator and the trainer in the order typed."""

import json

import pytest

from clipscope.pipelines import cli
def test_generate_passes_its_options_through(tmp_path, capsys):
    out = tmp_path / "world"
    assert cli.main(["shapes", "generate", str(out), "--shards", "2", "--per-shard", "3", "--seed", "4"]) == 0
    world = json.loads((out / "world.json").read_text())
    assert (world["n_shards"], world["per_shard"], world["seed"]) == (2, 3, 4)
    assert sorted(p.name for p in out.glob("*.tar")) == ["shapes-00000.tar", "shapes-00001.tar"]


def test_bad_options_exit_2(tmp_path, capsys):
    assert cli.main(["shapes", "train", "--steps", "0"]) == 2
    assert "steps must be an integer ≥ 1, got 0" in capsys.readouterr().err
    assert cli.main(["shapes", "evaluate", "--n", "5"]) == 2
    assert "--n must be an integer ≥ 10, got 5" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        cli.main(["status", str(tmp_path), "--bogus"])
    assert exc.value.code == 2
    assert "unrecognized arguments: --bogus" in capsys.readouterr().err
