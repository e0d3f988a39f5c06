"""The one data protocol every source implements, and the batch every consumer reads.

A source is a map-style :class:`torch.utils.data.Dataset` (``len`` + ``ds[i]``) whose items are
sample dicts::

    {"inputs": {modality: tensor in its valid input range}, "label": int, "id": int, "index": i}

with a :class:`DatasetInfo` beside it (``ds.info``): class names, prompt templates, modalities,
split, and a fingerprint of the source's content. ``label`` is an index into
``info.class_names`` (``-1`` for an unlabelled retrieval item); ``id`` names the instance, so the
same id in two modalities is the same thing (retrieval ground truth); ``index`` is the item's
position in this dataset (what the clean-embedding cache is keyed by).

Calibration and evaluation read :class:`Batch` es from a ``DataLoader(ds, collate_fn=collate)``.
Nothing on those paths holds a whole split in memory.

Unreadable files: a source opened with ``skip_bad=True`` returns a *skipped item*
(``inputs`` None, ``skipped`` the reason) for a file it cannot decode instead of raising;
:func:`collate` drops skipped items and lists their dataset indices in ``Batch.skipped``.
The count a consumer reports is ``sum(len(b.skipped) for b in loader)``, exact with any
number of workers (``ds.skipped``, the ``{index: reason}`` a source records in its own
process, misses what worker processes saw). A batch whose items were all skipped has
``len(batch) == 0`` and empty ``inputs``.

Cheap metadata without decoding: ``ds.labels`` and ``ds.ids`` are ``(N,)`` int64 tensors built
from the index a source makes when it opens (file lists, csv rows), so stratified subsets and
sharding never decode a file.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch.utils.data import Dataset

TASKS = ("classification", "retrieval")


@dataclass(frozen=True)
class DatasetInfo:
    """What a dataset is, beside its samples (written into every report).

    Attributes:
        name: a label for reports (``"imagenet-val"``).
        source: the spec it was opened from (``"imagenet:/data/imagenet"``).
        split: ``"train"``, ``"val"``, ``"test"``, ...
        modalities: the modalities every item carries.
        class_names: the K classes, in label order.
        templates: prompt templates for the text centers (``"a photo of a {}."``).
        fingerprint: sha256 hex of what identifies the content (file names, sizes and mtimes,
            or a file's header); two opens of unchanged data give the same fingerprint.
        task: ``"classification"`` or ``"retrieval"`` (items paired with ``captions``).
        captions: retrieval text per instance id (``{id: [caption, ...]}``), else empty.
        extra: anything else a report should carry (fold, subset file, skipped files).
    """

    name: str
    source: str
    split: str
    modalities: tuple[str, ...]
    class_names: tuple[str, ...]
    templates: tuple[str, ...] = ()
    fingerprint: str = ""
    task: str = "classification"
    captions: Mapping[int, tuple[str, ...]] = field(default_factory=dict)
    extra: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "modalities", tuple(self.modalities))
        object.__setattr__(self, "class_names", tuple(self.class_names))
        object.__setattr__(self, "templates", tuple(self.templates))
        if not self.modalities:
            raise ValueError(f"dataset '{self.name}' has no modalities")
        if self.task not in TASKS:
            raise ValueError(f"DatasetInfo.task must be one of {TASKS}, got {self.task!r}")

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def as_dict(self) -> dict:
        d = asdict(self)
        d["captions"] = len(self.captions)  # a count: reports do not carry the text
        return d


class SampleSource(Dataset):
    """Base of every source: ``info``, ``labels`` and ``ids`` (``(N,)`` int64 tensors, set when
    the source opens), ``__getitem__`` -> sample dict. Subclasses set those three attributes
    and implement ``_load(i)`` (the sample's ``inputs`` dict: modality -> tensor in its valid
    range). ``len(ds)`` is ``len(ds.labels)``. Consumers read metadata from ``ds.info`` only."""

    info: DatasetInfo
    labels: torch.Tensor
    ids: torch.Tensor

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def _load(self, i: int) -> dict[str, torch.Tensor] | None:
        """The sample's inputs; None when the item is skipped (recorded by
        :meth:`_record_skip`, ``skip_bad=True`` sources only)."""
        raise NotImplementedError

    def _record_skip(self, i: int, reason: str) -> None:
        self.__dict__.setdefault("_skipped", {})[i] = reason

    @property
    def skipped(self) -> dict[int, str]:
        """``{index: reason}`` of items this process skipped (see the module docstring for
        the count across DataLoader workers)."""
        return dict(self.__dict__.get("_skipped", {}))

    def __getitem__(self, i: int) -> dict:
        if not -len(self) <= i < len(self):
            raise IndexError(f"index {i} out of range for dataset of {len(self)}")
        i = i % len(self)
        inputs = self._load(i)
        item = {"inputs": inputs, "label": int(self.labels[i]), "id": int(self.ids[i]), "index": i}
        if inputs is None:
            item["skipped"] = self.skipped.get(i, "unreadable")
        return item


class SampleSubset(SampleSource):
    """``source`` restricted to ``indices`` (in that order), itself a source: labels, ids and
    metadata without decoding, items decoded from ``source`` when read. Its fingerprint hashes
    the source's with the indices, so two subsets never share a cache entry."""

    def __init__(self, source: SampleSource, indices, note: str = "") -> None:
        import dataclasses

        self.source = source
        self.indices = torch.as_tensor(indices, dtype=torch.long).reshape(-1)
        n = len(source)
        if len(self.indices) and not (int(self.indices.min()) >= 0 and int(self.indices.max()) < n):
            raise IndexError(f"subset indices out of range for a dataset of {n}")
        self.labels = source.labels[self.indices]
        self.ids = source.ids[self.indices]
        info = source.info
        self.info = dataclasses.replace(
            info,
            fingerprint=fingerprint(info.fingerprint, self.indices.tolist()),
            extra={**info.extra, "subset": note or f"{len(self.indices)} of {n}"},
        )

    def _load(self, i: int) -> dict[str, torch.Tensor] | None:
        j = int(self.indices[i])
        inputs = self.source._load(j)
        if inputs is None:
            self._record_skip(i, self.source.skipped.get(j, "unreadable"))
        return inputs


