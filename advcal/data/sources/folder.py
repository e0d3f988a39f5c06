"""``folder:ROOT``: one sub-folder per class (torchvision ``ImageFolder`` convention), any
supported file type (:data:`advcal.data.decode.EXTENSIONS`).

Layout: ``ROOT/<split>/<class>/<files>`` when ``ROOT/<split>`` exists, else
``ROOT/<class>/<files>`` with the split semantics of an advcal dataset file without splits:
``test`` is a seeded stratified quarter of every class (:func:`advcal.data.holdout_split`),
``train`` the rest, ``all`` everything, so calibration never sees the samples it is
evaluated on. Class index = position in the sorted folder names; class names are the folder
names with ``_`` shown as spaces (``names=folder`` keeps them as they are).

One modality per tree: chosen from the files' extensions (images -> ``image``, audio,
video, point clouds, events), or by ``modality=`` (needed for ``depth``/``thermal``, which
are image files, or for a tree of mixed files; then only that modality's files are read).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from advcal.data.decode import EXTENSIONS
from advcal.data.protocol import SampleSource
from advcal.data.sources._common import (
    DataSourceError,
    Item,
    OpenArgs,
    build,
    class_folders,
    parse_options,
)

IMAGE_EXTS = tuple(e for e, m in EXTENSIONS.items() if m == "image")
EXTS_OF = {
    **{m: tuple(e for e, mm in EXTENSIONS.items() if mm == m) for m in set(EXTENSIONS.values())},
    "thermal": IMAGE_EXTS,
    "depth": (".png", ".tif", ".tiff", ".npy"),
}


@dataclass(frozen=True)
class FolderOptions:
    modality: str | None = None
    names: str = "spaces"  # "spaces" (folder name, _ -> space) or "folder"
    seed: int = 0  # of the holdout split when ROOT has no split folders

    def __post_init__(self) -> None:
        if self.modality is not None and self.modality not in EXTS_OF:
            raise DataSourceError(f"folder: modality must be one of {sorted(EXTS_OF)}")
        if self.names not in ("spaces", "folder"):
            raise DataSourceError("folder: names must be 'spaces' or 'folder'")


def infer_modality(files, where) -> str:
    """The one modality of ``files`` by extension; an error lists a mixed tree's kinds."""
    kinds = sorted({EXTENSIONS[p.suffix.lower()] for p in files})
    if len(kinds) != 1:
        raise DataSourceError(
            f"{where} holds {kinds} files: pass modality=<one of them> to read one kind"
        )
    return kinds[0]


def open_source(args: OpenArgs, **options) -> SampleSource:
    o = parse_options(FolderOptions, options, "folder")
    root = args.path
    split_dir = root / args.split
    has_split_dir = split_dir.is_dir() and any(p.is_dir() for p in split_dir.iterdir())
    tree = split_dir if has_split_dir else root
    exts = EXTS_OF[o.modality] if o.modality else tuple(EXTENSIONS)
    classes, found = class_folders(tree, exts)
    modality = o.modality or infer_modality([p for p, _ in found], tree)
    labels = torch.tensor([c for _, c in found])
    if has_split_dir or args.split == "all":
        keep = range(len(found))
    elif args.split in ("train", "test"):
        from advcal.data import holdout_split

        is_test = holdout_split(labels, seed=o.seed)
        keep = (is_test if args.split == "test" else ~is_test).nonzero().squeeze(1).tolist()
    else:
        raise DataSourceError(
            f"{root} has no {args.split!r} folder; without split folders the splits are "
            "'train', 'test' (a stratified holdout) and 'all'"
        )
    items = [
        Item({modality: str(found[k][0])}, found[k][1], k, found[k][0].relative_to(tree).as_posix())
        for k in keep
    ]
    names = classes if o.names == "folder" else [c.replace("_", " ") for c in classes]
    return build(
        args,
        items,
        name=root.name or "folder",
        modalities=(modality,),
        class_names=names,
        fingerprint_parts=[classes],
        extra={"layout": "split folders" if has_split_dir else "holdout", "root": str(tree)},
        root=tree,
    )
