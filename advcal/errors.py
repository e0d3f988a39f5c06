"""What counts as a user error: the one place the CLI (and anyone else) reads it from.

A *user error* is caused by what the user gave advcal: an argument, a config value, a file (or
its absence), a busy run folder. The CLI prints it as one line naming the argument or file and
exits with code 2, without a traceback. Anything else is a bug in advcal (or a dependency):
the CLI shows the traceback and asks to report it.

* :class:`UserError` is the base of advcal's own user errors.
* :data:`USER_ERRORS` adds the builtins that count: ``ValueError`` (every hand-written check
  in advcal raises it, each naming the argument) and the ``OSError`` kinds a bad path causes.
  ``TypeError`` does **not** count: outside :class:`ConfigError` (which is one) it is almost
  always a bug, e.g. a call with the wrong arguments, and hiding it as a user error hid bugs.
"""

from __future__ import annotations


class UserError(Exception):
    """Base of the errors a user can fix: the message names the argument or file and the fix."""


class ConfigError(UserError, ValueError, TypeError):
    """A config value of the wrong type or out of range. A ``ValueError`` and a ``TypeError``
    both, so callers that catch either keep working.

    ``section`` is where in a config file the value sits (``"calib.objective"``), prepended
    as nested configs are built, so the message says where to look."""

    def __init__(self, message: str, section: str | None = None) -> None:
        super().__init__(message)
        self.message, self.section = message, section

    def __str__(self) -> str:
        return self.message + (f" (config section [{self.section}])" if self.section else "")


class FileFormatError(UserError, ValueError):
    """A file advcal reads is empty, corrupt or holds the wrong thing; the message names it."""


class RunFolderBusy(UserError, RuntimeError):
    """Another live process holds the run folder's lock."""


class RunFolderError(UserError, ValueError):
    """The run folder cannot take this run: ``--out`` is a file, or it holds the results of a
    run with other settings (the message lists the differing keys)."""


class DistributedError(UserError, RuntimeError):
    """A rank stalled or died under torchrun (a collective timed out): every rank exits with
    this, naming the timeout and how to change it. Not a usage error: exit code 1."""

    exit_code = 1


USER_ERRORS: tuple[type[BaseException], ...] = (
    UserError,
    ValueError,
    FileNotFoundError,
    FileExistsError,
    IsADirectoryError,
    NotADirectoryError,
    PermissionError,
)


def is_user_error(err: BaseException) -> bool:
    return isinstance(err, USER_ERRORS)


def exit_code(err: BaseException) -> int:
    """2 for a usage error (the convention of argparse and most CLIs), or the error's own."""
    return int(getattr(err, "exit_code", 2))


__all__ = [
    "USER_ERRORS",
    "ConfigError",
    "DistributedError",
    "FileFormatError",
    "RunFolderBusy",
    "RunFolderError",
    "UserError",
    "exit_code",
    "is_user_error",
]
