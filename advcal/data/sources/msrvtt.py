"""``msrvtt:ROOT``: MSR-VTT in the CLIP4Clip / LanguageBind layout (DATA.md §2.4).

Videos: ``ROOT/MSRVTT_Videos/videoN.mp4`` or ``ROOT/videos/all/videoN.mp4`` (Frozen-in-Time's
zip), ``.webm`` when there is no ``.mp4``. Split files in ``ROOT`` or ``ROOT/msrvtt_data/``:

- ``test`` = the 1k-A split ``MSRVTT_JSFUSION_test.csv`` (``key,vid_key,video_id,sentence``,
  one caption per video);
- ``train`` = ``MSRVTT_train.9k.csv`` (``video_id``), captions from ``MSRVTT_data.json``
  (``sentences[{video_id, caption}]``).

``task=retrieval`` (default): text-to-video retrieval, ``info.task == "retrieval"``, labels
-1, ``info.captions[id]`` the captions of video ``id`` (id = N of ``videoN``).
``task=category``: UniBind's 20-way video-category classification, labels from
``MSRVTT_data.json`` ``videos[].category`` in category-id order (class names: DATA.md's
community list); same splits.
"""

from __future__ import annotations

import csv
import json
import re
from dataclasses import dataclass
from pathlib import Path

from advcal.data.metadata import MSRVTT_CATEGORIES
from advcal.data.protocol import SampleSource
from advcal.data.sources._common import (
    DataSourceError,
    Item,
    OpenArgs,
    build,
    file_stats,
    parse_options,
)

VIDEO_ID = re.compile(r"^video(\d+)$")
SPLIT_FILES = {"test": "MSRVTT_JSFUSION_test.csv", "train": "MSRVTT_train.9k.csv"}


@dataclass(frozen=True)
class MSRVTTOptions:
    task: str = "retrieval"  # retrieval | category

    def __post_init__(self) -> None:
        if self.task not in ("retrieval", "category"):
            raise DataSourceError("msrvtt: task must be 'retrieval' or 'category'")


def _find(root: Path, name: str) -> Path | None:
    return next((p for p in (root / name, root / "msrvtt_data" / name) if p.is_file()), None)


def _video_dir(root: Path) -> Path:
    for d in (root / "MSRVTT_Videos", root / "videos" / "all", root / "MSRVTT" / "videos" / "all"):
        if d.is_dir():
            return d
    raise DataSourceError(f"{root}: no MSRVTT_Videos/ or videos/all/ folder of videoN.mp4 files")


def open_source(args: OpenArgs, **options) -> SampleSource:
    o = parse_options(MSRVTTOptions, options, "msrvtt")
    root = args.path
    if args.split not in SPLIT_FILES:
        raise DataSourceError(
            f"msrvtt: split must be test (1k-A) or train (9k), got {args.split!r}"
        )
    split_file = _find(root, SPLIT_FILES[args.split])
    if split_file is None:
        raise DataSourceError(f"{root}: no {SPLIT_FILES[args.split]} (in ROOT or ROOT/msrvtt_data)")
    with open(split_file, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows or "video_id" not in rows[0]:
        raise DataSourceError(f"{split_file}: no video_id column")
    data_json = _find(root, "MSRVTT_data.json")
    data = json.loads(data_json.read_text()) if data_json else None
    captions: dict[str, list[str]] = {}
    if args.split == "test":
        for r in rows:
            captions.setdefault(r["video_id"], []).append(r["sentence"])
    elif o.task == "retrieval":
        if data is None:
            raise DataSourceError(f"{root}: the train captions are in MSRVTT_data.json (missing)")
        for s in data["sentences"]:
            captions.setdefault(s["video_id"], []).append(s["caption"])
    category = {}
    if o.task == "category":
        if data is None:
            raise DataSourceError(f"{root}: task=category needs MSRVTT_data.json (categories)")
        category = {v["video_id"]: int(v["category"]) for v in data["videos"]}
    vdir = _video_dir(root)
    items, seen = [], set()
    for r in rows:
        vid = r["video_id"]
        if vid in seen:
            continue
        seen.add(vid)
        m = VIDEO_ID.match(vid)
        if not m:
            raise DataSourceError(f"{split_file}: video_id {vid!r} is not videoN")
        path = vdir / f"{vid}.mp4"
        if not path.is_file() and (vdir / f"{vid}.webm").is_file():
            path = vdir / f"{vid}.webm"
        if o.task == "category" and vid not in category:
            raise DataSourceError(f"{data_json}: no category for {vid}")
        label = category[vid] if o.task == "category" else -1
        items.append(Item({"video": str(path)}, label, int(m.group(1)), path.name))
    caps = {int(VIDEO_ID.match(v).group(1)): tuple(c) for v, c in captions.items() if v in seen}
    parts = file_stats([p for p in (split_file, data_json) if p is not None], root)
    return build(
        args,
        items,
        name="msrvtt" if o.task == "retrieval" else "msrvtt-category",
        modalities=("video",),
        class_names=MSRVTT_CATEGORIES if o.task == "category" else (),
        fingerprint_parts=[parts, o.task],
        extra={"task": o.task, "split_file": split_file.name},
        task="retrieval" if o.task == "retrieval" else "classification",
        captions=caps if o.task == "retrieval" else None,
    )
