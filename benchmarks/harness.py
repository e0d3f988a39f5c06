"""The one benchmark harness: timing, hardware limits, a printed table and JSON.

Every ``benchmarks/bench_*.py`` builds :class:`Case` s, times each *arm* (eager reference,
``torch.compile``, advcal, ...) with :func:`measure`, and hands the results to :class:`Table`.
GPU timing uses CUDA events through ``triton.testing.do_bench`` (median, p20, p80); on CPU a
host clock is the only clock there is, and the table says so. Throughput is reported against
limits measured in the same run (:func:`matmul_rate`, :func:`copy_bandwidth`), so a ratio is
always side by side, never against a datasheet.

Ratio columns (per case and phase; ``baseline median / arm median``, > 1 is faster):
``speedup`` against the first arm of the case (the eager reference), one ``x_<arm>`` column per
arm named in ``Table(baselines=...)`` (e.g. ``x_compile_default_bf16_autocast``, so "1.3x
torch.compile" reads off directly), and ``x_best_other``: against the fastest arm whose name
does not start with the table's ``subject`` (``advcal``). An arm that fails is recorded with
its error (``Result.error``), shown in the table and the JSON, and the sweep goes on.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import platform
import statistics
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch


@dataclass(frozen=True)
class Case:
    """One point of a sweep: a name and its parameters (B, D, K, dtype, ...)."""

    name: str
    params: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Timing:
    median_ms: float
    p20_ms: float
    p80_ms: float
    clock: str  # "cuda-events" or "host"


@dataclass(frozen=True)
class Result:
    bench: str
    case: str
    params: dict
    arm: str
    phase: str  # "fwd", "bwd", "fwd+bwd", "step", ...
    timing: Timing | None  # None when the arm was skipped or failed (see error)
    flops: float | None = None  # FLOPs per call, written out by the bench
    bytes: float | None = None  # bytes moved per call
    peak_mem_mb: float | None = None
    extra: dict = field(default_factory=dict)
    error: str | None = None  # "skipped: <why>" or "<ExceptionType>: <message>"

    @property
    def ok(self) -> bool:
        return self.timing is not None and self.error is None

    @property
    def tflops(self) -> float | None:
        if self.flops is None or not self.ok:
            return None
        return self.flops / (self.timing.median_ms * 1e-3) / 1e12

    @property
    def gbps(self) -> float | None:
        if self.bytes is None or not self.ok:
            return None
        return self.bytes / (self.timing.median_ms * 1e-3) / 1e9


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(
    fn: Callable[[], object],
    device: torch.device | str,
    *,
    warmup: int = 3,
    rep: int = 20,
    min_time_s: float = 0.0,
) -> Timing:
    """Time ``fn``. CUDA: events via ``triton.testing.do_bench``; CPU: host clock, median of
    ``rep`` calls after ``warmup``."""
    device = torch.device(device)
    if device.type == "cuda":
        from triton.testing import do_bench

        q = do_bench(fn, warmup=25, rep=100, quantiles=[0.5, 0.2, 0.8])
        return Timing(float(q[0]), float(q[1]), float(q[2]), "cuda-events")
    for _ in range(warmup):
        fn()
    times: list[float] = []
    start_all = time.perf_counter()
    while len(times) < rep or time.perf_counter() - start_all < min_time_s:
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    qs = statistics.quantiles(times, n=10) if len(times) >= 2 else [times[0]] * 9
    return Timing(statistics.median(times), qs[1], qs[7], "host")


def peak_memory_mb(fn: Callable[[], object], device: torch.device | str) -> float | None:
    """Peak memory allocated *above what was allocated before* the call (CUDA only)."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    _sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    fn()
    _sync(device)
    return (torch.cuda.max_memory_allocated(device) - base) / 2**20


def matmul_rate(
    device: torch.device | str, dtype: torch.dtype = torch.bfloat16, n: int = 8192
) -> float:
    """Measured dense matmul rate in TFLOP/s (n x n x n; smaller n on CPU)."""
    device = torch.device(device)
    if device.type != "cuda":
        n, dtype = 1024, torch.float32
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    t = measure(lambda: a @ b, device, rep=10)
    return 2 * n**3 / (t.median_ms * 1e-3) / 1e12


