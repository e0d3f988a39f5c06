"""The Calibrator: trains the heads on adversarial examples only, the backbone and centers frozen.

One step (a global batch of paired instances, every modality at once)::

    x_adv = training attack(x) through backbone + current head   (all modalities, fused update)
    e_adv = backbone(x_adv)                                       (no grad: the backbone is frozen)
    loss  = sum_m Objective(head_m, e_adv_m, e_clean_m, C, y)
    AdamW step on the heads; cosine learning-rate schedule over every stage

The training attack is a PGD (``attack_steps`` steps of ``alpha_ratio * eps``) on one of the
losses of :mod:`advcal.attacks.losses`: ``ce``, ``dlr`` (margin), ``dlr_t`` (targeted margin,
each sample against one of its ``targets`` most likely wrong classes), ``kl`` (TRADES: away from
the calibrated model's own clean prediction), ``cos`` (CrossMaxim), or ``none`` (clean inputs);
several losses take turns batch by batch. Heads trained only against cross-entropy attacks
learn to resist exactly those, and margin attacks still break them: mixing losses is how the
training keeps up with an AutoAttack-grade evaluation.

A run is a sequence of :class:`Stage` s (the paper's v2 schedule), e.g. a clean alignment
stage, then adversarial training with an eps ramp, then the full eps; one stage by default.

Data: any map-style dataset of sample dicts (:mod:`advcal.data.protocol`), read through a
``DataLoader`` in global batches of ``batch_size``. ``e_clean`` (the frozen clean embedding of
every training sample) is computed once and kept on disk, memory-mapped (:mod:`advcal.cache`).

Under torchrun, N ranks compute what one process computes: every rank sees the same sequence
of global batches and takes every N-th sample of each; every random draw of a sample (its
attack's random start and target) is keyed by the sample, not by its rank or batch position;
each loss is a sum over the rank's samples divided by the global batch size (DDP averages the
gradients), and InfoNCE contrasts every sample with the whole global batch.

Every epoch ends with an atomic checkpoint; ``fit(resume=True)`` continues from it and gives
the same heads as an uninterrupted run, at any number of ranks.
"""

from __future__ import annotations

import logging
import math
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, Sampler

from advcal import cache as embcache
from advcal import distributed as dist
from advcal import progress as _progress
from advcal import runfolder
from advcal.attacks import PGD, ZeroShotClassifier
from advcal.attacks.iterative import IterativeAttack
from advcal.backbones.base import Backbone
from advcal.centers import Centers, MultiCenters, split, zero_shot_logits
from advcal.data.protocol import check_batch, collate
from advcal.errors import FileFormatError, RunFolderError
from advcal.heads import CalibrationHeads
from advcal.objectives import Objective
from advcal.profiling import nvtx_range
from advcal.validation import check_device, check_fields, check_state

log = logging.getLogger("advcal.calibrate")

CHECKPOINT = "checkpoint.pt"
LOSSES = ("none", "ce", "dlr", "dlr_t", "kl", "cos")
# training-attack losses whose step reads per-sample state drawn outside it (dlr_t's sampled
# target, kl's clean prediction): run eagerly under cuda_graph=True
UNGRAPHED = frozenset({"kl", "dlr_t"})
ALIASES = {"pgd": ("ce",), "crossmaxim": ("cos",), "alternate": ("ce", "cos")}
LOG_EVERY = 10  # progress-bar loss refresh, in steps (each refresh is one host sync)


def _losses(attack: str | tuple[str, ...], where: str) -> tuple[str, ...]:
    names = (attack,) if isinstance(attack, str) else tuple(attack)
    out: list[str] = []
    for a in names:
        out.extend(ALIASES.get(a, (a,)))
    bad = [a for a in out if a not in LOSSES]
    if bad or not out:
        raise ValueError(
            f"{where}: unknown training attack(s) {bad or names}; choose from {list(LOSSES)} "
            f"(several take turns batch by batch) or the aliases {sorted(ALIASES)}"
        )
    if "none" in out and len(out) > 1:
        raise ValueError(f"{where}: 'none' (clean inputs) cannot take turns with attacks")
    return tuple(out)


