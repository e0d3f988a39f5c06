"""Datasets: paired multimodal tensors in their valid input range, labels and instance ids.

A :class:`MultiModalDataset` holds every modality of every sample in memory (the embedded
``digits`` set is small); ``save``/``load`` round-trip one through safetensors so a user can
bring their own data to ``advcal calibrate|evaluate --data FILE``.

Splits of a file: :func:`save_splits` writes a train and a test set into one file (a per-sample
``split`` tensor); ``load(path, split)`` returns either. A file written by :func:`save` holds no
split: ``"train"``/``"test"`` then hold out a deterministic stratified quarter of every class
as the test split (seeded), so calibration never sees the samples it is evaluated on.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from advcal.data.protocol import Batch, DatasetInfo, SampleSource, collate, fingerprint


@dataclass(eq=False)
class MultiModalDataset(SampleSource):
    """In-memory paired tensors: ``inputs[m][i]`` is sample ``i`` of modality ``m``; all
    modalities share the index. A :class:`~advcal.data.protocol.SampleSource` like every other
    source (``ds[i]`` is a sample dict, ``ds.info`` its metadata), for small sets (the embedded
    ``digits``) and for tests.

    Attributes:
        inputs: modality -> tensor ``(N, *spec.shape)`` in the modality's valid range.
        labels: ``(N,)`` int64 class indices into ``class_names``.
        class_names: the K class names (prompts are built from them with templates).
        ids: ``(N,)`` int64 instance ids; the same id in two modalities is the same instance
            (retrieval ground truth). Defaults to ``arange(N)``.
        name: a label for reports.
        templates: prompt templates for the text centers (``"a drawing of the digit {}."``).
        split: which split this is, for reports.
        source: where it came from (``"digits"``, a file path), for reports.
    """

    inputs: dict[str, torch.Tensor]
    labels: torch.Tensor
    class_names: tuple[str, ...]
    ids: torch.Tensor | None = None
    name: str = "dataset"
    templates: tuple[str, ...] = field(default_factory=tuple)
    split: str = "all"
    source: str = ""

    def __post_init__(self) -> None:
        if not self.inputs:
            raise ValueError("dataset has no modalities")
        self.class_names = tuple(self.class_names)
        self.templates = tuple(self.templates)
        n = int(self.labels.shape[0])
        if n == 0:
            raise ValueError(f"dataset '{self.name}' is empty")
        if self.labels.dim() != 1 or self.labels.dtype != torch.int64:
            raise ValueError(
                f"labels must be a 1-D int64 tensor, got {self.labels.dtype} "
                f"of shape {tuple(self.labels.shape)}"
            )
        for m, x in self.inputs.items():
            if x.shape[0] != n:
                raise ValueError(f"inputs['{m}'] has {x.shape[0]} samples, labels have {n}")
        if self.labels.min() < 0 or self.labels.max() >= len(self.class_names):
            raise ValueError(
                f"labels must lie in [0, {len(self.class_names)}), "
                f"got [{int(self.labels.min())}, {int(self.labels.max())}]"
            )
        if self.ids is None:
            self.ids = torch.arange(n)
        elif self.ids.shape != (n,):
            raise ValueError(f"ids must have shape ({n},), got {tuple(self.ids.shape)}")

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def _load(self, i: int) -> dict[str, torch.Tensor]:
        return {m: x[i] for m, x in self.inputs.items()}

    @property
    def info(self) -> DatasetInfo:
        """Metadata; the fingerprint hashes the tensors' bytes (computed once)."""
        if getattr(self, "_fingerprint", None) is None:
            import hashlib

            h = hashlib.sha256()
            for t in (*(self.inputs[m] for m in sorted(self.inputs)), self.labels, self.ids):
                h.update(t.contiguous().view(torch.uint8).numpy().tobytes())
            self._fingerprint = h.hexdigest()
        return DatasetInfo(
            name=self.name,
            source=self.source or self.name,
            split=self.split,
            modalities=self.modalities,
            class_names=self.class_names,
            templates=self.templates,
            fingerprint=self._fingerprint,
        )

    @property
    def modalities(self) -> tuple[str, ...]:
        return tuple(self.inputs)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def subset(self, index: torch.Tensor | Sequence[int]) -> MultiModalDataset:
        index = torch.as_tensor(index, dtype=torch.long)
        return MultiModalDataset(
            {m: x[index] for m, x in self.inputs.items()},
            self.labels[index],
            self.class_names,
            self.ids[index],
            self.name,
            self.templates,
            self.split,
            self.source,
        )

    def select(self, modalities: Sequence[str]) -> MultiModalDataset:
        missing = [m for m in modalities if m not in self.inputs]
        if missing:
            raise ValueError(
                f"dataset '{self.name}' has no modality {missing}; it has {list(self.inputs)}"
            )
        return MultiModalDataset(
            {m: self.inputs[m] for m in modalities},
            self.labels,
            self.class_names,
            self.ids,
            self.name,
            self.templates,
            self.split,
            self.source,
        )

    def batches(
        self, batch_size: int, *, shuffle: bool = False, generator: torch.Generator | None = None
    ) -> Iterator[torch.Tensor]:
        """Index batches (the caller gathers the modalities it needs)."""
        order = (
            torch.randperm(len(self), generator=generator) if shuffle else torch.arange(len(self))
        )
        yield from order.split(batch_size)


