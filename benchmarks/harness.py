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

Interleaved rounds (``run_sweep(..., rounds=R)``, R > 1): every arm of a case is built first,
then timed round by round, one block of calls per arm per round, the arms' order rotating from
round to round, so a neighbour's burst on a shared machine hits every arm alike. Each round's
median is kept (``Result.round_ms``) and ratios are also paired per round
(:meth:`Table.paired`: the min, median and max over rounds of ``baseline round / arm round``),
printed as ``p_<arm>`` columns and written to the JSON as ``paired``.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
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
    round_ms: tuple[float, ...] = ()  # per-round medians, interleaved runs (run_sweep rounds > 1)

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


@dataclass(frozen=True)
class Paired:
    """Ratios ``baseline round time / arm round time`` over interleaved rounds (> 1: the arm is
    faster), each round's pair timed back to back."""

    baseline: str
    min: float
    median: float
    max: float
    rounds: int

    def __post_init__(self) -> None:
        if self.rounds < 1 or not self.min <= self.median <= self.max:
            raise ValueError(f"inconsistent paired ratios {self}")

    def __str__(self) -> str:
        return f"{self.median:.3g} [{self.min:.3g}-{self.max:.3g}]"


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


def measure_interleaved(
    fns: dict[str, Callable[[], object]],
    device: torch.device | str,
    *,
    rounds: int = 7,
    reps: int = 5,
    warmup: int = 2,
) -> dict[str, tuple[Timing, tuple[float, ...]]]:
    """Times every ``fns`` entry in ``rounds`` interleaved rounds; per arm the Timing over all
    its calls and the per-round medians. CPU: ``reps`` host-timed calls per arm per round
    (after ``warmup`` calls per arm, once); CUDA: one short ``do_bench`` per arm per round
    (its median). The order of the arms rotates by one each round."""
    if rounds < 1 or reps < 1:
        raise ValueError(f"rounds={rounds} and reps={reps} must be >= 1")
    device = torch.device(device)
    names = list(fns)
    calls: dict[str, list[float]] = {k: [] for k in names}
    per_round: dict[str, list[float]] = {k: [] for k in names}
    if device.type != "cuda":
        for k in names:
            for _ in range(warmup):
                fns[k]()
    for r in range(rounds):
        for k in names[r % len(names) :] + names[: r % len(names)]:
            if device.type == "cuda":
                from triton.testing import do_bench

                ms = float(do_bench(fns[k], warmup=5, rep=20))
                times = [ms]
            else:
                times = []
                for _ in range(reps):
                    t0 = time.perf_counter()
                    fns[k]()
                    times.append((time.perf_counter() - t0) * 1e3)
            calls[k].extend(times)
            per_round[k].append(statistics.median(times))
    out = {}
    clock = "cuda-events" if device.type == "cuda" else "host"
    for k in names:
        ts = calls[k]
        qs = statistics.quantiles(ts, n=10) if len(ts) >= 2 else [ts[0]] * 9
        out[k] = (Timing(statistics.median(ts), qs[1], qs[7], clock), tuple(per_round[k]))
    return out


def paired(base_rounds: Sequence[float], arm_rounds: Sequence[float], baseline: str) -> Paired:
    """Per-round ratios ``base / arm`` of two equally long interleaved runs."""
    if len(base_rounds) != len(arm_rounds) or not base_rounds:
        raise ValueError(f"{len(base_rounds)} vs {len(arm_rounds)} rounds: not paired")
    ratios = sorted(b / a for b, a in zip(base_rounds, arm_rounds, strict=True))
    return Paired(baseline, ratios[0], statistics.median(ratios), ratios[-1], len(ratios))


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


