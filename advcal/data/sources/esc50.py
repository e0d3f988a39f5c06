"""``esc50:ROOT``: ESC-50 as released (karolpiczak/ESC-50; DATA.md §2.2):
``ROOT/audio/{FOLD}-{CLIP_ID}-{TAKE}-{TARGET}.wav`` and ``ROOT/meta/esc50.csv`` (columns
``filename,fold,target,category,esc10,src_file,take``).

Splits: ``fold=`` picks the evaluation fold(s) (``fold=5`` or ``fold=4,5``): ``test`` is
those folds, ``train`` the other ones; without ``fold``, ``test``/``all`` are all 2000 clips
(zero-shot on the whole set) and ``train`` is refused. ``esc10=true`` keeps the ESC-10 rows.

Labels: ``label_order=csv`` (default) uses the csv ``target`` (0 dog ... 49 hand_saw, the
order of the README table; UniBind's string labels are these category names);
``label_order=alphabetical`` is LanguageBind's ``esc50/test/<category>/`` ImageFolder order
(sorted names with spaces, 'airplane', 'breathing', ...), where the label index differs from
``target``. Class names are shown with spaces in both orders; the template is LanguageBind's
``"a sound of {}."`` (ImageBind released none).
"""

from __future__ import annotations

import csv
from dataclasses import dataclass

from advcal.data.metadata import ESC50_TARGETS, templates
from advcal.data.protocol import SampleSource
from advcal.data.sources._common import (
    DataSourceError,
    Item,
    OpenArgs,
    build,
    file_stats,
    need,
    parse_options,
)

COLUMNS = ("filename", "fold", "target", "category")


@dataclass(frozen=True)
class ESC50Options:
    fold: tuple[int, ...] = ()
    label_order: str = "csv"  # csv | alphabetical
    esc10: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.fold, int):
            object.__setattr__(self, "fold", (self.fold,))
        bad = [f for f in self.fold if f not in range(1, 6)]
        if bad:
            raise DataSourceError(f"esc50: folds are 1..5, got {bad}")
        if self.label_order not in ("csv", "alphabetical"):
            raise DataSourceError("esc50: label_order must be 'csv' or 'alphabetical'")


def open_source(args: OpenArgs, **options) -> SampleSource:
    o = parse_options(ESC50Options, options, "esc50")
    root = args.path
    meta = need(root / "meta" / "esc50.csv", "ESC-50 needs meta/esc50.csv beside audio/")
    audio = need(root / "audio", "ESC-50 keeps its clips in audio/")
    with open(meta, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows or not set(COLUMNS) <= set(rows[0]):
        raise DataSourceError(
            f"{meta}: expected columns {COLUMNS}, got {list(rows[0] if rows else [])}"
        )
    for r in rows:  # the csv's own target/category pairs must match the official order
        t = int(r["target"])
        if not 0 <= t < 50 or ESC50_TARGETS[t] != r["category"]:
            raise DataSourceError(
                f"{meta}: row {r['filename']} has target {t} = {r['category']!r}; ESC-50's "
                f"target {t} is {ESC50_TARGETS[t] if 0 <= t < 50 else 'out of range'!r}"
            )
    if args.split == "train" and not o.fold:
        raise DataSourceError(
            "esc50: split 'train' needs fold=<evaluation fold(s)>; train is the rest"
        )
    if args.split not in ("train", "test", "all"):
        raise DataSourceError(f"esc50: split must be train, test or all, got {args.split!r}")
    folds = set(o.fold)

    def keep(r: dict) -> bool:
        if o.esc10 and r.get("esc10", "").strip().lower() != "true":
            return False
        if args.split == "all" or not folds:
            return True
        return (int(r["fold"]) in folds) == (args.split == "test")

    if o.label_order == "csv":
        names = [c.replace("_", " ") for c in ESC50_TARGETS]
        label = {c: i for i, c in enumerate(ESC50_TARGETS)}
    else:
        order = sorted(ESC50_TARGETS, key=lambda c: c.replace("_", " "))
        names = [c.replace("_", " ") for c in order]
        label = {c: i for i, c in enumerate(order)}
    items = [
        Item({"audio": str(audio / r["filename"])}, label[r["category"]], k, r["filename"])
        for k, r in enumerate(rows)
        if keep(r)
    ]
    return build(
        args,
        items,
        name="esc50",
        modalities=("audio",),
        class_names=names,
        templates=templates("languagebind_audio"),
        fingerprint_parts=[file_stats([meta], root), sorted(folds), o.label_order, o.esc10],
        extra={"fold": sorted(folds) or "all", "label_order": o.label_order, "esc10": o.esc10},
    )
