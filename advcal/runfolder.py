"""Crash-safe run folders: atomic writes, one lock per folder, clean failure.

Every file a run writes goes through :func:`atomic_path` (or :func:`write_text` /
:func:`write_json` / :func:`write_bytes` on top of it):

* the data goes to a temp file with a unique name in the target's own folder
  (``.<name>.<pid>.<random>.advcal-tmp``: a rename never crosses file systems, and two
  writers never share a temp file, as two runs did with the old fixed ``checkpoint.tmp``);
* the temp file is fsynced, given the umask's mode (``0666 & ~umask``, so ``0644`` under the
  usual ``022``: every file of a run has the same mode; ``mkstemp``-style ``0600`` is gone),
  renamed over the target, and the folder is fsynced, so after a power cut the file is
  either the old one or the new one, complete;
* on any exception the temp file is removed; a temp file left by ``kill -9`` is removed when
  the next run takes the folder's lock (:meth:`RunFolder.open`).

:class:`RunFolder` holds the folder for one run: ``--out`` that is a file is refused, a lock
file ``.advcal.lock`` holds the owner's pid and host (a second run on the folder is refused at
once, naming them; a lock left by a dead process on this host is taken over, and said so),
a resumed run whose settings differ from the folder's ``config.json`` is refused listing the
differing keys, and a run that fails before it saved any result removes the ``config.json``
it wrote, so nothing blocks a retry.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import secrets
import socket
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

from advcal.errors import FileFormatError, RunFolderBusy, RunFolderError

log = logging.getLogger("advcal.runfolder")

TMP_SUFFIX = ".advcal-tmp"
LOCK_NAME = ".advcal.lock"
CONFIG = "config.json"
# the files that hold results: once one exists, the folder belongs to its config
RESULTS = ("eval_before.json", "checkpoint.pt", "heads.safetensors", "report.json")
# temp names of advcal <= 0.1.0 (fixed names beside the target), removed like our own
LEGACY_TMP = (
    "checkpoint.tmp",
    "config.json.tmp",
    "eval_before.json.tmp",
    "heads.safetensors.tmp",
    "report.json.tmp",
    "report.md.tmp",
    "robust_vs_eps.tmp.png",
)
# keys of a config that may differ when a run is resumed: where it runs, not what it computes
# (under torchrun each rank has its own device; a run may continue on another GPU)
RUNTIME_KEYS = ("device", "dist_timeout")

_umask_lock = threading.Lock()


def file_mode() -> int:
    """``0666 & ~umask``: the mode ``open()`` gives a new file (``0644`` under umask 022)."""
    with _umask_lock:  # reading the umask means setting it: keep it set for no time at all
        mask = os.umask(0o022)
        os.umask(mask)
    return 0o666 & ~mask


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:  # a platform without directory fds: the rename is still atomic
        return
    try:
        os.fsync(fd)
    except OSError as err:  # some file systems refuse fsync on a directory
        if err.errno not in (errno.EINVAL, errno.EBADF, errno.ENOTSUP):
            raise
    finally:
        os.close(fd)


def _check_parent(path: Path) -> None:
    folder = path.parent
    if folder.exists() and not folder.is_dir():
        raise RunFolderError(f"cannot write {path}: {folder} is a file, not a folder")
    folder.mkdir(parents=True, exist_ok=True)
    if path.is_dir():
        raise RunFolderError(f"cannot write {path}: it is a folder")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp path beside ``path``; write it, and on a clean exit it replaces ``path``
    (fsynced, umask mode, folder fsynced). On an exception the temp file is removed and
    ``path`` is untouched."""
    path = Path(path)
    _check_parent(path)
    tmp = path.parent / f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}{TMP_SUFFIX}"
    os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))  # reserve the name
    try:
        yield tmp
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.chmod(tmp, file_mode())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    _fsync_dir(path.parent)


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_text(path: str | os.PathLike, text: str) -> None:
    write_bytes(path, text.encode())


def write_json(path: str | os.PathLike, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, default=str) + "\n")


def write_with(path: str | os.PathLike, writer: Callable[[Path], object]) -> None:
    """``writer(tmp)`` writes the file (``torch.save``, ``save_file``, ``savefig``)."""
    with atomic_path(path) as tmp:
        writer(tmp)


def read_json(path: str | os.PathLike, fix: str = "") -> Any:
    """Parse a JSON file; an empty, truncated or non-JSON file is one :class:`FileFormatError`
    naming the file (and ``fix``, what to do about it)."""
    path = Path(path)
    tail = f"; {fix}" if fix else ""
    if path.is_dir():
        raise FileFormatError(f"{path} is a folder, not a JSON file{tail}")
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} does not exist{tail}") from None
    except UnicodeDecodeError as err:
        raise FileFormatError(f"{path} is not a UTF-8 text file ({err.reason}){tail}") from None
    if not text.strip():
        raise FileFormatError(f"{path} is empty{tail}")
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise FileFormatError(
            f"{path} is not valid JSON ({err.msg} at line {err.lineno} column {err.colno}){tail}"
        ) from None


