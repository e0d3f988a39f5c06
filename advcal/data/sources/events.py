"""Event-camera sets (DATA.md §1.5): ``ncaltech101:ROOT`` and ``nimagenet:ROOT``.

``ncaltech101``: ``ROOT/<class>/image_XXXX.bin`` (5-byte events; ``ROOT`` may also be the
parent of ``N_Caltech101/``). Splits ``train``/``val`` from EventBind's
``Caltech101_{train,val}.txt`` lists (tab-separated event and image paths; matched on
``<class>/<file>``) in ``ROOT`` or its parent; ``all`` is every file. Class index = sorted
folder names (the ImageFolder convention; EventBind's own map is non-alphabetical:
``class_index=FILE.json`` ({name: index}) uses it instead); names as folders
('sea_horse', UniBind's strings).

``nimagenet``: ``ROOT/extracted_{train,val}/nXXXXXXXX/*.npz`` (``test`` reads ``val``),
optionally restricted by ``ROOT/{train,val}_list.txt`` (absolute paths, matched on
``<wnid>/<file>``). Class index = the sorted 1000 ImageNet wnids (as ``imagenet:``;
``class_index=FILE.json`` for EventBind's non-sorted map), ImageNet class names and the 80
OpenAI templates. Sensor 480 x 640.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from advcal.data.metadata import imagenet_classnames, imagenet_wnids, templates
from advcal.data.protocol import SampleSource
from advcal.data.sources._common import (
    DataSourceError,
    Item,
    OpenArgs,
    build,
    file_stats,
    list_files,
    parse_options,
    read_lines,
)


@dataclass(frozen=True)
class EventOptions:
    class_index: str | None = None  # a JSON {class name or wnid: index} (EventBind's maps)


def _index_map(path: str | None, default: list[str]) -> tuple[list[str], dict[str, int]]:
    if path is None:
        return default, {c: i for i, c in enumerate(default)}
    try:
        m = {str(k): int(v) for k, v in json.loads(Path(path).read_text()).items()}
    except Exception as err:
        raise DataSourceError(f"class_index file {path}: {err}") from err
    if sorted(m.values()) != list(range(len(m))):
        raise DataSourceError(f"class_index file {path}: indices must be 0..{len(m) - 1}")
    return sorted(m, key=m.__getitem__), m


def _tail(p: str | Path) -> str:
    parts = Path(str(p).strip().replace("\\", "/")).parts
    return "/".join(parts[-2:])


def open_ncaltech101(args: OpenArgs, **options) -> SampleSource:
    o = parse_options(EventOptions, options, "ncaltech101")
    root = args.path / "N_Caltech101" if (args.path / "N_Caltech101").is_dir() else args.path
    folders = sorted(d.name for d in root.iterdir() if d.is_dir())
    if not folders:
        raise DataSourceError(f"{root}: no class folders of .bin event files")
    names, index = _index_map(o.class_index, folders)
    unknown = [f for f in folders if f not in index]
    if unknown:
        raise DataSourceError(f"{root}: folders {unknown[:5]} are not in the class index")
    files = {f"{f}/{p.name}": p for f in folders for p in list_files(root / f, [".bin"])}
    parts: list = []
    if args.split == "all":
        keys = list(files)
    else:
        lst = next((d / f"Caltech101_{args.split}.txt" for d in (root, root.parent)
                    if (d / f"Caltech101_{args.split}.txt").is_file()), None)  # fmt: skip
        if lst is None:
            raise DataSourceError(
                f"{root}: split {args.split!r} needs Caltech101_{args.split}.txt (EventBind's "
                "list) in ROOT or its parent; split 'all' reads every file"
            )
        keys = [_tail(line.split("\t")[0]) for line in read_lines(lst)]
        missing = [k for k in keys if k not in files]
        if missing:
            raise DataSourceError(
                f"{lst} lists {len(missing)} files not under {root}: {missing[:3]}"
            )
        parts = file_stats([lst], lst.parent)
    items = [
        Item({"event": str(files[k])}, index[k.split("/")[0]], n, k) for n, k in enumerate(keys)
    ]
    return build(
        args,
        items,
        name="ncaltech101",
        modalities=("event",),
        class_names=names,
        fingerprint_parts=[parts, names],
        extra={"class_index": o.class_index or "sorted folders"},
        root=root,
    )


def open_nimagenet(args: OpenArgs, **options) -> SampleSource:
    o = parse_options(EventOptions, options, "nimagenet")
    split = {"test": "val"}.get(args.split, args.split)
    tree = args.path / f"extracted_{split}"
    if not tree.is_dir():
        raise DataSourceError(f"{args.path}: no extracted_{split}/ folder for split {args.split!r}")
    wnids = list(imagenet_wnids())
    names, index = _index_map(o.class_index, wnids)
    folders = sorted(d.name for d in tree.iterdir() if d.is_dir())
    unknown = [f for f in folders if f not in index]
    if unknown:
        raise DataSourceError(f"{tree}: folders {unknown[:5]} are not ImageNet wnids")
    files = {f"{f}/{p.name}": p for f in folders for p in list_files(tree / f, [".npz"])}
    lst = args.path / f"{split}_list.txt"
    keys = [_tail(s) for s in read_lines(lst)] if lst.is_file() else list(files)
    missing = [k for k in keys if k not in files]
    if missing:
        raise DataSourceError(f"{lst} lists {len(missing)} files not under {tree}: {missing[:3]}")
    items = [
        Item({"event": str(files[k])}, index[k.split("/")[0]], n, k) for n, k in enumerate(keys)
    ]
    by_wnid = dict(zip(wnids, imagenet_classnames(), strict=True))
    return build(
        args,
        items,
        name="nimagenet",
        modalities=("event",),
        class_names=[by_wnid[w] for w in names],
        templates=templates("openai_imagenet"),
        fingerprint_parts=[file_stats([lst], args.path) if lst.is_file() else None, names[:3]],
        extra={"class_index": o.class_index or "sorted wnids"},
        root=tree,
    )
