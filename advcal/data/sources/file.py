"""``file:PATH`` (or a bare path): an advcal safetensors dataset file
(:func:`advcal.data.save` / :func:`advcal.data.save_splits`), read **per sample** with
``safetensors.safe_open`` slices: opening reads the header and the small ``labels``,
``ids`` and ``split`` tensors; ``ds[i]`` reads row ``i`` of each ``in.<modality>`` tensor.

Splits as :func:`advcal.data.load`: a file with a ``split`` tensor has ``train`` (0) and
``test`` (1) rows; a file without one holds out the seeded stratified quarter of every
class as ``test`` (:func:`advcal.data.holdout_split`); ``all`` is every row. A file with only
test rows opens as ``split="test"`` (nothing else is read); asking it for ``train`` names the
file and the splits it has. Transforms are not applied (rows are model-layout tensors).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from advcal.data.protocol import DatasetInfo, SampleSource, fingerprint
from advcal.data.sources._common import DataSourceError, NoOptions, OpenArgs, parse_options
from advcal.data.sources.tensors import NOT_APPLIED

SPLITS = ("train", "test", "all")


# safetensors dtype codes -> (torch dtype, bytes per element)
_DTYPES = {
    "F64": (torch.float64, 8),
    "F32": (torch.float32, 4),
    "F16": (torch.float16, 2),
    "BF16": (torch.bfloat16, 2),
    "I64": (torch.int64, 8),
    "I32": (torch.int32, 4),
    "I16": (torch.int16, 2),
    "I8": (torch.int8, 1),
    "U8": (torch.uint8, 1),
    "BOOL": (torch.bool, 1),
}


def _layout(path: Path) -> dict[str, tuple[torch.dtype, int, tuple[int, ...], int]]:
    """``{tensor: (dtype, itemsize, shape, absolute byte offset)}`` from the file's header
    (8-byte little-endian header length, then the JSON header, then the data)."""
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
    out = {}
    for name, t in header.items():
        if name == "__metadata__":
            continue
        dtype, size = _DTYPES[t["dtype"]]
        out[name] = (dtype, size, tuple(t["shape"]), 8 + n + t["data_offsets"][0])
    return out


class SafetensorsSource(SampleSource):
    """Rows of an advcal dataset file, read lazily: ``ds[i]`` reads exactly the bytes of row
    ``i`` of each ``in.<modality>`` tensor with one ``pread`` (no memory map: a mapped file's
    touched pages would stay in the process's resident memory, ~the file's size after one
    epoch). The descriptor is opened once per process (DataLoader workers each open their
    own) and never pickled."""

    def __init__(self, path: Path, info: DatasetInfo, rows: torch.Tensor, labels, ids) -> None:
        self.path, self.info, self.rows = path, info, rows
        self.labels, self.ids = labels, ids
        self._layout = {m: _layout(path)[f"in.{m}"] for m in info.modalities}
        self._fd: int | None = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_fd": None}

    def __del__(self) -> None:
        if getattr(self, "_fd", None) is not None:
            os.close(self._fd)

    def _read(self, m: str, r: int) -> torch.Tensor:
        if self._fd is None:
            self._fd = os.open(self.path, os.O_RDONLY)
        dtype, size, shape, start = self._layout[m]
        count = 1
        for d in shape[1:]:
            count *= d
        nbytes = count * size
        buf = bytearray(os.pread(self._fd, nbytes, start + r * nbytes))
        if len(buf) != nbytes:
            raise DataSourceError(f"{self.path}: row {r} of in.{m} is truncated")
        return torch.frombuffer(buf, dtype=dtype).reshape(shape[1:])

    def _load(self, i: int) -> dict[str, torch.Tensor]:
        r = int(self.rows[i])
        return {m: self._read(m, r) for m in self.info.modalities}


def open_source(args: OpenArgs, **options) -> SampleSource:
    parse_options(NoOptions, options, "file")
    path = args.path
    if args.split not in SPLITS:
        raise DataSourceError(f"{path}: split must be one of {SPLITS}, got {args.split!r}")
    if not path.is_file():
        raise DataSourceError(f"dataset file {path} does not exist")
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
            keys = set(f.keys())
            if "labels" not in keys or "class_names" not in meta:
                raise DataSourceError(
                    f"{path} is a safetensors file but not an advcal dataset "
                    "(no 'labels' tensor or 'class_names' metadata)"
                )
            labels = f.get_tensor("labels").to(torch.int64)
            ids = f.get_tensor("ids").to(torch.int64) if "ids" in keys else None
            split_t = f.get_tensor("split").bool() if "split" in keys else None
            shapes = {k[3:]: tuple(f.get_slice(k).get_shape()) for k in keys if k.startswith("in.")}
    except DataSourceError:
        raise
    except Exception as err:  # safetensors raises several types for a corrupt header
        raise DataSourceError(f"{path} is not a readable safetensors dataset: {err}") from err
    n = int(labels.shape[0])
    ids = torch.arange(n) if ids is None else ids
    bad = {m: s for m, s in shapes.items() if not s or s[0] != n}
    if not shapes or bad:
        raise DataSourceError(f"{path}: input tensors {bad or 'none'} do not have {n} rows")
    mods = tuple(args.modalities or shapes)
    missing = [m for m in mods if m not in shapes]
    if missing:
        raise DataSourceError(f"{path} has no modality {missing}; it has {sorted(shapes)}")
    if args.split == "all":
        rows = torch.arange(n)
    else:
        from advcal.data import holdout_split

        is_test = split_t if split_t is not None else holdout_split(labels)
        keep = is_test if args.split == "test" else ~is_test
        rows = keep.nonzero().squeeze(1)
        if rows.numel() == 0:
            have = sorted({"test" if t else "train" for t in is_test.tolist()})
            raise DataSourceError(f"{path} has no {args.split!r} samples (it has {have})")
    sel: dict[str, Any] = {}
    if args.subset is not None:
        from advcal.data.sources._common import read_lines

        pos = {int(ids[r]): k for k, r in enumerate(rows.tolist())}
        want = [int(s) for s in read_lines(args.subset)]
        gone = [w for w in want if w not in pos]
        if gone:
            raise DataSourceError(f"subset file {args.subset}: ids {gone[:5]} not in {path}")
        rows = rows[torch.tensor([pos[w] for w in want], dtype=torch.long)]
        sel["subset"] = str(args.subset)
    if args.first is not None:
        if args.first > rows.numel():
            raise DataSourceError(f"first={args.first} but {path} has {rows.numel()} rows")
        rows = rows[: args.first]
        sel["first"] = args.first
    st = os.stat(path)
    info = DatasetInfo(
        name=f"{meta.get('name', path.stem)}-{args.split}",
        source=args.spec,
        split=args.split,
        modalities=mods,
        class_names=tuple(json.loads(meta["class_names"])),
        templates=tuple(json.loads(meta.get("templates", "[]"))),
        fingerprint=fingerprint("file", path.name, st.st_size, st.st_mtime_ns, args.split, sel),
        extra={**sel, "transforms": NOT_APPLIED, "file_split": split_t is not None},
    )
    return SafetensorsSource(path, info, rows, labels[rows], ids[rows])
