"""Every bad input is one clear line naming the argument or file: through the Python API (one
exception, a user error, one line) and through the CLI (exit code 2, one line on stderr, no
traceback), and no file of the run folder involved changes or disappears.

The world: one finished tiny run folder (``run``) that every CLI case points ``--out`` or
``--run`` at, and files a user might get wrong (configs, datasets, centers). Reader cases
damage a copy of the run folder first and check the copy is not changed further.
"""

from __future__ import annotations

import json
import math
import pickle
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import runkit
import torch
from safetensors.torch import save_file

from advcal import CalibConfig, EvalConfig, InputSpec, Objective, RunConfig, validation
from advcal.centers import CENTERS_FORMAT, load_centers
from advcal.cli import main
from advcal.errors import is_user_error
from advcal.heads import CalibrationHeads
from advcal.pipeline import load_run, run

CUDA = torch.cuda.is_available()


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from advcal import data

    cache = runkit.cache(tmp_path_factory)
    mp = pytest.MonkeyPatch()
    mp.setenv("ADVCAL_CACHE", str(cache))
    root = tmp_path_factory.mktemp("bad")
    w = SimpleNamespace(root=root, run=root / "run", files=root / "files")
    w.files.mkdir()
    try:
        run(RunConfig.from_dict(runkit.TINY), w.run, progress=False)
        f = w.files
        runkit.write_config(f / "tiny.json")
        nokw = {k: v for k, v in runkit.TINY.items() if k != "backbone_kwargs"}
        runkit.write_config(f / "nokw.json", nokw)  # minibind kwargs exclude a checkpoint
        (f / "afile").write_text("not a folder")
        (f / "empty.json").write_text("")
        (f / "corrupt.json").write_text('{"backbone": "minibind",')
        (f / "list.json").write_text("[1, 2]")
        (f / "bad.toml").write_text("backbone = \n")
        (f / "calib_list.toml").write_text("calib = [1, 2]\n")
        (f / "epochs_true.toml").write_text("[calib]\nepochs = true\n")
        (f / "batch.toml").write_text("[calib]\nbatch_size = 15.5\n")
        (f / "unknown.toml").write_text("epochz = 3\n")
        (f / "nan.toml").write_text("[calib]\nlr = nan\n")
        (f / "cfg.yaml").write_text("backbone: minibind\n")
        (f / "latin1.toml").write_bytes(b"backbone = '\xff'\n")
        (f / "adir").mkdir()
        # datasets: two digits modalities, a good file and its broken variants
        test = data.load_dataset("digits", "test").select(["image", "audio"])
        small = test.subset(torch.arange(40))
        data.save(small, f / "good.safetensors")
        nan_in = {m: x.clone() for m, x in small.inputs.items()}
        nan_in["image"][3, 0, 0, 0] = math.nan
        data.save(
            data.MultiModalDataset(nan_in, small.labels, small.class_names), f / "nan_data.st"
        )
        ints = {"image": (small.inputs["image"] * 255).to(torch.uint8), "audio": nan_in["audio"]}
        data.save(data.MultiModalDataset(ints, small.labels, small.class_names), f / "uint8.st")
        (f / "corrupt.st").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{garbage")
        save_file({"x": torch.zeros(2)}, str(f / "plain.st"))
        # centers: the run's classes at width 32; NaN, wrong width, a pickle
        names = json.dumps(list(small.class_names))
        k = len(small.class_names)
        meta = {"format": CENTERS_FORMAT, "class_names": names, "source": "t"}
        ok = torch.nn.functional.normalize(torch.randn(k, 32), dim=-1)
        save_file({"centers": ok, "labels": torch.arange(k)}, str(f / "centers.st"), meta)
        bad = ok.clone()
        bad[2, 5] = math.nan
        save_file({"centers": bad, "labels": torch.arange(k)}, str(f / "nan_centers.st"), meta)
        wide = torch.nn.functional.normalize(torch.randn(k, 16), dim=-1)
        save_file({"centers": wide, "labels": torch.arange(k)}, str(f / "c16.st"), meta)
        (f / "centers.pkl").write_bytes(pickle.dumps({"0": [0.0]}))
        # heads files
        CalibrationHeads(("image",), 8).save(f / "heads8.safetensors")
        w.snap = runkit.snapshot(w.run)
        yield w
    finally:
        mp.undo()


def _fill(value, w):
    """``{run}``/``{files}``/``{fresh}`` placeholders -> the world's paths (``fresh``: a run
    folder that does not exist; a failed start must not leave it behind)."""
    if isinstance(value, str):
        return value.format(run=w.run, files=w.files, fresh=w.root / "fresh")
    return [_fill(v, w) for v in value]


def _cli(argv: list[str], capsys) -> tuple[int, str]:
    try:
        rc = main(argv)
    except SystemExit as e:  # argparse's usage errors
        rc = e.code
    return rc, capsys.readouterr().err


def _has(text: str, needle: str | tuple[str, ...]) -> bool:
    """``needle`` in ``text``; a tuple: every part (the field and the value, where the exact
    sentence is a hand-written check's to change)."""
    return all(n in text for n in (needle if isinstance(needle, tuple) else (needle,)))


def _assert_one_line(rc: int, err: str, needle: str | tuple[str, ...]) -> None:
    lines = err.strip().splitlines()
    assert "Traceback" not in err, err
    assert rc == 2, (rc, err)
    assert len(lines) == 1, err
    assert lines[0].startswith("advcal") and "error:" in lines[0], err
    assert _has(lines[0], needle), (needle, lines[0])


# -- the Python API: configs ---------------------------------------------------------------------


def _rc(**kw):
    return lambda w: RunConfig.from_dict({**runkit.TINY, **kw})


def _calib(**kw):
    return lambda w: RunConfig.from_dict({**runkit.TINY, "calib": kw})


def _eval(**kw):
    return lambda w: RunConfig.from_dict({**runkit.TINY, "eval": kw})


NAN, INF = math.nan, math.inf

API_CASES = [
    ("epochs-true", _calib(epochs=True), "CalibConfig.epochs must be an int, got True"),
    ("batch-15.5", _calib(batch_size=15.5), "CalibConfig.batch_size must be an int, got 15.5"),
    ("batch-16.0", _calib(batch_size=16.0), "CalibConfig.batch_size must be an int, got 16.0"),
    ("calib-list", _rc(calib=[1, 2]), "RunConfig.calib must be a CalibConfig"),
    ("backbone-int", _rc(backbone=3), "RunConfig.backbone must be a str"),
    ("backbone-empty", _rc(backbone=" "), "RunConfig.backbone must not be empty"),
    ("data-none", _rc(data=None), "RunConfig.data must be a str, got None"),
    ("data-int", _rc(data=3), "RunConfig.data must be a str"),
    ("centers-int", _rc(centers=5), "RunConfig.centers must be a str, or None"),
    ("checkpoint-int", _rc(checkpoint=5), "RunConfig.checkpoint must be a str"),
    ("checkpoint-ints", _rc(checkpoint=[1, 2]), "RunConfig.checkpoint must be a str"),
    ("kwargs-list", _rc(backbone_kwargs=[1]), "RunConfig.backbone_kwargs must be a table"),
    ("modalities-str", _rc(modalities="image"), "RunConfig.modalities must be a list of str"),
    ("modalities-empty", _rc(modalities=[]), "RunConfig.modalities must name distinct"),
    ("modalities-dup", _rc(modalities=["image", "image"]), "must name distinct modalities"),
    ("modalities-int", _rc(modalities=[1]), "RunConfig.modalities must be a list of str"),
    ("train-limit-1", _rc(train_limit=1), "RunConfig.train_limit must be >= 2, got 1"),
    ("train-limit-true", _rc(train_limit=True), "RunConfig.train_limit must be an int"),
    ("train-limit-2.5", _rc(train_limit=2.5), "RunConfig.train_limit must be an int"),
    ("test-limit-0", _rc(test_limit=0), "RunConfig.test_limit must be >= 2, got 0"),
    ("test-limit-str", _rc(test_limit="10"), "RunConfig.test_limit must be an int"),
    ("device-gpu", _rc(device="gpu"), "use device='cuda'"),
    ("device-tpu", _rc(device="tpu"), "device='tpu' is not a device"),
    ("device-int", _rc(device=0), "RunConfig.device must be a str"),
    ("timeout-0", _rc(dist_timeout=0), "RunConfig.dist_timeout must be > 0 seconds"),
    ("timeout-neg", _rc(dist_timeout=-5), "RunConfig.dist_timeout must be > 0 seconds"),
    ("timeout-nan", _rc(dist_timeout=NAN), "RunConfig.dist_timeout must be a finite number"),
    ("timeout-str", _rc(dist_timeout="fast"), "RunConfig.dist_timeout must be a finite number"),
    ("eval-list", _rc(eval=[1]), "RunConfig.eval must be a EvalConfig"),
    ("unknown-top", _rc(epochz=3), "unknown key(s) ['epochz'] for RunConfig"),
    ("unknown-calib", _calib(bogus=1), "unknown key(s) ['bogus'] for CalibConfig"),
    ("unknown-eval", _eval(bogus=1), "unknown key(s) ['bogus'] for EvalConfig"),
    ("unknown-objective", _calib(objective={"cee": 1}), "unknown key(s) ['cee'] for Objective"),
    ("lr-0", _calib(lr=0), "CalibConfig needs lr > 0"),
    ("lr-neg", _calib(lr=-1e-3), "CalibConfig needs lr > 0"),
    ("lr-str", _calib(lr="fast"), "CalibConfig.lr must be a finite number, got 'fast'"),
    ("lr-nan", _calib(lr=NAN), "CalibConfig.lr must be a finite number, got nan"),
    ("lr-inf", _calib(lr=INF), "CalibConfig.lr must be a finite number, got inf"),
    ("wd-neg", _calib(weight_decay=-1), "weight_decay >= 0"),
    ("eps-scale-neg", _calib(eps_scale=-1), "eps_scale >= 0"),
    ("attack-fgsm", _calib(attack="fgsm"), ("CalibConfig.attack", "'fgsm'")),
    ("attack-int", _calib(attack=1), "CalibConfig.attack must be a str"),
    ("attack-steps-neg", _calib(attack_steps=-1), "CalibConfig.attack_steps must be positive"),
    ("attack-steps-float", _calib(attack_steps=1.0), "CalibConfig.attack_steps must be an int"),
    ("head-init", _calib(head_init="random"), "CalibConfig.head_init must be 'identity'"),
    ("head-init-kind", _calib(head_init="backbone"), "it needs head_kind='linear'"),
    ("alpha-0", _calib(alpha_ratio=0), "CalibConfig.alpha_ratio must be in (0, 1]"),
    ("alpha-1.5", _calib(alpha_ratio=1.5), "CalibConfig.alpha_ratio must be in (0, 1]"),
    ("amp-str", _calib(amp="yes"), "CalibConfig.amp must be true or false, got 'yes'"),
    ("amp-int", _calib(amp=1), "CalibConfig.amp must be true or false, got 1"),
    ("graph-str", _calib(cuda_graph="no"), "CalibConfig.cuda_graph must be true or false"),
    ("seed-float", _calib(seed=1.5), "CalibConfig.seed must be an int, got 1.5"),
    ("seed-bool", _calib(seed=True), "CalibConfig.seed must be an int, got True"),
    ("hidden-float", _calib(head_hidden=2.0), "CalibConfig.head_hidden must be an int, or None"),
    ("head-kind-int", _calib(head_kind=3), "CalibConfig.head_kind must be a str"),
    ("objective-int", _calib(objective=5), "CalibConfig.objective must be a Objective"),
    ("objective-neg", _calib(objective={"ce": -1}), "Objective weights must be finite, >= 0"),
    (
        "objective-zero",
        _calib(objective={"ce": 0, "l2": 0, "infonce": 0, "consistency": 0}),
        "one positive",
    ),
    ("objective-tau-0", _calib(objective={"tau": 0}), "tau must be > 0, got 0.0"),
    ("objective-tau-nan", _calib(objective={"tau": NAN}), "Objective.tau must be a finite"),
    ("objective-bool", _calib(objective={"ce": True}), "Objective.ce must be a finite number"),
    ("eval-batch-0", _eval(batch_size=0), ("EvalConfig", "batch_size", ">= 1")),
    ("eval-batch-float", _eval(batch_size=2.5), "EvalConfig.batch_size must be an int, got 2.5"),
    ("eval-eps-scale-nan", _eval(eps_scale=NAN), "EvalConfig.eps_scale must be a finite number"),
    ("eval-gap-str", _eval(masking_gap="x"), "EvalConfig.masking_gap must be a finite number"),
    ("eval-sweep-str", _eval(sweep=["a"]), "EvalConfig.sweep must be a list of finite number"),
    ("eval-sweep-nan", _eval(sweep=[NAN]), "EvalConfig.sweep[0] must be a finite number"),
    ("eval-tau-str", _eval(tau="x"), "EvalConfig.tau must be a finite number, got 'x'"),
    ("eval-retrieval-str", _eval(retrieval="yes"), "EvalConfig.retrieval must be true or false"),
    ("eval-seed-str", _eval(seed="1"), "EvalConfig.seed must be an int, got '1'"),
    ("eval-noise-inf", _eval(noise=INF), "EvalConfig.noise must be a finite number, got inf"),
    ("spec-shape-0", lambda w: InputSpec((0,)), "InputSpec.shape must hold positive ints or -1"),
    ("spec-shape-str", lambda w: InputSpec((3, "32")), "InputSpec.shape must be a list of int"),
    ("spec-shape-scalar", lambda w: InputSpec(3), "InputSpec.shape must be a list of int"),
    ("spec-lo-hi", lambda w: InputSpec((3,), 1.0, 0.0), "InputSpec needs lo < hi"),
    ("spec-eps-nan", lambda w: InputSpec((3,), eps=NAN), "InputSpec.eps must be a finite number"),
    ("spec-eps-neg", lambda w: InputSpec((3,), eps=-1.0), "InputSpec.eps must be finite and >= 0"),
    ("spec-norm", lambda w: InputSpec((3,), norm="l1"), "InputSpec.norm must be one of 'linf'"),
    ("spec-lo-str", lambda w: InputSpec((3,), lo="0"), "InputSpec.lo must be a finite number"),
    ("spec-space-int", lambda w: InputSpec((3,), space=3), "InputSpec.space must be a str"),
    ("calibconfig-direct", lambda w: CalibConfig(epochs="5"), "CalibConfig.epochs must be an int"),
    ("objective-direct", lambda w: Objective(l2="1"), "Objective.l2 must be a finite number"),
    ("heads-empty", lambda w: CalibrationHeads([], 4), "CalibrationHeads needs at least one"),
    ("heads-kind", lambda w: CalibrationHeads(["image"], 4, kind="x"), "head kind must be one of"),
    ("device-absent", lambda w: validation.check_device("cuda:7"), "cuda"),
]


def _toy_call(fn):
    """A case on the tests' two-modality toy world (conftest.Toy)."""

    def make(w):
        from conftest import Toy

        bb, centers, ds = Toy.build()
        return fn(bb, centers, ds)

    return make


def _nan_centers(c):
    c = c.clone()
    c[1, 0] = math.nan
    return c


API_CASES += [
    ("calib-head-kind", _calib(head_kind="nope"), "CalibConfig.head_kind must be one of"),
    ("calib-hidden-0", _calib(head_hidden=0), "CalibConfig.head_hidden must be >= 1"),
    ("calib-hidden-neg", _calib(head_hidden=-3), "CalibConfig.head_hidden must be >= 1"),
    ("calib-targets-0", _calib(targets=0), "CalibConfig.targets must be positive"),
    ("calib-workers-neg", _calib(workers=-1), "CalibConfig.workers must be >= 0"),
    ("calib-attack-none-mix", _calib(attack=["none", "ce"]), "'none' (clean inputs)"),
    ("calib-stages-sum", _calib(epochs=3, stages=[{"epochs": 2}]), "the stages last 2"),
    ("calib-stage-eps", _calib(epochs=1, stages=[{"epochs": 1, "eps": -1.0}]), "Stage.eps"),
    ("calib-stage-attack", _calib(epochs=1, stages=[{"epochs": 1, "attack": "x"}]), "'x'"),
    ("eval-large-eps-0", _eval(large_eps_multiplier=0.0), "large_eps_multiplier must be > 0"),
    ("eval-max-acc-2", _eval(large_eps_max_acc=2.0), "large_eps_max_acc is a fraction"),
    ("eval-noise-neg", _eval(noise=-1.0), "EvalConfig.noise is a fraction"),
    ("eval-gap-neg", _eval(masking_gap=-1.0), "EvalConfig.masking_gap is a fraction"),
    ("eval-weak-empty", _eval(weak=[]), "EvalConfig.weak: the masking checks need"),
    ("eval-graph-true", _eval(cuda_graph=True), "EvalConfig.cuda_graph"),
    ("eval-sweep-suite", _eval(sweep_suite=["nope"]), "nope"),
    ("eval-compare-nope", _eval(compare=["strongest"]), "unknown suite 'strongest'"),
    ("spec-eps-range", lambda w: InputSpec((3,), 0.0, 1.0, 2.0), "larger than the valid range"),
    (
        "api-nan-centers-calibrator",
        _toy_call(lambda bb, c, ds: __import__("advcal").Calibrator(bb, _nan_centers(c), ["img"])),
        "centers contain NaN or Inf",
    ),
    (
        "api-nan-centers-evaluate",
        _toy_call(lambda bb, c, ds: __import__("advcal").evaluate(bb, ds, _nan_centers(c))),
        "centers contain NaN or Inf",
    ),
    (
        "api-zero-center",
        _toy_call(lambda bb, c, ds: __import__("advcal").evaluate(bb, ds, c * 0)),
        "all-zero row",
    ),
    (
        "api-cuda-calibrator",
        _toy_call(
            lambda bb, c, ds: __import__("advcal").Calibrator(bb, c, ["img"], device="cuda:7")
        ),
        "cuda",
    ),
    (
        "api-cuda-evaluate",
        _toy_call(lambda bb, c, ds: __import__("advcal").evaluate(bb, ds, c, device="cuda:7")),
        "cuda",
    ),
    (
        "api-attack-float64",
        _toy_call(
            lambda bb, c, ds: __import__("advcal").PGD(
                __import__("advcal").ZeroShotClassifier(bb, "img", c)
            )(ds.inputs["img"].double(), ds.labels)
        ),
        "attacks run on float32",
    ),
]
API_CASES += [
    ("eval-suite-int", _eval(suite=3), "EvalConfig.suite must be"),
    ("eval-suite-nope", _eval(suite=["nope:3"]), "nope"),
    ("eval-weak-str", _eval(weak="pgd:10"), "EvalConfig.weak must be a list of"),
    ("eval-weak-square", _eval(weak=["square:10"]), "is a black-box attack"),
    ("eval-workers-neg", _eval(workers=-1), "EvalConfig.workers must be >= 0"),
    ("eval-samples-0", _eval(samples=0), "EvalConfig.samples must be >= 1"),
    ("eval-samples-float", _eval(samples=1.5), "EvalConfig.samples must be an int, or None"),
    ("eval-amp-str", _eval(amp="yes"), "EvalConfig.amp must be true or false, got 'yes'"),
    ("eval-compare-int", _eval(compare=[3]), "EvalConfig.compare must be a list of str"),
    ("evalconfig-direct", lambda w: EvalConfig(seed=None), "EvalConfig.seed must be an int"),
]

# -- the Python API: files -----------------------------------------------------------------------

API_FILE_CASES = [
    ("heads-missing", lambda w: CalibrationHeads.load(w.files / "nope.st"), "nope.st does not"),
    (
        "heads-corrupt",
        lambda w: CalibrationHeads.load(w.files / "corrupt.st"),
        "corrupt.st is not a readable heads file",
    ),
    (
        "heads-empty-file",
        lambda w: CalibrationHeads.load(w.files / "empty.json"),
        "empty.json is not a readable heads file",
    ),
    ("heads-plain", lambda w: CalibrationHeads.load(w.files / "plain.st"), "holds no advcal heads"),
    (
        "centers-nan",
        lambda w: load_centers(w.files / "nan_centers.st"),
        "nan_centers.st: 'centers' contains NaN or Inf (first at row 2)",
    ),
    ("centers-pickle", lambda w: load_centers(w.files / "centers.pkl"), "centers.pkl is a pickle"),
    ("centers-missing", lambda w: load_centers(w.files / "nope.st"), "centers file not found"),
    ("centers-corrupt", lambda w: load_centers(w.files / "corrupt.st"), "corrupt.st is not a"),
    (
        "from-file-missing",
        lambda w: RunConfig.from_file(w.files / "nope.toml"),
        "nope.toml does not exist",
    ),
    ("from-file-dir", lambda w: RunConfig.from_file(w.files / "adir"), "adir is a folder"),
    (
        "from-file-yaml",
        lambda w: RunConfig.from_file(w.files / "cfg.yaml"),
        "unknown format '.yaml'",
    ),
    (
        "from-file-empty",
        lambda w: RunConfig.from_file(w.files / "empty.json"),
        "empty.json is empty",
    ),
    (
        "from-file-corrupt",
        lambda w: RunConfig.from_file(w.files / "corrupt.json"),
        "corrupt.json is not valid JSON",
    ),
    (
        "from-file-toml",
        lambda w: RunConfig.from_file(w.files / "bad.toml"),
        "bad.toml: invalid TOML",
    ),
    (
        "from-file-list",
        lambda w: RunConfig.from_file(w.files / "list.json"),
        "list.json holds list, not a table",
    ),
    (
        "from-file-calib-list",
        lambda w: RunConfig.from_file(w.files / "calib_list.toml"),
        "calib_list.toml: RunConfig.calib must be",
    ),
    (
        "from-file-epochs",
        lambda w: RunConfig.from_file(w.files / "epochs_true.toml"),
        "epochs_true.toml: CalibConfig.epochs must be an int, got True (bool) (config section",
    ),
    (
        "from-file-latin1",
        lambda w: RunConfig.from_file(w.files / "latin1.toml"),
        "latin1.toml is not a UTF-8 text file",
    ),
    ("load-run-missing", lambda w: load_run(w.files / "nope"), "run folder"),
    ("load-run-file", lambda w: load_run(w.files / "afile"), "afile is a file"),
    ("load-run-empty-dir", lambda w: load_run(w.files / "adir"), "config.json is missing"),
    ("run-not-config", lambda w: run({"backbone": "minibind"}, w.run), "run() needs a RunConfig"),
    (
        "run-out-file",
        lambda w: run(RunConfig.from_dict(runkit.TINY), w.files / "afile"),
        "afile is a file, not a folder",
    ),
    (
        "run-other-config",
        lambda w: run(
            RunConfig.from_dict({**runkit.TINY, "test_limit": 20}), w.run, progress=False
        ),
        "test_limit: 16 in the folder, 20 now",
    ),
]
if not CUDA:
    API_FILE_CASES.append(
        (
            "run-cuda",
            lambda w: run(RunConfig.from_dict({**runkit.TINY, "device": "cuda"}), w.run),
            "cuda requested but this machine has no CUDA device",
        )
    )


ALL_API = API_CASES + API_FILE_CASES


@pytest.mark.parametrize("make, needle", [c[1:] for c in ALL_API], ids=[c[0] for c in ALL_API])
def test_api_bad_input_is_one_clear_user_error(world, make, needle):
    with pytest.raises(Exception) as info:
        make(world)
    err = info.value
    assert is_user_error(err), f"{type(err).__name__} is not a user error: {err}"
    assert "\n" not in str(err), str(err)
    assert _has(str(err), needle), (needle, str(err))
    assert runkit.snapshot(world.run) == world.snap


# -- the CLI -------------------------------------------------------------------------------------

CAL = ["calibrate", "--config", "{files}/tiny.json", "--out", "{run}", "--quiet"]
RES = [*CAL, "--resume"]
EV = ["evaluate", "--run", "{run}", "--quiet"]
NEW = ["calibrate", "--config", "{files}/tiny.json", "--out", "{fresh}", "--quiet"]

CLI_CASES = [
    ("no-out", ["calibrate", "--config", "{files}/tiny.json"], "--out DIR is required"),
    ("epochs-x", [*CAL, "--epochs", "x"], "argument --epochs: invalid int value: 'x'"),
    ("epochs-1.5", [*CAL, "--epochs", "1.5"], "argument --epochs: invalid int value: '1.5'"),
    ("epochs-0", [*CAL, "--epochs", "0"], "CalibConfig.epochs must be positive, got 0"),
    ("epochs-neg", [*CAL, "--epochs", "-1"], "CalibConfig.epochs must be positive, got -1"),
    ("device-gpu", [*CAL, "--device", "gpu"], "use device='cuda'"),
    ("device-tpu", [*CAL, "--device", "tpu"], "device='tpu' is not a device"),
    ("device-empty", [*CAL, "--device", ""], "device='' is not a device"),
    ("device-cuda9", [*CAL, "--device", "cuda:9"], "available: cpu"),
    ("modalities-empty", [*CAL, "--modalities", " , "], "names no modality"),
    ("modalities-dup", [*CAL, "--modalities", "image,image"], "must name distinct modalities"),
    ("modalities-smell", [*NEW, "--modalities", "image,smell"], "smell"),
    ("backbone-nope", [*NEW, "--backbone", "nope"], "unknown backbone 'nope'"),
    ("data-missing", [*NEW, "--data", "{files}/nope.safetensors"], "nope.safetensors"),
    ("data-corrupt", [*NEW, "--data", "{files}/corrupt.st"], "corrupt.st"),
    ("data-plain", [*NEW, "--data", "{files}/plain.st"], "plain.st is a safetensors file but"),
    (
        "data-nan",
        [*NEW, "--data", "{files}/nan_data.st"],
        "nan_data.st' (train split): inputs['image'] contains NaN or Inf",
    ),
    ("data-uint8", [*NEW, "--data", "{files}/uint8.st"], "inputs['image'] has dtype torch.uint8"),
    ("data-dir", [*NEW, "--data", "{files}/adir"], "adir"),
    ("centers-missing", [*NEW, "--centers", "{files}/nope.st"], "centers file not found"),
    ("centers-nan", [*NEW, "--centers", "{files}/nan_centers.st"], "nan_centers.st: 'centers'"),
    ("centers-pickle", [*NEW, "--centers", "{files}/centers.pkl"], "centers.pkl is a pickle"),
    ("centers-width", [*NEW, "--centers", "{files}/c16.st"], "16"),
    (
        "checkpoint-missing",
        [
            "calibrate",
            "--config",
            "{files}/nokw.json",
            "--out",
            "{fresh}",
            "--checkpoint",
            "{files}/nope.pt",
        ],
        "nope.pt",
    ),
    (
        "config-missing",
        ["calibrate", "--config", "{files}/nope.json", "--out", "{run}"],
        "nope.json does not exist",
    ),
    (
        "config-empty",
        ["calibrate", "--config", "{files}/empty.json", "--out", "{run}"],
        "empty.json is empty",
    ),
    (
        "config-corrupt",
        ["calibrate", "--config", "{files}/corrupt.json", "--out", "{run}"],
        "corrupt.json is not valid JSON",
    ),
    (
        "config-list",
        ["calibrate", "--config", "{files}/list.json", "--out", "{run}"],
        "list.json holds list",
    ),
    (
        "config-toml",
        ["calibrate", "--config", "{files}/bad.toml", "--out", "{run}"],
        "bad.toml: invalid TOML",
    ),
    (
        "config-yaml",
        ["calibrate", "--config", "{files}/cfg.yaml", "--out", "{run}"],
        "unknown format '.yaml'",
    ),
    (
        "config-calib-list",
        ["calibrate", "--config", "{files}/calib_list.toml", "--out", "{run}"],
        "RunConfig.calib must be a CalibConfig",
    ),
    (
        "config-epochs-true",
        ["calibrate", "--config", "{files}/epochs_true.toml", "--out", "{run}"],
        "CalibConfig.epochs must be an int, got True",
    ),
    (
        "config-batch",
        ["calibrate", "--config", "{files}/batch.toml", "--out", "{run}"],
        "CalibConfig.batch_size must be an int, got 15.5",
    ),
    (
        "config-unknown",
        ["calibrate", "--config", "{files}/unknown.toml", "--out", "{run}"],
        "unknown key(s) ['epochz']",
    ),
    (
        "config-nan",
        ["calibrate", "--config", "{files}/nan.toml", "--out", "{run}"],
        "CalibConfig.lr must be a finite number, got nan",
    ),
    ("config-dir", ["calibrate", "--config", "{files}/adir", "--out", "{run}"], "adir is a folder"),
    (
        "config-latin1",
        ["calibrate", "--config", "{files}/latin1.toml", "--out", "{run}"],
        "not a UTF-8 text file",
    ),
    (
        "out-file",
        ["calibrate", "--config", "{files}/tiny.json", "--out", "{files}/afile"],
        "afile is a file, not a folder",
    ),
    (
        "out-under-file",
        ["calibrate", "--config", "{files}/tiny.json", "--out", "{files}/afile/run"],
        "afile is a file, not a folder",
    ),
    ("amp-cpu", [*CAL, "--amp"], "--amp is bf16 autocast on a CUDA device"),
    ("graph-cpu", [*CAL, "--cuda-graph"], "--cuda-graph captures attack steps"),
    ("timeout-0", [*CAL, "--dist-timeout", "0"], "RunConfig.dist_timeout must be > 0"),
    ("timeout-neg", [*CAL, "--dist-timeout", "-3"], "RunConfig.dist_timeout must be > 0"),
    ("timeout-abc", [*CAL, "--dist-timeout", "abc"], "argument --dist-timeout: invalid float"),
    ("timeout-nan", [*CAL, "--dist-timeout", "nan"], "RunConfig.dist_timeout must be a finite"),
    ("unknown-flag", [*CAL, "--bogus"], "unrecognized arguments: --bogus"),
    ("no-command", [], "the following arguments are required: cmd"),
    ("unknown-command", ["calibrat"], "invalid choice: 'calibrat'"),
    ("other-config", [*CAL, "--epochs", "3"], "calib.epochs: 2 in the folder, 3 now"),
    ("other-config-resume", [*RES, "--epochs", "3"], "calib.epochs: 2 in the folder, 3 now"),
    ("other-modalities", [*CAL, "--modalities", "image"], 'modalities: ["image", "audio"] in'),
    ("other-data", [*RES, "--data", "{files}/good.safetensors"], 'data: "digits" in the folder'),
    ("eval-resume", [*EV, "--resume"], "unrecognized arguments: --resume"),
    ("eval-epochs", [*EV, "--epochs", "3"], "unrecognized arguments: --epochs 3"),
    ("eval-run-missing", ["evaluate", "--run", "{files}/nope"], "nope does not exist"),
    ("eval-run-file", ["evaluate", "--run", "{files}/afile"], "afile is a file"),
    ("eval-run-not-run", ["evaluate", "--run", "{files}/adir"], "config.json is missing"),
    ("eval-run-data", [*EV, "--data", "digits"], "--data cannot be combined with it"),
    ("eval-run-config", [*EV, "--config", "{files}/tiny.json"], "--config cannot be combined"),
    ("eval-run-gpu", [*EV, "--device", "gpu"], "use --device='cuda'"),
    ("eval-run-cuda9", [*EV, "--device", "cuda:9"], "available: cpu"),
    ("eval-run-amp", [*EV, "--amp"], "--amp"),
    ("eval-run-graph", [*EV, "--cuda-graph"], "--cuda-graph applies to the training attack"),
    ("eval-out-file", [*EV, "--out", "{files}/afile"], "afile is a file, not a folder"),
    (
        "eval-amp",
        ["evaluate", "--config", "{files}/tiny.json", "--amp", "--out", "{run}/ev"],
        "--amp",
    ),
    (
        "eval-backbone",
        ["evaluate", "--backbone", "nope", "--out", "{run}/ev"],
        "unknown backbone 'nope'",
    ),
    (
        "eval-centers-nan",
        [
            "evaluate",
            "--config",
            "{files}/tiny.json",
            "--centers",
            "{files}/nan_centers.st",
            "--out",
            "{run}/ev",
        ],
        "contains NaN or Inf",
    ),
    ("demo-bogus", ["demo", "--bogus"], "unrecognized arguments: --bogus"),
    ("demo-out-file", ["demo", "--out", "{files}/afile", "--quick"], "afile is a file"),
    ("info-bogus", ["info", "--bogus"], "unrecognized arguments: --bogus"),
    (
        "convert-untrusted",
        ["convert-centers", "{files}/centers.pkl", "{files}/out.st"],
        "--trust-pickle",
    ),
    (
        "convert-missing",
        ["convert-centers", "{files}/nope.pkl", "{files}/out.st", "--trust-pickle"],
        "nope.pkl",
    ),
    ("bench-nope", ["bench", "nope"], "no benchmark 'nope'"),
]
if not CUDA:
    CLI_CASES += [
        (
            "device-cuda",
            [*CAL, "--device", "cuda"],
            "cuda requested but this machine has no CUDA device",
        ),
        ("eval-run-cuda", [*EV, "--device", "cuda"], "no CUDA device"),
        (
            "eval-device-cuda",
            ["evaluate", "--device", "cuda", "--out", "{run}/ev"],
            "no CUDA device",
        ),
    ]


@pytest.mark.parametrize("argv, needle", [c[1:] for c in CLI_CASES], ids=[c[0] for c in CLI_CASES])
def test_cli_bad_input_is_one_line_exit_2_folder_untouched(world, capsys, argv, needle):
    rc, err = _cli(_fill(argv, world), capsys)
    _assert_one_line(rc, err, _fill(needle, world))
    assert runkit.snapshot(world.run) == world.snap
    assert not (world.run / "ev").exists() and not (world.files / "out.st").exists()
    assert not (world.root / "fresh").exists()  # a failed start leaves no folder behind


# -- damaged run folders: readers name the file ---------------------------------------------------


def _torch_edit(edit):
    def apply(folder: Path) -> None:
        state = torch.load(folder / "checkpoint.pt", weights_only=True)
        edit(state)
        torch.save(state, folder / "checkpoint.pt")

    return apply


def _heads_edit(edit):
    from safetensors import safe_open
    from safetensors.torch import load_file

    def apply(folder: Path) -> None:
        path = folder / "heads.safetensors"
        with safe_open(str(path), "pt") as f:
            meta = f.metadata()
        tensors = load_file(str(path))
        edit(tensors, meta)
        save_file(tensors, str(path), meta)

    return apply


def _write(name: str, text: str):
    return lambda folder: (folder / name).write_text(text)


def _remove(name: str):
    return lambda folder: (folder / name).unlink()


def _config_edit(**changes):
    def apply(folder: Path) -> None:
        cfg = json.loads((folder / "config.json").read_text())
        cfg.update(changes)
        (folder / "config.json").write_text(json.dumps(cfg))

    return apply


def _nan_first(t: dict) -> None:
    k = sorted(t)[0]
    t[k] = t[k].clone()
    t[k].view(-1)[0] = math.nan


W_KEY = "heads.image.weight"
COPY = "{root}/copy"
RES_COPY = ["calibrate", "--config", "{files}/tiny.json", "--out", COPY, "--resume", "--quiet"]
EV_COPY = ["evaluate", "--run", COPY, "--quiet", "--out", "{root}/copy-ev"]

READER_CASES = [
    ("before-empty", _write("eval_before.json", ""), RES_COPY, "eval_before.json is empty"),
    (
        "before-corrupt",
        _write("eval_before.json", '{"modalities": {'),
        RES_COPY,
        "eval_before.json is not valid JSON",
    ),
    (
        "before-list",
        _write("eval_before.json", "[]"),
        RES_COPY,
        "eval_before.json is not an advcal evaluation",
    ),
    ("config-corrupt", _write("config.json", "{"), RES_COPY, "config.json is not valid JSON"),
    ("config-empty", _write("config.json", " \n"), RES_COPY, "config.json is empty"),
    ("config-list", _write("config.json", "[]"), RES_COPY, "config.json holds list"),
    ("config-missing", _remove("config.json"), RES_COPY, "but no config.json"),
    (
        "ckpt-corrupt",
        _write("checkpoint.pt", "garbage"),
        RES_COPY,
        "checkpoint.pt is corrupt or not an advcal checkpoint",
    ),
    ("ckpt-empty", _write("checkpoint.pt", ""), RES_COPY, "checkpoint.pt is corrupt"),
    (
        "ckpt-not-advcal",
        lambda f: torch.save({"a": 1}, f / "checkpoint.pt"),
        RES_COPY,
        "checkpoint.pt is not an advcal checkpoint (['a'])",
    ),
    (
        "ckpt-shape",
        _torch_edit(lambda s: s["heads"].update({W_KEY: torch.zeros(3, 3)})),
        RES_COPY,
        f"tensor '{W_KEY}' has shape (3, 3), the heads need (32, 32)",
    ),
    (
        "ckpt-missing-tensor",
        _torch_edit(lambda s: s["heads"].pop(W_KEY)),
        RES_COPY,
        f"missing tensors ['{W_KEY}']",
    ),
    ("ckpt-nan", _torch_edit(lambda s: _nan_first(s["heads"])), RES_COPY, "contains NaN or Inf"),
    (
        "ckpt-opt-shape",
        _torch_edit(lambda s: s["opt"]["state"][0].update({"exp_avg": torch.zeros(5)})),
        RES_COPY,
        "optimizer tensor opt.state[0]['exp_avg'] has shape (5,)",
    ),
    ("ckpt-epoch", _torch_edit(lambda s: s.update(epoch=99)), RES_COPY, "epoch 99 out of range"),
    (
        "ckpt-other-config",
        _torch_edit(lambda s: s["config"].update(lr=0.5)),
        RES_COPY,
        "calib.lr: 0.5 in the folder, 0.005 now",
    ),
    (
        "heads-corrupt",
        _write("heads.safetensors", "garbage"),
        EV_COPY,
        "heads.safetensors is not a readable heads file",
    ),
    ("heads-empty", _write("heads.safetensors", ""), EV_COPY, "is not a readable heads file"),
    ("heads-missing", _remove("heads.safetensors"), EV_COPY, "heads.safetensors is missing"),
    (
        "heads-shape",
        _heads_edit(lambda t, m: t.update({W_KEY: torch.zeros(4, 4)})),
        EV_COPY,
        f"tensor '{W_KEY}' has shape (4, 4), the heads need (32, 32)",
    ),
    ("heads-nan", _heads_edit(lambda t, m: _nan_first(t)), EV_COPY, "contains NaN or Inf"),
    (
        "heads-extra",
        _heads_edit(lambda t, m: t.update(extra=torch.zeros(1))),
        EV_COPY,
        "unknown tensors ['extra']",
    ),
    (
        "heads-header",
        _heads_edit(lambda t, m: m.update(advcal_heads="{")),
        EV_COPY,
        "unreadable heads config in its header",
    ),
    ("eval-config-corrupt", _write("config.json", "{"), EV_COPY, "config.json is not valid JSON"),
    ("eval-config-unknown", _config_edit(epochz=3), EV_COPY, "unknown key(s) ['epochz']"),
    ("eval-config-type", _config_edit(train_limit="x"), EV_COPY, "RunConfig.train_limit must be"),
    ("eval-config-gpu", _config_edit(device="gpu"), EV_COPY, "use device='cuda'"),
]
if not CUDA:
    READER_CASES.append(
        (
            "eval-config-cuda",
            _config_edit(device="cuda"),
            EV_COPY,
            "says device='cuda'; pass another device, e.g. --device cpu",
        )
    )


@pytest.mark.parametrize(
    "damage, argv, needle", [c[1:] for c in READER_CASES], ids=[c[0] for c in READER_CASES]
)
def test_damaged_run_folder_names_the_file(world, capsys, damage, argv, needle):
    copy = world.root / "copy"
    shutil.rmtree(copy, ignore_errors=True)
    shutil.copytree(world.run, copy)
    damage(copy)
    before = runkit.snapshot(copy)
    argv = [a.replace("{root}", str(world.root)) for a in argv]
    rc, err = _cli(_fill(argv, world), capsys)
    _assert_one_line(rc, err, needle)
    assert runkit.snapshot(copy) == before  # nothing changed, nothing lost
    assert not (world.root / "copy-ev").exists()


def test_busy_folder_refused_at_once_and_untouched(world, capsys):
    hold = (
        "import sys, time\nfrom advcal.runfolder import RunLock\n"
        "with RunLock(sys.argv[1]):\n    print('locked', flush=True)\n    time.sleep(60)\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", hold, str(world.run)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout.readline().strip() == "locked"
        snap = runkit.snapshot(world.run)
        rc, err = _cli(_fill([*RES], world), capsys)
        _assert_one_line(rc, err, f"is in use by another advcal run: pid {proc.pid}")
        assert runkit.snapshot(world.run) == snap
    finally:
        proc.kill()
        proc.wait()
    (world.run / ".advcal.lock").unlink()  # the holder was killed: its stale lock file
    assert runkit.snapshot(world.run) == world.snap


def test_unexpected_error_is_a_traceback_and_a_request_to_report(monkeypatch, capsys):
    import advcal.cli as cli

    def buggy(args):
        return {}["oops"] + None  # a real bug: KeyError inside advcal

    monkeypatch.setattr(cli, "cmd_info", buggy)
    rc, err = _cli(["info"], capsys)
    assert rc == 1
    assert "Traceback" in err and "KeyError" in err
    assert err.strip().splitlines()[-1].endswith("and the output of `advcal info`")
    assert "this is a bug in advcal" in err

    def type_bug(args):
        return len(5)  # a TypeError is a bug, no longer shown as a user error

    monkeypatch.setattr(cli, "cmd_info", type_bug)
    rc, err = _cli(["info"], capsys)
    assert rc == 1 and "Traceback" in err and "TypeError" in err


@pytest.mark.parametrize(
    "argv, needle",
    [
        (
            ["calibrate", "--config", "{files}/tiny.json", "--out", "{run}", "--device", "gpu"],
            "use device='cuda'",
        ),
        (["calibrate", "--config", "{files}/empty.json", "--out", "{run}"], "empty.json is empty"),
        (["evaluate", "--run", "{files}/afile"], "afile is a file"),
    ],
    ids=["device-gpu", "empty-config", "run-is-a-file"],
)
def test_real_process_prints_one_line_and_exits_2(world, argv, needle):
    proc = subprocess.run(
        [sys.executable, "-m", "advcal.cli", *_fill(argv, world)],
        capture_output=True,
        text=True,
        timeout=120,
        env=runkit.env(world.root),
    )
    _assert_one_line(proc.returncode, proc.stderr, needle)
    assert runkit.snapshot(world.run) == world.snap


def test_float64_and_float16_dataset_files_are_cast_not_refused(world, tmp_path):
    """A dataset file of float64 (numpy's default) or float16 is read and cast to the
    backbone's float32 batch by batch: the frozen evaluation gives the float32 file's clean
    accuracy (float16 rounding aside: within a sample)."""
    from advcal import data
    from advcal.pipeline import evaluate_backbone

    good = data.load(world.files / "good.safetensors")
    base = {**runkit.TINY, "eval": {**runkit.TINY["eval"], "retrieval": False}}
    ref = evaluate_backbone(
        RunConfig.from_dict({**base, "data": str(world.files / "good.safetensors")}),
        tmp_path / "ref",
        progress=False,
    )
    for dt in (torch.float64, torch.float16):
        path = world.files / f"ds-{dt}.st"
        data.save(
            data.MultiModalDataset(
                {m: x.to(dt) for m, x in good.inputs.items()}, good.labels, good.class_names
            ),
            path,
        )
        rep = evaluate_backbone(
            RunConfig.from_dict({**base, "data": str(path)}), tmp_path / str(dt), progress=False
        )
        for m, r in rep["modalities"].items():
            want = ref["modalities"][m]["clean_top1_before"]
            assert abs(r["clean_top1_before"] - want) <= 1 / r["n"] + 1e-9, (dt, m)


def test_api_float64_and_float16_inputs_are_cast():
    """Another float dtype reaches the backbone as its own dtype: the same logits, no error."""
    from conftest import Toy

    import advcal

    bb, centers, ds = Toy.build()
    clf = advcal.ZeroShotClassifier(bb, "img", centers)
    x = ds.inputs["img"][:8]
    with torch.no_grad():
        torch.testing.assert_close(clf(x.double()), clf(x))
        torch.testing.assert_close(clf(x.half()), clf(x.half().float()))
    y = ds.labels[:8]
    x_adv = advcal.PGD(clf, steps=2)(x.half(), y)
    assert (
        x_adv.dtype == torch.float16
        and (x_adv.float() - x.half().float()).abs().max() <= 8 / 255 + 1e-3
    )


def test_case_count():
    n = len(API_CASES) + len(API_FILE_CASES) + len(CLI_CASES) + len(READER_CASES)
    assert n >= 150, n