def copy_bandwidth(device: torch.device | str, nbytes: int = 1 << 30) -> float:
    """Measured device-to-device copy bandwidth in GB/s (read + write counted)."""
    device = torch.device(device)
    if device.type != "cuda":
        nbytes = 1 << 27
    src = torch.empty(nbytes // 4, device=device, dtype=torch.float32).uniform_()
    dst = torch.empty_like(src)
    t = measure(lambda: dst.copy_(src), device, rep=20)
    return 2 * nbytes / (t.median_ms * 1e-3) / 1e9


def environment(device: torch.device | str) -> dict:
    device = torch.device(device)
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
            cwd=Path(__file__).parent,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        sha = "unknown"
    env = {
        "time": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "git_sha": sha,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else platform.processor() or platform.machine(),
        "cpu_threads": torch.get_num_threads(),
    }
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    return env


class Table:
    """Collects results of one benchmark run; prints a table with ratio columns and writes
    JSON. Ratios are ``baseline median / arm median`` for the same case and phase:
    ``speedup`` against the first arm recorded for the case (the eager reference), ``x_<arm>``
    against each arm in ``baselines``, ``x_best_other`` against the fastest arm not named
    ``<subject>...`` (None where the baseline did not run)."""

    def __init__(
        self,
        bench: str,
        device: torch.device | str,
        limits: dict | None = None,
        *,
        baselines: Sequence[str] = (),
        subject: str = "advcal",
    ):
        self.bench = bench
        self.device = torch.device(device)
        self.limits = dict(limits or {})
        self.baselines = tuple(baselines)
        self.subject = subject
        self.results: list[Result] = []

    def add(self, result: Result) -> Result:
        self.results.append(result)
        return result

    def _peers(self, r: Result) -> list[Result]:
        return [x for x in self.results if x.case == r.case and x.phase == r.phase]

    @staticmethod
    def _ratio(base: Result | None, r: Result) -> float | None:
        if base is None or not base.ok or not r.ok:
            return None
        return base.timing.median_ms / r.timing.median_ms

    def speedup(self, r: Result) -> float | None:
        """Against the first arm recorded for this case and phase (the eager reference)."""
        return self._ratio(self._peers(r)[0], r)

    def speedup_vs(self, r: Result, arm: str) -> float | None:
        return self._ratio(next((x for x in self._peers(r) if x.arm == arm), None), r)

    def speedup_vs_best_other(self, r: Result) -> float | None:
        others = [x for x in self._peers(r) if x.ok and not x.arm.startswith(self.subject)]
        best = min(others, key=lambda x: x.timing.median_ms, default=None)
        return self._ratio(best, r)

    def ratios(self, r: Result) -> dict[str, float | None]:
        out = {"speedup": self.speedup(r)}
        out.update({f"x_{arm}": self.speedup_vs(r, arm) for arm in self.baselines})
        out["x_best_other"] = self.speedup_vs_best_other(r)
        return out

    def rows(self) -> list[dict]:
        rows = []
        for r in self.results:
            t = r.timing
            row = {
                "case": r.case,
                "arm": r.arm,
                "phase": r.phase,
                "median_ms": t.median_ms if t else None,
                "p20_ms": t.p20_ms if t else None,
                "p80_ms": t.p80_ms if t else None,
                **self.ratios(r),
                "tflops": r.tflops,
                "gbps": r.gbps,
                "peak_mem_mb": r.peak_mem_mb,
                "error": r.error,
            }
            if r.tflops is not None and "matmul_tflops" in self.limits:
                row["frac_matmul"] = r.tflops / self.limits["matmul_tflops"]
            if r.gbps is not None and "copy_gbps" in self.limits:
                row["frac_copy"] = r.gbps / self.limits["copy_gbps"]
            rows.append(row)
        return rows

    def print(self) -> None:
        rows = self.rows()
        ratio_cols = list(self.ratios(self.results[0])) if self.results else ["speedup"]
        cols = ["case", "arm", "phase", "median_ms", "p20_ms", "p80_ms", *ratio_cols]
        for opt in ("tflops", "frac_matmul", "gbps", "frac_copy", "peak_mem_mb", "error"):
            if any(r.get(opt) is not None for r in rows):
                cols.append(opt)
        fmt = {c: (lambda v: "-" if v is None else f"{v:.4g}") for c in cols}
        fmt.update({c: (lambda v: "" if v is None else str(v)) for c in ("case", "arm", "phase")})
        fmt["error"] = lambda v: "" if v is None else str(v)[:120]
        cells = [[fmt[c](r.get(c)) for c in cols] for r in rows]
        widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
        clock = next((r.timing.clock for r in self.results if r.timing), "?")
        print(
            f"\n{self.bench} on {environment(self.device)['device_name']} "
            f"(clock: {clock}; limits: {self.limits})"
        )
        print("  ".join(c.ljust(w) for c, w in zip(cols, widths, strict=True)))
        for row in cells:
            print("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip())
        first = self.results[0].arm if self.results else "?"
        legend = [f"speedup = vs {first} (the case's first arm)"]
        legend += [f"x_{a} = vs {a}" for a in self.baselines]
        legend.append(f"x_best_other = vs the fastest arm not named {self.subject}*")
        print("ratios are baseline median / arm median: " + "; ".join(legend))

    def write_json(self, path: str | Path) -> None:
        payload = {
            "bench": self.bench,
            "environment": environment(self.device),
            "limits": self.limits,
            "baselines": list(self.baselines),
            "results": [
                {**asdict(r), "tflops": r.tflops, "gbps": r.gbps, **self.ratios(r)}
                for r in self.results
            ],
        }
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(payload, indent=2, default=str))
        print(f"wrote {path}")


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--json", type=Path, default=None, help="write results as JSON here")
    p.add_argument("--quick", action="store_true", help="small sweep (CPU smoke test)")
    return p


def run_sweep(
    table: Table,
    cases: Sequence[Case],
    arms: dict[str, Callable[[Case], Callable[[], object]]],
    *,
    phase: str = "fwd+bwd",
    flops: Callable[[Case], float] | None = None,
    nbytes: Callable[[Case], float] | None = None,
) -> None:
    """Time every arm on every case; an arm factory returns a zero-argument callable (or
    raises ``NotImplementedError(reason)`` to skip). A skipped or failing arm (any exception
    while building, timing or measuring memory: an OOM, a compile error, a kernel that does
    not launch) is recorded with its error string and printed; the sweep goes on."""

    def counts(case: Case) -> dict:
        """FLOPs/bytes of the case, read after the factory ran (factories may fill in the
        parameters these counts need); None where they cannot be computed."""
        out = {}
        for key, fn in (("flops", flops), ("bytes", nbytes)):
            try:
                out[key] = fn(case) if fn else None
            except (KeyError, TypeError):
                out[key] = None
        return out

    for case in cases:
        for arm, make in arms.items():
            common: dict = {"flops": None, "bytes": None}
            try:
                fn = make(case)
                common = counts(case)
                timing = measure(fn, table.device)
                peak = peak_memory_mb(fn, table.device)
            except NotImplementedError as why:
                print(f"  skip {case.name}/{arm}: {why}")
                table.add(Result(table.bench, case.name, case.params, arm, phase, None,
                                 error=f"skipped: {why}", **common))  # fmt: skip
                continue
            except Exception as exc:  # recorded, and the sweep goes on
                err = f"{type(exc).__name__}: {exc}".splitlines()[0][:500]
                print(f"  FAILED {case.name}/{arm}/{phase}: {err}")
                table.add(Result(table.bench, case.name, case.params, arm, phase, None,
                                 error=err, **common))  # fmt: skip
                if table.device.type == "cuda":
                    torch.cuda.empty_cache()
                continue
            result = Result(table.bench, case.name, case.params, arm, phase, timing,
                            peak_mem_mb=peak, **common)  # fmt: skip
            table.add(result)
