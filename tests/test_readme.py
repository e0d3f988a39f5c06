"""The README stays true: its first lines give the two commands, CI runs the second one, and
the code blocks marked ``<!-- tested: ... -->`` run as written."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def _tested_blocks() -> dict[str, str]:
    pattern = re.compile(r"<!-- tested: ([\w-]+) -->\s*```python\n(.*?)```", re.DOTALL)
    return {name: code for name, code in pattern.findall(README)}


def test_first_lines_give_the_two_commands_and_ci_runs_the_test_one():
    head = README.split("```bash\n", 1)[1].split("```", 1)[0]
    commands = [line.split("#")[0].strip() for line in head.splitlines() if line.strip()]
    assert commands == ["./dev demo", "./dev test"], commands
    assert README.index("./dev demo") < 200, "the commands come first"
    ci = (ROOT / ".ci" / "run").read_text()
    assert re.search(r"^\./dev test\b", ci, re.MULTILINE), (
        ".ci/run must call the README's test command"
    )


def test_placeholders_are_filled():
    assert "{{" not in README, "the README has an unfilled placeholder"


@pytest.mark.parametrize("name", sorted(_tested_blocks()))
def test_code_block_runs(name):
    code = _tested_blocks()[name]
    exec(compile(code, f"README.md<{name}>", "exec"), {"__name__": f"readme_{name}"})


def test_there_is_a_tested_block():
    assert "drop-in" in _tested_blocks()


def _cli_blocks() -> dict[str, list[str]]:
    """``<!-- tested-cli: NAME -->`` bash blocks: their ``advcal ...`` commands (continuation
    lines joined, comments dropped)."""
    pattern = re.compile(r"<!-- tested-cli: ([\w-]+) -->\s*```bash\n(.*?)```", re.DOTALL)
    out = {}
    for name, text in pattern.findall(README):
        joined = text.replace("\\\n", " ")
        out[name] = [ln.strip() for ln in joined.splitlines() if ln.strip().startswith("advcal ")]
    return out


def test_real_data_commands_run_on_miniature_layouts(tmp_path, monkeypatch):
    """The README's real-data commands, as written, on miniature copies of the official
    layouts ($IMAGENET, $ESC50, ... point at them); a tiny minibind config is added to each
    command (the README's use the default backbone), and runs/ is a temp dir."""
    import shlex

    pytest.importorskip("av")
    import runkit

    from advcal.cli import main
    from advcal.data import miniature

    blocks = _cli_blocks()
    assert "data" in blocks and len(blocks["data"]) >= 4, blocks
    cache = tmp_path / "cache"
    monkeypatch.setenv("ADVCAL_CACHE", str(cache))
    monkeypatch.chdir(tmp_path)
    paths = {
        "IMAGENET": tmp_path / "imagenet",
        "ESC50": tmp_path / "esc50",
        "MODELNET40": tmp_path / "modelnet40",
    }
    truth = miniature.make_imagenet(paths["IMAGENET"], "folders")
    ids = tmp_path / "imagenet_test_image_ids.txt"
    ids.write_text("\n".join(f"{w}/{name}" for name, w in reversed(truth.items())))
    miniature.make_esc50(paths["ESC50"])
    paths["MODELNET40"] = miniature.make_modelnet40_txt(paths["MODELNET40"])
    paths["MANIFEST"] = miniature.make_paired(tmp_path / "paired")
    paths["IMAGENET_IDS"] = ids
    import shutil

    shutil.copytree(paths["IMAGENET"] / "val", paths["IMAGENET"] / "train")
    tiny = runkit.write_config(
        tmp_path / "tiny.json",
        {
            "backbone_kwargs": {"embed_dim": 32, "width": 4, "epochs": 1},
            "calib": {"epochs": 1, "batch_size": 4, "attack_steps": 1},
            "eval": {**runkit.TINY["eval"], "batch_size": 4},
        },
    )
    for cmd in blocks["data"]:
        for var, value in sorted(paths.items(), key=lambda kv: -len(kv[0])):  # longest first
            cmd = cmd.replace(f"${var}", str(value))
        argv = [*shlex.split(cmd)[1:], "--config", str(tiny), "--quiet"]
        assert main(argv) == 0, cmd
        out = Path(argv[argv.index("--out") + 1])
        assert (out / "report.json").is_file(), cmd
