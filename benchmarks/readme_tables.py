"""The README's performance tables, generated from the committed benchmark JSON.

``python benchmarks/readme_tables.py`` prints them; ``--write`` replaces the block between
``<!-- generated: benchmarks/readme_tables.py -->`` and ``<!-- end generated -->`` in
README.md (``tests/test_readme.py`` checks the README holds exactly what this prints, so the
tables never drift from the measurements).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
BEGIN, END = "<!-- generated: benchmarks/readme_tables.py -->", "<!-- end generated -->"


def _load(name: str) -> dict | None:
    path = RESULTS / name
    return json.loads(path.read_text()) if path.is_file() else None


def _machine(payload: dict) -> str:
    env = payload.get("environment", {})
    cpu = env.get("device_name") or env.get("cpu_model") or "?"
    cores, threads = env.get("cpu_count"), env.get("cpu_threads")
    return f"{cpu}, {cores} cores, {threads} threads, torch {env.get('torch', '?')}"


def _paired(r: dict, arm: str) -> str:
    p = (r.get("paired") or {}).get(arm)
    if not p:
        return "-"
    return f"{p['median']:.2f}x [{p['min']:.2f}-{p['max']:.2f}]"


def attacks_table(payload: dict) -> list[str]:
    """advcal's attacks vs torchattacks', one row per modality x attack."""
    by_case: dict[str, dict[str, dict]] = {}
    for r in payload["results"]:
        by_case.setdefault(r["case"], {})[r["arm"]] = r
    setup = payload.get("setup", {})
    lines = [
        f"Attack throughput, advcal vs torchattacks {setup.get('torchattacks', '')} on the same "
        f"{setup.get('classifier', '')} minibind classifier and batch ({setup.get('batch')} "
        f"samples; APGD {setup.get('apgd_steps')} steps), one process, "
        f"{setup.get('rounds')} interleaved rounds, paired ratios median [min-max]; machine: "
        f"{_machine(payload)}. `benchmarks/results/attacks_cpu.json`.",
        "",
        "| case | advcal samples/s | vs torchattacks | vs torchattacks on torch.compile | "
        "advcal without early exit vs torchattacks | robust top-1: advcal / torchattacks |",
        "|---|---|---|---|---|---|",
    ]
    for case, arms in by_case.items():
        ours = arms.get("advcal_early_stop")
        if ours is None or ours.get("timing") is None:
            continue
        ta = arms.get("torchattacks", {})
        acc = f"{100 * ours['extra'].get('robust_top1', float('nan')):.1f} / " + (
            f"{100 * ta['extra']['robust_top1']:.1f}"
            if ta.get("extra", {}).get("robust_top1") is not None
            else "-"
        )
        lines.append(
            f"| {case} | {ours['extra'].get('samples_per_s', 0):.0f} | "
            f"{_paired(ours, 'torchattacks')} | {_paired(ours, 'torchattacks_compiled')} | "
            f"{_paired(arms['advcal'], 'torchattacks') if 'advcal' in arms else '-'} | {acc} |"
        )
    return lines


def ops_table(pgd: dict | None, head: dict | None) -> list[str]:
    lines = []
    if pgd:
        lines += [
            "",
            f"Fused update `pgd_step_` (fp32, L-inf), {_machine(pgd)}, paired ratios: "
            "`benchmarks/results/pgd_step_cpu_paired.json`.",
            "",
            "| elements | advcal GB/s | vs eager chain | vs torch.compile | vs a copy |",
            "|---|---|---|---|---|",
        ]
        for r in pgd["results"]:
            if not r["arm"].startswith("advcal") or r.get("timing") is None:
                continue
            if r["params"].get("norm") != "linf" or r["params"].get("dtype") not in (
                "fp32",
                "float32",
            ):
                continue
            gbps = r.get("gbps")
            lines.append(
                f"| {r['params']['N']:.0e} | {gbps:.1f} | "
                f"{_paired(r, 'eager')} | {_paired(r, 'compiled')} | {_paired(r, 'copy')} |"
                if gbps is not None
                else f"| {r['case']} | - | - | - | - |"
            )
    if head:
        lines += [
            "",
            f"`head_ce` forward + backward (fp32), {_machine(head)}, paired ratios: "
            "`benchmarks/results/head_ce_cpu.json`.",
            "",
            "| (B, D, K) | advcal ms | vs eager | vs torch.compile |",
            "|---|---|---|---|",
        ]
        for r in head["results"]:
            if (
                not r["arm"].startswith("advcal")
                or r.get("timing") is None
                or r["phase"] != "fwd+bwd"
            ):
                continue
            p = r["params"]
            shape = f"({p.get('B')}, {p.get('D')}, {p.get('K')})"
            lines.append(
                f"| {shape} | {r['timing']['median_ms']:.3f} | {_paired(r, 'eager_fp32')} | "
                f"{_paired(r, 'compile_fp32')} |"
            )
    return lines


def tables() -> str:
    out = []
    att = _load("attacks_cpu.json")
    if att:
        out += attacks_table(att)
    out += ops_table(_load("pgd_step_cpu_paired.json"), _load("head_ce_cpu.json"))
    return "\n".join(out).strip() + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--write", action="store_true", help="replace the block in README.md")
    args = p.parse_args()
    text = tables()
    if not args.write:
        print(text)
        return
    readme = ROOT / "README.md"
    src = readme.read_text()
    if BEGIN not in src or END not in src:
        raise SystemExit(f"README.md has no {BEGIN} ... {END} block")
    head, rest = src.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    readme.write_text(f"{head}{BEGIN}\n{text}{END}{tail}")
    print("README.md updated")


if __name__ == "__main__":
    main()
