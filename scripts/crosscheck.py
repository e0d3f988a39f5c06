"""A second opinion on a run's robust accuracy, from an attack library written elsewhere.

For every modality of a finished run folder, the frozen and the calibrated classifiers are
attacked on exactly the samples the report evaluated (its fixed subset) by torchattacks' APGD
(cross-entropy) and APGD-T (targeted DLR, 9 targets), ``--steps`` iterations each (AutoAttack:
100), per-sample worst case. The result is compared with ``report.json``: torchattacks must not
find robust top-1 more than ``--tolerance`` (2 points) below what advcal reports; a row that
does is printed as FAIL and the script exits 1.

torchattacks clamps its inputs to [0, 1] and expects image batches: every modality is attacked
through :class:`advcal.attacks.UnitBox` (an affine map onto the unit box, the budget scaled by
the same factor, samples flattened to ``(B, 1, 1, n)``; unbounded inputs get a box wide enough
that the clamp never binds), so the threat model is exactly the run's.

    python scripts/crosscheck.py advcal-demo [--steps 100] [--json docs/crosscheck.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

import advcal
from advcal.attacks import UnitBox
from advcal.evaluate import stratified_subset


def robust(model, x, y, eps, steps, batch):
    import torchattacks

    out = []
    for i in range(0, len(y), batch):
        xb, yb = x[i : i + batch], y[i : i + batch]
        ok = model(xb).argmax(1) == yb
        for atk in (
            torchattacks.APGD(model, eps=eps, steps=steps, loss="ce", seed=0),
            torchattacks.APGDT(model, eps=eps, steps=steps, n_classes=model_classes(model), seed=0),
        ):
            with torch.enable_grad():
                xa = atk(xb, yb)
            with torch.no_grad():
                ok &= model(xa).argmax(1) == yb
        out.append(ok)
    return float(torch.cat(out).float().mean())


def model_classes(model) -> int:
    return int(model.model.num_classes)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("run", type=Path)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--tolerance", type=float, default=0.02)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()
    try:
        import torchattacks
    except ImportError:
        sys.exit("crosscheck needs torchattacks (a test-only dependency; ./dev installs it)")
    rep = json.loads((args.run / "report.json").read_text())
    run = advcal.load_run(args.run)
    test = run.dataset("test")
    n_eval = rep["data"]["n"]
    idx = stratified_subset(test.labels, n_eval) if n_eval < len(test) else torch.arange(len(test))
    rows, failed = [], False
    print(f"torchattacks {torchattacks.__version__}: APGD-CE + APGD-T ({args.steps} steps) on "
          f"{len(idx)} samples of {args.run}")  # fmt: skip
    for m, r in rep["modalities"].items():
        x = torch.stack([test[int(i)]["inputs"][m] for i in idx])
        y = test.labels[idx]
        for when, calibrated in (("before", False), ("after", True)):
            clf = run.classifier(m, calibrated=calibrated)
            for p_ in clf.parameters():
                p_.requires_grad_(False)
            box = UnitBox(clf, x).eval()
            t0 = time.perf_counter()
            theirs = robust(box, box.to_unit(x), y, box.eps, args.steps, args.batch)
            ours = r[f"robust_top1_{when}"]
            ok = theirs >= ours - args.tolerance
            failed |= not ok
            rows.append({"modality": m, "model": "frozen" if when == "before" else "calibrated",
                         "advcal": ours, "torchattacks": theirs, "gap": ours - theirs, "ok": ok,
                         "seconds": round(time.perf_counter() - t0, 1)})  # fmt: skip
            print(f"  {m:8s} {rows[-1]['model']:10s} advcal {100 * ours:5.1f}  torchattacks "
                  f"{100 * theirs:5.1f}  gap {100 * (ours - theirs):+5.1f}  "
                  f"{'ok' if ok else 'FAIL'}")  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps({
            "run": str(args.run), "torchattacks": torchattacks.__version__, "steps": args.steps,
            "samples": len(idx), "tolerance": args.tolerance, "rows": rows}, indent=2))  # fmt: skip
    print("all within tolerance" if not failed else "FAILED: torchattacks found less robustness")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