# -- temp files --------------------------------------------------------------------------------


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def clean_temp(folder: str | os.PathLike) -> list[Path]:
    """Remove the temp files a killed writer left in ``folder`` (ours by name, with a pid that
    no longer runs; and advcal <= 0.1.0's fixed temp names). Returns what was removed."""
    folder = Path(folder)
    removed = []
    if not folder.is_dir():
        return removed
    for p in folder.iterdir():
        name = p.name
        if name.endswith(TMP_SUFFIX):
            parts = name[: -len(TMP_SUFFIX)].rsplit(".", 2)
            pid = int(parts[1]) if len(parts) == 3 and parts[1].isdigit() else -1
            if pid != os.getpid() and _pid_alive(pid):
                continue  # a live writer's (only possible without the folder's lock)
        elif name not in LEGACY_TMP:
            continue
        with contextlib.suppress(FileNotFoundError):
            p.unlink()
            removed.append(p)
    return removed


# -- the lock ----------------------------------------------------------------------------------


def _holder(text: str) -> dict:
    try:
        d = json.loads(text)
        return d if isinstance(d, dict) else {}
    except ValueError:
        return {}


def _describe_holder(h: Mapping) -> str:
    since = h.get("started")
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(since)) if since else "?"
    return f"pid {h.get('pid', '?')} on host {h.get('host', '?')} (since {when})"


class RunLock:
    """An exclusive ``flock`` on ``folder/.advcal.lock``, whose content names the holder.

    The kernel drops a ``flock`` when its process dies (``kill -9`` included), so a lock
    file nobody holds is stale by construction; its content (pid, host, start time) is what
    the refusal message and the take-over note say. A lock file written on another host is
    never taken over: this machine cannot see that process."""

    def __init__(self, folder: str | os.PathLike) -> None:
        self.path = Path(folder) / LOCK_NAME
        self._fd: int | None = None
        self.took_over: str | None = None  # the stale holder, when there was one

    def acquire(self) -> RunLock:
        host = socket.gethostname()
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, file_mode())
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                held = _holder(os.pread(fd, 4096, 0).decode(errors="replace"))
                os.close(fd)
                raise RunFolderBusy(
                    f"{self.path.parent} is in use by another advcal run: "
                    f"{_describe_holder(held)}, lock file {self.path}. Wait for it to finish, "
                    "or use another --out"
                ) from None
            try:  # the holder before us may have unlinked the file after we opened it
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        old = _holder(os.pread(fd, 4096, 0).decode(errors="replace"))
        if old and old.get("host") not in (None, host):
            os.close(fd)
            raise RunFolderBusy(
                f"{self.path.parent} is locked by {_describe_holder(old)}, another machine: "
                f"advcal cannot check a process there. If that run is gone, delete {self.path}"
            )
        if old and old.get("pid") != os.getpid():
            self.took_over = _describe_holder(old)
            log.warning(
                "advcal: took over the stale lock of %s in %s (that process is gone)",
                self.took_over,
                self.path.parent,
            )
        me = {"pid": os.getpid(), "host": host, "started": time.time()}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(me).encode(), 0)
        os.fsync(fd)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is None:
            return
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()  # while still holding it: a waiter re-checks the inode
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


# -- configs -----------------------------------------------------------------------------------


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(d, Mapping):
        return {prefix: d}
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if isinstance(v, Mapping) and v:
            out.update(_flatten(v, key))
        else:
            out[key] = v
    return out


def config_diff(saved: Mapping, current: Mapping, ignore: tuple[str, ...] = RUNTIME_KEYS) -> list:
    """``["calib.epochs: 2 in the folder, 3 now", ...]`` for every key that differs (dotted
    paths into nested tables), ``ignore`` keys (where a run executes) left out."""
    a, b = _flatten(saved), _flatten(current)
    missing = object()
    out = []
    for key in sorted(set(a) | set(b)):
        if key.split(".", 1)[0] in ignore:
            continue
        va, vb = a.get(key, missing), b.get(key, missing)
        if va != vb:
            show = lambda v: "(absent)" if v is missing else json.dumps(v, default=str)  # noqa: E731
            out.append(f"{key}: {show(va)} in the folder, {show(vb)} now")
    return out


def _plain(obj: Any) -> Any:
    """What ``obj`` reads back as after a JSON round trip (tuples -> lists, ...)."""
    return json.loads(json.dumps(obj, default=str))


