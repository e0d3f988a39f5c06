"""Adaptive attacks in each modality's valid input space, and the suites that evaluate with them.

Attacks are objects built with typed keywords and called as ``atk(x, y)`` (torchattacks style).
The model is a classifier, usually :class:`ZeroShotClassifier` (frozen backbone -> head ->
normalise -> logits against the fixed centers), so every attack is adaptive: it differentiates
through backbone AND head.

* :class:`PGD`, :class:`CrossMaxim`, :class:`APGD` (CE or DLR), :class:`APGDT` (targeted DLR):
  one gradient loop (:mod:`advcal.attacks.iterative`), shared with the training attacks.
* :class:`Square`: score-based black box (the gradient-masking check).
* :class:`FAB`: targeted minimum-norm attack (FAB-T).
* :class:`RankAttack`: the margin attack on a retrieval ranking.
* :class:`AttackSuite` / :data:`SUITES`: AutoAttack's cascade adapted per modality.
* :class:`UnitBox`: a classifier as another library expects it (image batches in [0, 1]).
"""

from advcal.attacks import losses
from advcal.attacks.base import Attack, Target, eval_mode, frozen_params, project
from advcal.attacks.classifier import ZeroShotClassifier
from advcal.attacks.fab import FAB
from advcal.attacks.interop import UnitBox
from advcal.attacks.iterative import APGD, APGDT, ATTACKS, PGD, CrossMaxim, IterativeAttack
from advcal.attacks.retrieval import RankAttack
from advcal.attacks.square import Square
from advcal.attacks.suite import SUITES, AttackSpec, AttackSuite, SuiteResult

__all__ = [
    "APGD",
    "APGDT",
    "ATTACKS",
    "FAB",
    "PGD",
    "SUITES",
    "Attack",
    "AttackSpec",
    "AttackSuite",
    "CrossMaxim",
    "IterativeAttack",
    "RankAttack",
    "Square",
    "SuiteResult",
    "Target",
    "UnitBox",
    "ZeroShotClassifier",
    "eval_mode",
    "frozen_params",
    "losses",
    "project",
]
