"""Reports: ``report.json`` (everything), ``report.md`` (the table a person reads) and
``robust_vs_eps.png`` (robust top-1 against eps per modality, before and after calibration).

``build(...)`` merges a frozen ("before") and a calibrated ("after") evaluation into one dict;
``write(report, out_dir)`` writes the three files atomically (PNG only with the ``plot``
extra; without it the report says how to get it).
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

METHOD = (
    "Frozen backbone and fixed text centers; one trainable head per modality trained only on "
    "adversarial examples (attacks through backbone + head); objective = weighted sum of "
    "fixed-center CE, clean->adversarial L2, clean-adversarial InfoNCE and modality-consistency "
    "KL. Evaluation attacks are adaptive (through backbone and head); a sample counts as robust "
    "only if every attack of the suite fails on it."
)
_PER_SIDE = (
    "clean_top1",
    "clean_top5",
    "robust_top1",
    "robust_top5",
    "attacks",
    "broken_by",
    "compare",
    "weak_top1",
    "sweep",
    "large_eps_top1",
    "black_box_broke",
    "seconds",
    "not_run",
)


def _as_dict(result) -> dict | None:
    if result is None or isinstance(result, dict):
        return result
    return result.to_dict()  # an advcal.evaluate.EvalResult


def build(
    *,
    backbone: str,
    backbone_params: int,
    trainable_params: int,
    before,
    after,
    config: dict,
    timings: dict,
    dataset: str,
) -> dict:
    """One report dict from a frozen (``before``) and a calibrated (``after``, or None)
    evaluation (:class:`advcal.evaluate.EvalResult` or its ``to_dict()``). Per modality, every
    per-evaluation number ``k`` appears as ``k_before`` / ``k_after``."""
    before, after = _as_dict(before), _as_dict(after)
    mods = {}
    for m, b in before["modalities"].items():
        a = (after or {}).get("modalities", {}).get(m, {})
        entry = {k: b[k] for k in ("n", "eps", "norm", "space", "large_eps")}
        for k in _PER_SIDE:
            entry[f"{k}_before"] = b[k]
            entry[f"{k}_after"] = a.get(k)
        mods[m] = entry
    sanity = {f"before.{k}": v for k, v in before["sanity"].items()}
    if after is not None:
        sanity.update({f"after.{k}": v for k, v in after["sanity"].items()})
    retrieval = {
        pair: {"before": r, "after": (after or {}).get("retrieval", {}).get(pair)}
        for pair, r in before.get("retrieval", {}).items()
    }
    return {
        "backbone": backbone,
        "dataset": dataset,
        "data": before["data"],
        "method": METHOD,
        "config": {**config, "eval": before["config"]},
        "modalities": mods,
        "retrieval": retrieval,
        "sanity": sanity,
        "sanity_passed": all(v is not False for v in sanity.values()),
        "sanity_not_run": sorted(k for k, v in sanity.items() if v is None),
        "trainable_params": trainable_params,
        "backbone_params": backbone_params,
        "trainable_fraction": trainable_params / max(backbone_params, 1),
        "timings": timings,
    }


def _eps(eps: float, space: str) -> str:
    """``4/255`` for unit-range inputs (pixels, waveforms), else the number in input units."""
    if space in ("pixels", "waveform") and abs(eps * 255 - round(eps * 255)) < 1e-6:
        return f"{round(eps * 255)}/255"
    return f"{eps:.4g}"


def _pct(v) -> str:
    return "-" if v is None else f"{100 * v:.1f}"


def _delta(a, b) -> str:
    return "-" if a is None or b is None else f"{100 * (a - b):+.1f}"


def table(report: dict) -> str:
    """The Markdown table of clean/robust top-1 per modality, before and after."""
    lines = [
        "| modality | eps | clean before | clean after | robust before | robust after | Δ robust |",
        "|---|---|---|---|---|---|---|",
    ]
    mods = report["modalities"]
    for m, r in mods.items():
        eps = _eps(r["eps"], r["space"]) + f" ({r['norm']}, {r['space']})"
        lines.append(
            f"| {m} | {eps} | {_pct(r['clean_top1_before'])} | {_pct(r['clean_top1_after'])} | "
            f"{_pct(r['robust_top1_before'])} | {_pct(r['robust_top1_after'])} | "
            f"{_delta(r['robust_top1_after'], r['robust_top1_before'])} |"
        )
    if mods and all(r["robust_top1_after"] is not None for r in mods.values()):
        n = len(mods)
        mean = {
            k: sum(r[k] for r in mods.values()) / n
            for k in (
                "clean_top1_before",
                "clean_top1_after",
                "robust_top1_before",
                "robust_top1_after",
            )
        }
        lines.append(
            f"| **mean** | | {_pct(mean['clean_top1_before'])} | {_pct(mean['clean_top1_after'])}"
            f" | {_pct(mean['robust_top1_before'])} | {_pct(mean['robust_top1_after'])} | "
            f"{_delta(mean['robust_top1_after'], mean['robust_top1_before'])} |"
        )
    return "\n".join(lines)


def cascade_table(report: dict) -> str:
    """Robust top-1 after each attack of the suite (each runs on what the earlier ones left)."""
    mods = report["modalities"]
    labels = list(next(iter(mods.values()))["attacks_before"]) if mods else []
    lines = [
        "| modality | model | clean | " + " | ".join(f"after {x}" for x in labels) + " |",
        "|---|---|---|" + "---|" * len(labels),
    ]
    for m, r in mods.items():
        for when in ("before", "after"):
            acc = r[f"attacks_{when}"]
            if acc is None:
                continue
            broke = r[f"broken_by_{when}"] or {}
            cells = [f"{_pct(acc.get(x))} (-{broke.get(x, 0)})" for x in labels]
            model = "frozen" if when == "before" else "calibrated"
            lines.append(
                f"| {m} | {model} | {_pct(r[f'clean_top1_{when}'])} | " + " | ".join(cells) + " |"
            )
    return "\n".join(lines)


def compare_table(report: dict) -> str:
    """Robust top-1 under the comparison suites beside the main suite's."""
    mods = report["modalities"]
    names = list(next(iter(mods.values()))["compare_before"]) if mods else []
    if not names:
        return ""
    suite = report["config"]["eval"]["suite"]
    suite = suite if isinstance(suite, str) else "custom"
    head = ["modality"]
    for when in ("frozen", "calibrated"):
        head += [f"{n} ({when})" for n in names] + [f"{suite} ({when})"]
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for m, r in mods.items():
        cells = [m]
        for when in ("before", "after"):
            cmp = r[f"compare_{when}"] or {}
            cells += [_pct(cmp.get(n)) for n in names] + [_pct(r[f"robust_top1_{when}"])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _suite_text(ev: dict) -> str:
    """``standard (apgd-ce-100 -> apgd-t-100 -> fab-t-100 -> square-5000q)``."""
    from advcal.attacks.suite import resolve

    specs = resolve(ev["suite"])
    name = ev["suite"] if isinstance(ev["suite"], str) else "custom"
    return f"{name} ({' -> '.join(s.label for s in specs)})"


def summary(report: dict, out: Path | str, seconds: float) -> str:
    """What the CLI prints after a run: the table, the checks, the parameters, where."""
    failed = [k for k, v in report["sanity"].items() if v is False]
    not_run = report.get("sanity_not_run") or []
    checks = "all passed" if not failed else "FAILED: " + ", ".join(failed)
    if not_run:  # grouped by check: "black_box_not_better x14"
        names: dict[str, int] = {}
        for k in not_run:
            name = k.split(".")[1] if k.count(".") >= 2 else k
            names[name] = names.get(name, 0) + 1
        checks += " (not run: " + ", ".join(f"{k} x{v}" for k, v in names.items()) + ")"
    data = report.get("data") or {}
    first = table(report)
    if not report["modalities"]:  # a retrieval set: the R@K table is the result
        first = "\n".join(
            [
                "| query -> gallery | gallery | before R@1/5/10 | after R@1/5/10 |",
                "|---|---|---|---|",
            ]
            + [
                f"| {pair} | {kind} | {' / '.join(_pct(v) for v in r['before'][kind].values())} | "
                + (" / ".join(_pct(v) for v in r["after"][kind].values()) if r["after"] else "-")
                + " |"
                for pair, r in report["retrieval"].items()
                for kind in ("clean", "adv")
            ]
        )
    lines = [
        first,
        "",
        f"robust = worst case over the {_suite_text(report['config']['eval'])} suite, "
        f"{data.get('n', '?')} of {data.get('of', '?')} {data.get('split', '')} samples"
        + (f" ({data['subset']})" if data.get("subset") else ""),
        f"sanity checks: {checks}",
        f"trainable parameters: {report['trainable_params']:,} "
        f"({100 * report['trainable_fraction']:.2f}% of the backbone)",
        f"report: {Path(out) / 'report.md'}  ({seconds:.0f} s)",
    ]
    return "\n".join(lines)


def markdown(report: dict) -> str:
    cfg = report["config"]
    ev = cfg["eval"]
    failed = [k for k, v in report["sanity"].items() if v is False]
    data = report.get("data") or {}
    subset = f" ({data['subset']})" if data.get("subset") else ""
    out = [
        f"# advcal report: {report['backbone']} on {report['dataset']}",
        "",
        f"Top-1 accuracy (%) on {data.get('n', '?')} of the {data.get('of', '?')} samples of "
        f"`{data.get('source', report['dataset'])}` split `{data.get('split', '?')}`{subset}. "
        f"Robust = per-sample worst case over the {_suite_text(ev)} suite, each attack run on "
        "the samples every earlier one failed on, adaptive through backbone and head.",
        "",
        table(report),
        "",
        f"Trainable parameters: {report['trainable_params']:,} "
        f"({100 * report['trainable_fraction']:.2f}% of the backbone's "
        f"{report['backbone_params']:,}).",
        "",
        "## Robust accuracy after each attack",
        "",
        "Each cell: robust top-1 (%) after that attack (samples it broke).",
        "",
        cascade_table(report),
        "",
    ]
    not_run = sorted(
        {f"{m}: {x}" for m, r in report["modalities"].items() for x in r["not_run_before"] or ()}
    )
    if not_run:
        out += ["Not run (the suite adapted to the input): " + "; ".join(not_run) + ".", ""]
    cmp = compare_table(report)
    if cmp:
        out += [
            "## The same models under other suites",
            "",
            "Robust top-1 (%) under each comparison suite beside the main one: a suite of "
            "cross-entropy attacks only (`legacy`) overstates robustness.",
            "",
            cmp,
            "",
        ]
    out += [
        "## Sanity checks",
        "",
        "All passed." if not failed else "**FAILED:** " + ", ".join(failed),
        "",
        "| check | result |",
        "|---|---|",
        *[
            f"| {k} | {'pass' if v else ('not run' if v is None else '**FAIL**')} |"
            for k, v in report["sanity"].items()
        ],
        "",
        "## Retrieval (R@1 / R@5 / R@10, %)",
        "",
        "Instance retrieval `a->m`: the clean `a` embedding queries the `m` gallery, clean or "
        "with every item attacked on its ranking margin. `text->m`: every class center queries "
        "the gallery, clean or the suite's worst-case examples.",
        "",
        "| pair | gallery | before | after |",
        "|---|---|---|---|",
    ]
    for pair, r in report["retrieval"].items():
        for kind in ("clean", "adv"):

            def fmt(x, kind=kind):
                return "-" if not x else " / ".join(_pct(x[kind][k]) for k in x[kind])

            out.append(f"| {pair} | {kind} | {fmt(r['before'])} | {fmt(r['after'])} |")
    out += [
        "",
        "## Method and protocol",
        "",
        report["method"],
        "",
        "```json",
        json.dumps(cfg, indent=2, default=str),
        "```",
        "",
        "Timings (s): " + ", ".join(f"{k} {v:.1f}" for k, v in report["timings"].items()),
        *_shares(report["timings"]),
        "",
    ]
    return "\n".join(out)


def _shares(timings: dict) -> list[str]:
    """One line: the evaluation's and the data loaders' shares of the run's wall time."""
    total = sum(v for k, v in timings.items() if k != "data_wait")
    if total <= 0 or "data_wait" not in timings:
        return []
    evaluation = sum(v for k, v in timings.items() if k.startswith("eval"))
    return [
        "",
        f"Evaluation took {100 * evaluation / total:.0f}% of the wall time ({total:.0f} s), "
        f"waiting for data {100 * timings['data_wait'] / total:.1f}%.",
    ]


def plot(report: dict, path: Path) -> bool:
    """Robust top-1 vs eps per modality, before (dashed) and after (solid)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        warnings.warn(
            "matplotlib is not installed: no plot written. "
            "Install the extra: pip install 'advcal[plot]'",
            stacklevel=2,
        )
        return False
    mods = report["modalities"]
    if not mods:  # a retrieval-only evaluation: no eps sweep to plot
        return False
    cols = min(4, len(mods))
    rows = (len(mods) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.6 * rows), squeeze=False)
    for ax, (m, r) in zip(axes.flat, mods.items(), strict=False):
        # pixels and waveforms live in unit-width ranges: eps reads best in 1/255 steps
        scale, unit = (255.0, " (x/255)") if r["space"] in ("pixels", "waveform") else (1.0, "")
        for when, style in (("before", "--o"), ("after", "-o")):
            sweep = r[f"sweep_{when}"]
            if not sweep:
                continue
            eps = sorted(sweep, key=float)
            xs = [float(e) * scale for e in eps]
            ax.plot(xs, [100 * sweep[e] for e in eps], style, label=when)
        ax.axvline(r["eps"] * scale, color="grey", lw=0.8, ls=":")  # the evaluation eps
        ax.set_title(f"{m} ({r['norm']}, {r['space']})", fontsize=9)
        ax.set_xlabel("eps" + unit, fontsize=8)
        ax.set_ylabel("robust top-1 (%)", fontsize=8)
        ax.set_ylim(0, 100)
        ax.grid(alpha=0.3)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(mods) :]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=8)
    fig.suptitle(f"advcal: robust accuracy vs eps ({report['backbone']})", fontsize=10)
    fig.tight_layout()
    from advcal import runfolder

    runfolder.write_with(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
    plt.close(fig)
    return True


def _atomic_write(path: Path, text: str) -> None:
    from advcal import runfolder  # unique temp name, fsync, umask mode, temp removed on error

    runfolder.write_text(path, text)


def write(report: dict, out_dir: str | Path) -> dict[str, Path]:
    """Write report.json, report.md and robust_vs_eps.png into ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "report.json", "md": out / "report.md"}
    _atomic_write(paths["json"], json.dumps(report, indent=2, default=str))
    _atomic_write(paths["md"], markdown(report))
    if plot(report, out / "robust_vs_eps.png"):
        paths["png"] = out / "robust_vs_eps.png"
    return paths