def subset(source: SampleSource, indices, note: str = "") -> SampleSource:
    """``source`` restricted to ``indices``: an in-memory dataset's own ``subset`` (a copy of
    those rows), else a :class:`SampleSubset` view."""
    if hasattr(source, "inputs") and hasattr(source, "subset"):  # MultiModalDataset
        return source.subset(torch.as_tensor(indices, dtype=torch.long))
    return SampleSubset(source, indices, note)


@dataclass
class Batch:
    """A collated batch: ``inputs[m]`` ``(B, *shape)``, ``labels``/``ids``/``index`` ``(B,)``."""

    inputs: dict[str, torch.Tensor]
    labels: torch.Tensor
    ids: torch.Tensor
    index: torch.Tensor
    skipped: tuple[int, ...] = ()  # dataset indices of items dropped as unreadable

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def to(
        self,
        device: torch.device | str,
        non_blocking: bool = False,
        float_dtype: torch.dtype | None = None,
    ) -> Batch:
        """On ``device``; ``float_dtype`` also casts every floating input that differs (a
        float64 dataset file becomes the model's float32)."""

        def move(x: torch.Tensor) -> torch.Tensor:
            x = x.to(device, non_blocking=non_blocking)
            if float_dtype is not None and x.is_floating_point() and x.dtype != float_dtype:
                x = x.to(float_dtype)
            return x

        return Batch(
            {m: move(x) for m, x in self.inputs.items()},
            self.labels.to(device, non_blocking=non_blocking),
            self.ids.to(device, non_blocking=non_blocking),
            self.index.to(device, non_blocking=non_blocking),
            self.skipped,
        )

    def pin_memory(self) -> Batch:  # DataLoader(pin_memory=True) calls this on custom types
        return Batch(
            {m: x.pin_memory() for m, x in self.inputs.items()},
            self.labels.pin_memory(),
            self.ids.pin_memory(),
            self.index.pin_memory(),
            self.skipped,
        )


def check_batch(batch: Batch, info: DatasetInfo) -> None:
    """A read batch at the loops' boundary: every floating input finite; the error names the
    source, the split and the items (``batch.ids``), so a bad file is found."""
    for m, x in batch.inputs.items():
        if not x.is_floating_point():
            raise ValueError(
                f"dataset {info.source!r} ({info.split} split): inputs[{m!r}] has dtype "
                f"{x.dtype}, not a floating type; the transform must give values in the valid "
                "range"
            )
        bad = ~torch.isfinite(x.reshape(len(x), -1)).all(1)
        if bool(bad.any()):
            items = batch.ids[bad.to(batch.ids.device)].tolist()[:5]
            raise ValueError(
                f"dataset {info.source!r} ({info.split} split): inputs[{m!r}] contains NaN or "
                f"Inf (item ids {items})"
            )


def collate(samples: Sequence[dict]) -> Batch:
    """Stack sample dicts into a :class:`Batch` (every sample must carry the same modalities
    with the same shapes; a mismatch names the sample and the modality). Skipped items
    (``inputs`` None) are dropped and their indices listed in ``Batch.skipped``."""
    if not samples:
        raise ValueError("collate: empty batch")
    skipped = tuple(int(s["index"]) for s in samples if s["inputs"] is None)
    samples = [s for s in samples if s["inputs"] is not None]
    if not samples:
        empty = torch.zeros(0, dtype=torch.int64)
        return Batch({}, empty, empty.clone(), empty.clone(), skipped)
    mods = tuple(samples[0]["inputs"])
    inputs = {}
    for m in mods:
        try:
            inputs[m] = torch.stack([s["inputs"][m] for s in samples])
        except KeyError:
            bad = next(s for s in samples if m not in s["inputs"])
            raise ValueError(f"sample {bad['index']} has no modality {m!r}") from None
        except RuntimeError as err:
            shapes = sorted({tuple(s["inputs"][m].shape) for s in samples})
            raise ValueError(
                f"samples of modality {m!r} differ in shape {shapes}: the transform must give "
                "one shape per modality"
            ) from err
    return Batch(
        inputs,
        torch.tensor([s["label"] for s in samples], dtype=torch.int64),
        torch.tensor([s["id"] for s in samples], dtype=torch.int64),
        torch.tensor([s["index"] for s in samples], dtype=torch.int64),
        skipped,
    )


def fingerprint(*parts: Any) -> str:
    """sha256 hex of JSON-serialisable ``parts`` (file lists with sizes and mtimes, headers)."""
    h = hashlib.sha256()
    for p in parts:
        h.update(json.dumps(p, sort_keys=True, default=str).encode())
        h.update(b"\0")
    return h.hexdigest()


__all__ = [
    "TASKS",
    "Batch",
    "DatasetInfo",
    "SampleSource",
    "SampleSubset",
    "check_batch",
    "collate",
    "fingerprint",
    "subset",
]
