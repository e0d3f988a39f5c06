"""advcal: adversarial calibration heads for frozen multimodal Bind encoders.

Quick tour::

    import advcal
    backbone = advcal.backbones.load("minibind")            # frozen encoders + text tower
    train = advcal.data.load_dataset("digits", split="train")
    centers = backbone.centers(train.class_names, train.templates)
    cal = advcal.Calibrator(backbone, centers, train.modalities, advcal.CalibConfig(epochs=5))
    heads = cal.fit(train)
    test = advcal.data.open("digits", "test")
    result = advcal.evaluate(backbone, test, centers, heads, config=advcal.EvalConfig(samples=100))
    print(result.modalities["image"].robust_top1, result.sanity)
"""

from advcal import backbones, centers, data, objectives, ops, report
from advcal.attacks import (
    APGD,
    APGDT,
    FAB,
    PGD,
    AttackSpec,
    AttackSuite,
    CrossMaxim,
    RankAttack,
    Square,
    ZeroShotClassifier,
)
from advcal.calibrate import CalibConfig, Calibrator, Stage
from advcal.evaluate import EvalConfig, EvalResult, evaluate
from advcal.heads import CalibrationHeads
from advcal.objectives import Objective
from advcal.pipeline import Run, RunConfig, demo_config, load_run, run
from advcal.specs import InputSpec

__version__ = "0.1.0"

__all__ = [
    "APGD",
    "APGDT",
    "FAB",
    "PGD",
    "AttackSpec",
    "AttackSuite",
    "CalibConfig",
    "CalibrationHeads",
    "Calibrator",
    "CrossMaxim",
    "EvalConfig",
    "EvalResult",
    "InputSpec",
    "Objective",
    "RankAttack",
    "Run",
    "RunConfig",
    "Square",
    "Stage",
    "ZeroShotClassifier",
    "backbones",
    "centers",
    "data",
    "demo_config",
    "evaluate",
    "load_run",
    "objectives",
    "ops",
    "report",
    "run",
]
