"""The wheel ships every module the editable install imports (kernels/ as advcal.kernels, the
data package, the tokenizer vocabulary): an editable install hides a package missing from
``setup.py``, a wheel does not."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel_names(tmp_path_factory) -> set[str]:
    out = tmp_path_factory.mktemp("wheel")
    # build from a copy of the sources: a stale build/ folder in the checkout would otherwise
    # slip files into the wheel that setup.py no longer lists
    src = tmp_path_factory.mktemp("src") / "advcal"
    skip = shutil.ignore_patterns("build", "*.egg-info", "*.so", "__pycache__")
    for name in ("advcal", "kernels", "csrc"):
        shutil.copytree(ROOT / name, src / name, ignore=skip)
    for name in ("setup.py", "pyproject.toml", "README.md"):
        if (ROOT / name).is_file():
            shutil.copy(ROOT / name, src / name)
    env = {**os.environ, "ADVCAL_BUILD_EXT": "0"}  # pure-Python wheel: no compile in this test
    cmd = [sys.executable, "-m", "pip", "wheel", "--no-build-isolation", "--no-deps", "-q"]
    proc = subprocess.run(
        [*cmd, "-w", str(out), str(src)], env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    (whl,) = out.glob("advcal-*.whl")
    with zipfile.ZipFile(whl) as z:
        return set(z.namelist())


def test_wheel_holds_every_module(wheel_names):
    expected = {
        f"advcal/{p.relative_to(ROOT / 'advcal').as_posix()}"
        for p in (ROOT / "advcal").rglob("*.py")
    }
    expected |= {f"advcal/kernels/{p.name}" for p in (ROOT / "kernels").glob("*.py")}
    missing = sorted(expected - wheel_names)
    assert not missing, f"setup.py leaves these out of the wheel: {missing}"


def test_wheel_holds_package_data(wheel_names):
    for name in (
        "advcal/py.typed",
        "advcal/backbones/assets/bpe_simple_vocab_16e6.txt.gz",
        "advcal/backbones/assets/LICENSE.clip_bpe_vocab.txt",
        "advcal/data/assets/imagenet_wnids.txt",
        "advcal/data/assets/imagenet_classnames.txt",
        "advcal/data/assets/templates.json",
    ):
        assert name in wheel_names, f"{name} is not in the wheel"
