"""Clean and robust zero-shot evaluation, retrieval, the eps sweep and the honest-evaluation checks.

Per modality, over the evaluation data (a dataset or a fixed subset of it, streamed through a
``DataLoader``):

* clean top-1 / top-5 of ``normalize(head(backbone(x))) @ C^T``;
* robust top-1 under an attack *suite* (default ``standard``: AutoAttack's APGD-CE, APGD-T,
  FAB-T and Square, see :mod:`advcal.attacks.suite`), adaptive through backbone and head, each
  attack run on the samples every earlier one failed on; the robust accuracy after each attack
  and the number each attack broke; robust top-5 of the per-sample worst-case examples;
* the same robust top-1 under the ``compare`` suites (default ``legacy``: the cross-entropy
  suite advcal used before), to show what a weaker evaluation would have claimed;
* an eps sweep and a large-eps attack (the ``sweep_suite``), the training-strength attacks
  (``weak``), which feed the sanity checks;
* retrieval: instance retrieval between paired modalities (query: the first modality's clean
  embedding; gallery clean, or attacked by :class:`~advcal.attacks.RankAttack` on the ranking
  margin) and text -> modality (every center a query; gallery clean or the suite's worst case).

Sanity checks (every report shows them; a failed one is shown, never hidden; ``None`` = could
not run, e.g. no black-box attack for an L2 input):

* ``robust_le_clean``: robust top-1 <= clean top-1 (+ ``noise``).
* ``monotone_in_eps``: robust top-1 does not rise with eps (beyond ``noise``).
* ``large_eps_breaks``: at ``large_eps_multiplier`` x eps the attacks succeed on all but
  ``large_eps_max_acc`` of the samples (else gradients are masked or the pipeline clips).
* ``more_steps_not_higher``: the suite finds at least what the training-strength attacks find.
* ``no_gradient_masking``: the suite does not find much more than the training-strength
  attacks (a gap above ``masking_gap``: the model hides its gradients from short attacks).
* ``black_box_not_better``: the black-box attack (Square) breaks at most ``noise`` of the
  samples every gradient attack failed on (else the gradients mislead: masking).

:func:`evaluate` returns an :class:`EvalResult` (typed; ``to_dict``/``from_dict`` for JSON).
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, Subset

from advcal import distributed as dist
from advcal import progress as _progress
from advcal.attacks import AttackSpec, AttackSuite, RankAttack, ZeroShotClassifier
from advcal.attacks.retrieval import competitors
from advcal.attacks.suite import BLACK_BOX, resolve
from advcal.backbones.base import Backbone
from advcal.centers import Centers, MultiCenters, split
from advcal.data.protocol import Batch, check_batch, collate
from advcal.heads import CalibrationHeads
from advcal.validation import check_device, check_fields


@dataclass(frozen=True)
class EvalConfig:
    """The evaluation protocol (written into every report).

    Attacks are names (``"apgd-t"``), ``"name:steps"`` strings or :class:`AttackSpec` tables;
    ``suite`` may also name a suite of :data:`advcal.attacks.SUITES`.
    """

    suite: str | tuple[str | AttackSpec, ...] = "standard"
    compare: tuple[str, ...] = ("legacy",)  # suites reported beside the main one (top-1 only)
    # at most this many samples: the first of each class in turn (a fixed stratified subset)
    samples: int | None = None
    eps_scale: float = 1.0  # evaluate at eps_scale x each modality's default eps
    sweep: tuple[float, ...] = (0.25, 0.5, 1.0, 2.0)  # multiples of the modality's eps
    sweep_suite: str | tuple[str | AttackSpec, ...] = "fast"  # the sweep and the large eps
    # the masking checks' short attacks: the suite's gradient attacks at 10 steps (their
    # per-sample worst case); more steps must not find less, nor much more (masked gradients).
    # PGD-family entries step weak_alpha_ratio x eps.
    weak: tuple[str | AttackSpec, ...] = ("apgd-ce:10", "apgd-t:10")
    weak_alpha_ratio: float = 0.5
    large_eps_multiplier: float = 16.0
    large_eps_max_acc: float = 0.05
    noise: float = 0.01  # allowed slack (fraction) for the monotonicity checks
    masking_gap: float = 0.08
    batch_size: int = 128
    workers: int = 0  # DataLoader worker processes
    max_rows: int = 2048  # rows per forward pass in targeted attacks (samples x targets)
    retrieval: bool = True
    retrieval_steps: int = 50  # APGD-DLR steps of the ranking attack
    tau: float = 0.07
    seed: int = 1234
    amp: bool = False  # bf16 autocast (CUDA only)
    cuda_graph: bool = False  # evaluation attacks stop early per sample: not capturable

    def __post_init__(self) -> None:
        check_fields(self)  # types first: steps=true, sweep=["a"], tau=nan refused by name
        object.__setattr__(self, "suite", _normalise(self.suite))
        object.__setattr__(self, "sweep_suite", _normalise(self.sweep_suite))
        self.attack_specs()  # validates every name now, not mid-evaluation
        resolve(self.sweep_suite)
        for name in self.compare:
            resolve(name)
        object.__setattr__(self, "weak", _normalise(self.weak))
        for w in self.weak:
            if w.name in BLACK_BOX:
                raise ValueError(
                    f"EvalConfig.weak: {w.label} is a black-box attack; the masking checks "
                    "compare gradient attacks"
                )
        for name in ("batch_size", "max_rows", "retrieval_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"EvalConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.workers < 0:
            raise ValueError(f"EvalConfig.workers must be >= 0, got {self.workers}")
        if not self.weak:
            raise ValueError("EvalConfig.weak: the masking checks need at least one attack")
        if not self.large_eps_multiplier > 0:
            raise ValueError(
                f"EvalConfig.large_eps_multiplier must be > 0, got {self.large_eps_multiplier}"
            )
        for name in ("large_eps_max_acc", "noise", "masking_gap"):
            v = getattr(self, name)
            if not 0 <= v <= 1:
                raise ValueError(f"EvalConfig.{name} is a fraction in [0, 1], got {v}")
        if self.samples is not None and self.samples < 1:
            raise ValueError(f"EvalConfig.samples must be >= 1 or None, got {self.samples}")
        if not (self.eps_scale > 0 and self.tau > 0 and 0 < self.weak_alpha_ratio <= 4):
            raise ValueError("EvalConfig needs eps_scale > 0, tau > 0, 0 < weak_alpha_ratio <= 4")
        if any(m <= 0 for m in self.sweep) or not self.sweep:
            raise ValueError(f"EvalConfig.sweep: multiples of eps, all > 0, got {self.sweep}")
        if self.cuda_graph:
            raise ValueError(
                "EvalConfig.cuda_graph: evaluation attacks drop each sample as soon as it is "
                "broken (dynamic shapes, host syncs), which CUDA graphs cannot capture; graphs "
                "apply to the training attack (CalibConfig.cuda_graph / --cuda-graph)"
            )

    def attack_specs(self) -> tuple[AttackSpec, ...]:
        return resolve(self.suite)

    def as_dict(self) -> dict:
        return asdict(self)


def _normalise(suite):
    return suite if isinstance(suite, str) else tuple(AttackSpec.parse(v) for v in suite)


# ------------------------------------------------------------------------------ results


@dataclass
class ModalityResult:
    """One modality's numbers. Accuracies are fractions in [0, 1] over ``n`` samples."""

    n: int
    eps: float
    norm: str
    space: str
    clean_top1: float
    clean_top5: float
    robust_top1: float
    robust_top5: float
    attacks: dict[str, float]  # robust top-1 after each attack (cumulative, cascade order)
    broken_by: dict[str, int]  # samples each attack broke first
    compare: dict[str, float]  # robust top-1 under each comparison suite
    weak_top1: float
    sweep: dict[str, float]  # eps -> robust top-1 (the evaluation eps: the full suite)
    large_eps: float
    large_eps_top1: float
    black_box_broke: int | None  # samples only the black-box attack broke; None: not run
    seconds: dict[str, float] = field(default_factory=dict)
    not_run: list[str] = field(default_factory=list)  # attacks of the suite that cannot run

    @classmethod
    def from_dict(cls, d: dict) -> ModalityResult:
        return cls(**d)