@dataclass(frozen=True)
class Stage:
    """One stage of the training schedule.

    Attributes:
        epochs: its length.
        attack: training-attack loss(es), by turns batch by batch (``"none"``: clean inputs).
        eps: the budget as a multiple of each modality's eps; ``(a, b)``: a linear ramp from
            ``a`` in the stage's first epoch to ``b`` in its last.
        steps: attack steps (default ``CalibConfig.attack_steps``).
        objective: the loss weights (default ``CalibConfig.objective``).
        name: a label for logs and reports.
    """

    epochs: int
    attack: str | tuple[str, ...] = "ce"
    eps: float | tuple[float, float] = 1.0
    steps: int | None = None
    objective: Objective | None = None
    name: str = ""

    def __post_init__(self) -> None:
        check_fields(self)
        if self.epochs < 1:
            raise ValueError(f"Stage.epochs must be >= 1, got {self.epochs}")
        object.__setattr__(self, "attack", _losses(self.attack, "Stage.attack"))
        lo, hi = self.eps if isinstance(self.eps, tuple) else (self.eps, self.eps)
        if not (lo >= 0 and hi >= 0):
            raise ValueError(f"Stage.eps must be >= 0, got {self.eps}")
        if self.steps is not None and self.steps < 1:
            raise ValueError(f"Stage.steps must be >= 1, got {self.steps}")

    def eps_at(self, epoch: int) -> float:
        """The eps multiple in epoch ``epoch`` of this stage (0-based)."""
        if not isinstance(self.eps, tuple):
            return float(self.eps)
        a, b = self.eps
        return b if self.epochs == 1 else a + (b - a) * epoch / (self.epochs - 1)


@dataclass(frozen=True)
class CalibConfig:
    """Every knob of a calibration run (written into the run's config and report).

    Without ``stages`` the run is one stage of ``epochs`` with ``attack``, ``eps_scale``,
    ``attack_steps`` and ``objective``; with ``stages``, ``epochs`` must equal their sum.
    """

    epochs: int = 8
    batch_size: int = 128
    lr: float = 5e-3
    weight_decay: float = 1e-4
    head_kind: str = "residual_linear"
    head_hidden: int | None = None
    # "identity": every head starts as the identity map (the frozen model); "backbone": linear
    # heads start from the model's released per-modality heads where it has them (UniBind)
    head_init: str = "identity"
    objective: Objective = field(default_factory=Objective)
    # the training attack's loss(es), by turns batch by batch: ce, dlr, dlr_t, kl, cos, none.
    # CE and the targeted margin by turns: heads trained on CE attacks alone resist exactly
    # those while margin attacks still break them (docs/results.md, "attack" rows)
    attack: str | tuple[str, ...] = ("ce", "dlr_t")
    attack_steps: int = 10
    # step = alpha_ratio * eps: 0.5 makes PGD-10 nearly as strong as PGD-50 at eps/10 on every
    # digits modality (0.25 left the audio tower 6 points short: a weak training signal)
    alpha_ratio: float = 0.5
    eps_scale: float = 1.1  # train at eps_scale x each modality's eps (a margin over eval's)
    targets: int = 3  # dlr_t: each sample attacks one of its `targets` most likely wrong classes
    stages: tuple[Stage, ...] = ()
    amp: bool = False
    cuda_graph: bool = False  # capture the training attack's step in a CUDA graph (GPU only)
    workers: int = 0  # DataLoader worker processes
    cache: bool = True  # keep the clean embeddings in $ADVCAL_CACHE/embeddings (memory-mapped)
    seed: int = 0

    def __post_init__(self) -> None:
        check_fields(self)  # types first: epochs=true, batch_size=15.5, lr=nan refused by name
        for name in ("epochs", "batch_size", "attack_steps", "targets"):
            if getattr(self, name) < (0 if name == "attack_steps" else 1):
                raise ValueError(f"CalibConfig.{name} must be positive, got {getattr(self, name)}")
        if not (self.lr > 0 and self.weight_decay >= 0 and self.eps_scale >= 0):
            raise ValueError("CalibConfig needs lr > 0, weight_decay >= 0, eps_scale >= 0")
        if self.workers < 0:
            raise ValueError(f"CalibConfig.workers must be >= 0, got {self.workers}")
        object.__setattr__(self, "attack", _losses(self.attack, "CalibConfig.attack"))
        if self.stages and sum(s.epochs for s in self.stages) != self.epochs:
            raise ValueError(
                f"CalibConfig.epochs={self.epochs} but the stages last "
                f"{sum(s.epochs for s in self.stages)} epochs "
                f"({[s.epochs for s in self.stages]}); make them agree"
            )
        from advcal.heads import KINDS

        if self.head_kind not in KINDS:
            raise ValueError(
                f"CalibConfig.head_kind must be one of {KINDS}, got {self.head_kind!r}"
            )
        if self.head_hidden is not None and self.head_hidden < 1:
            raise ValueError(
                f"CalibConfig.head_hidden must be >= 1 or None, got {self.head_hidden}"
            )
        if self.head_init not in ("identity", "backbone"):
            raise ValueError(
                f"CalibConfig.head_init must be 'identity' or 'backbone', got {self.head_init!r}"
            )
        if self.head_init == "backbone" and self.head_kind != "linear":
            raise ValueError(
                "CalibConfig(head_init='backbone') starts from the model's released linear "
                f"heads: it needs head_kind='linear', got {self.head_kind!r}"
            )
        if self.alpha_ratio <= 0 or self.alpha_ratio > 1:
            raise ValueError(f"CalibConfig.alpha_ratio must be in (0, 1], got {self.alpha_ratio}")

    def schedule(self) -> tuple[Stage, ...]:
        """The stages, every default filled in."""
        stages = self.stages or (
            Stage(self.epochs, self.attack, self.eps_scale, self.attack_steps, None, "adversarial"),
        )
        return tuple(
            replace(
                s,
                steps=s.steps if s.steps is not None else self.attack_steps,
                objective=s.objective if s.objective is not None else self.objective,
            )
            for s in stages
        )

    def stage_at(self, epoch: int) -> tuple[Stage, float]:
        """The stage of (0-based) ``epoch`` and its eps multiple."""
        start = 0
        for s in self.schedule():
            if epoch < start + s.epochs:
                return s, s.eps_at(epoch - start)
            start += s.epochs
        raise IndexError(f"epoch {epoch} is past the schedule's {self.epochs} epochs")

    def as_dict(self) -> dict:
        return asdict(self)


