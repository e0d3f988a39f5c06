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
    """``$ADVCAL_FIXTURES`` when set (another fixture set, e.g. a hidden set B), else the
    repository's own ``tests/fixtures`` (set A, copied from ``../shared/fixtures``: a clean
    clone runs every Bind parity test), else ``../shared/fixtures`` beside the repo."""
    env = os.environ.get("ADVCAL_FIXTURES")
    if env:
        return Path(env) if Path(env).is_dir() else None
    for path in (Path(__file__).parent / "fixtures", ROOT.parent / "shared" / "fixtures"):
        if any(path.glob("*_tiny_*.safetensors")):
            return path
    return None


def fixture_stems(family: str) -> list[Path]:
    """Every parity set of ``family`` in the fixture folder: ``<family>_tiny_<set>`` with its
    ``.safetensors`` and ``.json`` sidecar (set A here; hidden set B has other tiny sizes), so
    no test assumes one set's name or sizes. Empty when the folder is absent."""
    folder = fixtures_dir()
    if folder is None:
        return []
    found = folder.glob(f"{family}_tiny_*.safetensors")
    return sorted(p.with_suffix("") for p in found if p.with_suffix(".json").is_file())


def parity_params(family: str) -> dict:
    """``@pytest.fixture(scope="module", **parity_params(family))``: one run per parity set
    (a single skipped run when there is none)."""
    return {"params": fixture_stems(family) or [None], "ids": lambda p: p.name if p else "absent"}


def load_parity_set(stem: Path | None, family: str) -> tuple[dict, dict[str, torch.Tensor]]:
    """(sidecar json, every tensor of the set); skips with the reason when there is none."""
    import json

    from safetensors.torch import load_file

    if stem is None:
        pytest.skip(f"no {family}_tiny_* parity fixture ($ADVCAL_FIXTURES or tests/fixtures)")
    meta = json.loads(stem.with_suffix(".json").read_text())
    return meta, load_file(str(stem.with_suffix(".safetensors")))


requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


class Toy:
    """A tiny frozen two-modality world for fast method tests: a learnable-looking but fixed
    encoder per modality and well-separated classes."""

    K, D, N = 4, 16, 96

    @staticmethod
    def build(seed: int = 0):
        from torch import nn

        from advcal import backbones
        from advcal.data import MultiModalDataset
        from advcal.specs import InputSpec

        g = torch.Generator().manual_seed(seed)
        y = torch.arange(Toy.N) % Toy.K
        protos = torch.randn(Toy.K, 3, 4, 4, generator=g)
        img = torch.sigmoid(
            2 * protos[y].repeat_interleave(2, -1).repeat_interleave(2, -2)
            + 0.3 * torch.randn(Toy.N, 3, 8, 8, generator=g)
        )
        vec = torch.tanh(protos[y].flatten(1)[:, :12] + 0.3 * torch.randn(Toy.N, 12, generator=g))
        torch.manual_seed(seed)
        enc = {
            "img": nn.Sequential(
                nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 64, Toy.D)
            ),
            "vec": nn.Sequential(nn.Linear(12, 32), nn.Tanh(), nn.Linear(32, Toy.D)),
        }
        specs = {
            "img": InputSpec((3, 8, 8), 0.0, 1.0, 8 / 255),
            "vec": InputSpec((12,), -1.0, 1.0, 0.1, "l2", "values"),
        }
        bb = backbones.wrap(enc, specs, embed_dim=Toy.D)
        with torch.no_grad():  # centers = class means of the clean embeddings: a usable model
            c = torch.stack([bb.encode("img", img[y == k]).mean(0) for k in range(Toy.K)])
        centers = torch.nn.functional.normalize(c, dim=-1)
        ds = MultiModalDataset({"img": img, "vec": vec}, y, ("a", "b", "c", "d"), name="toy")
        return bb, centers, ds


@pytest.fixture
def toy():
    return Toy.build()
