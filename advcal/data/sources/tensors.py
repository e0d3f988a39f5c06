"""Shared by the tensor sources (``digits``, in-memory datasets): ``first``/``subset``
selection and the report metadata of a :class:`~advcal.data.MultiModalDataset`."""

from __future__ import annotations

from typing import Any

import torch

from advcal.data.protocol import DatasetInfo, SampleSource
from advcal.data.sources._common import DataSourceError, OpenArgs, read_lines

NOT_APPLIED = "stored tensors in model layout: transforms not applied"


class _Info(SampleSource):
    """A view of an in-memory dataset with its own ``info`` (the spec it was opened from,
    selection and transforms note in ``extra``)."""

    def __init__(self, ds: Any, info: DatasetInfo) -> None:
        self.ds, self.info = ds, info
        self.labels, self.ids = ds.labels, ds.ids

    def _load(self, i: int) -> dict[str, torch.Tensor]:
        return self.ds._load(i)

    def __getattr__(self, name: str) -> Any:  # inputs, class_names, subset, ... of the dataset
        if name in ("ds", "info", "labels", "ids"):
            raise AttributeError(name)
        return getattr(self.ds, name)


def finish(ds: Any, args: OpenArgs, extra: dict[str, Any]) -> SampleSource:
    """Apply ``subset`` (ids, one per line, in list order) and ``first`` to ``ds`` and give it
    the spec's metadata."""
    sel: dict[str, Any] = {}
    if args.subset is not None:
        pos = {int(i): k for k, i in enumerate(ds.ids.tolist())}
        try:
            want = [int(s) for s in read_lines(args.subset)]
        except ValueError as err:
            raise DataSourceError(f"subset file {args.subset}: ids must be ints ({err})") from None
        missing = [w for w in want if w not in pos]
        if missing:
            raise DataSourceError(
                f"subset file {args.subset}: ids {missing[:5]} are not in {args.spec} "
                f"split {args.split!r}"
            )
        ds = ds.subset([pos[w] for w in want])
        sel["subset"] = str(args.subset)
    if args.first is not None:
        if args.first > len(ds):
            raise DataSourceError(f"first={args.first} but {args.spec} has {len(ds)} items")
        ds = ds.subset(range(args.first))
        sel["first"] = args.first
    base = ds.info
    from dataclasses import replace

    from advcal.data.protocol import fingerprint

    info = replace(
        base,
        source=args.spec,
        split=args.split,
        fingerprint=fingerprint(base.fingerprint, sel) if sel else base.fingerprint,
        extra={**base.extra, **extra, **sel, "transforms": NOT_APPLIED},
    )
    return _Info(ds, info)
