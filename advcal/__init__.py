"""advcal: adversarial calibration heads for frozen multimodal Bind encoders.

Quick tour::

    import advcal
    backbone = advcal.backbones.load("minibind")            # frozen encoders + text tower
    train = advcal.data.load_dataset("digits", split="train")
    centers = backbone.centers(train.class_names, train.templates)
    cal = advcal.Calibrator(backbone, centers, train.modalities, advcal.CalibConfig(epochs=5))
    heads = cal.fit(train)
    result = advcal.evaluate(backbone, advcal.data.load_dataset("digits", "test"), centers, heads)
"""

from advcal import backbones, centers, data, objectives, ops, report
from advcal.attacks import PGD, CrossMaxim, ZeroShotClassifier
from advcal.calibrate import CalibConfig, Calibrator
from advcal.evaluate import EvalConfig, evaluate
from advcal.heads import CalibrationHeads
from advcal.objectives import Objective
from advcal.pipeline import Run, RunConfig, load_run, run
from advcal.specs import InputSpec

__version__ = "0.1.0"

__all__ = [
    "PGD",
    "CalibConfig",
    "CalibrationHeads",
    "Calibrator",
    "CrossMaxim",
    "EvalConfig",
    "InputSpec",
    "Objective",
    "Run",
    "RunConfig",
    "ZeroShotClassifier",
    "backbones",
    "centers",
    "data",
    "evaluate",
    "load_run",
    "objectives",
    "ops",
    "report",
    "run",
]
