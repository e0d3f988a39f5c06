"""torchrun with 2 CPU processes (gloo): sharded data, DDP heads, reduced metrics, rank-0 files;
a stalled (SIGSTOPped) rank ends every rank with a clear error within the test's timeout; the
autograd-aware all-gather's gradient against one process; LOCAL_RANK -> cuda:N; the
watchdog backstop."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import runkit
import torch

from advcal import distributed
from advcal.errors import DistributedError, UserError

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]


def _config(tmp_path, **calib) -> Path:
    cfg = {**runkit.TINY, "train_limit": 64, "test_limit": 30}
    cfg["calib"] = {**cfg["calib"], "batch_size": 32, **calib}
    return runkit.write_config(tmp_path / "run.json", cfg)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    cache = runkit.cache(tmp_path_factory)
    env = runkit.env(cache)
    # build the tiny backbone's cache once, so the two ranks do not both pretrain it
    kw = runkit.TINY["backbone_kwargs"]
    subprocess.run(
        [
            sys.executable,
            "-c",
            f"import advcal; advcal.backbones.load('minibind', **{kw!r}, progress=False)",
        ],
        env=env,
        check=True,
        timeout=300,
    )
    return env


@pytest.mark.slow
def test_torchrun_two_processes(tmp_path, env):
    cmd = [
        *TORCHRUN,
        "-m",
        "advcal.cli",
        "calibrate",
        "--config",
        str(_config(tmp_path)),
        "--out",
        str(tmp_path / "run"),
        "--quiet",
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rep = json.loads((tmp_path / "run" / "report.json").read_text())
    assert rep["world_size"] == 2 and rep["provenance"]["world_size"] == 2
    assert len(rep["history"]) == runkit.TINY["calib"]["epochs"]
    # metrics cover the whole test split (30 samples), not one rank's 15
    acc = rep["modalities"]["image"]["clean_top1_before"]
    assert abs(acc * 30 - round(acc * 30)) < 1e-4
    assert proc.stdout.count("| image |") == 1  # only rank 0 prints the table
    assert (tmp_path / "run" / "heads.safetensors").is_file()
    assert not (tmp_path / "run" / ".advcal.lock").exists()


@pytest.mark.slow
def test_two_ranks_equal_one_process(tmp_path, env):
    """The same global batches and seed: heads of 2 ranks equal one process's within 1e-5,
    and every evaluation number is identical (each rank attacks its shard with per-sample
    keyed randomness; InfoNCE contrasts the global batch; losses are global-batch means)."""
    from safetensors.torch import load_file

    config = {**runkit.TINY, "train_limit": 60, "test_limit": 30}
    config["calib"] = {**config["calib"], "batch_size": 20, "epochs": 2}
    config["eval"] = {
        "suite": ["apgd-ce:3", "apgd-t:3", "square:30"],
        "compare": [],
        "sweep": [0.5, 1.0],
        "sweep_suite": ["apgd-ce:2"],
        "weak": ["pgd:2"],
        "retrieval_steps": 2,
        "batch_size": 8,
    }
    cfg = runkit.write_config(tmp_path / "run.json", config)
    one = [sys.executable, "-m", "advcal.cli", "calibrate", "--config", str(cfg), "--quiet"]
    two = [*TORCHRUN, "-m", "advcal.cli", "calibrate", "--config", str(cfg), "--quiet"]
    for name, cmd in (("one", one), ("two", two)):
        proc = subprocess.run(
            [*cmd, "--out", str(tmp_path / name)], env=env, capture_output=True, text=True,
            timeout=900,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    h1 = load_file(str(tmp_path / "one" / "heads.safetensors"))
    h2 = load_file(str(tmp_path / "two" / "heads.safetensors"))
    assert h1.keys() == h2.keys()
    moved = max(float(v.abs().max()) for v in h1.values())
    assert moved > 1e-3, "the heads trained (the comparison would be empty otherwise)"
    for k in h1:
        torch.testing.assert_close(h2[k], h1[k], rtol=0, atol=1e-5, msg=k)
    r1, r2 = (json.loads((tmp_path / n / "report.json").read_text()) for n in ("one", "two"))
    assert r2["world_size"] == 2 and r1["world_size"] == 1
    for m in r1["modalities"]:
        a, b = r1["modalities"][m], r2["modalities"][m]
        for k in ("clean_top1", "robust_top1", "robust_top5", "attacks", "weak_top1", "sweep"):
            assert a[f"{k}_before"] == b[f"{k}_before"], (m, k, "before")
            assert a[f"{k}_after"] == b[f"{k}_after"], (m, k, "after")
    assert r1["retrieval"] == r2["retrieval"]
    h1_hist = [{k: v for k, v in h.items() if k != "epoch"} for h in r1["history"]]
    h2_hist = [{k: v for k, v in h.items() if k != "epoch"} for h in r2["history"]]
    for a, b in zip(h1_hist, h2_hist, strict=True):
        for k in a:
            if isinstance(a[k], float):
                assert abs(a[k] - b[k]) < 1e-5, (k, a[k], b[k])


@pytest.mark.slow
def test_resume_across_rank_counts(tmp_path, env):
    """A run interrupted under 2 ranks (kill -9 after its first checkpoint) and resumed by one
    process ends with the heads of an uninterrupted single-process run (within 1e-5)."""
    from safetensors.torch import load_file

    config = {**runkit.TINY, "train_limit": 60, "test_limit": 20}
    config["calib"] = {**config["calib"], "batch_size": 20, "epochs": 6}
    cfg = runkit.write_config(tmp_path / "run.json", config)
    base = ["-m", "advcal.cli", "calibrate", "--config", str(cfg), "--quiet", "--out"]
    proc = subprocess.run(
        [sys.executable, *base, str(tmp_path / "one")], env=env, capture_output=True, text=True,
        timeout=900,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = tmp_path / "two"
    torchrun = subprocess.Popen(
        [*TORCHRUN, *base, str(out)], env=env, start_new_session=True,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    ckpt = out / "checkpoint.pt"
    deadline = time.monotonic() + 600
    while not ckpt.exists() and time.monotonic() < deadline and torchrun.poll() is None:
        time.sleep(0.05)
    os.killpg(torchrun.pid, signal.SIGKILL)
    torchrun.wait(timeout=60)
    state = torch.load(ckpt, weights_only=True)
    assert 1 <= state["epoch"] < 6, "killed mid-run, after at least one checkpoint"
    proc = subprocess.run(
        [sys.executable, *base, str(out), "--resume"], env=env, capture_output=True, text=True,
        timeout=900,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    h1 = load_file(str(tmp_path / "one" / "heads.safetensors"))
    h2 = load_file(str(out / "heads.safetensors"))
    for k in h1:
        torch.testing.assert_close(h2[k], h1[k], rtol=0, atol=1e-5, msg=k)


def _children(pid: int) -> dict[int, dict[str, str]]:
    """pid -> environment of every direct child of ``pid`` (Linux /proc)."""
    out = {}
    for p in Path("/proc").iterdir():
        if not p.name.isdigit():
            continue
        try:
            ppid = int((p / "stat").read_text().rsplit(")", 1)[1].split()[1])
            if ppid != pid:
                continue
            raw = (p / "environ").read_bytes().split(b"\0")
        except (OSError, IndexError, ValueError):
            continue
        out[int(p.name)] = dict(e.decode(errors="replace").split("=", 1) for e in raw if b"=" in e)
    return out


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc").is_dir(), reason="finds the ranks through /proc")
def test_a_stalled_rank_ends_every_rank_with_a_clear_error(tmp_path, env):
    timeout = 10
    out = tmp_path / "run"
    cmd = [
        *TORCHRUN,
        "-m",
        "advcal.cli",
        "calibrate",
        "--config",
        str(_config(tmp_path, epochs=4)),
        "--out",
        str(out),
        "--quiet",
        "--dist-timeout",
        str(timeout),
    ]
    proc = subprocess.Popen(
        cmd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    stopped = None
    try:
        deadline = time.monotonic() + 300
        while not (out / "eval_before.json").exists():  # both ranks are past the start
            assert proc.poll() is None, proc.communicate()[1][-3000:]
            assert time.monotonic() < deadline, "the run never got to calibration"
            time.sleep(0.05)
        ranks = {int(e.get("RANK", -1)): pid for pid, e in _children(proc.pid).items()}
        assert set(ranks) >= {0, 1}, ranks
        stopped = ranks[1]
        os.kill(stopped, signal.SIGSTOP)
        t0 = time.monotonic()
        _, err = proc.communicate(timeout=120)
        took = time.monotonic() - t0
    finally:
        if stopped is not None:
            for sig in (signal.SIGCONT, signal.SIGKILL):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(stopped, sig)
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode != 0
    assert took < 120, took  # not PyTorch's 30 minutes
    lines = [ln for ln in err.splitlines() if "[rank 0]: error:" in ln]
    assert len(lines) == 1, err[-3000:]
    assert "another rank stalled or died" in lines[0] and f"timeout {timeout} s" in lines[0]
    assert "--dist-timeout" in lines[0] and "--resume" in lines[0]
    # no traceback from advcal's code (torchrun prints its own ChildFailedError summary)
    assert f"{os.sep}advcal{os.sep}" not in "".join(
        ln for ln in err.splitlines(keepends=True) if ln.lstrip().startswith("File ")
    ), err[-3000:]
    with pytest.raises(ProcessLookupError):  # the stalled rank was ended too
        os.kill(stopped, 0)


# -- all_gather_with_grad on 2 gloo processes ------------------------------------------------


def _gather_worker(rank: int, world: int, init: str, result_dir: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        g = torch.Generator().manual_seed(7)
        full = torch.randn(5, 3, generator=g)  # every rank builds the same global batch
        w = torch.randn(5, 3, generator=g)
        sizes = (2, 3)  # unequal shards: the last batch of an epoch
        start = sum(sizes[:rank])
        local = full[start : start + sizes[rank]].clone().requires_grad_(True)
        gathered = distributed.all_gather_with_grad(local)
        # a global-batch loss, the same on every rank (InfoNCE-like: rows against each other)
        loss = torch.logsumexp((gathered * w) @ gathered.T, dim=1).sum()
        loss.backward()
        torch.save(
            {"gathered": gathered.detach(), "grad": local.grad, "loss": loss.detach()},
            Path(result_dir) / f"rank{rank}.pt",
        )
    finally:
        dist.destroy_process_group()


def test_all_gather_with_grad_matches_one_process(tmp_path):
    import torch.multiprocessing as mp

    init = f"file://{tmp_path / 'store'}"
    mp.spawn(_gather_worker, args=(2, init, str(tmp_path)), nprocs=2, join=True)
    r = [torch.load(tmp_path / f"rank{i}.pt", weights_only=True) for i in range(2)]
    g = torch.Generator().manual_seed(7)
    full = torch.randn(5, 3, generator=g).requires_grad_(True)
    w = torch.randn(5, 3, generator=g)
    loss = torch.logsumexp((full * w) @ full.T, dim=1).sum()
    loss.backward()
    for i in range(2):
        assert torch.equal(r[i]["gathered"], full.detach())  # rank order, unequal sizes
        torch.testing.assert_close(r[i]["loss"], loss.detach())
    # each rank's rows get the sum over ranks of each rank's gradient: with the same loss on
    # both ranks that is 2x the one-process gradient, which DDP's averaging of the parameter
    # gradients turns back into exactly the one-process gradient
    torch.testing.assert_close(torch.cat([r[0]["grad"], r[1]["grad"]]), 2 * full.grad)


def test_all_gather_with_grad_is_identity_without_torchrun():
    t = torch.randn(3, 2, requires_grad=True)
    assert distributed.all_gather_with_grad(t) is t


# -- devices, errors, watchdog ------------------------------------------------------------------


def test_local_rank_picks_the_cuda_device(monkeypatch):
    picked = []
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: picked.append(d))
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert distributed.local_device("cuda") == torch.device("cuda")  # not under torchrun
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "2")
    assert distributed.local_device("cuda") == torch.device("cuda", 2)
    assert picked[-1] == torch.device("cuda", 2)
    assert distributed.local_device("cuda:0") == torch.device("cuda", 0)  # explicit: kept
    assert distributed.local_device("cpu") == torch.device("cpu")
    monkeypatch.setenv("LOCAL_RANK", "5")
    with pytest.raises(UserError, match=r"LOCAL_RANK=5 needs cuda:5, but this machine has 4"):
        distributed.local_device("cuda")


def test_backend_timeouts_become_one_clear_error(monkeypatch):
    monkeypatch.setattr(distributed, "enabled", lambda: True)
    monkeypatch.setattr(distributed, "rank", lambda: 1)
    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    gloo = RuntimeError(
        "[../third_party/gloo/gloo/transport/tcp/unbound_buffer.cc:81] Timed out waiting "
        "10000ms for recv operation to complete"
    )
    err = distributed.explain(gloo)
    assert isinstance(err, DistributedError) and isinstance(err, UserError)
    assert "rank 1/2" in str(err) and "another rank stalled or died" in str(err)
    assert "Timed out waiting 10000ms" in str(err) and err.exit_code == 1
    assert distributed.explain(RuntimeError("shape mismatch")) is None  # a bug stays a bug
    assert distributed.explain(ValueError("timed out")) is None


WATCHDOG = """
import time
from advcal import distributed as d
d._timeout_s = 0.4
d._WATCHDOG.start()
with d.guard("all_reduce of the epoch losses"):
    time.sleep(30)