@dataclass
class EvalResult:
    """What :func:`evaluate` returns, and what the report renders."""

    modalities: dict[str, ModalityResult]
    retrieval: dict[str, dict[str, dict[str, float]]]  # pair -> clean/adv -> R@k
    sanity: dict[str, bool | None]  # "<check>.<modality>" -> passed (None: not run)
    config: dict
    data: dict  # the evaluation data: source, split, fingerprint, subset, n, skipped
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> EvalResult:
        mods = {m: ModalityResult.from_dict(r) for m, r in d["modalities"].items()}
        return cls(mods, d["retrieval"], d["sanity"], d["config"], d["data"], d.get("seconds", 0))


# ------------------------------------------------------------------------------ helpers


def topk_correct(logits: torch.Tensor, y: torch.Tensor, k: int) -> torch.Tensor:
    """Per-sample bool: is ``y`` among the top-``k`` logits (k clipped to K)."""
    k = min(k, logits.shape[1])
    return (logits.topk(k, dim=1).indices == y[:, None]).any(1)


def recall_at_k(
    query: torch.Tensor,
    gallery: torch.Tensor,
    q_ids: torch.Tensor,
    g_ids: torch.Tensor,
    ks: Sequence[int] = (1, 5, 10),
) -> dict[str, float]:
    """Instance retrieval: for each query, is an item with its id among the top-k of the
    gallery by cosine similarity. ``query`` (Q, D), ``gallery`` (G, D)."""
    sim = F.normalize(query.float(), dim=-1) @ F.normalize(gallery.float(), dim=-1).T
    top = sim.topk(min(max(ks), gallery.shape[0]), dim=1).indices
    hit = g_ids[top] == q_ids[:, None]
    return {f"R@{k}": float(hit[:, :k].any(1).float().mean()) for k in ks}


