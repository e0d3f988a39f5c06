"""``imagenet:ROOT``: ImageNet-1K in the layouts users have (DATA.md §2.1).

Class index = position of the wnid in the **sorted** 1000 wnids (n01440764 = 0), always:
the devkit's ``ILSVRC2012_ID`` (meta.mat order) and EventBind-style maps are translated to
it, never used as labels. Class names: open_clip's ``IMAGENET_CLASSNAMES`` (``names=lemma``:
WordNet lemmas, UniBind's strings; ``names=wnid``); templates: OpenAI's 80
(``templates=simple``: the 7).

Layouts, tried in this order for split ``val`` (``train`` reads ``ROOT/train/<wnid>/``):

1. class folders: ``ROOT/val/<wnid>/*.JPEG`` (or ``ROOT/<wnid>/`` directly; soumith's
   ``valprep.sh``, torchvision ``ImageFolder``, RobustBench).
2. flat + devkit: ``ILSVRC2012_val_XXXXXXXX.JPEG`` in ``ROOT/val/`` or ``ROOT/`` with
   ``ILSVRC2012_devkit_t12/data/ILSVRC2012_validation_ground_truth.txt`` (ILSVRC2012_IDs,
   one per image in sorted file order) and ``meta.mat`` (``synsets`` rows with
   ``num_children == 0``: ILSVRC2012_ID -> WNID), read with ``scipy.io.loadmat``; option
   ``devkit=`` points elsewhere.
3. flat + Kaggle: ``ILSVRC/Data/CLS-LOC/val/ILSVRC2012_val_*.JPEG`` with
   ``LOC_val_solution.csv`` (``ImageId,PredictionString``; the first token is the wnid);
   option ``solution=`` points elsewhere.

Item keys are ``<wnid>/ILSVRC2012_val_XXXXXXXX.JPEG`` in every layout, so RobustBench's
5000-image list (``subset=imagenet_test_image_ids.txt``, taken in list order) works on the
flat layouts too; ids are the 8-digit image number.
"""

from __future__ import annotations

import csv
import re
from dataclasses import dataclass
from pathlib import Path

from advcal.data.metadata import imagenet_classnames, imagenet_lemmas, imagenet_wnids, templates
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

EXTS = (".jpeg", ".jpg", ".png")
WNID = re.compile(r"^n\d{8}$")
VAL_NAME = re.compile(r"ILSVRC2012_val_(\d{8})", re.I)
GROUND_TRUTH = "ILSVRC2012_validation_ground_truth.txt"


@dataclass(frozen=True)
class ImageNetOptions:
    names: str = "openclip"  # openclip | lemma | wnid
    templates: str = "openai"  # openai (80) | simple (7)
    devkit: str | None = None  # folder holding meta.mat + the ground-truth txt
    solution: str | None = None  # Kaggle LOC_val_solution.csv

    def __post_init__(self) -> None:
        if self.names not in ("openclip", "lemma", "wnid"):
            raise DataSourceError("imagenet: names must be openclip, lemma or wnid")
        if self.templates not in ("openai", "simple"):
            raise DataSourceError("imagenet: templates must be openai or simple")


def _image_id(name: str, fallback: int) -> int:
    m = VAL_NAME.search(name)
    return int(m.group(1)) if m else fallback


def parse_meta_mat(path: Path) -> dict[int, str]:
    """``{ILSVRC2012_ID: wnid}`` of the 1000 leaf synsets in the devkit's ``meta.mat``."""
    try:
        from scipy.io import loadmat

        synsets = loadmat(str(path), squeeze_me=True)["synsets"]
        return {
            int(s["ILSVRC2012_ID"]): str(s["WNID"])
            for s in synsets.ravel()
            if int(s["num_children"]) == 0
        }
    except Exception as err:
        raise DataSourceError(f"cannot read the devkit's {path}: {err}") from err


def _class_folder_items(tree: Path, index: dict[str, int]) -> list[Item]:
    folders = sorted(d.name for d in tree.iterdir() if d.is_dir())
    unknown = [f for f in folders if f not in index]
    if unknown:
        raise DataSourceError(
            f"{tree}: folders {unknown[:5]} are not ImageNet-1K wnids (expected {tree}/<wnid>/)"
        )
    items = []
    for wnid in folders:
        for p in list_files(tree / wnid, EXTS):
            items.append(Item({"image": str(p)}, index[wnid], _image_id(p.name, len(items)),
                              f"{wnid}/{p.name}"))  # fmt: skip
    return items