SPLITS = ("train", "test", "all")
HOLDOUT_FRACTION = 0.25  # test share of each class for files without a split


def holdout_split(labels: torch.Tensor, fraction: float = HOLDOUT_FRACTION, seed: int = 0):
    """``(N,)`` bool, True for the test samples: ``round(fraction * n_c)`` of every class's
    ``n_c`` samples (at least one when ``n_c >= 2``), chosen by a seeded permutation."""
    g = torch.Generator().manual_seed(seed)
    is_test = torch.zeros(len(labels), dtype=torch.bool)
    for c in labels.unique():
        idx = (labels == c).nonzero().squeeze(1)
        idx = idx[torch.randperm(len(idx), generator=g)]
        k = max(1, round(fraction * len(idx))) if len(idx) >= 2 else 0
        is_test[idx[:k]] = True
    return is_test


def save(
    dataset: MultiModalDataset, path: str | Path, *, split: torch.Tensor | None = None
) -> None:
    """Write a dataset to one safetensors file (metadata in its header). ``split``: optional
    ``(N,)`` bool, True for test samples (see :func:`save_splits`)."""
    tensors = {f"in.{m}": x.contiguous() for m, x in dataset.inputs.items()}
    if split is not None:
        if split.shape != (len(dataset),):
            raise ValueError(f"split must be ({len(dataset)},), got {tuple(split.shape)}")
        tensors["split"] = split.to(torch.uint8).contiguous()
    tensors["labels"] = dataset.labels.contiguous()
    tensors["ids"] = dataset.ids.contiguous()
    meta = {
        "class_names": json.dumps(list(dataset.class_names)),
        "name": dataset.name,
        "templates": json.dumps(list(dataset.templates)),
    }
    from advcal import runfolder  # unique temp name, fsync, removed on any failure

    runfolder.write_with(Path(path), lambda tmp: save_file(tensors, str(tmp), metadata=meta))


def save_splits(path: str | Path, train: MultiModalDataset, test: MultiModalDataset) -> None:
    """Write a train and a test set (same modalities and classes) into one file."""
    if set(train.inputs) != set(test.inputs) or train.class_names != test.class_names:
        raise ValueError(
            "train and test must share modalities and class names; got "
            f"{sorted(train.inputs)} / {list(train.class_names)} and "
            f"{sorted(test.inputs)} / {list(test.class_names)}"
        )
    both = MultiModalDataset(
        {m: torch.cat([train.inputs[m], test.inputs[m]]) for m in train.inputs},
        torch.cat([train.labels, test.labels]),
        train.class_names,
        torch.cat([train.ids, test.ids]),
        train.name,
        train.templates,
    )
    split = torch.cat(
        [torch.zeros(len(train), dtype=torch.bool), torch.ones(len(test), dtype=torch.bool)]
    )
    save(both, path, split=split)


def load(path: str | Path, split: str = "all") -> MultiModalDataset:
    """Read a dataset written by :func:`save` or :func:`save_splits`; ``split`` selects
    ``"train"``, ``"test"`` or ``"all"`` (see the module docstring for files without one)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"dataset file {path} does not exist")
    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
        tensors = load_file(str(path))
    except Exception as err:  # safetensors raises several types for a corrupt header
        raise ValueError(f"{path} is not a readable safetensors dataset: {err}") from err
    if "labels" not in tensors or "class_names" not in meta:
        raise ValueError(
            f"{path} is a safetensors file but not an advcal dataset "
            "(no 'labels' tensor or 'class_names' metadata)"
        )
    inputs = {k[3:]: v for k, v in tensors.items() if k.startswith("in.")}
    ds = MultiModalDataset(
        inputs,
        tensors["labels"],
        tuple(json.loads(meta["class_names"])),
        tensors.get("ids"),
        meta.get("name", path.stem),
        tuple(json.loads(meta.get("templates", "[]"))),
    )
    if split == "all":
        return ds
    is_test = tensors["split"].bool() if "split" in tensors else holdout_split(ds.labels)
    keep = is_test if split == "test" else ~is_test
    if not keep.any():
        raise ValueError(f"{path} has no {split!r} samples")
    out = ds.subset(keep.nonzero().squeeze(1))
    out.name = f"{ds.name}-{split}"
    out.split, out.source = split, str(path)
    return out


def load_dataset(name_or_path: str | Path, split: str = "test", **kwargs) -> MultiModalDataset:
    """``"digits"`` (the embedded set) or a path to a file written by :func:`save` /
    :func:`save_splits`, its ``split`` (``"train"``, ``"test"`` or ``"all"``)."""
    if str(name_or_path) == "digits":
        from advcal.data.digits import digits

        return digits(split=split, **kwargs)
    if kwargs:
        raise ValueError(f"dataset files take no options, got {sorted(kwargs)}")
    return load(name_or_path, split)


# the streamed sources (advcal.data.sources) build on the in-memory API above: imported last
from advcal.data.sources import open  # noqa: E402

__all__ = [
    "Batch",
    "DatasetInfo",
    "MultiModalDataset",
    "SampleSource",
    "collate",
    "fingerprint",
    "holdout_split",
    "load",
    "load_dataset",
    "open",
    "save",
    "save_splits",
]
