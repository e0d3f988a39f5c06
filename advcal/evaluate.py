"""Clean and robust zero-shot evaluation, retrieval, eps sweep and the honest-evaluation checks.

Per modality, on the evaluation split:

* clean top-1 / top-5 of ``normalize(head(backbone(x))) @ C^T``;
* robust top-1 / top-5 under every evaluation attack (PGD-``steps`` on the cross-entropy,
  CrossMaxim-``steps`` on ``-cos(z, c_y)``, each with its ``restarts``), adaptive through
  backbone and head, taking the per-sample worst case over the attacks (a sample is robust
  only if every attack fails on it);
* an eps sweep (PGD-``sweep_steps``), the same attacks at training strength (``weak_attacks``,
  ``weak_steps`` steps each, worst case) and a large-eps attack, which feed the sanity checks.

Sanity checks (every report shows them; a failed one is shown, never hidden):

* ``robust_le_clean``: robust top-1 <= clean top-1 (+ ``noise``).
* ``monotone_in_eps``: robust top-1 does not rise with eps (beyond ``noise``).
* ``large_eps_breaks``: at ``large_eps_multiplier`` x eps the attack succeeds on all but
  ``large_eps_max_acc`` of the samples.
* ``more_steps_not_higher``: the full protocol finds at least what the training-strength
  attacks find.
* ``no_gradient_masking``: the full protocol does not find much more than the
  training-strength attacks (a gap above ``masking_gap`` means the model hides its gradients
  from short attacks: apparent robustness, not robustness).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from advcal import distributed as dist
from advcal.attacks import ATTACKS, PGD, Attack, ZeroShotClassifier
from advcal.backbones.base import Backbone
from advcal.centers import Centers, MultiCenters, split
from advcal.data import MultiModalDataset
from advcal.heads import CalibrationHeads
from advcal.validation import check_fields


@dataclass(frozen=True)
class EvalConfig:
    """The evaluation protocol (written into every report)."""

    attacks: tuple[str, ...] = ("pgd", "crossmaxim")
    steps: int = 50
    restarts: int | tuple[int, ...] = (2, 1)  # one for all attacks, or one per attack
    alpha_ratio: float = 0.1
    eps_scale: float = 1.0  # evaluate at eps_scale x each modality's default eps
    sweep: tuple[float, ...] = (0.25, 0.5, 1.0, 2.0)  # multiples of the modality's eps
    sweep_steps: int = 10  # the sweep and the large-eps attack: PGD at the training strength
    # the evaluation attacks at training strength (PGD-10, step eps/2: CalibConfig's attack),
    # per-sample worst case: the gradient-masking check compares the full protocol against it
    weak_attacks: tuple[str, ...] = ("pgd", "crossmaxim")
    weak_steps: int = 10
    weak_alpha_ratio: float = 0.5
    large_eps_multiplier: float = 16.0
    large_eps_max_acc: float = 0.05
    noise: float = 0.01  # allowed slack (fraction) for the monotonicity checks
    masking_gap: float = 0.08
    batch_size: int = 256
    retrieval: bool = True
    tau: float = 0.07
    seed: int = 1234
    cuda_graph: bool = False  # capture every attack step in a CUDA graph (GPU only)

    def __post_init__(self) -> None:
        check_fields(self)  # types first: steps=true, sweep=["a"], tau=nan refused by name
        for name in ("attacks", "weak_attacks"):
            names = tuple(getattr(self, name))
            unknown = [a for a in names if a not in ATTACKS]
            if unknown or not names:
                raise ValueError(
                    f"EvalConfig.{name}: unknown attacks {unknown}; choose from {sorted(ATTACKS)}"
                )
            object.__setattr__(self, name, names)
        object.__setattr__(self, "attacks", tuple(self.attacks))
        restarts = self.restarts
        if isinstance(restarts, int):
            restarts = (restarts,) * len(self.attacks)
        restarts = tuple(int(r) for r in restarts)
        if len(restarts) != len(self.attacks):
            raise ValueError(
                f"EvalConfig.restarts: {len(restarts)} values for {len(self.attacks)} attacks "
                f"{self.attacks}; give one int, or one per attack"
            )
        object.__setattr__(self, "restarts", restarts)
        if self.steps < 1 or min(restarts) < 1 or self.batch_size < 1:
            raise ValueError("EvalConfig needs steps, restarts and batch_size >= 1")
        object.__setattr__(self, "sweep", tuple(float(s) for s in self.sweep))

    def as_dict(self) -> dict:
        return asdict(self)


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


class _Model:
    """Frozen or calibrated chain for one modality, evaluated batch by batch."""

    def __init__(self, backbone, modality, centers, heads, tau):
        head = heads[modality] if heads is not None else None
        self.clf = ZeroShotClassifier(backbone, modality, centers, head, tau)

    @torch.no_grad()
    def logits_and_embed(self, x):
        e = self.clf.embed(x)
        z = self.clf.head(e) if self.clf.head is not None else e
        return self.clf.logits_from_embedding(e), z


def evaluate(
    backbone: Backbone,
    dataset: MultiModalDataset,
    centers: Centers,
    heads: CalibrationHeads | None = None,
    *,
    modalities: Sequence[str] | None = None,
    config: EvalConfig | None = None,
    device: str | torch.device | None = None,
    progress: bool = True,
) -> dict:
    """Evaluate the frozen model (``heads=None``) or the calibrated one against ``centers``
    (``(K, D)``, or :class:`~advcal.centers.MultiCenters`: a class scores its nearest center;
    every center is then a text query in retrieval). Returns a dict:
    ``modalities.<m>`` (accuracies as fractions), ``retrieval``, ``sanity``, ``config``."""
    cfg = config or EvalConfig()
    device = torch.device(device) if device is not None else centers.device
    if cfg.cuda_graph and device.type != "cuda":
        raise ValueError(
            f"EvalConfig(cuda_graph=True) needs a CUDA device, got {device}; "
            "set cuda_graph=False (the default) to evaluate on this device"
        )
    modalities = tuple(modalities or dataset.modalities)
    for m in modalities:
        backbone.spec(m)
        if m not in dataset.inputs:
            raise ValueError(f"dataset '{dataset.name}' has no modality {m!r}")
    if heads is not None:
        missing = [m for m in modalities if m not in heads.modalities]
        if missing:
            raise ValueError(f"heads have no head for {missing}")
    c, center_labels, num_classes = split(centers, backbone.embed_dim)
    if center_labels is None:
        centers = c.to(device)
    else:
        centers = MultiCenters(c, center_labels, list(centers.class_names)).to(device)
    if len(dataset.class_names) != num_classes:
        raise ValueError(
            f"the centers cover {num_classes} classes but dataset '{dataset.name}' has "
            f"{len(dataset.class_names)}"
        )
    y_all = dataset.labels.to(device)
    n = len(dataset)

    results: dict = {"modalities": {}, "retrieval": {}, "sanity": {}, "config": cfg.as_dict()}
    embeds: dict[str, dict[str, torch.Tensor]] = {"clean": {}, "adv": {}}
    # Under torchrun each rank evaluates a strided shard; per-sample results are gathered.
    local = torch.arange(n)[dist.rank() :: dist.world_size()]
    work = [(m, idx) for m in modalities for idx in local.split(cfg.batch_size)]
    bar = tqdm(
        work,
        desc="evaluate" + (" (calibrated)" if heads is not None else " (frozen)"),
        disable=not (progress and dist.is_main()),
        leave=False,
        dynamic_ncols=True,
    )
    acc: dict[str, dict[str, list]] = {m: {} for m in modalities}
    suites: dict[str, tuple[_Model, _Suite]] = {}
    for m, idx in bar:
        if m not in suites:  # one model and attack suite per modality, reused over batches
            model = _Model(backbone, m, centers, heads, cfg.tau)
            suites[m] = (model, _Suite(model.clf, backbone.spec(m), cfg))
        model, suite = suites[m]
        x, y = dataset.inputs[m][idx].to(device), y_all[idx.to(device)]
        rec = acc[m]

        def add(key, value, rec=rec):
            rec.setdefault(key, []).append(value)

        def top1(x_adv, model=model, y=y):
            return topk_correct(model.logits_and_embed(x_adv)[0], y, 1)

        logits, z = model.logits_and_embed(x)
        add("clean_top1", topk_correct(logits, y, 1))
        add("clean_top5", topk_correct(logits, y, 5))
        embeds["clean"].setdefault(m, []).append(z)

        worst1 = torch.ones_like(y, dtype=torch.bool)
        worst5 = torch.ones_like(y, dtype=torch.bool)
        worst_x, worst_margin = x.clone(), torch.full_like(y, float("inf"), dtype=torch.float)
        for name, atk in suite.attacks.items():
            xa = atk(x, y)
            la, _ = model.logits_and_embed(xa)
            c1, c5 = topk_correct(la, y, 1), topk_correct(la, y, 5)
            add(f"attack_{name}_top1", c1)
            # keep, per sample, the adversarial input with the lowest true-class margin
            margin = (
                la.gather(1, y[:, None]).squeeze(1)
                - la.scatter(1, y[:, None], -float("inf")).max(1).values
            )
            take = margin < worst_margin
            worst_x = torch.where(take.view(-1, *([1] * (x.dim() - 1))), xa, worst_x)
            worst_margin = torch.where(take, margin, worst_margin)
            worst1 &= c1
            worst5 &= c5
        add("robust_top1", worst1)
        add("robust_top5", worst5)
        embeds["adv"].setdefault(m, []).append(model.logits_and_embed(worst_x)[1])

        weak = torch.ones_like(y, dtype=torch.bool)
        for atk in suite.weak:
            weak &= top1(atk(x, y))
        add("weak_top1", weak)
        for mult, atk in suite.sweep.items():
            # the full evaluation at the evaluation eps; a PGD-sweep_steps attack elsewhere
            add(f"sweep_{mult:g}", worst1 if atk is None else top1(atk(x, y)))
        add("large_eps_top1", top1(suite.large(x, y)))

    order = dist.all_gather_cat(local).argsort()  # gathered position -> sample index order
    for m in modalities:
        spec = backbone.spec(m)
        r = {k: float(dist.all_gather_cat(torch.cat(v)).float().mean()) for k, v in acc[m].items()}
        sweep = {f"{spec.eps * mult:.6g}": r.pop(f"sweep_{mult:g}") for mult in cfg.sweep}
        results["modalities"][m] = {
            **{k: r[k] for k in ("clean_top1", "clean_top5", "robust_top1", "robust_top5")},
            "eps": spec.eps * cfg.eps_scale,
            "norm": spec.norm,
            "space": spec.space,
            "attacks": {a: r[f"attack_{a}_top1"] for a in cfg.attacks},
            "weak_top1": r["weak_top1"],
            "sweep": sweep,
            "large_eps": spec.eps * cfg.large_eps_multiplier,
            "large_eps_top1": r["large_eps_top1"],
        }
    for kind in ("clean", "adv"):
        embeds[kind] = {
            m: dist.all_gather_cat(torch.cat(v))[order.to(device)] for m, v in embeds[kind].items()
        }
    if cfg.retrieval:
        results["retrieval"] = _retrieval(embeds, dataset, centers, modalities, device)
    results["sanity"] = sanity_checks(results["modalities"], cfg)
    return results


class _Suite:
    """Every attack the protocol runs on one modality, built once (seeded identically for
    every batch; with ``cuda_graph`` each captures its step once per batch shape)."""

    def __init__(self, clf: ZeroShotClassifier, spec, cfg: EvalConfig) -> None:
        eps = spec.check_eps(spec.eps * cfg.eps_scale)
        graph = cfg.cuda_graph
        self.attacks = {
            name: ATTACKS[name](
                clf,
                eps=eps,
                steps=cfg.steps,
                restarts=cfg.restarts[i],
                alpha_ratio=cfg.alpha_ratio,
                seed=cfg.seed + i,
                cuda_graph=graph,
            )
            for i, name in enumerate(cfg.attacks)
        }

        def pgd(eps: float, steps: int, seed: int, cls=PGD) -> Attack:
            return cls(
                clf,
                eps=eps,
                steps=steps,
                alpha_ratio=cfg.weak_alpha_ratio,
                seed=seed,
                cuda_graph=graph,
            )

        self.weak = [  # the training-strength attacks
            pgd(eps, cfg.weak_steps, cfg.seed + 100 + i, ATTACKS[name])
            for i, name in enumerate(cfg.weak_attacks)
        ]
        self.sweep: dict[float, PGD | None] = {
            mult: None
            if abs(mult - cfg.eps_scale) < 1e-9
            else pgd(spec.check_eps(spec.eps * mult), cfg.sweep_steps, cfg.seed + 200)
            for mult in cfg.sweep
        }
        big = spec.eps * cfg.large_eps_multiplier
        if spec.range is not None and spec.norm == "linf":
            big = min(big, spec.range)
        self.large = pgd(big, cfg.sweep_steps, cfg.seed + 300)


def _retrieval(embeds, dataset, centers, modalities, device) -> dict:
    """R@1/5/10: instance retrieval between paired modalities (query clean, gallery clean or
    attacked), and text -> modality (query = class center, hit = an item of that class)."""
    ids = dataset.ids.to(device)
    labels = dataset.labels.to(device)
    out: dict[str, dict] = {}
    anchor = modalities[0]
    for m in modalities[1:]:
        for kind in ("clean", "adv"):
            out.setdefault(f"{anchor}->{m}", {})[kind] = recall_at_k(
                embeds["clean"][anchor], embeds[kind][m], ids, ids
            )
    # every center is a text query; its hits are the items of its class
    queries, classes, _ = split(centers)
    if classes is None:
        classes = torch.arange(queries.shape[0], device=device)
    for m in modalities:
        for kind in ("clean", "adv"):
            out.setdefault(f"text->{m}", {})[kind] = recall_at_k(
                queries, embeds[kind][m], classes, labels
            )
    return out


def sanity_checks(per_modality: dict, cfg: EvalConfig) -> dict[str, bool]:
    """The honest-evaluation checks of DESIGN.md, per modality (``<check>.<modality>``)."""
    out: dict[str, bool] = {}
    for m, r in per_modality.items():
        sweep = [r["sweep"][k] for k in sorted(r["sweep"], key=float)]
        out[f"robust_le_clean.{m}"] = r["robust_top1"] <= r["clean_top1"] + cfg.noise
        out[f"monotone_in_eps.{m}"] = all(b <= a + cfg.noise for a, b in itertools.pairwise(sweep))
        out[f"large_eps_breaks.{m}"] = r["large_eps_top1"] <= cfg.large_eps_max_acc
        out[f"more_steps_not_higher.{m}"] = r["robust_top1"] <= r["weak_top1"] + cfg.noise
        out[f"no_gradient_masking.{m}"] = r["weak_top1"] - r["robust_top1"] <= cfg.masking_gap
    return out
