"""``nyud:ROOT``: NYU-Depth v2 scene classification (DATA.md §2.5), depth as 16-bit PNGs in
millimetres, in either layout:

- TUI-NICR (``nicr-scene-analysis-datasets`` ``prepare_dataset.py``):
  ``ROOT/{train,test}/depth/NNNN.png`` (``depth=raw``: ``depth_raw/``), the scene type in
  ``scene_class/NNNN.txt`` and RGB in ``rgb/NNNN.png`` (modality ``image``, when present).
  795 train / 654 test.
- LanguageBind's ImageFolder: ``ROOT/val/<class>/*.png`` (``test`` reads ``val``).

Classes (``classes=nyu10``, default): LanguageBind's 10 (bathroom ... office, others). The
27 raw scene types map by name (``living_room`` -> living room) and every other type to
"others": our mapping (the official 27 -> 10 mapping was not found, DATA.md §2.5).
``classes=scene``: the raw scene types found, sorted. Templates: LanguageBind's 80 "depth
photo" templates.
"""

from __future__ import annotations

from dataclasses import dataclass

from advcal.data.metadata import NYUV2_CLASSES, templates
from advcal.data.protocol import SampleSource
from advcal.data.sources._common import (
    DataSourceError,
    Item,
    OpenArgs,
    build,
    list_files,
    parse_options,
    pick_split_dir,
)

ALIASES = {"test": ("test", "val"), "val": ("val", "test")}


@dataclass(frozen=True)
class NYUDOptions:
    classes: str = "nyu10"  # nyu10 | scene
    depth: str = "filled"  # filled (depth/) | raw (depth_raw/)

    def __post_init__(self) -> None:
        if self.classes not in ("nyu10", "scene"):
            raise DataSourceError("nyud: classes must be 'nyu10' or 'scene'")
        if self.depth not in ("filled", "raw"):
            raise DataSourceError("nyud: depth must be 'filled' or 'raw'")


def nyu10(scene: str) -> int:
    """Index in LanguageBind's 10 classes of a raw NYUv2 scene type (ours: by name)."""
    name = scene.strip().replace("_", " ")
    return NYUV2_CLASSES.index(name) if name in NYUV2_CLASSES[:-1] else len(NYUV2_CLASSES) - 1


def open_source(args: OpenArgs, **options) -> SampleSource:
    o = parse_options(NYUDOptions, options, "nyud")
    tree = pick_split_dir(args.path, args.split, ALIASES)
    depth_dir = tree / ("depth_raw" if o.depth == "raw" else "depth")
    if (tree / "scene_class").is_dir():
        if not depth_dir.is_dir():
            raise DataSourceError(f"{tree}: TUI-NICR layout without {depth_dir.name}/")
        scenes = {p.stem: p.read_text().strip() for p in list_files(tree / "scene_class", [".txt"])}
        names = NYUV2_CLASSES if o.classes == "nyu10" else tuple(sorted(set(scenes.values())))
        label = nyu10 if o.classes == "nyu10" else names.index
        has_rgb = (tree / "rgb").is_dir()
        items = []
        for p in list_files(depth_dir, [".png"]):
            if p.stem not in scenes:
                raise DataSourceError(f"{p} has no scene_class/{p.stem}.txt")
            refs = {"depth": str(p)}
            if has_rgb:
                refs["image"] = str(tree / "rgb" / p.name)
            items.append(Item(refs, label(scenes[p.stem]), int(p.stem), p.name))
        layout, mods = "tui-nicr", ("depth", "image") if has_rgb else ("depth",)
        args = args if args.modalities else _only(args, ("depth",))
    else:
        folders = sorted(d.name for d in tree.iterdir() if d.is_dir())
        unknown = [f for f in folders if f.replace("_", " ") not in NYUV2_CLASSES]
        if o.classes != "nyu10" or unknown:
            raise DataSourceError(
                f"{tree}: LanguageBind's ImageFolder layout has the 10 class folders "
                f"{[c.replace(' ', '_') for c in NYUV2_CLASSES]} (unknown: {unknown}); "
                "classes=scene needs the TUI-NICR layout"
            )
        names = NYUV2_CLASSES
        items = [
            Item({"depth": str(p)}, NYUV2_CLASSES.index(f.replace("_", " ")), 0, f"{f}/{p.name}")
            for f in folders
            for p in list_files(tree / f, [".png"])
        ]
        items = [Item(it.refs, it.label, k, it.key) for k, it in enumerate(items)]
        layout, mods = "imagefolder", ("depth",)
    return build(
        args,
        items,
        name="nyud",
        modalities=mods,
        class_names=names,
        templates=templates("languagebind_depth"),
        fingerprint_parts=[o.classes, o.depth],
        extra={"layout": layout, "classes": o.classes, "depth": o.depth},
        root=tree,
    )


def _only(args: OpenArgs, mods: tuple[str, ...]) -> OpenArgs:
    from dataclasses import replace

    return replace(args, modalities=mods)