def stratified_subset(labels: torch.Tensor, n: int) -> torch.Tensor:
    """The first ``n`` indices of the dataset taken one class at a time in turn (each class's
    samples in dataset order): a fixed, class-balanced subset, sorted by index."""
    labels = labels.cpu()
    rank = torch.zeros_like(labels)
    for c in labels.unique():
        idx = (labels == c).nonzero().squeeze(1)
        rank[idx] = torch.arange(len(idx))
    order = sorted(range(len(labels)), key=lambda i: (int(rank[i]), int(labels[i]), i))
    return torch.tensor(sorted(order[:n]), dtype=torch.long)


class _Embedder(torch.nn.Module):
    """``x -> head(backbone(x))`` (the calibrated embedding; the ranking attack's model)."""

    def __init__(self, clf: ZeroShotClassifier) -> None:
        super().__init__()
        self.clf = clf

    def forward(self, x):
        e = self.clf.embed(x)
        return self.clf.head(e) if self.clf.head is not None else e


class _Protocol:
    """Every attack the protocol runs on one modality, built once and reused over batches
    (seeded identically for every batch)."""

    def __init__(self, clf: ZeroShotClassifier, cfg: EvalConfig) -> None:
        spec = clf.spec
        self.eps = spec.check_eps(spec.eps * cfg.eps_scale)
        self.spec = spec
        kw = {"spec": spec, "max_rows": cfg.max_rows}
        self.main = AttackSuite(clf, cfg.suite, eps=self.eps, seed=cfg.seed, **kw)
        self.compare = {
            name: AttackSuite(clf, name, eps=self.eps, seed=cfg.seed + 50, **kw)
            for name in cfg.compare
        }
        weak = [
            AttackSpec(**{**asdict(w), "alpha_ratio": cfg.weak_alpha_ratio})
            if w.name.startswith(("pgd", "crossmaxim")) and w.alpha_ratio is None
            else w
            for w in cfg.weak
        ]
        self.weak = AttackSuite(clf, weak, eps=self.eps, seed=cfg.seed + 100, **kw)
        self.sweep = {
            mult: None
            if abs(mult - cfg.eps_scale) < 1e-9
            else AttackSuite(
                clf, cfg.sweep_suite, eps=spec.check_eps(spec.eps * mult), seed=cfg.seed + 200, **kw
            )
            for mult in cfg.sweep
        }
        big = spec.eps * cfg.large_eps_multiplier
        if spec.range is not None and spec.norm == "linf":
            big = min(big, spec.range)
        self.large_eps = big
        self.large = AttackSuite(clf, cfg.sweep_suite, eps=big, seed=cfg.seed + 300, **kw)
        self.black_box = [
            label
            for label, s in zip(self.main.labels, self.main._built_specs(), strict=True)
            if s.name in BLACK_BOX
        ]


# ------------------------------------------------------------------------------ evaluate


