"""kill -9 at any point, then ``--resume``: the heads are bitwise those of an uninterrupted run
and no temp file or lock is left; two runs on one folder: the second is refused at once and
the first finishes intact.

Every run is a real ``advcal calibrate`` process on the tiny minibind config (the reference
too: one thread everywhere, so the arithmetic is the same). Deterministic kill points patch
``os.replace`` / ``torch.save`` inside the process to SIGKILL it just before or just after a
file is committed, or halfway through writing one; random ones kill it after a seeded delay.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import runkit

from advcal import runfolder

pytestmark = pytest.mark.slow  # ~17 processes of a few seconds each

# SIGKILL the process at the n-th commit of a file: "before" the rename (the temp file is
# complete and fsynced), "after" it, or "mid" (half the bytes of a torch.save written)
KILLER = r"""
import io, os, signal, sys
name, nth, when = sys.argv[1], int(sys.argv[2]), sys.argv[3]
seen = {"n": 0}
real_replace = os.replace

def die():
    os.kill(os.getpid(), signal.SIGKILL)

def replace(src, dst, *a, **k):
    if os.path.basename(str(dst)) == name:
        seen["n"] += 1
        if seen["n"] == nth and when == "before":
            die()
        real_replace(src, dst, *a, **k)
        if seen["n"] == nth and when == "after":
            die()
        return None
    return real_replace(src, dst, *a, **k)

os.replace = replace
if when == "mid":
    import torch
    real_save = torch.save

    def save(obj, f, *a, **k):
        buf = io.BytesIO()
        real_save(obj, buf, *a, **k)
        seen["n"] += 1
        if seen["n"] == nth:
            with open(f, "wb") as out:
                out.write(buf.getvalue()[: len(buf.getvalue()) // 2])
                out.flush()
            die()
        with open(f, "wb") as out:
            out.write(buf.getvalue())

    torch.save = save
from advcal.cli import main
sys.exit(main(sys.argv[4:]))
"""

# One chain of kills on one folder: each process is a --resume of the one killed before it
# (the first is a fresh start) and is itself killed at the next point; a last --resume
# finishes. Every kill point is thus followed by a resume, at the cost of one process each.
CHAIN = [  # (file, its n-th commit in that process, when)
    ("config.json", 1, "after"),  # before any result exists
    ("eval_before.json", 1, "before"),
    ("eval_before.json", 1, "after"),
    ("checkpoint.pt", 1, "mid"),  # epoch 1's checkpoint half written
    ("checkpoint.pt", 1, "before"),  # epoch 1's, complete but not committed
    ("checkpoint.pt", 1, "after"),  # epoch 1's committed
    ("checkpoint.pt", 1, "before"),  # the resumed process's first: epoch 2's
    ("checkpoint.pt", 1, "mid"),  # epoch 2's half written
    ("heads.safetensors", 1, "before"),
    ("report.json", 1, "before"),
]
RANDOM_KILLS = 3


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("crash")
    cfg = runkit.write_config(root / "tiny.json")
    env = runkit.env(runkit.cache(tmp_path_factory))
    ref = root / "reference"
    _calibrate(cfg, root / "warm", env)  # builds the minibind cache (pretraining: not timed)
    t0 = time.perf_counter()
    _calibrate(cfg, ref, env)
    return root, cfg, env, ref, time.perf_counter() - t0


def _argv(cfg, out, resume=False):
    return ["calibrate", "--config", str(cfg), "--out", str(out), "--quiet"] + (
        ["--resume"] if resume else []
    )


def _calibrate(cfg, out, env, resume=False) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, "-m", "advcal.cli", *_argv(cfg, out, resume)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _leftovers(folder) -> list[str]:
    return sorted(
        p.name
        for p in folder.iterdir()
        if p.name.endswith(runfolder.TMP_SUFFIX) or p.name == runfolder.LOCK_NAME
    )


def _check_finished(cfg, env, ref, out) -> subprocess.CompletedProcess:
    proc = _calibrate(cfg, out, env, resume=True)
    runkit.assert_same_heads(ref / "heads.safetensors", out / "heads.safetensors")
    assert _leftovers(out) == [], _leftovers(out)
    rep = json.loads((out / "report.json").read_text())
    assert len(rep["history"]) == runkit.TINY["calib"]["epochs"]
    before, want = (json.loads((f / "eval_before.json").read_text()) for f in (out, ref))
    assert runkit.without_timings(before) == runkit.without_timings(want)
    return proc


def test_kill_at_every_commit_then_resume_is_bitwise_identical(setup):
    root, cfg, env, ref, _ = setup
    out = root / "chain"
    for step, (name, nth, when) in enumerate(CHAIN):
        proc = subprocess.run(
            [sys.executable, "-c", KILLER, name, str(nth), when, *_argv(cfg, out, step > 0)],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        where = f"step {step}: kill at {name} #{nth} {when}"
        assert proc.returncode == -signal.SIGKILL, (where, proc.returncode, proc.stderr[-2000:])
        assert (out / runfolder.LOCK_NAME).exists(), where  # killed holding it: now stale
        if step > 0:  # it started over a killed run: took its lock over and said so
            assert "took over the stale lock" in proc.stderr, (where, proc.stderr[-2000:])
    resumed = _check_finished(cfg, env, ref, out)
    assert "took over the stale lock" in resumed.stderr


def test_kill_at_random_times_then_resume_is_bitwise_identical(setup):
    root, cfg, env, ref, seconds = setup
    rng = random.Random(12)
    out = root / "random"
    for i in range(RANDOM_KILLS):
        proc = subprocess.Popen(
            [sys.executable, "-m", "advcal.cli", *_argv(cfg, out, resume=i > 0)],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        time.sleep(rng.uniform(0.35, 0.9) * seconds)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    _check_finished(cfg, env, ref, out)


def test_second_run_on_one_folder_is_refused_and_the_first_finishes(setup):
    root, cfg, env, ref, _ = setup
    out = root / "shared"
    first = subprocess.Popen(
        [sys.executable, "-m", "advcal.cli", *_argv(cfg, out)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 120
    while not (out / runfolder.LOCK_NAME).exists():
        assert first.poll() is None and time.monotonic() < deadline, "first run never locked"
        time.sleep(0.05)
    t0 = time.perf_counter()
    second = subprocess.run(
        [sys.executable, "-m", "advcal.cli", *_argv(cfg, out, resume=True)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    refused_after = time.perf_counter() - t0
    assert second.returncode == 2, second.stderr
    lines = second.stderr.strip().splitlines()
    assert len(lines) == 1 and f"is in use by another advcal run: pid {first.pid}" in lines[0]
    assert refused_after < 30  # interpreter start + import; no loading, no waiting
    _, err = first.communicate(timeout=300)
    assert first.returncode == 0, err[-3000:]
    runkit.assert_same_heads(ref / "heads.safetensors", out / "heads.safetensors")
    assert _leftovers(out) == []
    assert json.loads((out / "report.json").read_text())["provenance"]["world_size"] == 1


def test_files_of_a_run_share_one_mode(setup):
    _, _, _, ref, _ = setup
    modes = {p.name: os.stat(p).st_mode & 0o777 for p in ref.iterdir() if p.is_file()}
    assert len(set(modes.values())) == 1, modes