def _cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo on Linux), else the platform's machine type."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


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
        "device_name": (
            torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_model()
        ),
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
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

    def paired(self, r: Result, arm: str) -> Paired | None:
        """Per-round paired ratios of ``arm`` (the baseline) over ``r``; None unless both ran
        the same interleaved rounds."""
        base = next((x for x in self._peers(r) if x.arm == arm), None)
        if base is None or not base.ok or not r.ok or not r.round_ms:
            return None
        if len(base.round_ms) != len(r.round_ms):
            return None
        return paired(base.round_ms, r.round_ms, arm)

    def paired_all(self, r: Result) -> dict[str, Paired | None]:
        """Against the case's first arm and every named baseline."""
        first = self._peers(r)[0].arm
        arms = dict.fromkeys([first, *self.baselines])
        return {arm: self.paired(r, arm) for arm in arms}

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
            for arm, p in self.paired_all(r).items():
                row[f"p_{arm}"] = p
            rows.append(row)
        return rows

    def print(self) -> None:
        rows = self.rows()
        ratio_cols = list(self.ratios(self.results[0])) if self.results else ["speedup"]
        cols = ["case", "arm", "phase", "median_ms", "p20_ms", "p80_ms", *ratio_cols]
        paired_cols = list(dict.fromkeys(c for r in rows for c in r if c.startswith("p_")))
        for opt in ("tflops", "frac_matmul", "gbps", "frac_copy", *paired_cols, "peak_mem_mb",
                    "error"):  # fmt: skip
            if any(r.get(opt) is not None for r in rows):
                cols.append(opt)
        fmt = {c: (lambda v: "-" if v is None else f"{v:.4g}") for c in cols}
        fmt.update({c: (lambda v: "-" if v is None else str(v)) for c in paired_cols})
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
        if any(r.round_ms for r in self.results):
            rounds = max(len(r.round_ms) for r in self.results)
            print(f"p_<arm> = paired per round over {rounds} interleaved rounds, "
                  "<arm> round / this arm's round: median [min-max]")  # fmt: skip

    def write_json(self, path: str | Path) -> None:
        payload = {
            "bench": self.bench,
            "environment": environment(self.device),
            "limits": self.limits,
            "baselines": list(self.baselines),
            "results": [
                {
                    **asdict(r),
                    "tflops": r.tflops,
                    "gbps": r.gbps,
                    **self.ratios(r),
                    "paired": {
                        arm: None if p is None else asdict(p)
                        for arm, p in self.paired_all(r).items()
                    },
                }
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
    rounds: int = 1,
    reps: int = 5,
) -> None:
    """Time every arm on every case; an arm factory returns a zero-argument callable (or
    raises ``NotImplementedError(reason)`` to skip). A skipped or failing arm (any exception
    while building, timing or measuring memory: an OOM, a compile error, a kernel that does
    not launch) is recorded with its error string and printed; the sweep goes on.

    ``rounds`` > 1: per case, all arms are built and warmed up first, then timed in
    interleaved rounds (:func:`measure_interleaved`, ``reps`` calls per arm per round), and
    each Result keeps its per-round medians for paired ratios (:meth:`Table.paired`)."""

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

    def record_failure(case: Case, arm: str, exc: BaseException, common: dict) -> None:
        if isinstance(exc, NotImplementedError):
            print(f"  skip {case.name}/{arm}: {exc}")
            err = f"skipped: {exc}"
        else:
            err = f"{type(exc).__name__}: {exc}".splitlines()[0][:500]
            print(f"  FAILED {case.name}/{arm}/{phase}: {err}")
        table.add(Result(table.bench, case.name, case.params, arm, phase, None, error=err,
                         **common))  # fmt: skip
        if table.device.type == "cuda" and not isinstance(exc, NotImplementedError):
            torch.cuda.empty_cache()

    for case in cases:
        if rounds > 1:
            _interleaved_case(table, case, arms, phase, counts, record_failure, rounds, reps)
            continue
        for arm, make in arms.items():
            common: dict = {"flops": None, "bytes": None}
            try:
                fn = make(case)
                common = counts(case)
                timing = measure(fn, table.device)
                peak = peak_memory_mb(fn, table.device)
            except Exception as exc:  # recorded (NotImplementedError: skipped), sweep goes on
                record_failure(case, arm, exc, common)
                continue
            result = Result(table.bench, case.name, case.params, arm, phase, timing,
                            peak_mem_mb=peak, **common)  # fmt: skip
            table.add(result)


def _interleaved_case(table, case, arms, phase, counts, record_failure, rounds, reps) -> None:
    """One case of :func:`run_sweep` in interleaved rounds; results in the arms' order."""
    built: dict[str, Callable[[], object]] = {}
    common: dict[str, dict] = {}
    failed: dict[str, tuple[BaseException, dict]] = {}
    for arm, make in arms.items():
        common[arm] = {"flops": None, "bytes": None}
        try:
            fn = make(case)
            common[arm] = counts(case)
            for _ in range(2):  # warm-up (and a failing arm fails here, alone)
                fn()
            _sync(table.device)
            built[arm] = fn
        except Exception as exc:
            failed[arm] = (exc, common[arm])
    timed: dict[str, tuple[Timing, tuple[float, ...]]] = {}
    if built:
        try:
            timed = measure_interleaved(built, table.device, rounds=rounds, reps=reps, warmup=0)
        except Exception as exc:  # a failure mid-run: every arm of the case is recorded failed
            failed.update({arm: (exc, common[arm]) for arm in built})
    for arm in arms:
        if arm in failed:
            record_failure(case, arm, failed[arm][0], failed[arm][1])
            continue
        timing, per_round = timed[arm]
        try:
            peak = peak_memory_mb(built[arm], table.device)
        except Exception:  # memory is a side measurement: the timing stands
            peak = None
        table.add(Result(table.bench, case.name, case.params, arm, phase, timing,
                         peak_mem_mb=peak, round_ms=per_round, **common[arm]))  # fmt: skip
