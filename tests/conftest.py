from __future__ import annotations

from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
CENSUS = SHARED_DATA / "census-income" / "census-income.test.gz"

torch.set_num_threads(1)


@pytest.fixture
def census_file() -> Path:
    if not CENSUS.is_file():
        pytest.skip(f"census data not found at {CENSUS} (it lives in ../shared/data next to the repository)")
    return CENSUS


@pytest.fixture
def in_repo(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """Run from the repository root: the recipes name their data relative to it."""
    monkeypatch.chdir(REPO)
    return REPO