def _seed(*parts: int) -> int:
    s = 0
    for p in parts:
        s = (s * 1_000_003 + int(p)) % (2**62)
    return s


class GlobalBatches(Sampler[list[int]]):
    """Each epoch, a seeded permutation of ``n`` samples cut into global batches of
    ``batch_size``; rank ``r`` of ``world`` yields samples ``r, r + world, ...`` of each. So
    every rank walks the same global batches, and their union is what one process sees."""

    def __init__(self, n: int, batch_size: int, *, world: int = 1, rank: int = 0, seed: int = 0):
        self.n, self.batch_size, self.world, self.rank, self.seed = n, batch_size, world, rank, seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def global_batches(self) -> list[torch.Tensor]:
        g = torch.Generator().manual_seed(_seed(self.seed, self.epoch))
        return list(torch.randperm(self.n, generator=g).split(self.batch_size))

    def __iter__(self) -> Iterator[list[int]]:
        for b in self.global_batches():
            yield b[self.rank :: self.world].tolist()

    def __len__(self) -> int:
        return math.ceil(self.n / self.batch_size)


def _collate_or_none(samples):
    """A rank's share of a small last global batch may be empty."""
    return collate(samples) if samples else None


class Calibrator:
    """Fit :class:`CalibrationHeads` for ``modalities`` of a frozen ``backbone``.

    Args:
        backbone: the frozen Backbone.
        centers: ``(K, D)`` unit-norm fixed semantic centers, or
            :class:`advcal.centers.MultiCenters` (many per class, nearest one counts).
        modalities: which modalities get a head (default: all the dataset has).
        config: :class:`CalibConfig`.
        out_dir: where checkpoints go (None: no checkpoints, no resume).
        device: where to train (default: the centers' device).
    """

    def __init__(
        self,
        backbone: Backbone,
        centers: Centers,
        modalities: Sequence[str],
        config: CalibConfig | None = None,
        *,
        out_dir: str | Path | None = None,
        device: str | torch.device | None = None,
    ) -> None:
        self.config = config or CalibConfig()
        self.data_wait_s = 0.0  # seconds fit() waited for its data loader
        c, labels, _ = split(centers, backbone.embed_dim)  # validates: (K, D) of the backbone
        self.device = check_device(device) if device is not None else c.device
        for m in modalities:
            backbone.spec(m)  # unknown modality -> clear error now, not mid-epoch
        if self.config.cuda_graph and self.device.type != "cuda":
            raise ValueError(
                f"CalibConfig(cuda_graph=True) needs a CUDA device, got {self.device}; "
                "set cuda_graph=False (the default) to calibrate on this device"
            )
        eager = sorted({a for s in self.config.schedule() for a in s.attack} & UNGRAPHED)
        if self.config.cuda_graph and eager:
            warnings.warn(
                f"cuda_graph: the {', '.join(eager)} training attack batches run eagerly (their "
                "per-sample targets and clean predictions are drawn outside the step); the "
                "ce, dlr and cos batches are captured",
                stacklevel=2,
            )
        self.backbone = backbone.to(self.device)
        self.centers: Centers = (
            c.to(self.device)
            if labels is None
            else MultiCenters(c, labels, list(centers.class_names)).to(self.device)
        )
        self.modalities = tuple(modalities)
        self.heads = CalibrationHeads(
            self.modalities,
            backbone.embed_dim,
            kind=self.config.head_kind,
            hidden=self.config.head_hidden,
        ).to(self.device)
        self.initialised_from: list[str] = []
        if self.config.head_init == "backbone":
            for m in self.modalities:
                init = backbone.head_init(m)
                if init is not None:
                    self.heads.load_linear(m, *(t.to(self.device) for t in init))
                    self.initialised_from.append(m)
            if not self.initialised_from:
                log.warning(
                    "head_init='backbone': backbone '%s' has no released head for %s; "
                    "every head starts at the identity",
                    backbone.name,
                    list(self.modalities),
                )
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.history: list[dict] = []
        self.timings: dict[str, float] = {}
        self._attacks: dict[tuple, IterativeAttack] = {}

    # -- pieces -------------------------------------------------------------------------
    def _autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.config.amp)

    def _loader(self, dataset: Dataset, sampler) -> DataLoader:
        w = self.config.workers
        return DataLoader(
            dataset,
            batch_sampler=sampler,
            num_workers=w,
            persistent_workers=w > 0,
            pin_memory=self.device.type == "cuda",
            collate_fn=_collate_or_none,
        )

    @torch.no_grad()
    def clean_embeddings(self, dataset: Dataset, *, progress: bool = False) -> dict:
        """The frozen clean embedding of every sample, per modality: a
        :class:`~advcal.cache.CleanEmbeddings` ``(N, D)`` (``emb[index]`` gives a batch's rows),
        read from the on-disk cache or computed in one pass over ``dataset`` (rank 0 writes
        the cache; the other ranks wait and read it)."""
        info, n = dataset.info, len(dataset)
        memo = self.__dict__.setdefault("_clean", {})
        if (info.fingerprint, n) in memo:  # already read once by this calibrator
            return memo[(info.fingerprint, n)]
        memo[(info.fingerprint, n)] = out = self._clean_embeddings(dataset, progress)
        return out

    def _clean_embeddings(self, dataset: Dataset, progress: bool) -> dict:
        info, n = dataset.info, len(dataset)
        if not self.config.cache:  # every rank computes them in memory
            arrays = self._encode_all(dataset, self.modalities, progress)
            return {m: embcache.CleanEmbeddings(a) for m, a in arrays.items()}
        d = self.backbone.embed_dim
        precision = "bf16" if self.config.amp else "fp32"
        keys = {m: embcache.key(self.backbone, info, m, n, precision) for m in self.modalities}
        root = embcache.cache_root()
        missing = [m for m, k in keys.items() if not (root / f"{k}.npy").is_file()]
        computed: dict = {}

        def fill(m: str):
            def compute(out) -> None:
                if not computed:  # one pass over the data for every missing modality
                    computed.update(self._encode_all(dataset, missing, progress))
                out[:] = computed[m]

            return compute

        if dist.enabled():  # rank 0 fills the cache once; the others read it
            # every rank enters the barrier: whether a file is missing is rank 0's view only
            # (a slower rank may look after rank 0 has written it, and skipping the barrier
            # there would pair it with a different collective: a hang until the timeout)
            if dist.is_main() and missing:
                for m in self.modalities:
                    embcache.load_or_compute(keys[m], n, d, fill(m), root=root)
            dist.barrier()
        return {
            m: embcache.load_or_compute(keys[m], n, d, fill(m), root=root, write=dist.is_main())
            for m in self.modalities
        }

    def _encode_all(self, dataset, modalities, progress) -> dict:
        """One pass over ``dataset``: ``{m: (N, D) float32 numpy}`` for ``modalities``."""
        import numpy as np

        n, d = len(dataset), self.backbone.embed_dim
        out = {m: np.zeros((n, d), dtype=np.float32) for m in modalities}
        order = torch.arange(n).split(self.config.batch_size * 2)
        loader = self._loader(dataset, [b.tolist() for b in order])
        bar = _progress.bar(desc="clean embeddings", total=len(order), enabled=progress)
        for batch in loader:
            if batch is None:
                continue
            check_batch(batch, dataset.info)
            for m in modalities:
                with self._autocast():
                    e = self.backbone.encode(m, batch.inputs[m].to(self.device), check=True)
                out[m][batch.index.numpy()] = e.float().cpu().numpy()
            bar.update(1)
        bar.close()
        return out

    def _attack(self, loss: str, eps_scale: float, steps: int) -> IterativeAttack:
        """The training attack on every modality for (loss, eps multiple, steps), built once
        (so a CUDA graph is captured once per batch shape)."""
        k = (loss, round(eps_scale, 9), steps)
        if k not in self._attacks:
            cfg = self.config
            classifiers = {
                m: ZeroShotClassifier(
                    self.backbone, m, self.centers, self.heads[m], cfg.objective.tau
                )
                for m in self.modalities
            }
            eps = {
                m: self.backbone.spec(m).check_eps(self.backbone.spec(m).eps * eps_scale)
                for m in self.modalities
            }
            n_classes = min(clf.num_classes for clf in classifiers.values())
            if loss == "dlr_t" and n_classes < 4:
                # the targeted DLR margin's denominator needs the 4 highest scores; with fewer
                # classes every wrong class is a target anyway: cross-entropy's attack
                warnings.warn(
                    f"the dlr_t training attack needs >= 4 classes, the data has {n_classes}: "
                    "its turns use the ce attack",
                    stacklevel=2,
                )
                self._attacks[k] = self._attack("ce", eps_scale, steps)
                return self._attacks[k]
            targeted = {"n_targets": cfg.targets, "sample_targets": True} if loss == "dlr_t" else {}
            self._attacks[k] = PGD(
                classifiers,
                loss=loss,
                eps=eps,
                steps=steps,
                alpha_ratio=cfg.alpha_ratio,
                cuda_graph=cfg.cuda_graph and loss not in UNGRAPHED,
                **targeted,
            )
        return self._attacks[k]

    def _checkpoint_path(self) -> Path | None:
        return None if self.out_dir is None else self.out_dir / CHECKPOINT

    def _save(self, epoch: int, opt, sched) -> None:
        path = self._checkpoint_path()
        if path is None or not dist.is_main():
            dist.barrier()
            return
        state = {
            "epoch": epoch,
            "heads": self.heads.state_dict(),
            "opt": opt.state_dict(),
            "sched": sched.state_dict(),
            "history": self.history,
            "config": self.config.as_dict(),
            "modalities": list(self.modalities),
        }
        # atomic (unique temp name, fsync, rename): a kill mid-write never clobbers the last
        # checkpoint, and the temp file is removed on any exit path
        runfolder.write_with(path, lambda tmp: torch.save(state, tmp))
        dist.barrier()

    def _load(self, opt, sched) -> int:
        path = self._checkpoint_path()
        if path is None or not path.is_file():
            return 0
        fix = "delete it to start the calibration over"
        try:
            state = torch.load(path, map_location=self.device, weights_only=True)
        except Exception as err:
            raise FileFormatError(
                f"checkpoint {path} is corrupt or not an advcal checkpoint: {err}; {fix}"
            ) from err
        keys = ("epoch", "heads", "opt", "sched", "history", "config", "modalities")
        if not isinstance(state, dict) or any(k not in state for k in keys):
            have = sorted(state) if isinstance(state, dict) else type(state).__name__
            raise FileFormatError(f"checkpoint {path} is not an advcal checkpoint ({have}); {fix}")
        if state.get("config") != self.config.as_dict() or state.get("modalities") != list(
            self.modalities
        ):
            diff = runfolder.config_diff(
                {"calib": state.get("config"), "modalities": state.get("modalities")},
                {"calib": self.config.as_dict(), "modalities": list(self.modalities)},
            )
            raise RunFolderError(
                f"checkpoint {path} was written by a run with a different config or "
                f"modalities ({'; '.join(diff)}); use another --out or drop --resume"
            )
        check_state(self.heads.state_dict(), state["heads"], f"checkpoint {path}: heads")
        params = [p for g in opt.param_groups for p in g["params"]]
        for i, moments in dict(state["opt"].get("state", {})).items():
            for name, t in dict(moments).items():  # AdamW's exp_avg/exp_avg_sq per param
                want = params[i].shape if isinstance(i, int) and i < len(params) else None
                if isinstance(t, torch.Tensor) and t.dim() and (want is None or t.shape != want):
                    raise FileFormatError(
                        f"checkpoint {path}: optimizer tensor opt.state[{i}][{name!r}] has shape "
                        f"{tuple(t.shape)}, the heads need "
                        f"{tuple(want) if want is not None else 'no such parameter'}; {fix}"
                    )
        epoch = state["epoch"]
        if not isinstance(epoch, int) or not 0 <= epoch <= self.config.epochs:
            raise FileFormatError(f"checkpoint {path}: epoch {epoch!r} out of range; {fix}")
        self.heads.load_state_dict(state["heads"])
        opt.load_state_dict(state["opt"])
        sched.load_state_dict(state["sched"])
        self.history = list(state["history"])
        return int(state["epoch"])

    # -- the loop -----------------------------------------------------------------------
    def fit(
        self,
        dataset: Dataset,
        *,
        resume: bool = False,
        progress: bool = True,
        stop_after: int | None = None,
    ) -> CalibrationHeads:
        """Train the heads on ``dataset`` (a map-style dataset of sample dicts). ``stop_after=k``
        stops after epoch k (as an interruption would, checkpoint written); ``resume=True``
        continues from the checkpoint in ``out_dir``."""
        cfg = self.config
        info = dataset.info
        missing = [m for m in self.modalities if m not in info.modalities]
        if missing:
            raise ValueError(f"dataset '{info.name}' lacks modalities {missing}")
        n = len(dataset)
        if n < 2:
            raise ValueError("calibration needs at least 2 samples (InfoNCE contrasts a batch)")
        show = progress and dist.is_main()
        t0 = time.perf_counter()
        e_clean = self.clean_embeddings(dataset, progress=show)
        self.timings["clean_embeddings"] = time.perf_counter() - t0

        params = [p for p in self.heads.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        world, rank = dist.world_size(), dist.rank()
        sampler = GlobalBatches(n, cfg.batch_size, world=world, rank=rank, seed=cfg.seed)
        steps_per_epoch = len(sampler)
        total = cfg.epochs * steps_per_epoch
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total) / total))
        )
        start = self._load(opt, sched) if resume else 0
        if resume and start == 0 and self._checkpoint_path() is not None and dist.is_main():
            print(f"advcal: no checkpoint in {self.out_dir}; starting from scratch")
        loss_fn: nn.Module = _HeadsLoss(self.heads, self.centers)
        if dist.enabled():  # gradients of the heads all-reduced (averaged) by PyTorch's DDP
            loss_fn = DistributedDataParallel(loss_fn)
        loader = self._loader(dataset, sampler)

        t0 = time.perf_counter()
        for epoch in range(start, cfg.epochs):
            stage, eps_scale = cfg.stage_at(epoch)
            sampler.set_epoch(epoch)
            batches = sampler.global_batches()
            sums: dict[str, torch.Tensor] = {}  # on the device: no host sync per step
            waited = _progress.Waited(loader)
            bar = _progress.bar(
                waited,
                desc=f"calibrate epoch {epoch + 1}/{cfg.epochs}"
                + (f" ({stage.name})" if len(cfg.schedule()) > 1 else ""),
                enabled=show,
            )
            for step, batch in enumerate(bar):
                loss_name = stage.attack[step % len(stage.attack)]
                attack = (
                    None if loss_name == "none" else self._attack(loss_name, eps_scale, stage.steps)
                )
                if attack is not None:
                    attack.seed = _seed(cfg.seed, epoch, step)  # the same on every rank
                with nvtx_range("calibration_step"):
                    parts = self._step(
                        attack, batch, batches[step], epoch, e_clean, stage.objective, opt, loss_fn
                    )
                sched.step()
                for k, v in parts.items():
                    sums[k] = sums.get(k, 0.0) + v
                if show and (step % LOG_EVERY == 0 or step == steps_per_epoch - 1):
                    bar.set_postfix(loss=f"{float(parts['loss']):.3f}")
            bar.close()
            self.data_wait_s += waited.seconds
            names = sorted(sums)
            means = torch.stack(
                [torch.as_tensor(sums[k], dtype=torch.float64).cpu() for k in names]
            )
            dist.all_reduce_mean_(means)
            # each rank logged world x its share of the global-batch mean: their mean is it
            means = means / steps_per_epoch
            self.history.append(
                {
                    "epoch": epoch + 1,
                    "stage": stage.name,
                    "eps_scale": eps_scale,
                    **dict(zip(names, means.tolist(), strict=True)),
                }
            )
            self._save(epoch + 1, opt, sched)
            if show:
                h = self.history[-1]
                print(
                    f"epoch {epoch + 1}/{cfg.epochs}: "
                    + " ".join(
                        f"{k}={v:.4f}"
                        for k, v in h.items()
                        if isinstance(v, float) and k != "eps_scale"
                    )
                )
            if stop_after is not None and epoch + 1 >= stop_after:
                break
        self.timings["train"] = time.perf_counter() - t0
        self.heads.eval()
        return self.heads

    def _step(self, attack, batch, global_idx, epoch, e_clean, objective, opt, loss_fn):
        """One step on this rank's share ``batch`` of the global batch ``global_idx``."""
        n_global = len(global_idx)
        # an empty share (None) still joins DDP's gradient all-reduce
        batch_local = (
            None
            if batch is None
            else batch.to(self.device, non_blocking=True, float_dtype=self.backbone.dtype)
        )
        e_global = {m: e_clean[m][global_idx].to(self.device) for m in self.modalities}
        if batch_local is not None:
            y = batch_local.labels
            xs = {m: batch_local.inputs[m] for m in self.modalities}
            # the rows of this rank's samples in the global batch (the InfoNCE positives)
            where = {int(i): k for k, i in enumerate(global_idx.tolist())}
            pos = torch.tensor(
                [where[int(i)] for i in batch_local.index.tolist()], device=self.device
            )
            with self._autocast():
                if attack is not None:
                    keys = batch_local.index.cpu() + epoch * 1_000_003
                    x_adv = attack(xs, y, keys=keys)
                else:
                    x_adv = xs
                with torch.no_grad():
                    e_adv = {
                        m: self.backbone.encode(m, x_adv[m], check=False).float()
                        for m in self.modalities
                    }
        else:
            y, e_adv, pos = None, None, None
        self.heads.train()
        with nvtx_range("head_loss"):
            total, parts = loss_fn(e_adv, e_global, pos, y, n_global, objective)
        opt.zero_grad(set_to_none=True)
        total.backward()
        opt.step()
        self.heads.eval()
        parts["loss"] = total.detach() / len(self.modalities)
        return parts


