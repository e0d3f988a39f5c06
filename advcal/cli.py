"""The ``advcal`` command line: demo, calibrate, evaluate, info, convert-centers, bench."""

from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys
import time
import traceback
from pathlib import Path

from advcal.errors import UserError

DEMO_OUT = "advcal-demo"


def _add_run_args(p: argparse.ArgumentParser, *, calibrate: bool) -> None:
    p.add_argument(
        "--config",
        type=Path,
        help="config file: TOML or JSON with RunConfig keys ([calib], [eval]); a run's "
        "config.json or report.json reproduces that run",
    )
    p.add_argument("--backbone", help="backbone name (see `advcal info`)")
    p.add_argument("--checkpoint", help="checkpoint file or directory of a real Bind model")
    p.add_argument(
        "--data",
        help="a data source: 'digits' (embedded), a dataset file, or SCHEME:PATH in the "
        "benchmark's own layout (imagenet:, esc50:, modelnet40:, msrvtt:, nyud:, llvip:, "
        "ncaltech101:, nimagenet:, folder:, paired:; options as ?key=value, e.g. "
        "esc50:/data/ESC-50?fold=5); see docs/data.md",
    )
    p.add_argument("--split", help="the evaluation split (default test; ImageNet: val)")
    if calibrate:
        p.add_argument("--train-split", help="the calibration split (default train)")
    p.add_argument("--first", type=int, help="evaluate the first N items of the split")
    p.add_argument(
        "--subset",
        help="evaluate the items a list file names, in its order (e.g. RobustBench's "
        "imagenet_test_image_ids.txt)",
    )
    p.add_argument(
        "--batch-size",
        type=int,
        help="samples per batch (evaluation; calibrate: the training batch as well)",
    )
    p.add_argument("--workers", type=int, help="DataLoader worker processes")
    p.add_argument(
        "--skip-bad",
        action="store_true",
        default=None,
        help="skip (and count in the report) unreadable files instead of stopping",
    )
    p.add_argument(
        "--centers",
        help="multi-center file (from `advcal convert-centers`); default: class-prompt centers",
    )
    p.add_argument("--modalities", help="comma-separated subset of modalities")
    if calibrate:
        p.add_argument("--epochs", type=int, help="calibration epochs")
    p.add_argument(
        "--device", help="cpu, cuda, cuda:1, ... (under torchrun, cuda = cuda:LOCAL_RANK)"
    )
    p.add_argument(
        "--amp",
        action="store_true",
        help=f"bf16 autocast for {'calibration' if calibrate else 'evaluation'} (CUDA only)",
    )
    p.add_argument(
        "--cuda-graph",
        action="store_true",
        help="capture the training attack's steps in CUDA graphs (calibration; CUDA only)"
        if calibrate
        else argparse.SUPPRESS,  # accepted only to say why it does not apply
    )
    p.add_argument(
        "--dist-timeout",
        type=float,
        metavar="SECONDS",
        help="under torchrun: how long a rank waits for a stalled one before every rank stops "
        "(default 300)",
    )
    p.add_argument("--out", type=Path, required=False, help="run folder")
    if calibrate:
        p.add_argument("--resume", action="store_true", help="continue an interrupted run in --out")
    _add_quiet(p)


def _add_quiet(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--quiet",
        "--no-progress",
        dest="quiet",
        action="store_true",
        help="no progress output (the result table still prints)",
    )


def _config_from_args(args, base=None):
    from advcal.pipeline import RunConfig

    cfg = RunConfig.from_file(args.config) if args.config else (base or RunConfig())
    changes: dict = {}
    for name in (
        "backbone",
        "checkpoint",
        "data",
        "centers",
        "device",
        "dist_timeout",
        "split",
        "train_split",
        "first",
        "subset",
        "skip_bad",
    ):
        if getattr(args, name, None) is not None:
            changes[name] = getattr(args, name)
    if getattr(args, "modalities", None) is not None:
        mods = tuple(m.strip() for m in args.modalities.split(",") if m.strip())
        if not mods:
            raise UserError(f"--modalities {args.modalities!r} names no modality")
        changes["modalities"] = mods
    calib: dict = {}
    evals: dict = {}
    if getattr(args, "epochs", None) is not None:
        calib["epochs"] = args.epochs
    if getattr(args, "batch_size", None) is not None:
        evals["batch_size"] = args.batch_size
        if args.cmd == "calibrate":
            calib["batch_size"] = args.batch_size
    if getattr(args, "workers", None) is not None:
        evals["workers"] = args.workers
        if args.cmd == "calibrate":
            calib["workers"] = args.workers
    if getattr(args, "amp", False) and args.cmd == "calibrate":
        calib["amp"] = True
    if getattr(args, "cuda_graph", False):
        _no_graph_in_evaluate(args)
        calib["cuda_graph"] = True
    if evals:
        changes["eval"] = dataclasses.replace(cfg.eval, **evals)
    if getattr(args, "amp", False) and args.cmd == "evaluate":
        changes["eval"] = _eval_amp(changes.get("eval", cfg.eval))
    if calib:
        changes["calib"] = dataclasses.replace(cfg.calib, **calib)
    cfg = cfg.replace(**changes) if changes else cfg
    _check_cuda_flags(args, cfg.device)
    return cfg


