"""One calibration run, end to end, and the run folder it leaves behind.

``RunConfig`` names everything a run depends on (backbone, data, modalities, the calibration
and evaluation protocols); :func:`run` does load -> evaluate frozen -> calibrate -> evaluate
calibrated -> report, saving each finished phase atomically so ``resume=True`` continues an
interrupted run without redoing it. :func:`load_run` rebuilds the calibrated model from a run
folder: ``run.classifier(m)`` is an ``nn.Module`` any attack library can attack.

A run folder holds ``config.json``, ``heads.safetensors``, ``checkpoint.pt`` (per epoch),
``eval_before.json``, ``report.json``, ``report.md`` and ``robust_vs_eps.png``.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from advcal import backbones, report
from advcal import distributed as dist
from advcal.attacks import ZeroShotClassifier
from advcal.calibrate import CalibConfig, Calibrator
from advcal.centers import Centers, for_classes, load_centers, split
from advcal.data import MultiModalDataset, load_dataset
from advcal.evaluate import EvalConfig, evaluate
from advcal.heads import CalibrationHeads
from advcal.objectives import Objective


@dataclass(frozen=True)
class RunConfig:
    """What a run depends on. ``data`` is ``"digits"`` or a dataset file (``advcal.data.save``).

    ``centers``: the fixed semantic centers. ``None`` (default): the backbone's text embeddings
    of the dataset's class prompts (template ensemble). A path: a multi-center file (UniBind's
    LLM-description centers, converted by ``advcal convert-centers``); a class then scores its
    nearest center."""

    backbone: str = "minibind"
    checkpoint: str | list[str] | None = None  # a file or folder; UniBind: several files
    backbone_kwargs: dict = field(default_factory=dict)
    data: str = "digits"
    centers: str | None = None  # a multi-center file (advcal convert-centers); None: prompts
    modalities: tuple[str, ...] | None = None
    train_limit: int | None = None
    test_limit: int | None = None
    device: str = "cpu"
    calib: CalibConfig = field(default_factory=CalibConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def __post_init__(self) -> None:
        if isinstance(self.calib, Mapping):
            c = dict(self.calib)
            if isinstance(c.get("objective"), Mapping):
                c["objective"] = Objective(**c["objective"])
            object.__setattr__(self, "calib", _build(CalibConfig, c, "calib"))
        if isinstance(self.eval, Mapping):
            object.__setattr__(self, "eval", _build(EvalConfig, dict(self.eval), "eval"))
        if self.modalities is not None:
            object.__setattr__(self, "modalities", tuple(self.modalities))
        for name in ("train_limit", "test_limit"):
            v = getattr(self, name)
            if v is not None and v < 2:
                raise ValueError(f"{name} must be >= 2, got {v}")

    @classmethod
    def from_dict(cls, d: Mapping) -> RunConfig:
        return _build(cls, dict(d), "config")

    @classmethod
    def from_toml(cls, path: str | Path) -> RunConfig:
        import tomllib

        path = Path(path)
        try:
            return cls.from_dict(tomllib.loads(path.read_text()))
        except tomllib.TOMLDecodeError as err:
            raise ValueError(f"{path}: invalid TOML: {err}") from err

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)

    def replace(self, **changes) -> RunConfig:
        return dataclasses.replace(self, **changes)


def _build(cls, d: dict, where: str):
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise ValueError(f"unknown key(s) {unknown} in [{where}]; known: {sorted(names)}")
    return cls(**d)


def _datasets(cfg: RunConfig) -> tuple[MultiModalDataset, MultiModalDataset]:
    train = load_dataset(cfg.data, split="train")
    test = load_dataset(cfg.data, split="test")
    if cfg.modalities is not None:
        train, test = train.select(cfg.modalities), test.select(cfg.modalities)
    gen = torch.Generator().manual_seed(0)
    if cfg.train_limit is not None and cfg.train_limit < len(train):
        train = train.subset(torch.randperm(len(train), generator=gen)[: cfg.train_limit])
    if cfg.test_limit is not None and cfg.test_limit < len(test):
        test = test.subset(torch.randperm(len(test), generator=gen)[: cfg.test_limit])
    return train, test


def make_centers(
    cfg: RunConfig, backbone: backbones.Backbone, dataset: MultiModalDataset
) -> tuple[Centers, str]:
    """The run's fixed centers on ``cfg.device``, and a line saying what they are."""
    if cfg.centers is None:
        c = backbone.centers(dataset.class_names, dataset.templates or None).to(cfg.device)
        templates = list(dataset.templates) or "default"
        return c, f"{c.shape[0]} text centers (templates: {templates})"
    mc = for_classes(load_centers(cfg.centers), dataset.class_names).to(cfg.device)
    split(mc, backbone.embed_dim)  # width check, with a clear error
    return mc, (
        f"{mc.centers.shape[0]} centers for {len(mc.class_names)} classes from {cfg.centers} "
        "(a class scores its nearest center)"
    )


