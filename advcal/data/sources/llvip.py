"""``llvip:ROOT``: LLVIP infrared crops as classification, LanguageBind's ImageFolder form
``ROOT/{train,val}/{background,person}/*.jpg`` (DATA.md §2.6; ``test`` reads ``val``).

Modality ``thermal``. Labels in sorted folder order: background = 0, person = 1. Class names
``names=languagebind`` (default): ``("background", "people")`` with the 80 plain OpenAI
templates (LanguageBind's active set); ``names=unibind``: ``("background", "person")``.
(Building the person/background crops from raw LLVIP: how ImageBind did it was not found.)
"""

from __future__ import annotations

from dataclasses import dataclass

from advcal.data.metadata import LLVIP_CLASSES, templates
from advcal.data.protocol import SampleSource
from advcal.data.sources._common import (
    DataSourceError,
    Item,
    OpenArgs,
    build,
    class_folders,
    parse_options,
    pick_split_dir,
)
from advcal.data.sources.folder import IMAGE_EXTS


@dataclass(frozen=True)
class LLVIPOptions:
    names: str = "languagebind"  # languagebind | unibind

    def __post_init__(self) -> None:
        if self.names not in LLVIP_CLASSES:
            raise DataSourceError(f"llvip: names must be one of {sorted(LLVIP_CLASSES)}")


def open_source(args: OpenArgs, **options) -> SampleSource:
    o = parse_options(LLVIPOptions, options, "llvip")
    tree = pick_split_dir(args.path, args.split, {"test": ("test", "val"), "val": ("val", "test")})
    classes, found = class_folders(tree, IMAGE_EXTS)
    if classes != ["background", "person"]:
        raise DataSourceError(f"{tree}: expected folders background/ and person/, got {classes}")
    items = [Item({"thermal": str(p)}, c, k, p.relative_to(tree).as_posix())
             for k, (p, c) in enumerate(found)]  # fmt: skip
    return build(
        args,
        items,
        name="llvip",
        modalities=("thermal",),
        class_names=LLVIP_CLASSES[o.names],
        templates=templates("openai_imagenet"),
        fingerprint_parts=[o.names],
        extra={"names": o.names},
        root=tree,
    )
