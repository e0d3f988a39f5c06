"""One calibration run, end to end, and the run folder it leaves behind.

``RunConfig`` names everything a run depends on (backbone, data, modalities, the calibration
and evaluation protocols); :func:`run` does load -> evaluate frozen -> calibrate -> evaluate
calibrated -> report, saving each finished phase atomically so ``resume=True`` continues an
interrupted run without redoing it. :func:`load_run` rebuilds the calibrated model from a run
folder: ``run.classifier(m)`` is an ``nn.Module`` any attack library can attack.

A run folder holds ``config.json``, ``heads.safetensors``, ``checkpoint.pt`` (per epoch),
``eval_before.json``, ``report.json``, ``report.md`` and ``robust_vs_eps.png``; every file is
written atomically and the folder is locked while a run uses it (:mod:`advcal.runfolder`).
``config.json`` (and a ``report.json``) is a valid ``--config``: it reproduces the run.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from advcal import backbones, provenance, report, runfolder, validation
from advcal import distributed as dist
from advcal.attacks import ZeroShotClassifier
from advcal.calibrate import CalibConfig, Calibrator
from advcal.centers import Centers, for_classes, load_centers, split
from advcal.data import MultiModalDataset
from advcal.errors import ConfigError, FileFormatError
from advcal.evaluate import EvalConfig, EvalResult, evaluate
from advcal.heads import CalibrationHeads


@dataclass(frozen=True)
class RunConfig:
    """What a run depends on.

    ``data``: a data source (:func:`advcal.data.open`): ``"digits"`` (embedded), a dataset
    file, or ``SCHEME:PATH`` for a benchmark in its own layout (``imagenet:/data/imagenet``,
    ``esc50:/data/ESC-50?fold=5``, ...; ``data_options`` adds source options). Calibration
    reads ``train_split``, evaluation ``split`` (``first`` / ``subset``: its first N items, or
    a list file of item keys in list order, e.g. RobustBench's 5000 ImageNet images); an
    evaluation alone never opens the training split. Inputs go through the backbone's own
    transforms (``Backbone.transforms()``) up to the attack space.

    ``centers``: the fixed semantic centers. ``None`` (default): the backbone's text embeddings
    of the dataset's class prompts (template ensemble). A path: a multi-center file (UniBind's
    LLM-description centers, converted by ``advcal convert-centers``); a class then scores its
    nearest center."""

    backbone: str = "minibind"
    checkpoint: str | list[str] | None = None  # a file or folder; UniBind: several files
    backbone_kwargs: dict = field(default_factory=dict)
    data: str = "digits"
    data_options: dict = field(default_factory=dict)  # the source's own options (fold=5, ...)
    split: str = "test"  # the evaluation split
    train_split: str = "train"  # the calibration split
    first: int | None = None  # evaluate the first N items of the split
    subset: str | None = None  # evaluate the items a list file names, in its order
    skip_bad: bool = False  # skip (and count) unreadable files instead of stopping
    centers: str | None = None  # a multi-center file (advcal convert-centers); None: prompts
    modalities: tuple[str, ...] | None = None
    train_limit: int | None = None
    test_limit: int | None = None
    device: str = "cpu"  # where the run computes; not compared on --resume (per rank)
    # seconds a torchrun rank waits for the others before the run ends (a stalled rank)
    dist_timeout: float = dist.DEFAULT_TIMEOUT_S
    calib: CalibConfig = field(default_factory=CalibConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def __post_init__(self) -> None:
        if isinstance(self.device, torch.device):
            object.__setattr__(self, "device", str(self.device))
        validation.check_fields(self)  # types first, nested [calib]/[eval] tables built
        object.__setattr__(self, "device", validation.parse_device(self.device, "device"))
        mods = self.modalities
        if mods is not None and (not mods or len(set(mods)) != len(mods)):
            raise ConfigError(f"RunConfig.modalities must name distinct modalities, got {mods}")
        for name in ("train_limit", "test_limit"):
            v = getattr(self, name)
            if v is not None and v < 2:
                raise ConfigError(f"RunConfig.{name} must be >= 2, got {v}")
        if self.first is not None and self.first < 1:
            raise ConfigError(f"RunConfig.first must be >= 1, got {self.first}")
        if not self.dist_timeout > 0:
            raise ConfigError(
                f"RunConfig.dist_timeout must be > 0 seconds, got {self.dist_timeout}"
            )
        for name in ("backbone", "data", "split", "train_split"):
            if not getattr(self, name).strip():
                raise ConfigError(f"RunConfig.{name} must not be empty")

    @classmethod
    def from_dict(cls, d: Mapping) -> RunConfig:
        return validation.build(cls, d)

    @classmethod
    def from_file(cls, path: str | Path) -> RunConfig:
        """A ``.toml`` or ``.json`` config: a run folder's ``config.json``, or a
        ``report.json`` (its ``config`` table is read: a report reproduces its run)."""
        import tomllib

        path = Path(path)
        if not path.is_file():
            what = "is a folder, not a file" if path.is_dir() else "does not exist"
            raise FileNotFoundError(f"config file {path} {what}")
        if path.suffix.lower() == ".json":
            d = runfolder.read_json(path, fix="give a config file (TOML or JSON)")
            if isinstance(d, dict) and isinstance(d.get("config"), dict) and "sanity" in d:
                d = d["config"]  # a report: its config
        elif path.suffix.lower() == ".toml":
            try:
                d = tomllib.loads(path.read_text(encoding="utf-8"))
            except tomllib.TOMLDecodeError as err:
                raise FileFormatError(f"{path}: invalid TOML: {err}") from err
            except UnicodeDecodeError as err:
                raise FileFormatError(f"{path} is not a UTF-8 text file ({err.reason})") from err
        else:
            raise ConfigError(
                f"config file {path}: unknown format {path.suffix or '(no suffix)'!r}; "
                "give a .toml or .json file"
            )
        if not isinstance(d, dict):
            raise FileFormatError(f"{path} holds {type(d).__name__}, not a table of config keys")
        try:
            return cls.from_dict(d)
        except ConfigError as err:
            raise ConfigError(f"{path}: {err.message}", err.section) from None

    from_toml = from_file  # the name of advcal <= 0.1.0

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)

    def replace(self, **changes) -> RunConfig:
        return dataclasses.replace(self, **changes)


DEMO_SAMPLES = 100  # the demo evaluates a fixed, class-balanced subset of digits' 450 test samples


def demo_config(*, quick: bool = False) -> RunConfig:
    """The demo's protocol: every default, evaluated on :data:`DEMO_SAMPLES` test samples
    (the first of each class in turn: the same every run, said in the report). ``quick``: a
    smoke run on a subset with short attacks (not a result)."""
    if not quick:
        return RunConfig.from_dict({"eval": {"samples": DEMO_SAMPLES}})
    return RunConfig.from_dict(
        {
            "train_limit": 256,
            "test_limit": 96,
            "calib": {"epochs": 1, "attack_steps": 3},
            "eval": {  # 5-step APGD, 3-step sweep and masking checks, no legacy suite
                "suite": ["apgd-ce:5"],
                "compare": [],
                "sweep_suite": ["pgd:3"],
                "weak": ["apgd-ce:3", "apgd-t:3"],
                "retrieval_steps": 5,
            },
        }
    )


def _check_split(ds, cfg: RunConfig, split_name: str):
    """A split at the boundary: an in-memory one is checked whole (finite inputs; float64 /
    float16 cast, see :func:`advcal.validation.check_inputs`); a streamed source is checked
    batch by batch as it is read (the backbone refuses NaN, the loops cast dtypes)."""
    if not isinstance(ds, MultiModalDataset):
        return ds
    inputs = validation.check_inputs(ds.inputs, f"dataset {cfg.data!r} ({split_name} split)")
    if all(inputs[m] is ds.inputs[m] for m in inputs):
        return ds
    return dataclasses.replace(ds, inputs=inputs)


def open_data(cfg: RunConfig, backbone: backbones.Backbone | None = None, *, train: bool = True):
    """``(train, test)`` datasets of a run (``train`` None when not asked for): ``cfg.data``
    opened at ``cfg.train_split`` / ``cfg.split`` through the backbone's transforms, the
    evaluation split cut to ``first`` / ``subset``, then ``train_limit`` / ``test_limit``
    seeded random subsets. Nothing is decoded here: items are read as they are used."""
    from advcal.data import open as open_source
    from advcal.data.protocol import subset

    transforms = backbone.transforms() if backbone is not None else None
    common = {
        "transforms": transforms or None,
        "modalities": cfg.modalities,
        "skip_bad": cfg.skip_bad,
        **cfg.data_options,
    }
    test = open_source(cfg.data, cfg.split, first=cfg.first, subset=cfg.subset, **common)
    tr = open_source(cfg.data, cfg.train_split, **common) if train else None
    # one generator per split: the evaluation subset does not depend on the training split
    if tr is not None and cfg.train_limit is not None and cfg.train_limit < len(tr):
        gen = torch.Generator().manual_seed(provenance.SUBSET_SEED)
        idx = torch.randperm(len(tr), generator=gen)[: cfg.train_limit]
        tr = subset(tr, idx, f"train_limit={cfg.train_limit} (seeded)")
    if cfg.test_limit is not None and cfg.test_limit < len(test):
        gen = torch.Generator().manual_seed(provenance.SUBSET_SEED + 1)
        idx = torch.randperm(len(test), generator=gen)[: cfg.test_limit]
        test = subset(test, idx, f"test_limit={cfg.test_limit} (seeded)")
    return (
        None if tr is None else _check_split(tr, cfg, cfg.train_split),
        _check_split(test, cfg, cfg.split),
    )


def make_centers(
    cfg: RunConfig,
    backbone: backbones.Backbone,
    dataset: MultiModalDataset,
    device: str | torch.device | None = None,
) -> tuple[Centers, str]:
    """The run's fixed centers on ``device`` (default ``cfg.device``), and a line saying
    what they are. NaN/Inf centers are refused (they train NaN heads that exit 0)."""
    device = device if device is not None else cfg.device
    if dataset.info.task == "retrieval":  # no classes: the captions are the text side
        return None, "no centers: a retrieval dataset (caption queries, text -> modality R@K)"
    if cfg.centers is None:
        info = dataset.info
        c = backbone.centers(info.class_names, info.templates or None).to(device)
        validation.check_finite(
            c, f"the text centers backbone '{backbone.name}' computed for the class prompts"
        )
        templates = list(info.templates) or "default"
        return c, f"{c.shape[0]} text centers (templates: {templates})"
    mc = for_classes(load_centers(cfg.centers), dataset.info.class_names).to(device)
    split(mc, backbone.embed_dim)  # width check, with a clear error
    return mc, (
        f"{mc.centers.shape[0]} centers for {len(mc.class_names)} classes from {cfg.centers} "
        "(a class scores its nearest center)"
    )


EVAL_BEFORE = "eval_before.json"
HEADS = "heads.safetensors"


def _read_eval_before(path: Path) -> EvalResult:
    fix = "delete it to recompute the frozen evaluation"
    before = runfolder.read_json(path, fix=fix)
    if not isinstance(before, dict) or not isinstance(before.get("modalities"), dict):
        raise FileFormatError(f"{path} is not an advcal evaluation (no 'modalities' table); {fix}")
    try:
        return EvalResult.from_dict(before)
    except (KeyError, TypeError) as err:  # written by another advcal version
        raise FileFormatError(
            f"{path} is not an evaluation of this advcal version ({err}); {fix}"
        ) from None


def run(
    cfg: RunConfig, out_dir: str | Path, *, resume: bool = False, progress: bool = True
) -> dict:
    """Calibrate and evaluate; returns the report dict (also written into ``out_dir``).

    Under ``torchrun`` every rank runs this; the work is sharded and rank 0 writes the files.
    Everything that can be checked is checked before the run folder is touched (config,
    device, ``out_dir``, the folder's lock and its config on ``resume``); the folder's
    ``config.json`` is written only once the backbone, data and centers have loaded, and
    removed again if the run fails before its first result (:class:`runfolder.RunFolder`).
    """
    if not isinstance(cfg, RunConfig):
        raise ConfigError(f"run() needs a RunConfig, got {type(cfg).__name__}")
    validation.check_device(cfg.device, "device")
    folder = runfolder.RunFolder(out_dir, cfg.as_dict(), resume=resume)
    folder.check_path()
    dist.init_from_env(cfg.device, cfg.dist_timeout)
    device = dist.local_device(cfg.device)
    dist.on_main(folder.open, "opening the run folder")
    try:
        rep = _run(cfg, folder, device, resume=resume, progress=progress)
    except BaseException:
        if dist.is_main():
            folder.close(failed=True)
        raise
    if dist.is_main():
        folder.close()
    return rep


def _run(
    cfg: RunConfig,
    folder: runfolder.RunFolder,
    device: torch.device,
    *,
    resume: bool,
    progress: bool,
) -> dict:
    main = dist.is_main()
    before_path = folder / EVAL_BEFORE
    # read before the slow loading: a damaged file fails the resume at once
    before = _read_eval_before(before_path) if resume and before_path.is_file() else None
    timings: dict[str, float] = {}

    t0 = time.perf_counter()
    backbone = backbones.load(
        cfg.backbone,
        checkpoint=cfg.checkpoint,
        device=device,
        progress=progress,
        **cfg.backbone_kwargs,
    )
    timings["load_backbone"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    train, test = open_data(cfg, backbone)
    if train.info.task == "retrieval":
        raise ConfigError(
            f"data {cfg.data!r}: calibration trains against class centers, and split "
            f"{cfg.train_split!r} is a retrieval set (captions, no classes); calibrate on a "
            "classification split (MSR-VTT: ?task=category) and evaluate the run's heads on "
            "the retrieval split with advcal evaluate"
        )
    timings["load_data"] = time.perf_counter() - t0
    modalities = cfg.modalities or tuple(
        m for m in test.info.modalities if m in backbone.modalities
    )
    if not modalities:
        raise ValueError(
            f"dataset '{test.info.name}' shares no modality with backbone "
            f"'{backbone.name}' ({list(backbone.modalities)})"
        )
    centers, centers_note = make_centers(cfg, backbone, test, device)
    if main:
        folder.write_config()

    calibrator = Calibrator(
        backbone, centers, modalities, cfg.calib, out_dir=folder.path, device=device
    )
    # the training split's clean pass first: a bad file in it stops the run before any
    # result is written (and calibration reuses the embeddings)
    t0 = time.perf_counter()
    calibrator.clean_embeddings(train, progress=progress and main)
    timings["clean_embeddings"] = time.perf_counter() - t0

    if before is not None:
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
            device=device,
            progress=progress,
        )
        timings["eval_before"] = time.perf_counter() - t0
        if main:
            runfolder.write_json(before_path, before.to_dict())

    t0 = time.perf_counter()
    heads = calibrator.fit(train, resume=resume, progress=progress)
    timings["calibrate"] = time.perf_counter() - t0
    if main:
        heads.save(folder / HEADS)

    t0 = time.perf_counter()
    after = evaluate(
        backbone,
        test,
        centers,
        heads,
        modalities=modalities,
        config=cfg.eval,
        device=device,
        progress=progress,
    )
    timings["eval_after"] = time.perf_counter() - t0
    # the part of the above spent waiting for data loaders (decoding, transforms)
    timings["data_wait"] = (
        calibrator.data_wait_s
        + after.data.get("seconds_data_wait", 0.0)
        + (before.data.get("seconds_data_wait", 0.0) if timings["eval_before"] else 0.0)
    )

    rep = report.build(
        backbone=backbone.name,
        backbone_params=backbone.num_params(),
        trainable_params=heads.num_trainable(),
        before=before,
        after=after,
        config=cfg.as_dict(),  # exactly the run's config: a report is a valid --config
        timings=timings,
        dataset=test.info.name,
    )
    rep["run"] = {"modalities": list(modalities), "centers": centers_note}
    rep["history"] = calibrator.history
    rep["world_size"] = dist.world_size()
    if main:
        rep["provenance"] = provenance.collect(
            cfg,
            backbone=backbone,
            datasets={"train": train, "test": test},
            device=device,
            world_size=dist.world_size(),
        )
        rep["provenance"]["checkpoint_pt_sha256"] = _sha_or_none(folder / "checkpoint.pt")
        rep["provenance"]["heads_sha256"] = _sha_or_none(folder / HEADS)
        report.write(rep, folder.path)
    dist.barrier()
    return rep


def _sha_or_none(path: Path) -> str | None:
    return provenance.sha256_file(path, use_cache=False) if path.is_file() else None


def evaluate_backbone(cfg: RunConfig, out_dir: str | Path, *, progress: bool = True) -> dict:
    """Evaluate the frozen backbone of ``cfg`` alone (no calibration, no training split read)
    and write the report into ``out_dir``; returns the report dict. Under torchrun the
    evaluation is sharded and rank 0 writes."""
    if not isinstance(cfg, RunConfig):
        raise ConfigError(f"evaluate_backbone() needs a RunConfig, got {type(cfg).__name__}")
    validation.check_device(cfg.device, "device")
    runfolder.RunFolder(out_dir, {}).check_path()  # an --out that is a file: refused first
    dist.init_from_env(cfg.device, cfg.dist_timeout)
    device = dist.local_device(cfg.device)
    t0 = time.perf_counter()
    backbone = backbones.load(
        cfg.backbone, checkpoint=cfg.checkpoint, device=device, progress=progress,
        **cfg.backbone_kwargs,
    )  # fmt: skip
    _, test = open_data(cfg, backbone, train=False)
    centers, note = make_centers(cfg, backbone, test, device)
    return _evaluate_and_report(
        cfg, backbone, test, centers, None, out_dir, device, progress, t0, {"centers": note}
    )


def evaluate_run(
    path: str | Path,
    out_dir: str | Path | None = None,
    *,
    device: str | torch.device | None = None,
    eval_overrides: Mapping | None = None,
    progress: bool = True,
) -> dict:
    """Re-evaluate a finished run folder (frozen and calibrated, on the run's evaluation
    data) and write the report into ``out_dir`` (default ``<run>/eval``);
    ``eval_overrides`` changes fields of the run's evaluation protocol (``batch_size``,
    ``workers``, ``amp``, another ``suite``, ...)."""
    t0 = time.perf_counter()
    out_dir = Path(out_dir) if out_dir is not None else Path(path) / "eval"
    runfolder.RunFolder(out_dir, {}).check_path()
    r = load_run(path, device=device)
    cfg = r.config
    if eval_overrides:
        cfg = cfg.replace(
            eval=validation.build(EvalConfig, {**cfg.eval.as_dict(), **eval_overrides}, "eval")
        )
    dist.init_from_env(cfg.device, cfg.dist_timeout)
    _, test = open_data(cfg, r.backbone, train=False)
    extra = {"evaluated_run": str(path)}
    rep = _evaluate_and_report(
        cfg, r.backbone, test, r.centers, r.heads, out_dir, torch.device(cfg.device), progress,
        t0, extra, heads_file=Path(path) / HEADS,
    )  # fmt: skip
    return rep


def _evaluate_and_report(
    cfg, backbone, test, centers, heads, out_dir, device, progress, t0, extra, heads_file=None
) -> dict:
    modalities = cfg.modalities or tuple(
        m for m in test.info.modalities if m in backbone.modalities
    )
    kw = {"modalities": modalities, "config": cfg.eval, "device": device, "progress": progress}
    before = evaluate(backbone, test, centers, None, **kw)
    after = evaluate(backbone, test, centers, heads, **kw) if heads is not None else None
    rep = report.build(
        backbone=backbone.name,
        backbone_params=backbone.num_params(),
        trainable_params=heads.num_trainable() if heads is not None else 0,
        before=before,
        after=after,
        config=cfg.as_dict(),
        timings={
            "evaluate": time.perf_counter() - t0,
            "data_wait": sum(
                r.data.get("seconds_data_wait", 0.0) for r in (before, after) if r is not None
            ),
        },
        dataset=test.info.name,
    )
    rep["run"] = {"modalities": list(modalities), **extra}
    rep["world_size"] = dist.world_size()
    if dist.is_main():
        rep["provenance"] = provenance.collect(
            cfg, backbone=backbone, datasets={"test": test}, device=device,
            world_size=dist.world_size(),
        )  # fmt: skip
        if heads_file is not None:
            rep["provenance"]["heads_sha256"] = provenance.sha256_file(heads_file, use_cache=False)
        report.write(rep, out_dir)
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

    def dataset(self, split: str = "test"):
        """The run's evaluation data (``"test"``) or its calibration data (``"train"``), as
        the run saw them (transforms, subsets and limits applied)."""
        if split not in ("train", "test"):
            raise ValueError(f"split must be 'train' or 'test', got {split!r}")
        train, test = open_data(self.config, self.backbone, train=split == "train")
        return train if split == "train" else test


def load_run(path: str | Path, device: str | torch.device | None = None) -> Run:
    """Rebuild a calibrated model from a run folder (``device`` overrides the run's)."""
    path = Path(path)
    if not path.is_dir():
        what = "is a file" if path.exists() else "does not exist"
        raise FileNotFoundError(f"run folder {path} {what}; give a folder advcal calibrate wrote")
    for name in (runfolder.CONFIG, HEADS):
        if not (path / name).is_file():
            raise FileNotFoundError(f"{path} is not a finished advcal run: {name} is missing")
    saved = runfolder.read_json(path / runfolder.CONFIG, fix="the run folder is damaged")
    if not isinstance(saved, dict):
        raise FileFormatError(f"{path / runfolder.CONFIG} holds no config table")
    try:
        cfg = RunConfig.from_dict(saved)
    except ConfigError as err:
        raise ConfigError(f"{path / runfolder.CONFIG}: {err.message}", err.section) from None
    if device is not None:
        cfg = cfg.replace(device=str(device))
    try:
        validation.check_device(cfg.device, "device")
    except Exception as err:
        if device is not None:
            raise
        raise type(err)(
            f"{err} (the run's config.json says device={cfg.device!r}; pass another device, "
            "e.g. --device cpu)"
        ) from None
    backbone = backbones.load(
        cfg.backbone, checkpoint=cfg.checkpoint, device=cfg.device, **cfg.backbone_kwargs
    )
    heads = CalibrationHeads.load(path / HEADS, map_location=cfg.device)
    _, test = open_data(cfg, backbone, train=False)
    centers, _ = make_centers(cfg, backbone, test)
    return Run(path, cfg, backbone, heads, centers)