def _eval_amp(eval_cfg):
    """``EvalConfig`` with bf16 autocast on; refused clearly where this build has no such
    field (never accepted and ignored)."""
    if "amp" not in {f.name for f in dataclasses.fields(eval_cfg)}:
        raise UserError(
            "--amp: this version's evaluation has no autocast mode (EvalConfig.amp); "
            "drop --amp to evaluate in fp32"
        )
    return dataclasses.replace(eval_cfg, amp=True)


def _no_graph_in_evaluate(args) -> None:
    if args.cmd == "evaluate" and getattr(args, "cuda_graph", False):
        raise UserError(
            "--cuda-graph applies to the training attack (advcal calibrate); evaluation attacks "
            "drop each sample once it is broken (dynamic shapes), which CUDA graphs cannot "
            "capture: drop --cuda-graph"
        )


def _check_cuda_flags(args, device: str) -> None:
    """--amp and --cuda-graph are CUDA features: refused on another device, with the reason."""
    import torch

    kind = torch.device(device).type
    if kind == "cuda":
        return
    if getattr(args, "amp", False):
        raise UserError(
            f"--amp is bf16 autocast on a CUDA device; this run is on {device!r}, where bf16 is "
            "emulated (slower and less accurate than fp32): drop --amp, or add --device cuda"
        )
    if getattr(args, "cuda_graph", False):
        raise UserError(
            f"--cuda-graph captures attack steps in CUDA graphs; this run is on {device!r}: "
            "drop --cuda-graph, or add --device cuda"
        )


def _print_summary(rep: dict, out: Path, seconds: float) -> None:
    from advcal import distributed
    from advcal.report import summary

    if distributed.is_main():
        print()
        print(summary(rep, out, seconds))


def cmd_demo(args) -> int:
    from advcal.pipeline import demo_config, run

    out = args.out or Path(DEMO_OUT)
    t0 = time.perf_counter()
    rep = run(demo_config(quick=args.quick), out, resume=args.resume, progress=not args.quiet)
    _print_summary(rep, out, time.perf_counter() - t0)
    if args.quick:
        print(
            "(--quick: a smoke run on a subset with 3- and 5-step attacks; its numbers and "
            "sanity checks are not a result: run `advcal demo` for those)"
        )
    return 0


def cmd_calibrate(args) -> int:
    from advcal.pipeline import run

    if args.out is None:
        raise UserError("--out DIR is required (the run folder)")
    t0 = time.perf_counter()
    rep = run(_config_from_args(args), args.out, resume=args.resume, progress=not args.quiet)
    _print_summary(rep, args.out, time.perf_counter() - t0)
    return 0


_RUN_OWNS = (
    "config",
    "backbone",
    "checkpoint",
    "data",
    "centers",
    "modalities",
    "split",
    "first",
    "subset",
)


def cmd_evaluate(args) -> int:
    """Evaluate a finished run folder (frozen vs calibrated), or a frozen backbone alone."""
    from advcal import validation
    from advcal.pipeline import evaluate_backbone, evaluate_run

    t0 = time.perf_counter()
    progress = not args.quiet
    if args.run is None:
        cfg = _config_from_args(args)
        out = args.out or Path("advcal-eval")
        rep = evaluate_backbone(cfg, out, progress=progress)
        _print_summary(rep, out, time.perf_counter() - t0)
        return 0
    clash = [f"--{n.replace('_', '-')}" for n in _RUN_OWNS if getattr(args, n, None) is not None]
    if clash:
        raise UserError(
            f"--run evaluates the run folder's own config; {', '.join(clash)} cannot be "
            "combined with it (evaluate without --run to set them)"
        )
    if args.device is not None:
        validation.check_device(args.device, "--device")
    _no_graph_in_evaluate(args)
    overrides = {
        k: v
        for k, v in (("batch_size", args.batch_size), ("workers", args.workers))
        if v is not None
    }
    if args.amp:
        overrides["amp"] = True  # refused by the evaluation on a device without CUDA
    out = args.out or Path(args.run) / "eval"
    rep = evaluate_run(
        args.run, out, device=args.device, eval_overrides=overrides, progress=progress
    )
    _print_summary(rep, out, time.perf_counter() - t0)
    return 0


