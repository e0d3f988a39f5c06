"""advcal's attacks against torchattacks' on the same classifier and batch, side by side.

The benchmark of record for attack throughput (README's performance table is generated from its
latest JSON, ``benchmarks/results/attacks_cpu.json``). One process; every arm of a case is built
and warmed up first, then the arms are timed in interleaved rounds (their order rotating each
round), and ratios are paired per round (min / median / max over rounds), so a neighbour's
burst on a shared machine hits every arm alike. Each arm's robust accuracy on the batch is
recorded beside its time (they must agree within a point: the same attack, not a weaker one).

Classifier: the embedded ``minibind`` tower of each modality as a zero-shot classifier over the
digits class centers — calibrated heads from a run folder (``--run advcal-demo``), or the frozen
model. Attacks, eps = the modality's default (4/255):

* ``pgd-10``: step eps/4, random start. torchattacks' ``PGD`` returns the last iterate;
  ``advcal_early_stop`` (the evaluation default) checks every iterate and drops a sample once
  it is fooled, ``advcal`` runs every step (training semantics, torchattacks' behaviour).
* ``apgd-ce``, ``apgd-t``: ``--apgd-steps`` iterations (AutoAttack: 100), APGD-T over 9
  targets. torchattacks runs the targets one after another on the samples still robust;
  advcal runs them as rows of one batch and drops a sample once fooled.

Arms with ``_compiled`` run on ``torch.compile(classifier)`` (torchattacks) or with
``compile=True`` (advcal); ``--no-compile`` skips them (compilation takes minutes on 2 cores).

    python benchmarks/bench_attacks.py [--run advcal-demo] [--modalities image,video,audio]
        [--batch 128] [--apgd-steps 100] [--rounds 5] [--json benchmarks/results/attacks_cpu.json]
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import advcal
from advcal.attacks import APGD, APGDT, PGD, UnitBox, ZeroShotClassifier
from benchmarks.harness import Case, Table, parser, run_sweep

ATTACKS = ("pgd-10", "apgd-ce", "apgd-t")


def classifiers(run: str | None, modalities, device, quick: bool):
    """``{m: (classifier, x, y)}``: the calibrated (``run``) or frozen minibind classifier and
    a test batch of each modality."""
    if run:
        r = advcal.load_run(run, device=device)
        test = r.dataset("test")
        out = {m: r.classifier(m) for m in modalities}
    else:
        kw = {"embed_dim": 32, "width": 4, "epochs": 1} if quick else {}
        bb = advcal.backbones.load("minibind", device=device, progress=False, **kw)
        test = advcal.data.load_dataset("digits", "test")
        centers = bb.centers(test.class_names, test.templates).to(device)
        out = {m: ZeroShotClassifier(bb, m, centers).eval() for m in modalities}
    return out, test


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--run", default=None, help="a finished run folder: its calibrated heads")
    p.add_argument("--modalities", default="image,video,audio")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--apgd-steps", type=int, default=100)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--reps", type=int, default=1)
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        import torchattacks
    except ImportError:
        sys.exit("bench_attacks needs torchattacks (a test-only dependency): ./dev installs it")
    device = torch.device(args.device)
    mods = [m.strip() for m in args.modalities.split(",") if m.strip()]
    batch, steps, rounds = args.batch, args.apgd_steps, args.rounds
    if args.quick:
        mods, batch, steps, rounds = mods[:1], 16, 5, 2
    clfs, test = classifiers(args.run, mods, device, args.quick)
    compiled: dict = {}
    accs: dict = {}

    def robust(clf, xa, y) -> float:
        with torch.no_grad():
            return float((clf(xa).argmax(1) == y).float().mean())

    def arm(make_attack):
        def factory(case: Case):
            clf, x, y = case.params["_clf"]
            atk = make_attack(case, clf)
            accs[(case.name, factory.arm)] = robust(clf, atk(x, y), y)
            return lambda: atk(x, y)

        return factory

    def ta_model(case, compile_: bool):
        clf = case.params["_clf"][0]
        if not compile_:
            return clf
        if case.params["modality"] not in compiled:
            compiled[case.params["modality"]] = torch.compile(clf, dynamic=False)
        return compiled[case.params["modality"]]

    def ta(case, clf, compile_=False):
        # torchattacks expects image batches in [0, 1]: the classifier through a UnitBox (the
        # same threat model: audio's [-1, 1], video's 5-D batches), its map inside the timing
        x = case.params["_clf"][1]
        box = UnitBox(ta_model(case, compile_), x, spec=clf.spec)
        e, a = box.eps, case.params["attack"]
        if a == "pgd-10":
            atk = torchattacks.PGD(box, eps=e, alpha=e / 4, steps=10, random_start=True)
        elif a == "apgd-ce":
            atk = torchattacks.APGD(box, eps=e, steps=steps, loss="ce", seed=0)
        else:
            atk = torchattacks.APGDT(box, eps=e, steps=steps, n_classes=10, seed=0)
        return lambda x, y: box.from_unit(atk(box.to_unit(x), y))

    def ours(case, clf, early_stop=True, compile_=False):
        a = case.params["attack"]
        kw = {"steps": steps, "compile": compile_}
        if a == "pgd-10":
            return PGD(clf, steps=10, alpha_ratio=0.25, early_stop=early_stop, compile=compile_)
        if a == "apgd-ce":
            return APGD(clf, early_stop=early_stop, **kw)
        return APGDT(clf, early_stop=early_stop, **kw)

    arms = {
        "torchattacks": arm(lambda c, clf: ta(c, clf)),
        "advcal": arm(lambda c, clf: ours(c, clf, early_stop=False)),
        "advcal_early_stop": arm(lambda c, clf: ours(c, clf)),
    }
    if not args.no_compile:
        arms["torchattacks_compiled"] = arm(lambda c, clf: ta(c, clf, compile_=True))
        arms["advcal_early_stop_compiled"] = arm(lambda c, clf: ours(c, clf, compile_=True))
    for name, factory in arms.items():
        factory.arm = name
    cases = []
    for m in mods:
        x = test.inputs[m][:batch].to(device)
        y = test.labels[:batch].to(device)
        for a in ATTACKS:
            cases.append(Case(f"{m}/{a}", {"modality": m, "attack": a, "batch": len(y),
                                            "_clf": (clfs[m], x, y)}))  # fmt: skip
    table = Table(
        "attacks", device, baselines=("torchattacks", "torchattacks_compiled"), subject="advcal"
    )
    run_sweep(table, cases, arms, phase="attack", rounds=rounds, reps=args.reps)
    for i, r in enumerate(table.results):
        params = {k: v for k, v in r.params.items() if not k.startswith("_")}
        extra = dict(r.extra)
        if (r.case, r.arm) in accs:
            extra["robust_top1"] = accs[(r.case, r.arm)]
        if r.ok:
            extra["samples_per_s"] = params["batch"] / (r.timing.median_ms / 1e3)
        table.results[i] = dataclasses.replace(r, params=params, extra=extra)
    table.print()
    print("\nrobust top-1 per arm (each attack's arms must agree within 1 point):")
    for case in cases:
        vals = {a: accs.get((case.name, a)) for a in arms}
        print(
            f"  {case.name}: " + ", ".join(f"{a} {v:.3f}" for a, v in vals.items() if v is not None)
        )
    if args.json:
        table.write_json(args.json)
        import json

        payload = json.loads(Path(args.json).read_text())
        payload["setup"] = {
            "run": args.run,
            "classifier": "calibrated" if args.run else "frozen",
            "batch": batch,
            "apgd_steps": steps,
            "rounds": rounds,
            "threads": torch.get_num_threads(),
            "torchattacks": torchattacks.__version__,
        }
        Path(args.json).write_text(json.dumps(payload, indent=2, default=str))


if __name__ == "__main__":
    main()