def evaluate(
    backbone: Backbone,
    data: Dataset,
    centers: Centers,
    heads: CalibrationHeads | None = None,
    *,
    modalities: Sequence[str] | None = None,
    config: EvalConfig | None = None,
    device: str | torch.device | None = None,
    progress: bool = True,
) -> EvalResult:
    """Evaluate the frozen model (``heads=None``) or the calibrated one against ``centers``
    (``(K, D)``, or :class:`~advcal.centers.MultiCenters`: a class scores its nearest center;
    every center is then a text query in retrieval).

    ``data`` is a map-style dataset of sample dicts (:mod:`advcal.data.protocol`: an
    :func:`advcal.data.open` source or a :class:`~advcal.data.MultiModalDataset`). It is read
    once per pass through a ``DataLoader`` (``config.batch_size``, ``config.workers``); under
    torchrun each rank evaluates its own shard and the per-sample results are gathered, so
    the totals are exact.
    """
    cfg = config or EvalConfig()
    show = progress
    t_start = time.perf_counter()
    if device is not None:
        device = check_device(device)
    elif centers is not None:
        device = centers.device
    else:
        device = torch.device("cpu")
    if cfg.amp and device.type != "cuda":
        raise ValueError(
            f"EvalConfig.amp: bf16 autocast is for CUDA devices; on {device.type} it would be "
            "slower and less precise. Drop --amp (or amp = true) to evaluate on this device"
        )
    info = data.info
    modalities = tuple(modalities or info.modalities)
    for m in modalities:
        backbone.spec(m)
        if m not in info.modalities:
            raise ValueError(
                f"dataset '{info.name}' has no modality {m!r}; it has {list(info.modalities)}"
            )
    if heads is not None:
        missing = [m for m in modalities if m not in heads.modalities]
        if missing:
            raise ValueError(f"heads have no head for {missing}")
    if info.task == "retrieval":  # text -> modality retrieval: no classes, caption queries
        return _evaluate_text_retrieval(
            backbone, data, heads, modalities, cfg, device, show, t_start
        )
    c, center_labels, num_classes = split(centers, backbone.embed_dim)
    centers = (
        c.to(device)
        if center_labels is None
        else MultiCenters(c, center_labels, list(centers.class_names)).to(device)
    )
    if info.num_classes != num_classes:
        raise ValueError(
            f"the centers cover {num_classes} classes but dataset '{info.name}' has "
            f"{info.num_classes}"
        )

    index = torch.arange(len(data))
    if cfg.samples is not None and cfg.samples < len(data):
        index = stratified_subset(data.labels, cfg.samples)
    local = index[dist.rank() :: dist.world_size()]
    loader = DataLoader(
        Subset(data, local.tolist()),
        batch_size=cfg.batch_size,
        shuffle=False,
        num_workers=cfg.workers,
        persistent_workers=cfg.workers > 0,
        pin_memory=device.type == "cuda",
        collate_fn=collate,
    )
    clfs = {
        m: ZeroShotClassifier(
            backbone, m, centers, heads[m] if heads is not None else None, cfg.tau
        )
        for m in modalities
    }
    protocols = {m: _Protocol(clfs[m], cfg) for m in modalities}
    what = "calibrated" if heads is not None else "frozen"
    rec: dict[str, dict[str, list]] = {m: {} for m in modalities}
    counts: dict[str, dict[str, int]] = {m: {} for m in modalities}
    seen: list[torch.Tensor] = []
    skipped = 0
    seconds: dict[str, dict[str, float]] = {m: {} for m in modalities}
    bar = _progress.bar(
        desc=f"evaluate ({what})",
        total=len(loader) * len(modalities),
        enabled=show and dist.is_main(),
    )
    waited = _progress.Waited(loader)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.amp):
        for batch in waited:
            skipped += len(getattr(batch, "skipped", ()) or ())
            if len(batch) == 0:
                continue
            check_batch(batch, info)
            batch = batch.to(device, float_dtype=backbone.dtype or torch.float32)
            seen.append(batch.index.cpu())
            for m in modalities:
                _evaluate_batch(m, batch, clfs[m], protocols[m], rec[m], counts[m], seconds[m], cfg)
                bar.update(1)
    bar.close()

    order = dist.all_gather_cat(torch.cat(seen) if seen else torch.zeros(0, dtype=torch.long))
    perm = order.argsort()
    n = len(order)
    if n == 0:
        raise ValueError(f"no sample of dataset '{info.name}' could be evaluated")
    results: dict[str, ModalityResult] = {}
    gathered: dict[str, dict[str, torch.Tensor]] = {}
    for m in modalities:
        g = {k: dist.all_gather_cat(torch.cat(v))[perm.to(v[0].device)] for k, v in rec[m].items()}
        gathered[m] = g
        names = sorted(counts[m])
        total = dist.all_gather_cat(torch.tensor([[counts[m][k] for k in names]])).sum(0)
        results[m] = _summarise(
            m, g, dict(zip(names, total.tolist(), strict=True)), protocols[m], cfg, seconds[m]
        )
    retrieval = {}
    if cfg.retrieval:
        retrieval = _retrieval(
            gathered,
            order[perm],
            data,
            loader,
            clfs,
            protocols,
            centers,
            modalities,
            cfg,
            device,
            show,
        )
    sanity = sanity_checks(results, cfg)
    data_info = {
        "name": info.name,
        "source": info.source,
        "split": info.split,
        "fingerprint": info.fingerprint,
        "n": n,
        "of": len(data),
        "subset": None
        if cfg.samples is None or cfg.samples >= len(data)
        else f"stratified: the first {cfg.samples} samples taking each class in turn",
        "skipped": int(dist.all_gather_cat(torch.tensor([skipped])).sum()),
        # seconds this evaluation waited for its data loader (the slowest rank's)
        "seconds_data_wait": round(
            float(dist.all_gather_cat(torch.tensor([waited.seconds])).max()), 3
        ),
    }
    return EvalResult(
        results, retrieval, sanity, cfg.as_dict(), data_info, time.perf_counter() - t_start
    )


