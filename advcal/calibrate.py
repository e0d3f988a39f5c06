"""The Calibrator: trains the heads on adversarial examples only, the backbone and centers frozen.

One step (a batch of paired instances, every modality at once)::

    x_adv = PGD-k(x) through backbone + current head      (all modalities, one fused update)
    e_adv = backbone(x_adv)                                (no grad: the backbone is frozen)
    loss  = sum_m Objective(head_m, e_adv_m, e_clean_m, C, y)
    AdamW step on the heads; cosine learning-rate schedule

``e_clean`` is computed once for the whole training set and cached (the backbone is frozen).
Every epoch ends with an atomic checkpoint; ``fit(resume=True)`` continues from it and gives
the same heads as an uninterrupted run (all randomness is seeded per epoch and batch).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DistributedSampler
from tqdm.auto import tqdm

from advcal import distributed as dist
from advcal import runfolder
from advcal.attacks import PGD, Attack, CrossMaxim, ZeroShotClassifier
from advcal.backbones.base import Backbone
from advcal.centers import Centers, MultiCenters, split, zero_shot_logits
from advcal.data import MultiModalDataset
from advcal.errors import FileFormatError, RunFolderError
from advcal.heads import CalibrationHeads
from advcal.objectives import Objective
from advcal.profiling import nvtx_range
from advcal.validation import check_fields, check_state

log = logging.getLogger("advcal.calibrate")

CHECKPOINT = "checkpoint.pt"
TRAIN_ATTACKS = ("pgd", "crossmaxim", "alternate")
LOG_EVERY = 10  # progress-bar loss refresh, in steps (each refresh is one host sync)


@dataclass(frozen=True)
class CalibConfig:
    """Every knob of a calibration run (written into the run's config and report)."""

    epochs: int = 5
    batch_size: int = 128
    lr: float = 5e-3
    weight_decay: float = 1e-4
    head_kind: str = "residual_linear"
    head_hidden: int | None = None
    # "identity": every head starts as the identity map (the frozen model); "backbone": linear
    # heads start from the model's released per-modality heads where it has them (UniBind)
    head_init: str = "identity"
    objective: Objective = field(default_factory=Objective)
    # the training attack: "pgd" (cross-entropy), "crossmaxim" (-cos to the true center), or
    # "alternate" (the two by turns, batch by batch)
    attack: str = "pgd"
    attack_steps: int = 10
    # step = alpha_ratio * eps: 0.5 makes PGD-10 nearly as strong as PGD-50 at eps/10 on every
    # digits modality (0.25 left the audio tower 6 points short: a weak training signal)
    alpha_ratio: float = 0.5
    eps_scale: float = 1.0  # train at eps_scale x each modality's eps
    amp: bool = False
    cuda_graph: bool = False  # capture the training attack's step in a CUDA graph (GPU only)
    seed: int = 0

    def __post_init__(self) -> None:
        check_fields(self)  # types first: epochs=true, batch_size=15.5, lr=nan refused by name
        for name in ("epochs", "batch_size", "attack_steps"):
            if getattr(self, name) < (0 if name == "attack_steps" else 1):
                raise ValueError(f"CalibConfig.{name} must be positive, got {getattr(self, name)}")
        if not (self.lr > 0 and self.weight_decay >= 0 and self.eps_scale >= 0):
            raise ValueError("CalibConfig needs lr > 0, weight_decay >= 0, eps_scale >= 0")
        if isinstance(self.objective, dict):
            object.__setattr__(self, "objective", Objective(**self.objective))
        if self.attack not in TRAIN_ATTACKS:
            raise ValueError(
                f"CalibConfig.attack must be one of {TRAIN_ATTACKS}, got {self.attack!r}"
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

    def as_dict(self) -> dict:
        return asdict(self)


def _seed(*parts: int) -> int:
    s = 0
    for p in parts:
        s = (s * 1_000_003 + int(p)) % (2**62)
    return s


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
        c, labels, _ = split(centers, backbone.embed_dim)  # validates: (K, D) of the backbone
        self.device = torch.device(device) if device is not None else c.device
        for m in modalities:
            backbone.spec(m)  # unknown modality -> clear error now, not mid-epoch
        if self.config.cuda_graph and self.device.type != "cuda":
            raise ValueError(
                f"CalibConfig(cuda_graph=True) needs a CUDA device, got {self.device}; "
                "set cuda_graph=False (the default) to calibrate on this device"
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

    # -- pieces -------------------------------------------------------------------------
    def _autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.config.amp)

    @torch.no_grad()
    def clean_embeddings(self, dataset: MultiModalDataset, batch_size: int = 256) -> dict:
        """Frozen clean embeddings of every sample, per modality, ``(N, D)`` fp32 (cached)."""
        out = {}
        for m in self.modalities:
            x = dataset.inputs[m]
            self.backbone.spec(m).check_input(x[:1], f"dataset.inputs[{m!r}]", m)
            chunks = []
            for i in range(0, len(dataset), batch_size):
                with self._autocast():
                    chunks.append(
                        self.backbone.encode(
                            m, x[i : i + batch_size].to(self.device), check=False
                        ).float()
                    )
            out[m] = torch.cat(chunks)
        return out

    def _attacks(self) -> list[Attack]:
        """The training attack(s) over every modality, built once (their CUDA graphs, when
        ``cuda_graph=True``, are captured once per batch shape); batch ``i`` uses attack
        ``i % len``, reseeded per batch."""
        classifiers = {
            m: ZeroShotClassifier(
                self.backbone, m, self.centers, self.heads[m], self.config.objective.tau
            )
            for m in self.modalities
        }
        eps = {m: self.backbone.spec(m).eps * self.config.eps_scale for m in self.modalities}
        kinds = {"pgd": [PGD], "crossmaxim": [CrossMaxim], "alternate": [PGD, CrossMaxim]}
        return [
            cls(
                classifiers,
                eps=eps,
                steps=self.config.attack_steps,
                alpha_ratio=self.config.alpha_ratio,
                cuda_graph=self.config.cuda_graph,
            )
            for cls in kinds[self.config.attack]
        ]

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
        dataset: MultiModalDataset,
        *,
        resume: bool = False,
        progress: bool = True,
        stop_after: int | None = None,
    ) -> CalibrationHeads:
        """Train the heads. ``stop_after=k`` stops after epoch k (as an interruption would,
        checkpoint written); ``resume=True`` continues from the checkpoint in ``out_dir``."""
        cfg = self.config
        missing = [m for m in self.modalities if m not in dataset.inputs]
        if missing:
            raise ValueError(f"dataset '{dataset.name}' lacks modalities {missing}")
        if len(dataset) < 2:
            raise ValueError("calibration needs at least 2 samples (InfoNCE contrasts a batch)")
        t0 = time.perf_counter()
        e_clean = self.clean_embeddings(dataset)
        self.timings["clean_embeddings"] = time.perf_counter() - t0
        # frozen clean predictions, for the paired cross-modal consistency term
        with torch.no_grad():
            probs = {
                m: F.softmax(zero_shot_logits(e, self.centers, cfg.objective.tau), -1)
                for m, e in e_clean.items()
            }
        labels = dataset.labels.to(self.device)

        params = [p for p in self.heads.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        # Each rank takes its shard of the data (DistributedSampler; one rank = all of it) in
        # batches of batch_size / world, so the global batch is the same at any world size.
        world, rank = dist.world_size(), dist.rank()
        sampler = DistributedSampler(
            range(len(dataset)), num_replicas=world, rank=rank, shuffle=True, seed=cfg.seed
        )
        local_bs = max(1, math.ceil(cfg.batch_size / world))
        steps_per_epoch = math.ceil(len(sampler) / local_bs)
        total = cfg.epochs * steps_per_epoch
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total) / total))
        )
        start = self._load(opt, sched) if resume else 0
        if resume and start == 0 and self._checkpoint_path() is not None and dist.is_main():
            print(f"advcal: no checkpoint in {self.out_dir}; starting from scratch")
        loss_fn: nn.Module = _HeadsLoss(self.heads, cfg.objective, self.centers)
        if dist.enabled():  # gradients of the heads all-reduced by PyTorch's DDP
            loss_fn = DistributedDataParallel(loss_fn)
        show = progress and dist.is_main()
        attacks = self._attacks()

        t0 = time.perf_counter()
        for epoch in range(start, cfg.epochs):
            sampler.set_epoch(epoch)
            batches = torch.tensor(list(sampler), dtype=torch.long).split(local_bs)
            sums: dict[str, torch.Tensor] = {}  # on the device: no host sync per step
            bar = tqdm(
                batches,
                desc=f"calibrate epoch {epoch + 1}/{cfg.epochs}",
                disable=not show,
                leave=False,
                dynamic_ncols=True,
            )
            for step, idx in enumerate(bar):
                attack = attacks[step % len(attacks)]
                attack.seed = _seed(cfg.seed, epoch, step, dist.rank())
                with nvtx_range("calibration_step"):
                    parts = self._step(attack, idx, dataset, e_clean, probs, labels, opt, loss_fn)
                sched.step()
                for k, v in parts.items():
                    sums[k] = sums.get(k, 0.0) + v
                if show and (step % LOG_EVERY == 0 or step == len(batches) - 1):
                    bar.set_postfix(loss=f"{float(parts['loss']):.3f}")
            means = torch.stack([v / steps_per_epoch for v in sums.values()]).double().cpu()
            dist.all_reduce_mean_(means)
            self.history.append(
                {"epoch": epoch + 1, **dict(zip(sums, means.tolist(), strict=True))}
            )
            self._save(epoch + 1, opt, sched)
            if show:
                h = self.history[-1]
                print(
                    f"epoch {epoch + 1}/{cfg.epochs}: "
                    + " ".join(f"{k}={v:.4f}" for k, v in h.items() if k != "epoch")
                )
            if stop_after is not None and epoch + 1 >= stop_after:
                break
        self.timings["train"] = time.perf_counter() - t0
        self.heads.eval()
        return self.heads

    def _step(self, attack, idx, dataset, e_clean, probs, labels, opt, loss_fn):
        y = labels[idx]
        xs = {m: dataset.inputs[m][idx].to(self.device) for m in self.modalities}
        with self._autocast():
            x_adv = attack(xs, y)
            with torch.no_grad():
                e_adv = {
                    m: self.backbone.encode(m, x_adv[m], check=False).float()
                    for m in self.modalities
                }
        cross = {}
        for m in self.modalities:
            others = [probs[o][idx] for o in self.modalities if o != m]
            cross[m] = torch.stack(others).mean(0) if others else None
        self.heads.train()
        with nvtx_range("head_loss"):
            total, parts = loss_fn(e_adv, {m: e_clean[m][idx] for m in self.modalities}, cross, y)
        opt.zero_grad(set_to_none=True)
        total.backward()
        opt.step()
        self.heads.eval()
        parts["loss"] = total.detach() / len(self.modalities)
        return parts


class _HeadsLoss(nn.Module):
    """The heads and the objective as one module, so DDP can wrap the whole loss."""

    def __init__(self, heads: CalibrationHeads, objective: Objective, centers: Centers):
        super().__init__()
        self.heads, self.objective = heads, objective
        self.centers = centers  # fixed, the same on every rank: not a buffer DDP would sync

    def forward(self, e_adv, e_clean, cross, y):
        total = torch.zeros((), device=y.device)
        parts: dict[str, torch.Tensor] = {}
        for m in self.heads.modalities:
            loss, p = self.objective(
                self.heads[m], e_adv[m], e_clean[m], self.centers, y, cross_probs=cross[m]
            )
            total = total + loss
            for k, v in p.items():
                parts[k] = parts.get(k, 0.0) + v / len(self.heads.modalities)
        return total, parts
