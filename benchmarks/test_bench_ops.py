"""pytest-benchmark suite for the fused ops: eager reference vs advcal, fwd+bwd.

GPU: the timed function synchronises the device, so the wall clock covers the kernels.
CPU: tiny shapes, plus the harness (failing arms recorded, ratio columns) and both bench
scripts' ``--quick --json`` runs; the CI smoke command (~10 s)::

    python -m pytest benchmarks/test_bench_ops.py --benchmark-disable -q
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from benchmarks import bench_head_ce, bench_infonce
from benchmarks.harness import Case

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
if DEVICE.type == "cuda":
    HEAD_CASE = Case("B256_D1024_K1000", {"B": 256, "D": 1024, "K": 1000})
    NCE_CASE = Case("B4096_D1024", {"B": 4096, "D": 1024})
else:
    HEAD_CASE = Case("B33_D64_K10", {"B": 33, "D": 64, "K": 10})
    NCE_CASE = Case("B65_D64", {"B": 65, "D": 64})


def _synced(fn):
    def run():
        out = fn()
        if DEVICE.type == "cuda":
            torch.cuda.synchronize(DEVICE)
        return out

    return run


# the eager arms of each device's table (CPU: fp32 user code; GPU: also bf16 autocast)
EAGER_ARMS = ["eager_fp32"] + (["eager_bf16_autocast"] if DEVICE.type == "cuda" else [])


@pytest.mark.parametrize("arm", [*EAGER_ARMS, "advcal"])
def test_head_ce_fwd_bwd(benchmark, arm):
    arms = bench_head_ce.arms(DEVICE, "fwd+bwd")
    make = next(v for k, v in arms.items() if k.startswith(arm))
    benchmark(_synced(make(HEAD_CASE)))


@pytest.mark.parametrize("arm", [*EAGER_ARMS, "advcal"])
def test_infonce_fwd_bwd(benchmark, arm):
    arms = bench_infonce.arms(DEVICE, "fwd+bwd")
    make = next(v for k, v in arms.items() if k.startswith(arm))
    benchmark(_synced(make(NCE_CASE)))


# ------------------------------------------------------------------ harness and bench scripts


def test_failing_arm_is_recorded_and_the_sweep_goes_on(tmp_path, capsys):
    import json

    from benchmarks.harness import Table, run_sweep

    def ok(case):
        return lambda: torch.ones(64).sum()

    def broken(case):
        def run():
            raise RuntimeError("out of memory (simulated)")

        return run

    def skipped(case):
        raise NotImplementedError("GPU only")

    table = Table("harness_smoke", "cpu", baselines=("eager",))
    cases = [Case("a", {"n": 1}), Case("b", {"n": 2})]
    arms = {"eager": ok, "compile": broken, "skip": skipped, "advcal": ok}
    run_sweep(table, cases, arms, phase="fwd")
    assert [(r.case, r.arm) for r in table.results] == [(c.name, a) for c in cases for a in arms]
    by = {(r.case, r.arm): r for r in table.results}
    assert by["a", "compile"].error == "RuntimeError: out of memory (simulated)"
    assert by["b", "skip"].error == "skipped: GPU only" and by["b", "skip"].timing is None
    advcal = table.ratios(by["b", "advcal"])
    assert advcal["speedup"] > 0 and advcal["x_eager"] == advcal["speedup"]
    assert advcal["x_best_other"] is not None  # vs eager: the only non-advcal arm that ran
    assert table.ratios(by["a", "compile"])["speedup"] is None
    table.print()
    out = capsys.readouterr().out
    assert "x_eager" in out and "x_best_other" in out and "out of memory (simulated)" in out
    table.write_json(tmp_path / "r.json")
    rows = json.loads((tmp_path / "r.json").read_text())["results"]
    assert rows[1]["error"].startswith("RuntimeError") and rows[1]["x_eager"] is None


@pytest.mark.parametrize("bench", [bench_head_ce, bench_infonce])
def test_bench_script_quick_writes_json(bench, tmp_path):
    """`python benchmarks/bench_*.py --quick --no-compile --json ...` on CPU: every arm of
    every case and phase is in the JSON (the compile arm recorded as skipped), timed in
    interleaved rounds; advcal's rows carry the ratio and paired-ratio columns against the CPU
    baselines and the backend the dispatch picked per case."""
    import json

    if DEVICE.type == "cuda":
        pytest.skip("the full sweep is the GPU run; this is the CPU smoke test")
    out = tmp_path / "out.json"
    bench.main(["--quick", "--no-compile", "--device", "cpu", "--json", str(out)])
    payload = json.loads(out.read_text())
    rows = payload["results"]
    arms = {r["arm"] for r in rows}
    assert {*bench_head_ce.CPU_BASELINES, "advcal_fp32"} == arms
    assert {r["phase"] for r in rows} == set(bench_head_ce.PHASES)
    for r in rows:
        if r["arm"].startswith("compile"):
            assert r["error"] == "skipped: --no-compile", r
        else:
            assert r["error"] is None and r["timing"]["median_ms"] > 0, r
            assert len(r["round_ms"]) == 3, r  # --quick: 3 interleaved rounds
    adv = [r for r in rows if r["arm"].startswith("advcal")]
    assert adv and all(r["x_eager_fp32"] > 0 for r in adv)
    # --quick's tiny shapes are below CPU_MIN_MACS: the default there is the reference
    assert {r["params"]["advcal_backend"] for r in adv} == {"ref"}
    for r in adv:
        p = r["paired"]["eager_fp32"]
        assert p["rounds"] == 3 and 0 < p["min"] <= p["median"] <= p["max"], r
        assert r["paired"]["compile_fp32"] is None  # skipped: nothing to pair with
    assert payload["environment"]["git_sha"] and payload["baselines"] == list(
        bench_head_ce.CPU_BASELINES
    )


def test_interleaved_rounds_and_paired_ratios(capsys):
    """run_sweep(rounds=R): each arm keeps R per-round medians, paired ratios are per round
    (min <= median <= max), a failing arm is recorded without stopping the others, and the
    table prints the p_ columns."""
    import time

    from benchmarks.harness import Paired, Table, paired, run_sweep

    def sleeper(ms):
        def make(case):
            return lambda: time.sleep(ms / 1e3)

        return make

    def broken(case):
        def run():
            raise RuntimeError("boom")

        return run

    table = Table("paired_smoke", "cpu", baselines=("slow",))
    arms = {"slow": sleeper(4.0), "broken": broken, "advcal": sleeper(1.0)}
    run_sweep(table, [Case("a")], arms, phase="fwd", rounds=4, reps=2)
    by = {r.arm: r for r in table.results}
    assert [r.arm for r in table.results] == list(arms)
    assert by["broken"].error == "RuntimeError: boom" and by["broken"].round_ms == ()
    assert len(by["slow"].round_ms) == len(by["advcal"].round_ms) == 4
    p = table.paired(by["advcal"], "slow")
    assert p.rounds == 4 and 1.5 < p.min <= p.median <= p.max  # ~4x, sleep-limited
    assert table.paired(by["advcal"], "broken") is None
    table.print()
    assert "p_slow" in capsys.readouterr().out
    # the pairing itself: ratios per round, not ratios of medians
    assert paired([2.0, 4.0, 9.0], [1.0, 1.0, 3.0], "b") == Paired("b", 2.0, 3.0, 4.0, 3)
    with pytest.raises(ValueError, match="not paired"):
        paired([1.0, 2.0], [1.0], "b")


SMOKE = {  # script -> its CPU smoke arguments
    "bench_pgd_step.py": ["--quick", "--no-compile"],
    "bench_limits.py": ["--quick"],
    "bench_head_ce.py": ["--shapes", "5x16x3", "--arms", "eager_fp32,advcal", "--rounds", "2"],
    "bench_attack.py": ["--quick", "--steps", "2"],
    "bench_backbone.py": ["--tiny", "--quick"],
    "bench_bind_towers.py": ["--tiny", "--threads", "1"],
    "bench_fps_knn.py": ["--quick"],
    "bench_loader.py": ["--quick"],
}


@pytest.mark.parametrize("script", sorted(SMOKE))
def test_every_bench_script_runs_and_writes_json(script, tmp_path):
    """Each benchmark script's smoke mode runs in a fresh process and writes its JSON (device,
    versions, results); timings are not checked here."""
    import json
    import os
    import subprocess
    import sys

    if DEVICE.type == "cuda":
        pytest.skip("the full sweeps are the GPU run; this is the CPU smoke test")
    out = tmp_path / "out.json"
    env = {**os.environ, "ADVCAL_CACHE": str(tmp_path / "cache")}  # never the user's cache
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).parent / script), *SMOKE[script], "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    payload = json.loads(out.read_text())
    assert payload["environment"]["torch"] and payload["results"], payload.keys()