def _evaluate_batch(m, batch: Batch, clf, proto: _Protocol, rec, counts, seconds, cfg) -> None:
    x, y = batch.inputs[m], batch.labels

    def add(key, value):  # per sample
        rec.setdefault(key, []).append(value.detach())

    def count(key, n: int):  # per batch, summed
        counts[key] = counts.get(key, 0) + n

    def tick(key, t0):
        seconds[key] = seconds.get(key, 0.0) + time.perf_counter() - t0

    with torch.no_grad():
        e = clf.embed(x)
        logits = clf.logits_from_embedding(e).float()
        z = clf.head(e) if clf.head is not None else e
    add("index", batch.index)
    add("ids", batch.ids)
    add("labels", y)
    add("clean_top1", topk_correct(logits, y, 1))
    add("clean_top5", topk_correct(logits, y, 5))
    add("z_clean", z.float())
    keys = batch.index.cpu()  # every draw keyed by the sample: results independent of batching
    res = proto.main.run(x, y, keys)
    for k, v in res.seconds.items():
        seconds[k] = seconds.get(k, 0.0) + v
    for label, robust in res.after.items():
        add(f"after:{label}", robust)
    add("robust_top1", res.robust)
    with torch.no_grad():
        e_adv = clf.embed(res.worst)
        add("robust_top5", topk_correct(clf.logits_from_embedding(e_adv).float(), y, 5))
        add("z_adv", (clf.head(e_adv) if clf.head is not None else e_adv).float())
    for label, n_broken in res.broken_by.items():
        count(f"broken:{label}", n_broken)
    if proto.black_box:
        bb = proto.black_box[0]
        labels = list(res.after)
        before_bb = labels[labels.index(bb) - 1] if labels.index(bb) > 0 else None
        prior = res.after[before_bb] if before_bb else res.clean
        count("black_box_broke", int((prior & ~res.after[bb]).sum()))
    for name, suite in proto.compare.items():
        t0 = time.perf_counter()
        add(f"compare:{name}", suite.run(x, y, keys).robust)
        tick(f"compare:{name}", t0)
    t0 = time.perf_counter()
    add("weak_top1", proto.weak.run(x, y, keys).robust)
    tick("weak", t0)
    t0 = time.perf_counter()
    for mult, suite in proto.sweep.items():
        add(f"sweep:{mult:g}", res.robust if suite is None else suite.run(x, y, keys).robust)
    add("large_eps_top1", proto.large.run(x, y, keys).robust)
    tick("sweep", t0)


