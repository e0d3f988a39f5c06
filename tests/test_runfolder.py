"""advcal.runfolder: atomic writes (unique temp, fsync, umask mode, no leftovers), the folder
lock (pid + host, stale take-over), config diffs, and a failed start that blocks nothing."""

from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
import sys
import time

import pytest

from advcal import runfolder
from advcal.errors import FileFormatError, RunFolderBusy, RunFolderError


def _mode(p) -> int:
    return stat.S_IMODE(os.stat(p).st_mode)


def _temps(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(runfolder.TMP_SUFFIX))


def test_atomic_write_gives_umask_mode_and_leaves_no_temp(tmp_path):
    old = os.umask(0o022)
    try:
        runfolder.write_json(tmp_path / "a.json", {"x": 1})
        runfolder.write_with(tmp_path / "b.bin", lambda p: p.write_bytes(b"\x00\x01"))
        os.umask(0o027)
        runfolder.write_text(tmp_path / "c.txt", "hi")
    finally:
        os.umask(old)
    assert _mode(tmp_path / "a.json") == 0o644 and _mode(tmp_path / "b.bin") == 0o644
    assert _mode(tmp_path / "c.txt") == 0o640
    assert json.loads((tmp_path / "a.json").read_text()) == {"x": 1}
    assert (tmp_path / "b.bin").read_bytes() == b"\x00\x01"
    assert _temps(tmp_path) == []


def test_heads_file_has_the_same_mode_as_the_rest(tmp_path):
    from advcal.heads import CalibrationHeads

    old = os.umask(0o022)
    try:
        CalibrationHeads(("image",), 4).save(tmp_path / "heads.safetensors")
        runfolder.write_json(tmp_path / "config.json", {})
    finally:
        os.umask(old)
    assert _mode(tmp_path / "heads.safetensors") == _mode(tmp_path / "config.json") == 0o644
    assert _temps(tmp_path) == []


def test_a_failing_writer_leaves_the_old_file_and_no_temp(tmp_path):
    target = tmp_path / "x.json"
    runfolder.write_json(target, {"v": 1})

    def boom(p):
        p.write_text("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        runfolder.write_with(target, boom)
    assert json.loads(target.read_text()) == {"v": 1}
    assert _temps(tmp_path) == []


def test_temp_names_are_unique_per_write(tmp_path):
    seen = []
    for _ in range(3):
        with runfolder.atomic_path(tmp_path / "f") as tmp:
            seen.append(tmp.name)
            tmp.write_text("x")
    assert len(set(seen)) == 3 and all(str(os.getpid()) in n for n in seen)


def test_clean_temp_removes_dead_writers_and_legacy_names_only(tmp_path):
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    )
    dead_pid = int(dead.stdout)
    (tmp_path / f".checkpoint.pt.{dead_pid}.abcd1234{runfolder.TMP_SUFFIX}").write_text("x")
    live = tmp_path / f".report.json.{os.getppid()}.00000000{runfolder.TMP_SUFFIX}"
    live.write_text("x")  # the parent of this test process is alive: never removed
    (tmp_path / "checkpoint.tmp").write_text("x")  # advcal <= 0.1.0's fixed name
    (tmp_path / "keep.json").write_text("{}")
    removed = sorted(p.name for p in runfolder.clean_temp(tmp_path))
    assert removed == sorted(
        [f".checkpoint.pt.{dead_pid}.abcd1234{runfolder.TMP_SUFFIX}", "checkpoint.tmp"]
    )
    assert live.exists() and (tmp_path / "keep.json").exists()


def test_read_json_names_the_file(tmp_path):
    p = tmp_path / "eval_before.json"
    p.write_text("")
    with pytest.raises(FileFormatError, match=r"eval_before.json is empty; delete it"):
        runfolder.read_json(p, fix="delete it")
    p.write_text('{"a": ')
    with pytest.raises(FileFormatError, match=r"eval_before.json is not valid JSON \(Expecting"):
        runfolder.read_json(p)
    p.write_bytes(b"\xff\xfe\x00")
    with pytest.raises(FileFormatError, match="not a UTF-8 text file"):
        runfolder.read_json(p)
    with pytest.raises(FileNotFoundError, match=r"nope\.json does not exist"):
        runfolder.read_json(tmp_path / "nope.json")


