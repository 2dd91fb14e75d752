import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def data_dir() -> Path:
    d = Path(os.environ.get("QUORUM_DATA_DIR", REPO.parent / "shared" / "data"))
    if not (d / "ci" / "split.csv").exists():
        pytest.fail(f"labelled faces not found under {d}; set QUORUM_DATA_DIR to the shared data folder")
    return d
