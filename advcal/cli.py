"""The ``advcal`` command line: demo, calibrate, evaluate, info, convert-centers, bench."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

DEMO_OUT = "advcal-demo"


def _demo_config(quick: bool):
    from advcal.pipeline import RunConfig

    cfg = RunConfig()  # the defaults are the demo's protocol
    if quick:  # a smoke run: a subset and short attacks (not a result)
        cfg = RunConfig.from_dict(
            {
                "train_limit": 256,
                "test_limit": 96,
                "calib": {"epochs": 1, "attack_steps": 3},
                "eval": {
                    "steps": 5,
                    "restarts": 1,
                    "alpha_ratio": 0.5,
                    "sweep_steps": 3,
                    "weak_steps": 3,
                },
            }
        )
    return cfg


def _add_run_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", type=Path, help="TOML file with RunConfig keys ([calib], [eval])")
    p.add_argument("--backbone", help="backbone name (see `advcal info`)")
    p.add_argument("--checkpoint", help="checkpoint file or directory of a real Bind model")
    p.add_argument(
        "--data",
        help="'digits' (embedded) or a dataset file (advcal.data.save or save_splits)",
    )
    p.add_argument(
        "--centers",
        help="multi-center file (from `advcal convert-centers`); default: class-prompt centers",
    )
    p.add_argument("--modalities", help="comma-separated subset of modalities")
    p.add_argument("--epochs", type=int, help="calibration epochs")
    p.add_argument("--device", help="cpu, cuda, cuda:1, ...")
    p.add_argument("--amp", action="store_true", help="bf16 autocast for calibration (GPU)")
    p.add_argument(
        "--cuda-graph",
        action="store_true",
        help="capture every attack step in a CUDA graph (calibration and evaluation; GPU)",
    )
    p.add_argument("--out", type=Path, required=False, help="run folder")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run in --out")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def _config_from_args(args, base=None):
    from advcal.pipeline import RunConfig

    cfg = RunConfig.from_toml(args.config) if args.config else (base or RunConfig())
    changes = {}
    for name in ("backbone", "checkpoint", "data", "centers", "device"):
        if getattr(args, name, None) is not None:
            changes[name] = getattr(args, name)
    if getattr(args, "modalities", None):
        changes["modalities"] = tuple(m.strip() for m in args.modalities.split(",") if m.strip())
    import dataclasses

    calib = {}
    if getattr(args, "epochs", None) is not None:
        calib["epochs"] = args.epochs
    if getattr(args, "amp", False):
        calib["amp"] = True
    if getattr(args, "cuda_graph", False):
        calib["cuda_graph"] = True
        changes["eval"] = dataclasses.replace(cfg.eval, cuda_graph=True)
    if calib:
        changes["calib"] = dataclasses.replace(cfg.calib, **calib)
    return cfg.replace(**changes) if changes else cfg


def _print_summary(rep: dict, out: Path, seconds: float) -> None:
    from advcal import distributed
    from advcal.report import table

    if not distributed.is_main():
        return
    print()
    print(table(rep))
    failed = [k for k, v in rep["sanity"].items() if not v]
    print(f"\nsanity checks: {'all passed' if not failed else 'FAILED: ' + ', '.join(failed)}")
    print(
        f"trainable parameters: {rep['trainable_params']:,} "
        f"({100 * rep['trainable_fraction']:.2f}% of the backbone)"
    )
    print(f"report: {out / 'report.md'}  ({seconds:.0f} s)")


def cmd_demo(args) -> int:
    from advcal.pipeline import run

    out = args.out or Path(DEMO_OUT)
    t0 = time.perf_counter()
    rep = run(_demo_config(args.quick), out, resume=args.resume, progress=not args.no_progress)
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
        print("advcal calibrate: --out DIR is required (the run folder)", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    rep = run(_config_from_args(args), args.out, resume=args.resume, progress=not args.no_progress)
    _print_summary(rep, args.out, time.perf_counter() - t0)
    return 0


def cmd_evaluate(args) -> int:
    """Evaluate a finished run folder (frozen vs calibrated), or a frozen backbone alone."""
    from advcal import backbones, report
    from advcal.evaluate import evaluate
    from advcal.pipeline import _datasets, load_run, make_centers

    t0 = time.perf_counter()
    if args.run is not None:
        run = load_run(args.run, device=args.device)
        cfg, backbone, heads, centers = run.config, run.backbone, run.heads, run.centers
        test = run.dataset("test")
    else:
        cfg = _config_from_args(args)
        backbone = backbones.load(
            cfg.backbone,
            checkpoint=cfg.checkpoint,
            device=cfg.device,
            progress=not args.no_progress,
            **cfg.backbone_kwargs,
        )
        _, test = _datasets(cfg)
        heads = None
        centers, _ = make_centers(cfg, backbone, test)
    modalities = cfg.modalities or tuple(m for m in test.modalities if m in backbone.modalities)
    kw = {
        "modalities": modalities,
        "config": cfg.eval,
        "device": cfg.device,
        "progress": not args.no_progress,
    }
    before = evaluate(backbone, test, centers, None, **kw)
    after = evaluate(backbone, test, centers, heads, **kw) if heads is not None else None
    out = args.out or (Path(args.run) / "eval" if args.run else Path("advcal-eval"))
    rep = report.build(
        backbone=backbone.name,
        backbone_params=backbone.num_params(),
        trainable_params=heads.num_trainable() if heads is not None else 0,
        before=before,
        after=after,
        config={**cfg.as_dict(), "modalities": list(modalities)},
        timings={"evaluate": time.perf_counter() - t0},
        dataset=test.name,
    )
    report.write(rep, out)
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
        print(
            f"advcal bench: no benchmark {args.name!r} (benchmarks live in a source checkout; "
            f"found {names})",
            file=sys.stderr,
        )
        return 2
    return subprocess.call([sys.executable, str(script), *args.rest])


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="advcal", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)

    d = sub.add_parser("demo", help="the main job on the embedded default (minibind + digits)")
    d.add_argument("--out", type=Path, help=f"run folder (default ./{DEMO_OUT})")
    d.add_argument("--resume", action="store_true", help="continue an interrupted demo")
    d.add_argument("--quick", action="store_true", help="a fast smoke run on a subset")
    d.add_argument("--no-progress", action="store_true")
    d.set_defaults(fn=cmd_demo)

    c = sub.add_parser("calibrate", help="calibrate heads and evaluate before/after")
    _add_run_args(c)
    c.set_defaults(fn=cmd_calibrate)

    e = sub.add_parser("evaluate", help="evaluate a run folder, or a frozen backbone")
    e.add_argument(
        "--run", type=Path, help="a finished run folder (evaluates frozen and calibrated)"
    )
    _add_run_args(e)
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


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except (ValueError, FileNotFoundError, TypeError, PermissionError) as err:
        # user errors (bad argument, missing file, refused unpickling): one line, exit 2
        print(f"advcal {args.cmd}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
