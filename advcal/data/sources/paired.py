"""``paired:MANIFEST``: a CSV (with a header) or JSONL manifest of paired multimodal files,
one row per instance, for the paired sets that retrieval and the modality-consistency loss
need::

    id,label,image,audio,split
    7,dog,img/7.jpg,wav/7.wav,test

Columns/keys: ``id`` (int, unique; the row number when absent), ``label`` (a class name or
an int index), optional ``split``, and one path column per modality (``image``, ``video``,
``audio``, ``depth``, ``thermal``, ``point``, ``event``), relative to the manifest's folder.
Every row must have a file for every modality read.

Class names: ``classes=a,b,c`` (or ``classes_file=`` one per line) in label order; else the
sorted distinct label strings (int labels: ``"0"`` ... ``"K-1"``). Splits: the rows whose
``split`` equals the split asked for (``all``: every row); a manifest without a ``split``
column has the holdout splits of an advcal dataset file (``test`` = a seeded stratified
quarter per class, ``train`` the rest).
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from advcal.data.protocol import SampleSource
from advcal.data.sources._common import (
    DataSourceError,
    Item,
    OpenArgs,
    build,
    file_stats,
    parse_options,
    read_lines,
)

MODALITY_COLUMNS = ("image", "video", "audio", "depth", "thermal", "point", "event")
RESERVED = ("id", "label", "split")


@dataclass(frozen=True)
class PairedOptions:
    classes: tuple[str, ...] = ()
    classes_file: str | None = None
    seed: int = 0


def read_manifest(path: Path) -> list[dict[str, str]]:
    """Rows of a CSV or JSONL manifest as ``{column: str}``."""
    try:
        if path.suffix.lower() in (".jsonl", ".ndjson"):
            rows = [json.loads(s) for s in path.read_text().splitlines() if s.strip()]
            return [{k: "" if v is None else str(v) for k, v in r.items()} for r in rows]
        with open(path, newline="") as f:
            return [dict(r) for r in csv.DictReader(f)]
    except (OSError, ValueError) as err:
        raise DataSourceError(f"cannot read manifest {path}: {err}") from err


def open_source(args: OpenArgs, **options) -> SampleSource:
    o = parse_options(PairedOptions, options, "paired")
    path = args.path
    rows = read_manifest(path)
    if not rows:
        raise DataSourceError(f"manifest {path} has no rows")
    cols = list(rows[0])
    unknown = [c for c in cols if c not in RESERVED and c not in MODALITY_COLUMNS]
    if "label" not in cols or unknown:
        raise DataSourceError(
            f"manifest {path}: needs a 'label' column and path columns named after modalities "
            f"{list(MODALITY_COLUMNS)}; unknown columns {unknown}"
        )
    mods = tuple(c for c in cols if c in MODALITY_COLUMNS)
    if not mods:
        raise DataSourceError(f"manifest {path} has no modality column ({list(MODALITY_COLUMNS)})")
    raw = [r["label"].strip() for r in rows]
    if o.classes_file:
        names = tuple(read_lines(Path(o.classes_file)))
    elif o.classes:
        names = o.classes
    elif all(s.lstrip("-").isdigit() for s in raw):
        names = tuple(str(i) for i in range(max(int(s) for s in raw) + 1))
    else:
        names = tuple(sorted(set(raw)))
    lookup = {n: i for i, n in enumerate(names)}

    def label(s: str, line: int) -> int:
        if s in lookup:
            return lookup[s]
        if s.lstrip("-").isdigit() and 0 <= int(s) < len(names):
            return int(s)
        raise DataSourceError(f"manifest {path} row {line}: label {s!r} is not one of {names}")

    labels = [label(s, k + 2) for k, s in enumerate(raw)]
    ids = [int(r["id"]) if r.get("id", "").strip() else k for k, r in enumerate(rows)]
    if len(set(ids)) != len(ids):
        raise DataSourceError(f"manifest {path}: ids must be unique")
    if "split" in cols:
        keep = [k for k, r in enumerate(rows) if args.split == "all" or r["split"] == args.split]
        if not keep:
            have = sorted({r["split"] for r in rows})
            raise DataSourceError(f"manifest {path} has no {args.split!r} rows (splits {have})")
    elif args.split == "all":
        keep = list(range(len(rows)))
    elif args.split in ("train", "test"):
        from advcal.data import holdout_split

        t = holdout_split(torch.tensor(labels), seed=o.seed)
        keep = (t if args.split == "test" else ~t).nonzero().squeeze(1).tolist()
    else:
        raise DataSourceError(f"manifest {path} has no split column: splits are train, test, all")
    want = args.modalities or mods
    base = path.parent
    items = []
    for k in keep:
        refs = {}
        for m in want:
            cell = rows[k].get(m, "").strip() if m in cols else ""
            if not cell:
                raise DataSourceError(f"manifest {path} row {k + 2} (id {ids[k]}) has no {m} file")
            refs[m] = str(base / cell)
        items.append(Item(refs, labels[k], ids[k], str(ids[k])))
    return build(
        args,
        items,
        name=path.stem,
        modalities=mods,
        class_names=names,
        fingerprint_parts=[file_stats([path], base)],
        extra={"manifest": str(path), "split_column": "split" in cols},
        root=base,
    )