print("not reached")
"""


def test_watchdog_ends_a_process_stuck_in_a_collective():
    t0 = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-c", WATCHDOG],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 1 and "not reached" not in proc.stdout
    assert "all_reduce of the epoch losses waited" in proc.stderr
    assert "another rank stalled or died" in proc.stderr
    assert time.monotonic() - t0 < 25


def test_timeout_flag_reaches_the_config():
    from advcal.cli import _config_from_args, build_parser

    args = build_parser().parse_args(["calibrate", "--dist-timeout", "42", "--out", "x"])
    assert _config_from_args(args).dist_timeout == 42.0
    assert distributed.DEFAULT_TIMEOUT_S == 300.0


@pytest.mark.slow
def test_a_busy_folder_stops_every_rank_at_once(tmp_path, env):
    """Rank 0 takes the folder's lock; its refusal reaches rank 1 (instead of rank 1 waiting
    for rank 0 in the next collective until the timeout)."""
    out = tmp_path / "run"
    out.mkdir()
    hold = (
        "import sys, time\nfrom advcal.runfolder import RunLock\n"
        "with RunLock(sys.argv[1]):\n    print('locked', flush=True)\n    time.sleep(120)\n"
    )
    holder = subprocess.Popen(
        [sys.executable, "-c", hold, str(out)], stdout=subprocess.PIPE, text=True, env=env
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        cmd = [
            *TORCHRUN,
            "-m",
            "advcal.cli",
            "calibrate",
            "--config",
            str(_config(tmp_path)),
            "--out",
            str(out),
            "--quiet",
            "--dist-timeout",
            "60",
        ]
        t0 = time.monotonic()
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
        took = time.monotonic() - t0
    finally:
        holder.kill()
        holder.wait()
    assert proc.returncode != 0 and took < 60, (took, proc.stderr[-2000:])  # not the timeout
    rank0 = [ln for ln in proc.stderr.splitlines() if "[rank 0]: error:" in ln]
    rank1 = [ln for ln in proc.stderr.splitlines() if "[rank 1]: error:" in ln]
    assert len(rank0) == 1 and f"in use by another advcal run: pid {holder.pid}" in rank0[0]
    assert len(rank1) == 1 and "opening the run folder failed" in rank1[0]
    assert f"pid {holder.pid}" in rank1[0]