def test_config_diff_lists_keys_and_ignores_where_it_runs():
    a = {"device": "cuda:0", "calib": {"epochs": 2, "lr": 0.1}, "data": "digits"}
    b = {"device": "cuda:1", "calib": {"epochs": 3, "lr": 0.1}, "data": "x", "new": 1}
    diff = runfolder.config_diff(a, b)
    assert diff == [
        "calib.epochs: 2 in the folder, 3 now",
        'data: "digits" in the folder, "x" now',
        "new: (absent) in the folder, 1 now",
    ]
    assert runfolder.config_diff(a, {**a, "device": "cpu", "dist_timeout": 9}) == []


# -- the lock ----------------------------------------------------------------------------------

HOLD = """
import sys, time
from advcal.runfolder import RunLock
with RunLock(sys.argv[1]):
    print("locked", flush=True)
    time.sleep(60)
"""


def test_second_holder_is_refused_at_once_naming_pid_and_host(tmp_path):
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(tmp_path)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout.readline().strip() == "locked"
        t0 = time.perf_counter()
        with pytest.raises(RunFolderBusy) as info:
            runfolder.RunLock(tmp_path).acquire()
        assert time.perf_counter() - t0 < 1.0
        msg = str(info.value)
        assert f"pid {proc.pid} on host {socket.gethostname()}" in msg and "another --out" in msg
    finally:
        proc.kill()
        proc.wait()
    # the holder was killed (-9): its flock died with it; the file remains, stale
    assert (tmp_path / runfolder.LOCK_NAME).exists()
    lock = runfolder.RunLock(tmp_path).acquire()
    try:
        assert lock.took_over is not None and f"pid {proc.pid}" in lock.took_over
        held = json.loads((tmp_path / runfolder.LOCK_NAME).read_text())
        assert held["pid"] == os.getpid() and held["host"] == socket.gethostname()
    finally:
        lock.release()
    assert not (tmp_path / runfolder.LOCK_NAME).exists()


def test_lock_of_another_host_is_not_taken_over(tmp_path):
    (tmp_path / runfolder.LOCK_NAME).write_text(
        json.dumps({"pid": 1, "host": "elsewhere.example", "started": 0})
    )
    with pytest.raises(RunFolderBusy, match=r"host elsewhere.example.*another machine.*delete"):
        runfolder.RunLock(tmp_path).acquire()


# -- the folder ----------------------------------------------------------------------------------


def test_out_that_is_a_file_is_refused(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(RunFolderError, match=r"--out .*file is a file, not a folder"):
        runfolder.RunFolder(f, {}).open()
    with pytest.raises(RunFolderError, match="is a file, not a folder"):
        runfolder.RunFolder(f / "sub", {}).open()
    assert f.read_text() == "x"


def test_failed_start_leaves_nothing_that_blocks_a_retry(tmp_path):
    out = tmp_path / "run"
    with pytest.raises(RuntimeError), runfolder.RunFolder(out, {"a": 1}) as folder:
        folder.write_config()
        raise RuntimeError("backbone failed to load")
    assert not out.exists()  # created by this run, empty again: removed
    out.mkdir()
    (out / "note.txt").write_text("mine")
    with pytest.raises(RuntimeError), runfolder.RunFolder(out, {"a": 1}) as folder:
        folder.write_config()
        raise RuntimeError("failed")
    assert sorted(p.name for p in out.iterdir()) == ["note.txt"]
    # a config.json an earlier failed start left (no results beside it) never blocks
    runfolder.write_json(out / "config.json", {"a": 1})
    with runfolder.RunFolder(out, {"a": 2}, resume=True) as folder:
        folder.write_config()
    assert json.loads((out / "config.json").read_text()) == {"a": 2}


def test_results_of_other_settings_are_refused_listing_keys(tmp_path):
    out = tmp_path / "run"
    with runfolder.RunFolder(out, {"a": 1, "device": "cuda:0"}) as folder:
        folder.write_config()
        runfolder.write_json(out / "eval_before.json", {})
    for resume in (True, False):
        with pytest.raises(RunFolderError, match=r"different config \(1 key\(s\) differ: a: 1 in"):
            runfolder.RunFolder(out, {"a": 2, "device": "cuda:0"}, resume=resume).open()
    # the device is where a rank runs, not what it computes: resumable anywhere
    with runfolder.RunFolder(out, {"a": 1, "device": "cpu"}, resume=True):
        pass
    assert not (out / runfolder.LOCK_NAME).exists()
    # a failure after results exist keeps them (and the config that explains them)
    with pytest.raises(RuntimeError), runfolder.RunFolder(out, {"a": 1}, resume=True) as f:
        f.write_config()
        raise RuntimeError("x")
    assert (out / "config.json").exists() and (out / "eval_before.json").exists()