def _summarise(m, g, counts, proto: _Protocol, cfg: EvalConfig, seconds) -> ModalityResult:
    def mean(key):
        return float(g[key].float().mean())

    spec = proto.spec
    attacks = {label: mean(f"after:{label}") for label in proto.main.labels}
    broken = {label: int(counts.get(f"broken:{label}", 0)) for label in proto.main.labels}
    sweep = {f"{spec.eps * mult:.6g}": mean(f"sweep:{mult:g}") for mult in cfg.sweep}
    return ModalityResult(
        n=len(g["labels"]),
        eps=proto.eps,
        norm=spec.norm,
        space=spec.space,
        clean_top1=mean("clean_top1"),
        clean_top5=mean("clean_top5"),
        robust_top1=mean("robust_top1"),
        robust_top5=mean("robust_top5"),
        attacks=attacks,
        broken_by=broken,
        compare={name: mean(f"compare:{name}") for name in cfg.compare},
        weak_top1=mean("weak_top1"),
        sweep=sweep,
        large_eps=proto.large_eps,
        large_eps_top1=mean("large_eps_top1"),
        black_box_broke=int(counts["black_box_broke"]) if proto.black_box else None,
        not_run=list(proto.main.skipped),
        seconds={k: round(v, 3) for k, v in seconds.items()},
    )


def _retrieval(
    gathered, index, data, loader, clfs, protocols, centers, modalities, cfg, device, show
):
    """R@1/5/10: instance retrieval ``anchor -> m`` (gallery clean, or each item attacked by
    the ranking attack against its paired query), and text -> modality (every center a query,
    its hits the items of its class; gallery clean or the suite's worst case)."""
    out: dict[str, dict] = {}
    anchor = modalities[0]
    ids = gathered[anchor]["ids"]
    for m in modalities[1:] if len(ids) > 1 else ():  # one item: nothing to rank against
        q, g = gathered[anchor]["z_clean"], gathered[m]["z_clean"]
        out[f"{anchor}->{m}"] = {
            "clean": recall_at_k(q, g, ids, ids),
            "adv": recall_at_k(
                q,
                _ranked_gallery(m, q, g, index, loader, clfs, protocols, cfg, device, show),
                ids,
                ids,
            ),
        }
    queries, classes, _ = split(centers)
    if classes is None:
        classes = torch.arange(queries.shape[0], device=queries.device)
    for m in modalities:
        labels = gathered[m]["labels"]
        out[f"text->{m}"] = {
            kind: recall_at_k(queries, gathered[m][f"z_{kind}"], classes, labels)
            for kind in ("clean", "adv")
        }
    return out


def _ranked_gallery(m, q, g, index, loader, clfs, protocols, cfg, device, show):
    """The gallery of ``m`` with every item attacked by the ranking attack (its query: the
    anchor embedding of the same instance; its competitors: the query's best other items)."""
    return _ranked_gallery_from(
        m, q, g, index, loader, _Embedder(clfs[m]), protocols[m], cfg, device, show
    )


def _ranked_gallery_from(m, q, g, index, loader, embedder, proto, cfg, device, show):
    pos = {int(i): k for k, i in enumerate(index.tolist())}
    comp = competitors(q, g, k=10)
    atk = RankAttack(
        embedder,
        loss="dlr" if comp.shape[1] >= 2 else "ce",  # a gallery of 2: one competitor
        spec=proto.spec,
        eps=proto.eps,
        steps=cfg.retrieval_steps,
        tau=cfg.tau,
        seed=cfg.seed + 400,
        max_rows=cfg.max_rows,
    )
    adv, where = [], []
    bar = _progress.bar(
        desc=f"retrieval attack ({m})", total=len(loader), enabled=show and dist.is_main()
    )
    for batch in loader:
        if len(batch) == 0:
            continue
        batch = batch.to(device, float_dtype=torch.float32)
        rows = torch.tensor([pos[int(i)] for i in batch.index.tolist()], device=q.device)
        xa = atk(batch.inputs[m], q[rows], comp[rows], keys=batch.index.cpu())
        with torch.no_grad():
            adv.append(embedder(xa).float())
        where.append(rows)
        bar.update(1)
    bar.close()
    z = dist.all_gather_cat(torch.cat(adv))
    rows = dist.all_gather_cat(torch.cat(where))
    return z[rows.argsort()]


