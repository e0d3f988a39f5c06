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
    "adversarial examples (PGD through backbone + head); objective = weighted sum of fixed-center "
    "CE, clean->adversarial L2, clean-adversarial InfoNCE and modality-consistency KL. "
    "Evaluation attacks are adaptive (through backbone and head); robust accuracy is the "
    "per-sample "
    "worst case over the attacks."
)


def build(
    *,
    backbone: str,
    backbone_params: int,
    trainable_params: int,
    before: dict,
    after: dict | None,
    config: dict,
    timings: dict,
    dataset: str,
) -> dict:
    mods = {}
    for m, b in before["modalities"].items():
        a = (after or {}).get("modalities", {}).get(m, {})
        entry = {
            "eps": b["eps"],
            "norm": b["norm"],
            "space": b["space"],
            "clean_top1_before": b["clean_top1"],
            "clean_top5_before": b["clean_top5"],
            "robust_top1_before": b["robust_top1"],
            "robust_top5_before": b["robust_top5"],
            "attacks": {"before": b["attacks"], "after": a.get("attacks")},
            "sweep": {"before": b["sweep"], "after": a.get("sweep")},
            "weak_top1": {"before": b["weak_top1"], "after": a.get("weak_top1")},
            "large_eps": b["large_eps"],
            "large_eps_top1": {"before": b["large_eps_top1"], "after": a.get("large_eps_top1")},
        }
        for k in ("clean_top1", "clean_top5", "robust_top1", "robust_top5"):
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
        "method": METHOD,
        "config": {**config, "eval": before["config"]},
        "modalities": mods,
        "retrieval": retrieval,
        "sanity": sanity,
        "sanity_passed": all(sanity.values()),
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


def _protocol(ev: dict) -> str:
    """``pgd-50 x 2 restarts, crossmaxim-50 x 1 restart (step 0.1·eps)``."""
    restarts = ev["restarts"]
    if isinstance(restarts, int):
        restarts = [restarts] * len(ev["attacks"])
    parts = [
        f"{a}-{ev['steps']} x {r} restart{'s' if r != 1 else ''}"
        for a, r in zip(ev["attacks"], restarts, strict=True)
    ]
    return ", ".join(parts) + f" (step {ev['alpha_ratio']:g}·eps)"


def markdown(report: dict) -> str:
    cfg = report["config"]
    ev = cfg["eval"]
    failed = [k for k, v in report["sanity"].items() if not v]
    out = [
        f"# advcal report: {report['backbone']} on {report['dataset']}",
        "",
        "Top-1 accuracy (%) on the evaluation split. Robust = per-sample worst case over "
        + _protocol(ev)
        + ", adaptive through backbone and head.",
        "",
        table(report),
        "",
        f"Trainable parameters: {report['trainable_params']:,} "
        f"({100 * report['trainable_fraction']:.2f}% of the backbone's "
        f"{report['backbone_params']:,}).",
        "",
        "## Sanity checks",
        "",
        "All passed." if not failed else "**FAILED:** " + ", ".join(failed),
        "",
        "| check | result |",
        "|---|---|",
        *[f"| {k} | {'pass' if v else '**FAIL**'} |" for k, v in report["sanity"].items()],
        "",
        "## Retrieval (R@1 / R@5 / R@10, %)",
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
        "",
    ]
    return "\n".join(out)


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
    cols = min(4, len(mods))
    rows = (len(mods) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.6 * rows), squeeze=False)
    for ax, (m, r) in zip(axes.flat, mods.items(), strict=False):
        # pixels and waveforms live in unit-width ranges: eps reads best in 1/255 steps
        scale, unit = (255.0, " (x/255)") if r["space"] in ("pixels", "waveform") else (1.0, "")
        for when, style in (("before", "--o"), ("after", "-o")):
            sweep = r["sweep"][when]
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