def _flat_items(images: list[Path], wnids: list[str], index: dict[str, int]) -> list[Item]:
    return [
        Item({"image": str(p)}, index[w], _image_id(p.name, k), f"{w}/{p.name}")
        for k, (p, w) in enumerate(zip(images, wnids, strict=True))
    ]


def open_source(args: OpenArgs, **options) -> SampleSource:
    o = parse_options(ImageNetOptions, options, "imagenet")
    root = args.path
    all_wnids = imagenet_wnids()
    index = {w: i for i, w in enumerate(all_wnids)}
    parts: list = []
    tree = root / args.split
    if (
        not tree.is_dir()
        and args.split == "val"
        and any(WNID.match(d.name) for d in root.iterdir() if d.is_dir())
    ):
        tree = root  # ROOT is the val folder itself
    if tree.is_dir() and any(WNID.match(d.name) for d in tree.iterdir() if d.is_dir()):
        layout, items = "class folders", _class_folder_items(tree, index)
    elif args.split != "val":
        raise DataSourceError(
            f"{root}: split {args.split!r} needs class folders {root}/{args.split}/<wnid>/; "
            "the flat layouts hold only 'val'"
        )
    else:
        layout, items, parts = _flat(root, o, index)
    if not items:
        raise DataSourceError(f"{root}: no ImageNet images found for split {args.split!r}")
    names = {
        "openclip": imagenet_classnames(),
        "lemma": imagenet_lemmas(),
        "wnid": all_wnids,
    }[o.names]
    return build(
        args,
        items,
        name="imagenet",
        modalities=("image",),
        class_names=names,
        templates=templates(f"{o.templates}_imagenet"),
        fingerprint_parts=parts,
        extra={"layout": layout},
        root=root,
    )


def _flat(root: Path, o: ImageNetOptions, index: dict[str, int]):
    kaggle = root / "ILSVRC" / "Data" / "CLS-LOC" / "val"
    solution = Path(o.solution) if o.solution else root / "LOC_val_solution.csv"
    if solution.is_file():
        img_dir = kaggle if kaggle.is_dir() else root
        images = list_files(img_dir, EXTS)
        truth: dict[str, str] = {}
        with open(solution, newline="") as f:
            for row in csv.DictReader(f):
                truth[row["ImageId"]] = row["PredictionString"].split()[0]
        missing = [p.name for p in images if p.stem not in truth]
        if missing:
            raise DataSourceError(f"{solution} has no row for {missing[:3]}")
        wnids = [truth[p.stem] for p in images]
        return "flat + LOC_val_solution.csv", _flat_items(images, wnids, index), \
            file_stats([solution], root)  # fmt: skip
    img_dir = root / "val" if (root / "val").is_dir() else root
    images = [p for p in list_files(img_dir, EXTS) if VAL_NAME.search(p.name)]
    if not images:
        raise DataSourceError(
            f"{root}: no ImageNet val layout found: expected val/<wnid>/*.JPEG, or "
            "ILSVRC2012_val_*.JPEG with the devkit (ILSVRC2012_devkit_t12/data/) or "
            "LOC_val_solution.csv"
        )
    devkit = Path(o.devkit) if o.devkit else None
    candidates = [devkit] if devkit else [
        root / "ILSVRC2012_devkit_t12" / "data", root.parent / "ILSVRC2012_devkit_t12" / "data",
        root,
    ]  # fmt: skip
    found = next((d for d in candidates if (d / GROUND_TRUTH).is_file()), None)
    if found is None or not (found / "meta.mat").is_file():
        raise DataSourceError(
            f"{root} holds flat ILSVRC2012_val_*.JPEG files but no devkit ground truth: "
            f"expected {GROUND_TRUTH} and meta.mat in {candidates[0]} (or pass devkit=DIR), "
            "or a Kaggle LOC_val_solution.csv (solution=FILE)"
        )
    id_to_wnid = parse_meta_mat(found / "meta.mat")
    gt = [int(s) for s in read_lines(found / GROUND_TRUTH)]
    # the ground truth lists the 50 000 val images in file-name order: number N is line N
    by_number = [_image_id(p.name, -1) for p in images]
    if max(by_number) > len(gt):
        raise DataSourceError(
            f"{found / GROUND_TRUTH} has {len(gt)} lines; image number {max(by_number)} has none"
        )
    try:
        wnids = [id_to_wnid[gt[n - 1]] for n in by_number]
    except KeyError as err:
        raise DataSourceError(f"ILSVRC2012_ID {err} is not a leaf synset in meta.mat") from None
    parts = file_stats([found / GROUND_TRUTH, found / "meta.mat"], found)
    return "flat + devkit", _flat_items(images, wnids, index), parts