def _atomic_json(path: Path, obj) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str))
    tmp.replace(path)


def run(
    cfg: RunConfig, out_dir: str | Path, *, resume: bool = False, progress: bool = True
) -> dict:
    """Calibrate and evaluate; returns the report dict (also written into ``out_dir``).

    Under ``torchrun`` every rank runs this; the work is sharded and rank 0 writes the files.
    """
    dist.init_from_env(cfg.device)
    main = dist.is_main()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config_path = out / "config.json"
    if resume and config_path.is_file():
        saved = json.loads(config_path.read_text())
        if saved != json.loads(json.dumps(cfg.as_dict(), default=str)):
            raise ValueError(
                f"{out} holds a run with a different config; use another --out or drop --resume"
            )
    if main:
        _atomic_json(config_path, cfg.as_dict())
    timings: dict[str, float] = {}

    t0 = time.perf_counter()
    backbone = backbones.load(
        cfg.backbone,
        checkpoint=cfg.checkpoint,
        device=cfg.device,
        progress=progress,
        **cfg.backbone_kwargs,
    )
    timings["load_backbone"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    train, test = _datasets(cfg)
    timings["load_data"] = time.perf_counter() - t0
    modalities = cfg.modalities or tuple(m for m in test.modalities if m in backbone.modalities)
    if not modalities:
        raise ValueError(
            f"dataset '{test.name}' shares no modality with backbone "
            f"'{backbone.name}' ({list(backbone.modalities)})"
        )
    centers, centers_note = make_centers(cfg, backbone, test)

    before_path = out / "eval_before.json"
    if resume and before_path.is_file():
        before = json.loads(before_path.read_text())
        timings["eval_before"] = 0.0
    else:
        t0 = time.perf_counter()
        before = evaluate(
            backbone,
            test,
            centers,
            None,
            modalities=modalities,
            config=cfg.eval,
            device=cfg.device,
            progress=progress,
        )
        timings["eval_before"] = time.perf_counter() - t0
        if main:
            _atomic_json(before_path, before)

    calibrator = Calibrator(
        backbone, centers, modalities, cfg.calib, out_dir=out, device=cfg.device
    )
    t0 = time.perf_counter()
    heads = calibrator.fit(train, resume=resume, progress=progress)
    timings["calibrate"] = time.perf_counter() - t0
    if main:
        heads.save(out / "heads.safetensors")

    t0 = time.perf_counter()
    after = evaluate(
        backbone,
        test,
        centers,
        heads,
        modalities=modalities,
        config=cfg.eval,
        device=cfg.device,
        progress=progress,
    )
    timings["eval_after"] = time.perf_counter() - t0

    rep = report.build(
        backbone=backbone.name,
        backbone_params=backbone.num_params(),
        trainable_params=heads.num_trainable(),
        before=before,
        after=after,
        config={
            **cfg.as_dict(),
            "modalities": list(modalities),
            "centers_used": centers_note,
        },
        timings=timings,
        dataset=test.name,
    )
    rep["history"] = calibrator.history
    rep["world_size"] = dist.world_size()
    if main:
        report.write(rep, out)
    dist.barrier()
    return rep


@dataclass
class Run:
    """A finished run, rebuilt: the frozen backbone, its calibrated heads and centers."""

    path: Path
    config: RunConfig
    backbone: backbones.Backbone
    heads: CalibrationHeads
    centers: Centers

    def classifier(self, modality: str, calibrated: bool = True) -> ZeroShotClassifier:
        """``nn.Module``: inputs of ``modality`` in their valid range -> logits over classes."""
        head = self.heads[modality] if calibrated else None
        return ZeroShotClassifier(
            self.backbone, modality, self.centers, head, self.config.calib.objective.tau
        ).eval()

    def dataset(self, split: str = "test") -> MultiModalDataset:
        train, test = _datasets(self.config)
        if split not in ("train", "test"):
            raise ValueError(f"split must be 'train' or 'test', got {split!r}")
        return train if split == "train" else test


def load_run(path: str | Path, device: str | torch.device | None = None) -> Run:
    """Rebuild a calibrated model from a run folder."""
    path = Path(path)
    for name in ("config.json", "heads.safetensors"):
        if not (path / name).is_file():
            raise FileNotFoundError(f"{path} is not a finished advcal run: {name} is missing")
    cfg = RunConfig.from_dict(json.loads((path / "config.json").read_text()))
    if device is not None:
        cfg = cfg.replace(device=str(device))
    backbone = backbones.load(
        cfg.backbone, checkpoint=cfg.checkpoint, device=cfg.device, **cfg.backbone_kwargs
    )
    heads = CalibrationHeads.load(path / "heads.safetensors", map_location=cfg.device)
    test = load_dataset(cfg.data, split="test")
    centers, _ = make_centers(cfg, backbone, test)
    return Run(path, cfg, backbone, heads, centers)
