"""The layering of the package, as import-linter contracts (pyproject.toml [tool.importlinter]).

The repo's four top-level folders are installed as subpackages of `clipscope` through package-dir
mappings, which import-linter cannot walk where they lie; the test stages the package as it is
installed (clipscope/ with kernels/, storage/, cluster/, pipelines/ inside) and lints that copy.
"""

from __future__ import annotations

import os
import pathlib
import shutil
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
FOLDERS = ("kernels", "storage", "cluster", "pipelines")


def stage_package(root: pathlib.Path) -> pathlib.Path:
    """Copy the Python sources into root/clipscope/… as the installed package is laid out."""
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "assets", "model_configs")
    package = root / "clipscope"
    shutil.copytree(REPO / "clipscope", package, ignore=ignore)
    for folder in FOLDERS:
        shutil.copytree(REPO / folder, package / folder, ignore=ignore)
    return root


def lint(root: pathlib.Path) -> subprocess.CompletedProcess:
    lint_imports = pathlib.Path(sys.executable).with_name("lint-imports")
    # Run outside the repo: its root on sys.path would shadow the staged package.
    env = {**os.environ, "PYTHONPATH": str(root)}
    return subprocess.run([str(lint_imports), str(REPO / "pyproject.toml"), "--no-cache"], cwd=root,
                          env=env, capture_output=True, text=True)


def test_import_contracts_hold(tmp_path):
    result = lint(stage_package(tmp_path))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout
    # The staged graph is the whole package, not just the root's three modules.
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
    root = stage_package(tmp_path)
    (root / "clipscope" / module).write_text(line)
    result = lint(root)
    assert result.returncode != 0
    broken = [row for row in result.stdout.splitlines() if row.endswith("BROKEN")]
    assert any(contract in row for row in broken), result.stdout
