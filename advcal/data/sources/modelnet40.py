"""``modelnet40:ROOT``: ModelNet40 in either released form (DATA.md §2.3).

- ``modelnet40_normal_resampled/``: ``modelnet40_shape_names.txt`` (40 names, the class
  order), ``modelnet40_{train,test}.txt`` (ids like ``airplane_0627``; class = id minus
  ``_NNNN``) and ``<class>/<id>.txt`` rows ``x,y,z,nx,ny,nz`` (Point-Bind / ULIP reader).
- ``modelnet40_ply_hdf5_2048/``: ``shape_names.txt``, ``{train,test}_files.txt`` listing
  ``ply_data_*.h5`` (read **in the listed order**, as PointCLIP does; DGCNN's ``glob`` order is
  filesystem-dependent) with ``data`` (N, 2048, 3) and ``label`` (N, 1); rows are read one
  at a time through h5py, each worker process opening the files it needs once.

Splits ``train``/``test``. Labels: index in the shape-names file. Class names with spaces
('flower pot', 'night stand'; Point-Bind's ``labels.json``); templates: Point-Bind's 64
(``data/templates.json`` ``modelnet40_64``). ``variant=txt|h5`` picks a form when both exist.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from advcal.data.metadata import templates
from advcal.data.protocol import SampleSource
from advcal.data.sources._common import (
    DataSourceError,
    Item,
    OpenArgs,
    build,
    file_stats,
    need,
    parse_options,
    read_lines,
)


@dataclass(frozen=True)
class ModelNet40Options:
    variant: str | None = None  # txt | h5 (default: whichever ROOT holds)

    def __post_init__(self) -> None:
        if self.variant not in (None, "txt", "h5"):
            raise DataSourceError("modelnet40: variant must be 'txt' or 'h5'")


class H5Row:
    """Decoder of ``(file, row)`` references: row ``row`` of ``data`` in an h5 file; open
    files are cached per process and never pickled."""

    def __init__(self) -> None:
        self._files: dict[str, Any] = {}

    def __getstate__(self) -> dict:
        return {"_files": {}}

    def __call__(self, ref: tuple[str, int]) -> np.ndarray:
        from advcal.data.decode import DecodeError, require

        path, row = ref
        try:
            f = self._files.get(path)
            if f is None:
                f = self._files[path] = require("h5py", "read ModelNet40 h5 files").File(path, "r")
            return np.asarray(f["data"][row], dtype=np.float32)
        except Exception as err:
            raise DecodeError(f"cannot decode row {row} of {path}: {err}") from err

    def __repr__(self) -> str:
        return "H5Row()"


def open_source(args: OpenArgs, **options) -> SampleSource:
    o = parse_options(ModelNet40Options, options, "modelnet40")
    root = args.path
    if args.split not in ("train", "test"):
        raise DataSourceError(f"modelnet40: split must be train or test, got {args.split!r}")
    has_txt = (root / "modelnet40_shape_names.txt").is_file()
    has_h5 = (root / "shape_names.txt").is_file() and (root / f"{args.split}_files.txt").is_file()
    variant = o.variant or ("txt" if has_txt else "h5" if has_h5 else None)
    if variant is None:
        raise DataSourceError(
            f"{root} is neither modelnet40_normal_resampled (modelnet40_shape_names.txt) nor "
            "modelnet40_ply_hdf5_2048 (shape_names.txt + <split>_files.txt)"
        )
    if variant == "txt":
        names_file = need(root / "modelnet40_shape_names.txt", "the 40 class names")
        shapes = read_lines(names_file)
        index = {c: i for i, c in enumerate(shapes)}
        list_file = need(root / f"modelnet40_{args.split}.txt", f"the {args.split} shape ids")
        items = []
        for k, sid in enumerate(read_lines(list_file)):
            cls = sid.rsplit("_", 1)[0]
            if cls not in index:
                raise DataSourceError(f"{list_file}: {sid!r} names no class of {names_file}")
            items.append(Item({"point": str(root / cls / f"{sid}.txt")}, index[cls], k, sid))
        parts, decoders = file_stats([names_file, list_file], root), None
    else:
        h5py = _h5py()
        names_file = need(root / "shape_names.txt", "the 40 class names")
        shapes = read_lines(names_file)
        list_file = need(root / f"{args.split}_files.txt", f"the {args.split} h5 files")
        files = [root / Path(s).name for s in read_lines(list_file)]
        items = []
        for f in files:
            need(f, f"listed in {list_file}")
            try:
                with h5py.File(f, "r") as h:
                    labels = np.asarray(h["label"]).reshape(-1).astype(int)
                    if h["data"].shape[0] != labels.shape[0]:
                        raise ValueError("'data' and 'label' differ in length")
            except Exception as err:
                raise DataSourceError(f"cannot read {f}: {err}") from err
            for r, y in enumerate(labels):
                if not 0 <= y < len(shapes):
                    raise DataSourceError(
                        f"{f} row {r}: label {y} outside the {len(shapes)} classes"
                    )
                items.append(Item({"point": (str(f), r)}, int(y), len(items), f"{f.name}:{r}"))
        parts = file_stats([names_file, list_file, *files], root)
        decoders = {"point": H5Row()}
    return build(
        args,
        items,
        name="modelnet40",
        modalities=("point",),
        class_names=[s.replace("_", " ") for s in shapes],
        templates=templates("pointbind_modelnet40_64"),
        fingerprint_parts=parts,
        extra={"variant": variant},
        decoders=decoders,
    )


def _h5py() -> Any:
    from advcal.data.decode import require

    return require("h5py", "read the modelnet40 h5 files")