# -- the folder --------------------------------------------------------------------------------


class RunFolder:
    """The run folder ``path`` for one run (use as a context manager on the writing rank).

    ``open()`` refuses a path that is a file, creates the folder, takes the lock, removes
    temp files a killed run left, and checks ``config`` against the folder's ``config.json``
    (``resume=True``: must match but for :data:`RUNTIME_KEYS`; ``resume=False``: a folder
    holding results of other settings is refused rather than mixed). ``write_config()``
    writes ``config.json``. On an exception, if no result file exists yet, the
    ``config.json`` this run wrote is removed (and the folder, if this run created it and it
    is empty), so a retry, with or without ``--resume``, is not blocked."""

    def __init__(self, path: str | os.PathLike, config: Mapping, *, resume: bool = False):
        self.path = Path(path)
        self.config = _plain(dict(config))
        self.resume = resume
        self.lock = RunLock(self.path)
        self.created_folder = False
        self.wrote_config = False
        self.removed_temp: list[Path] = []

    # paths
    def __truediv__(self, name: str) -> Path:
        return self.path / name

    def has_results(self) -> list[str]:
        return [n for n in RESULTS if (self.path / n).is_file()]

    def check_path(self) -> None:
        """Refuse an ``--out`` that cannot be a folder (before anything is created)."""
        p = self.path
        if p.exists() and not p.is_dir():
            raise RunFolderError(f"--out {p} is a file, not a folder; give a folder path")
        for parent in p.parents:
            if parent.exists():
                if not parent.is_dir():
                    raise RunFolderError(f"--out {p}: {parent} is a file, not a folder")
                if not os.access(parent, os.W_OK | os.X_OK) and not p.exists():
                    raise PermissionError(f"--out {p}: cannot create it, {parent} is not writable")
                break

    def saved_config(self) -> dict | None:
        path = self.path / CONFIG
        if not path.is_file():
            return None
        saved = read_json(path, fix="delete it (and the folder's other files) or use another --out")
        if not isinstance(saved, dict):
            raise FileFormatError(f"{path} holds {type(saved).__name__}, not a config table")
        return saved

    def check_config(self) -> None:
        """Refuse to mix two runs' settings in one folder, listing the differing keys."""
        saved = self.saved_config()
        results = self.has_results()
        if saved is None:
            if self.resume and results:
                raise RunFolderError(
                    f"{self.path} holds {results} but no {CONFIG}: it is not a run advcal can "
                    "resume; use another --out"
                )
            return
        diff = config_diff(saved, self.config)
        if not diff or not results:  # no results: an earlier start that failed, nothing lost
            return
        what = "resume it" if self.resume else "start a new run in it"
        raise RunFolderError(
            f"{self.path} holds a run with a different config ({len(diff)} key(s) differ: "
            + "; ".join(diff)
            + f"); cannot {what}. Use another --out"
            + (", or drop --resume after deleting the folder" if self.resume else "")
        )

    def open(self) -> RunFolder:
        self.check_path()
        if not self.path.exists():
            self.path.mkdir(parents=True)
            self.created_folder = True
        self.lock.acquire()
        try:
            self.removed_temp = clean_temp(self.path)
            self.check_config()
        except BaseException:
            self._undo()
            raise
        return self

    def write_config(self) -> None:
        """Write ``config.json`` (left as it is when it already says the same: a resumed run
        changes no file it does not have to)."""
        path = self.path / CONFIG
        text = json.dumps(self.config, indent=2, default=str) + "\n"
        with contextlib.suppress(OSError, UnicodeDecodeError):
            if path.read_text(encoding="utf-8") == text:
                return
        write_text(path, text)
        self.wrote_config = True

    def _undo(self) -> None:
        """After a failure before any result: leave nothing that blocks a retry."""
        if not self.has_results() and self.wrote_config:
            with contextlib.suppress(FileNotFoundError):
                (self.path / CONFIG).unlink()
        clean_temp(self.path)
        self.lock.release()
        if self.created_folder:
            with contextlib.suppress(OSError):
                self.path.rmdir()  # only when empty

    def close(self, failed: bool = False) -> None:
        if failed:
            self._undo()
        else:
            self.lock.release()

    def __enter__(self) -> RunFolder:
        return self.open()

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close(failed=exc_type is not None)


__all__ = [
    "CONFIG",
    "LOCK_NAME",
    "RESULTS",
    "RUNTIME_KEYS",
    "TMP_SUFFIX",
    "RunFolder",
    "RunLock",
    "atomic_path",
    "clean_temp",
    "config_diff",
    "file_mode",
    "read_json",
    "write_bytes",
    "write_json",
    "write_text",
    "write_with",
]
