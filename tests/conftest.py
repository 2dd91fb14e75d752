import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

# FaceNet's ONNX conversion (workers/engines/facenet.py) is cached here once for every test, and for
# the processes integration tests start (they pass os.environ on), not again in each temporary home.
os.environ.setdefault("QUORUM_MODELS_DIR", str(REPO / ".quorum" / "models"))


@pytest.fixture(scope="session")
def data_dir() -> Path:
    d = Path(os.environ.get("QUORUM_DATA_DIR", REPO.parent / "shared" / "data"))
    if not (d / "ci" / "split.csv").exists():
        pytest.fail(f"labelled faces not found under {d}; set QUORUM_DATA_DIR to the shared data folder")
    return d
