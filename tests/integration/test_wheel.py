"""A wheel built from the project installs one name, ``quorum``, with its data files, and nothing generic
(``core``, ``cli``, ``workers``, ``schemas``...) that would shadow another distribution in site-packages."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel, built from a copy of the tree's files (setuptools builds in the source folder)."""
    src, out = tmp_path_factory.mktemp("src"), tmp_path_factory.mktemp("wheel")
    listed = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO, check=True, capture_output=True, text=True
    ).stdout.split()
    for rel in listed:
        if (REPO / rel).is_file():
            (src / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / rel, src / rel)
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(out), str(src)],
        check=True,
        timeout=600,
        capture_output=True,
    )
    (whl,) = out.glob("quorum-*.whl")
    return whl


def test_the_wheel_holds_only_the_quorum_package_and_its_data(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    assert {n.split("/")[0] for n in names} == {"quorum", "quorum-0.1.0.dist-info"}
    packages = {n.split("/")[1] for n in names if n.startswith("quorum/") and n.count("/") > 1}
    assert packages == {
        "schemas",
        "core",
        "broker",
        "accountability",
        "workers",
        "gallery",
        "evaluation",
        "review",
        "cli",
    }
    for data in (
        "quorum/workers/calibration.json",
        "quorum/review/bands.json",
        "quorum/review/templates/sheet.html.j2",
        "quorum/schemas/json/result.schema.json",
        "quorum/accountability/migrations/script.py.mako",
        "quorum/accountability/migrations/versions/0001_accountability.py",
        "quorum/workers/stages/fusion.py",
        "quorum/workers/conversion/tf_to_onnx.py",
    ):
        assert data in names, data
    assert not [n for n in names if "/tests/" in n or "/bench/" in n or n.startswith("quorum/.")]
    entry = zipfile.ZipFile(wheel).read("quorum-0.1.0.dist-info/entry_points.txt").decode()
    assert "quorum = quorum.cli.main:main" in entry


def test_installed_from_the_wheel_it_imports_and_runs_from_anywhere(wheel: Path, tmp_path: Path) -> None:
    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), str(wheel)],
        check=True,
        timeout=300,
        capture_output=True,
    )
    assert sorted(p.name for p in target.iterdir() if not p.name.endswith(".dist-info")) == ["bin", "quorum"]
    probe = (
        "import quorum.workers.stages, quorum.review.render, quorum.schemas, quorum.cli.main as m; "
        "print(quorum.workers.stages.__file__); "
        "from quorum.review.render import environment; environment().get_template('sheet.html.j2')"
    )
    env = {**os.environ, "PYTHONPATH": str(target)}
    run = subprocess.run(
        [sys.executable, "-c", probe], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip().startswith(str(target / "quorum" / "workers" / "stages"))
    cli = subprocess.run(
        [sys.executable, "-m", "quorum.cli", "--help"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert cli.returncode == 0 and "Usage: " in cli.stdout, cli.stderr
