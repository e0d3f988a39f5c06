"""Shared fixtures. Tests run on CPU; GPU tests skip with a reason."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).parent))  # `import tolerances`

torch.set_num_threads(min(2, os.cpu_count() or 1))


def fixtures_dir() -> Path | None:
    """``$ADVCAL_FIXTURES`` when set, else ``../shared/fixtures`` beside the repo, else None."""
    env = os.environ.get("ADVCAL_FIXTURES")
    path = Path(env) if env else ROOT.parent / "shared" / "fixtures"
    return path if path.is_dir() else None


requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
