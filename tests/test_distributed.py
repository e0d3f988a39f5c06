"""torchrun with 2 CPU processes (gloo): sharded data, DDP heads, reduced metrics, rank-0 files."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

TOML = """
backbone = "minibind"
modalities = ["image", "audio"]
train_limit = 64
test_limit = 30
[backbone_kwargs]
embed_dim = 32
width = 4
epochs = 1
modalities = ["image", "audio"]
[calib]
epochs = 2
batch_size = 32
attack_steps = 2
[eval]
steps = 2
restarts = 1
sweep_steps = 2
weak_steps = 2
batch_size = 8
"""


@pytest.mark.slow
def test_torchrun_two_processes(tmp_path):
    (tmp_path / "run.toml").write_text(TOML)
    env = {**os.environ, "ADVCAL_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    # build the tiny backbone's cache once, so the two ranks do not both pretrain it
    subprocess.run(
        [
            sys.executable,
            "-c",
            "import advcal; advcal.backbones.load('minibind', "
            "embed_dim=32, width=4, epochs=1, modalities=['image', 'audio'], "
            "progress=False)",
        ],
        env=env,
        check=True,
        timeout=300,
    )
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "advcal.cli",
        "calibrate",
        "--config",
        str(tmp_path / "run.toml"),
        "--out",
        str(tmp_path / "run"),
        "--no-progress",
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rep = json.loads((tmp_path / "run" / "report.json").read_text())
    assert rep["world_size"] == 2
    assert len(rep["history"]) == 2
    # metrics cover the whole test split (30 samples), not one rank's 15
    acc = rep["modalities"]["image"]["clean_top1_before"]
    assert abs(acc * 30 - round(acc * 30)) < 1e-4
    assert proc.stdout.count("| image |") == 1  # only rank 0 prints the table
    assert Path(tmp_path / "run" / "heads.safetensors").is_file()