def _evaluate_text_retrieval(backbone, data, heads, modalities, cfg, device, show, t_start):
    """A retrieval dataset (``info.task == "retrieval"``, e.g. MSR-VTT 1k-A): every item's
    first caption (the backbone's text embedding) queries the gallery of each modality, clean
    or with every item attacked on its ranking margin (:class:`RankAttack`); R@1/5/10."""
    info = data.info
    index = torch.arange(len(data))
    if cfg.samples is not None and cfg.samples < len(data):
        index = index[: cfg.samples]  # no classes to stratify by: the first items
    local = index[dist.rank() :: dist.world_size()]
    loader = DataLoader(
        Subset(data, local.tolist()), batch_size=cfg.batch_size, shuffle=False,
        num_workers=cfg.workers, persistent_workers=cfg.workers > 0, collate_fn=collate,
    )  # fmt: skip
    missing = [int(i) for i in data.ids[index].tolist() if int(i) not in info.captions]
    if missing:
        raise ValueError(f"dataset '{info.name}': items {missing[:5]} have no caption")
    embed = {
        m: _Embedder(
            ZeroShotClassifier(backbone, m, _NoCenters.of(backbone), heads[m] if heads else None)
        )
        for m in modalities
    }
    z, ids, seen = {m: [] for m in modalities}, [], []
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.amp):
        for batch in loader:
            if len(batch) == 0:
                continue
            check_batch(batch, info)
            batch = batch.to(device, float_dtype=backbone.dtype or torch.float32)
            ids.append(batch.ids.cpu())
            seen.append(batch.index.cpu())
            for m in modalities:
                z[m].append(embed[m](batch.inputs[m]).float())
    order = dist.all_gather_cat(torch.cat(seen)).argsort()
    ids_all = dist.all_gather_cat(torch.cat(ids))[order]
    texts = [info.captions[int(i)][0] for i in ids_all.tolist()]
    with torch.no_grad():
        q = torch.cat(
            [backbone.encode_text(texts[i : i + 256]).float() for i in range(0, len(texts), 256)]
        )
    q = F.normalize(q.to(device), dim=-1)
    results, retrieval = {}, {}
    for m in modalities:
        g = dist.all_gather_cat(torch.cat(z[m]))[order.to(device)]
        spec = backbone.spec(m)
        proto = SimpleNamespace(spec=spec, eps=spec.check_eps(spec.eps * cfg.eps_scale))
        adv = _ranked_gallery_from(m, q, g, index, loader, embed[m], proto, cfg, device, show)
        ids_dev = ids_all.to(device)
        retrieval[f"text->{m}"] = {
            "clean": recall_at_k(q, g, ids_dev, ids_dev),
            "adv": recall_at_k(q, adv, ids_dev, ids_dev),
        }
    data_info = {
        "name": info.name, "source": info.source, "split": info.split,
        "fingerprint": info.fingerprint, "n": len(ids_all), "of": len(data),
        "subset": None if cfg.samples is None or cfg.samples >= len(data)
        else f"the first {cfg.samples} items", "skipped": 0, "task": "retrieval",
    }  # fmt: skip
    return EvalResult(
        results, retrieval, {}, cfg.as_dict(), data_info, time.perf_counter() - t_start
    )


class _NoCenters:
    """Two placeholder unit centers: the classifier wrapper is used only for its embedding
    path (backbone -> head) when a dataset has no classes."""

    @staticmethod
    def of(backbone) -> torch.Tensor:
        c = torch.zeros(2, backbone.embed_dim)
        c[0, 0] = c[1, 1] = 1.0
        return c


def sanity_checks(
    per_modality: dict[str, ModalityResult], cfg: EvalConfig
) -> dict[str, bool | None]:
    """The honest-evaluation checks of DESIGN.md, per modality (``<check>.<modality>``)."""
    out: dict[str, bool | None] = {}
    for m, r in per_modality.items():
        sweep = [r.sweep[k] for k in sorted(r.sweep, key=float)]
        out[f"robust_le_clean.{m}"] = r.robust_top1 <= r.clean_top1 + cfg.noise
        out[f"monotone_in_eps.{m}"] = all(b <= a + cfg.noise for a, b in itertools.pairwise(sweep))
        out[f"large_eps_breaks.{m}"] = r.large_eps_top1 <= cfg.large_eps_max_acc
        out[f"more_steps_not_higher.{m}"] = r.robust_top1 <= r.weak_top1 + cfg.noise
        out[f"no_gradient_masking.{m}"] = r.weak_top1 - r.robust_top1 <= cfg.masking_gap
        out[f"black_box_not_better.{m}"] = (
            None if r.black_box_broke is None else r.black_box_broke <= math.floor(cfg.noise * r.n)
        )
    return out


__all__ = [
    "EvalConfig",
    "EvalResult",
    "ModalityResult",
    "evaluate",
    "recall_at_k",
    "sanity_checks",
    "stratified_subset",
    "topk_correct",
]
