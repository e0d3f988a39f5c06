"""Data sources by scheme: ``advcal.data.open("imagenet:/data/imagenet", split="val")``.

A spec is ``SCHEME:PATH`` (options may follow as ``?key=value&key=value``), ``digits``, or a
bare path to an advcal safetensors dataset file. One module per source reads its benchmark's
own on-disk layout (``../shared/DATA.md``); docs/data.md has the table of layouts, label
orders and templates.

==============  =====================================================================
scheme          module
==============  =====================================================================
``digits``      :mod:`.digits` (embedded; tensors in model layout)
``file``        :mod:`.file` (advcal safetensors dataset file, read per sample)
``folder``      :mod:`.folder` (one sub-folder per class, any supported file type)
``imagenet``    :mod:`.imagenet` (val in class folders or flat + ground truth)
``esc50``       :mod:`.esc50` (audio/*.wav + meta/esc50.csv, folds)
``modelnet40``  :mod:`.modelnet40` (normal_resampled txt or ply_hdf5_2048 h5)
``msrvtt``      :mod:`.msrvtt` (videos + 1k-A retrieval split or 20 categories)
``nyud``        :mod:`.nyud` (TUI-NICR NYUv2 or LanguageBind's ImageFolder depth)
``llvip``       :mod:`.llvip` (thermal ImageFolder background/person)
``ncaltech101``  :mod:`.events` (N-Caltech101 .bin events)
``nimagenet``   :mod:`.events` (N-ImageNet .npz events)
``paired``      :mod:`.paired` (CSV/JSONL manifest of paired multimodal files)
==============  =====================================================================
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from urllib.parse import parse_qsl

from advcal.data.protocol import SampleSource
from advcal.data.sources._common import DataSourceError, OpenArgs

# scheme -> "module:function"; the function takes (args: OpenArgs, **options)
SCHEMES: dict[str, str] = {
    "digits": "advcal.data.sources.digits:open_source",
    "file": "advcal.data.sources.file:open_source",
    "folder": "advcal.data.sources.folder:open_source",
    "imagenet": "advcal.data.sources.imagenet:open_source",
    "esc50": "advcal.data.sources.esc50:open_source",
    "modelnet40": "advcal.data.sources.modelnet40:open_source",
    "msrvtt": "advcal.data.sources.msrvtt:open_source",
    "nyud": "advcal.data.sources.nyud:open_source",
    "llvip": "advcal.data.sources.llvip:open_source",
    "ncaltech101": "advcal.data.sources.events:open_ncaltech101",
    "nimagenet": "advcal.data.sources.events:open_nimagenet",
    "paired": "advcal.data.sources.paired:open_source",
}


def parse_spec(spec: str | Path) -> tuple[str, str, dict[str, str]]:
    """``(scheme, path, options)`` of a spec: ``SCHEME:PATH[?k=v&...]``, ``digits[?k=v]``, or
    a bare path (scheme ``file``)."""
    s = str(spec)
    m = re.match(r"^([a-z][a-z0-9_]*)(?::(.*))?$", s.split("?", 1)[0], re.S)
    scheme = m.group(1) if m and (m.group(1) in SCHEMES) else None
    if scheme is None or (m.group(2) is None and scheme != "digits"):
        return "file", s, {}  # a bare path (a '?' may be part of a file name)
    query = s.split("?", 1)[1] if "?" in s else ""
    opts = dict(parse_qsl(query, keep_blank_values=True, strict_parsing=bool(query)))
    return scheme, m.group(2) or "", opts


def open(  # the data-source verb, as in webdataset; shadows the builtin here only
    spec: str | Path,
    split: str,
    *,
    transforms: Mapping[str, Callable] | None = None,
    modalities: Sequence[str] | None = None,
    first: int | None = None,
    subset: str | Path | None = None,
    skip_bad: bool = False,
    **options,
) -> SampleSource:
    """Open a data source: a map-style dataset of sample dicts with ``.info``, ``.labels`` and
    ``.ids`` (:mod:`advcal.data.protocol`), indexed at open time, decoded when read.

    Args:
        spec: ``SCHEME:PATH`` (``imagenet:/data/imagenet``, ``esc50:/data/ESC-50?fold=5``),
            ``digits``, or a path to an advcal safetensors dataset file.
        split: the split to read (``"train"``, ``"val"``, ``"test"``, ``"all"``, as the
            source's layout names them; each source's docstring lists its own).
        transforms: modality -> callable from the decoded file to the valid-range tensor
            (a backbone's ``transforms()``); modalities without one get
            :func:`advcal.data.transforms.generic_transforms`. Tensor sources (``digits``,
            ``file``) store model-layout tensors and do not apply transforms
            (``info.extra["transforms"]`` says so).
        modalities: the modalities to read (default: every one the source has).
        first: keep the first ``first`` items (after ``subset``).
        subset: a list file of item keys (one per line, e.g. RobustBench's
            ``<wnid>/ILSVRC2012_val_XXXXXXXX.JPEG``), taken in list order.
        skip_bad: skip (and count) unreadable files instead of raising.
        **options: the source's own options (also accepted as ``?key=value`` in ``spec``).
    """
    scheme, path, query = parse_spec(spec)
    clash = sorted(set(query) & set(options))
    if clash:
        raise DataSourceError(f"options {clash} given both in the spec and as keywords")
    module, fn = SCHEMES[scheme].split(":")
    args = OpenArgs(
        spec=str(spec),
        scheme=scheme,
        path=Path(path).expanduser() if path else Path(),
        split=split,
        transforms=transforms,
        modalities=tuple(modalities) if modalities is not None else None,
        first=first,
        subset=Path(subset) if subset is not None else None,
        skip_bad=skip_bad,
    )
    if scheme not in ("digits",) and not args.path.exists():
        raise DataSourceError(f"{spec}: {args.path} does not exist")
    return getattr(importlib.import_module(module), fn)(args, **{**query, **options})


def schemes() -> list[str]:
    return sorted(SCHEMES)


__all__ = ["SCHEMES", "DataSourceError", "open", "parse_spec", "schemes"]