class _HeadsLoss(nn.Module):
    """The heads and the objective as one module, so DDP can wrap the whole loss.

    Each term is a sum over this rank's samples divided by the global batch size, times the
    number of ranks (DDP averages the ranks' gradients): the gradient is the global batch's
    mean, whatever the split. InfoNCE contrasts each sample with the whole global batch's
    clean embeddings; the paired cross-modal consistency term uses the frozen clean
    predictions of the same sample in the other modalities.
    """

    def __init__(self, heads: CalibrationHeads, centers: Centers):
        super().__init__()
        self.heads = heads
        self.centers = centers  # fixed, the same on every rank: not a buffer DDP would sync

    def forward(self, e_adv, e_global, pos, y, n_global: int, objective: Objective):
        mods = self.heads.modalities
        if e_adv is None:  # no sample on this rank: a zero loss that still reaches every weight
            zero = sum(p.sum() for p in self.heads.parameters()) * 0.0
            return zero, {}
        scale = dist.world_size() / n_global
        total = torch.zeros((), device=y.device)
        parts: dict[str, torch.Tensor] = {}
        with torch.no_grad():
            probs = {
                m: F.softmax(zero_shot_logits(e_global[m], self.centers, objective.tau), -1)[pos]
                for m in mods
            }
        for m in mods:
            others = [probs[o] for o in mods if o != m]
            cross = torch.stack(others).mean(0) if others else None
            loss, p = objective.per_sample(
                self.heads[m], e_adv[m], e_global[m], pos, self.centers, y, cross_probs=cross
            )
            total = total + loss.sum() * scale
            for k, v in p.items():
                parts[k] = parts.get(k, 0.0) + v.sum().detach() * scale / len(mods)
        return total, parts