def cmd_info(args) -> int:
    import platform

    import torch

    from advcal import __version__, backbones
    from advcal.ops import _dispatch

    info: dict = {
        "advcal": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda_available": torch.cuda.is_available(),
        "cuda": torch.version.cuda,
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError as err:
        info["triton"] = f"not importable ({err})"
    try:
        from advcal import _ext

        info["extension"] = "built" if _ext.available() else f"not loaded: {_ext.why_unavailable()}"
    except ImportError:
        info["extension"] = "not part of this build"
    info["backend_env"] = _dispatch.forced_backend() or "auto"
    info["ops"] = _dispatch.describe()
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    info["backend_used"] = {dev: _dispatch.chosen_by_device(dev) for dev in devices}
    info["backbones"] = backbones.available()
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    for k, v in info.items():
        if isinstance(v, dict):
            print(f"{k}:")
            for k2, v2 in v.items():
                print(f"  {k2}: {v2}")
        else:
            print(f"{k}: {v}")
    return 0


def cmd_convert_centers(args) -> int:
    from advcal.backbones.unibind import convert_centers, load_centers

    convert_centers(args.src, args.dst, trust_pickle=args.trust_pickle)
    mc = load_centers(args.dst)
    k, (m, d) = len(mc.class_names), tuple(mc.centers.shape)
    print(f"wrote {args.dst}: {m} centres of width {d} for {k} classes")
    return 0


def cmd_bench(args) -> int:
    root = Path(__file__).resolve().parents[1] / "benchmarks"
    script = root / f"bench_{args.name}.py"
    if not script.is_file():
        names = sorted(p.stem[6:] for p in root.glob("bench_*.py")) if root.is_dir() else []
        raise UserError(
            f"no benchmark {args.name!r} (benchmarks live in a source checkout; found {names})"
        )
    return subprocess.call([sys.executable, str(script), *args.rest])


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors: ``advcal calibrate: error: ... (see --help)``, exit 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="advcal", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)

    d = sub.add_parser("demo", help="the main job on the embedded default (minibind + digits)")
    d.add_argument("--out", type=Path, help=f"run folder (default ./{DEMO_OUT})")
    d.add_argument("--resume", action="store_true", help="continue an interrupted demo")
    d.add_argument("--quick", action="store_true", help="a fast smoke run on a subset")
    _add_quiet(d)
    d.set_defaults(fn=cmd_demo)

    c = sub.add_parser("calibrate", help="calibrate heads and evaluate before/after")
    _add_run_args(c, calibrate=True)
    c.set_defaults(fn=cmd_calibrate)

    e = sub.add_parser("evaluate", help="evaluate a run folder, or a frozen backbone")
    e.add_argument(
        "--run", type=Path, help="a finished run folder (evaluates frozen and calibrated)"
    )
    _add_run_args(e, calibrate=False)
    e.set_defaults(fn=cmd_evaluate)

    i = sub.add_parser("info", help="what was built: extension, CUDA, Triton, op backends")
    i.add_argument("--json", action="store_true")
    i.set_defaults(fn=cmd_info)

    cc = sub.add_parser("convert-centers", help="UniBind center pickle -> safetensors")
    cc.add_argument("src", type=Path)
    cc.add_argument("dst", type=Path)
    cc.add_argument(
        "--trust-pickle",
        action="store_true",
        help="allow unpickling SRC (runs code from the file: only for files you trust)",
    )
    cc.set_defaults(fn=cmd_convert_centers)

    b = sub.add_parser("bench", help="run benchmarks/bench_NAME.py from a source checkout")
    b.add_argument("name")
    b.add_argument("rest", nargs=argparse.REMAINDER)
    b.set_defaults(fn=cmd_bench)
    return p


REPORT_BUG = (
    "this is a bug in advcal, not in your input: please report it with the command line, "
    "the traceback above and the output of `advcal info`"
)


def _one_line(err: BaseException) -> str:
    """The error's message on one line (some messages from torch span several)."""
    return " ".join(str(err).split()) or type(err).__name__


def main(argv: list[str] | None = None) -> int:
    """The ``advcal`` command. A user error (:mod:`advcal.errors`) is one line on stderr
    naming the argument or file, exit code 2; anything else is a bug: its traceback, a line
    asking to report it, exit code 1."""
    from advcal import distributed, errors

    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except KeyboardInterrupt:
        print(f"advcal {args.cmd}: interrupted", file=sys.stderr)
        return 130
    except Exception as err:
        err = distributed.explain(err) or err
        who = f"advcal {args.cmd}" + (
            f" [rank {distributed.rank()}]" if distributed.enabled() else ""
        )
        if errors.is_user_error(err):
            print(f"{who}: error: {_one_line(err)}", file=sys.stderr)
            return errors.exit_code(err)
        traceback.print_exc()
        print(f"{who}: internal error ({type(err).__name__}): {REPORT_BUG}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
