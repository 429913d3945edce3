"""The layering of the package, as import-linter contracts (pyproject.toml [tool.importlinter]).

The repo's four top-level folders are installed as subpackages of `clipscope` (package-dir mappings);
`clipscope/kernels`, `clipscope/storage`, … are symlinks to them, so the package on disk has the
installed layout and a plain `lint-imports` walks all of it. The contracts are linted in place; a
wrong import is planted in a copy of the package (symlinks followed), never in the repo.
"""

from __future__ import annotations

import os
import pathlib
import shutil
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]


def lint(root: pathlib.Path | None = None) -> subprocess.CompletedProcess:
    """`lint-imports` on the installed package, or on the copy of it under `root`."""
    lint_imports = pathlib.Path(sys.executable).with_name("lint-imports")
    env = dict(os.environ)
    if root is not None:  # run outside the repo, whose root on sys.path would shadow the copy
        env["PYTHONPATH"] = str(root)
    return subprocess.run([str(lint_imports), str(REPO / "pyproject.toml"), "--no-cache"],
                          cwd=root or REPO, env=env, capture_output=True, text=True)


def copy_package(root: pathlib.Path) -> pathlib.Path:
    shutil.copytree(REPO / "clipscope", root / "clipscope",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "assets", "model_configs"))
    return root


def test_import_contracts_hold():
    result = lint()
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout
    # The graph is the whole package, not just the root's three modules.
    analysed = int(result.stdout.split("Analyzed ")[1].split(" files")[0])
    assert analysed > 60


@pytest.mark.parametrize(
    ("module", "line", "contract"),
    [
        ("kernels/bad_import.py", "import clipscope.storage.store\n", "kernels are pure math"),
        ("kernels/bad_import.py", "import zarr\n", "kernels are pure math"),
        ("storage/bad_import.py", "import torch\n", "storage holds no models"),
        ("cluster/bad_import.py", "from clipscope.storage import layout\n", "cluster runs any work"),
        ("pipelines/jobs/bad_import.py", "from clipscope.pipelines.cli import main\n", "nothing imports the CLI"),
        ("pipelines/texts/bad_import.py", "from clipscope.pipelines.worlds.shapes import world\n",
         "nothing imports the CLI or a world"),
        ("pipelines/models/bad_import.py", "from clipscope.pipelines.texts import pools\n", "layered"),
        ("pipelines/jobs/means/bad_import.py", "from clipscope.pipelines.jobs.textspan import job\n",
         "jobs are independent"),
    ],
)
def test_a_wrong_import_breaks_a_contract(tmp_path, module, line, contract):
    root = copy_package(tmp_path)
    (root / "clipscope" / module).write_text(line)
    result = lint(root)
    assert result.returncode != 0
    broken = [row for row in result.stdout.splitlines() if row.endswith("BROKEN")]
    assert any(contract in row for row in broken), result.stdout
