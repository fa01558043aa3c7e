"""Shared test settings: one torch thread (two processes with two threads each on two cores run several times
slower), offline Hugging Face, and the tests directory importable for helper modules."""

from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).parent))

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "nli"


@pytest.fixture(scope="session")
def nli_data_dir() -> Path:
    """The real NLI splits in ../shared/data/nli (skips when this checkout has none)."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"{SHARED_DATA} not present")
    return SHARED_DATA
