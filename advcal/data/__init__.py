"""Datasets: paired multimodal tensors in their valid input range, labels and instance ids.

A :class:`MultiModalDataset` holds every modality of every sample in memory (the embedded
``digits`` set is small); ``save``/``load`` round-trip one through safetensors so a user can
bring their own data to ``advcal evaluate --data FILE``.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


@dataclass
class MultiModalDataset:
    """``inputs[m][i]`` is sample ``i`` of modality ``m``; all modalities share the index.

    Attributes:
        inputs: modality -> tensor ``(N, *spec.shape)`` in the modality's valid range.
        labels: ``(N,)`` int64 class indices into ``class_names``.
        class_names: the K class names (prompts are built from them with templates).
        ids: ``(N,)`` int64 instance ids; the same id in two modalities is the same instance
            (retrieval ground truth). Defaults to ``arange(N)``.
        name: a label for reports.
        templates: prompt templates for the text centers (``"a drawing of the digit {}."``).
    """

    inputs: dict[str, torch.Tensor]
    labels: torch.Tensor
    class_names: tuple[str, ...]
    ids: torch.Tensor | None = None
    name: str = "dataset"
    templates: tuple[str, ...] = field(default_factory=tuple)

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
        )

    def batches(
        self, batch_size: int, *, shuffle: bool = False, generator: torch.Generator | None = None
    ) -> Iterator[torch.Tensor]:
        """Index batches (the caller gathers the modalities it needs)."""
        order = (
            torch.randperm(len(self), generator=generator) if shuffle else torch.arange(len(self))
        )
        yield from order.split(batch_size)


def save(dataset: MultiModalDataset, path: str | Path) -> None:
    """Write a dataset to one safetensors file (metadata in its header)."""
    tensors = {f"in.{m}": x.contiguous() for m, x in dataset.inputs.items()}
    tensors["labels"] = dataset.labels.contiguous()
    tensors["ids"] = dataset.ids.contiguous()
    meta = {
        "class_names": json.dumps(list(dataset.class_names)),
        "name": dataset.name,
        "templates": json.dumps(list(dataset.templates)),
    }
    path = Path(path)
    tmp = path.with_suffix(path.suffix + ".tmp")
    save_file(tensors, str(tmp), metadata=meta)
    tmp.replace(path)


def load(path: str | Path) -> MultiModalDataset:
    """Read a dataset written by :func:`save`."""
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
    return MultiModalDataset(
        inputs,
        tensors["labels"],
        tuple(json.loads(meta["class_names"])),
        tensors.get("ids"),
        meta.get("name", path.stem),
        tuple(json.loads(meta.get("templates", "[]"))),
    )


def load_dataset(name_or_path: str | Path, split: str = "test", **kwargs) -> MultiModalDataset:
    """``"digits"`` (the embedded set) or a path to a file written by :func:`save`."""
    if str(name_or_path) == "digits":
        from advcal.data.digits import digits

        return digits(split=split, **kwargs)
    return load(name_or_path)


__all__ = ["MultiModalDataset", "load", "load_dataset", "save"]
