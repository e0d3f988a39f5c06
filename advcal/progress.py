"""Progress bars that suit where they are written: one function, :func:`bar`.

* stderr is a terminal: a normal tqdm bar (redrawn in place).
* stderr is a file or a pipe (a log, CI, ``nohup``, a job scheduler): *line mode*, one
  plain line every :data:`EVERY_PCT` percent or :data:`EVERY_S` seconds, whichever comes
  first, and a last line when the bar closes; never a carriage return or a cursor move (a
  redrawn bar in a log file is one enormous line of ``\\r`` spam).
* ``enabled=False`` (``--quiet``, ``--no-progress``, ranks other than 0): nothing at all; the
  returned bar still takes ``set_postfix`` and ``update`` calls.

Calibration, evaluation and backbone loading all call :func:`bar`, so the choice is made in
one place.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable
from typing import IO, Any, Literal

from tqdm.auto import tqdm as _auto_tqdm
from tqdm.std import tqdm as _std_tqdm

EVERY_PCT = 10.0  # line mode: a line per 10% of the total ...
EVERY_S = 30.0  # ... or per 30 s, whichever comes first (long epochs still show life)

Mode = Literal["auto", "bar", "lines"]


class LineBar(_std_tqdm):
    """tqdm that writes whole lines, at most every ``every_pct`` % or ``every_s`` seconds."""

    def __init__(self, *args, every_pct: float = EVERY_PCT, every_s: float = EVERY_S, **kw):
        # set before tqdm's __init__: it draws the bar once at the end of __init__
        self._every_pct, self._every_s = every_pct, every_s
        self._last_line_n: float = 0
        self._last_line_t = time.monotonic()
        kw.update(mininterval=0, miniters=1, ascii=True, dynamic_ncols=False)
        super().__init__(*args, **kw)

    def _line(self) -> None:
        self.fp.write(self.format_meter(**self.format_dict).rstrip() + "\n")
        self.fp.flush()
        self._last_line_n, self._last_line_t = self.n, time.monotonic()

    def display(self, msg: str | None = None, pos: int | None = None) -> bool:
        if msg is not None:  # tqdm clearing or moving the bar: nothing to do in a log
            return False
        if self.n == self._last_line_n:
            return True
        now = time.monotonic()
        due = now - self._last_line_t >= self._every_s
        if self.total:
            step = max(self.total * self._every_pct / 100.0, 1e-12)
            due = due or int(self.n // step) > int(self._last_line_n // step)
        if due:
            self._line()
        return True

    def close(self) -> None:
        if not self.disable and self.n != self._last_line_n:
            self._line()  # where it ended, once
        self.leave = False  # tqdm's close then only asks display() to clear: a no-op here
        super().close()


def _is_tty(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


def bar(
    iterable: Iterable | None = None,
    *,
    desc: str = "",
    total: float | None = None,
    enabled: bool = True,
    leave: bool = False,
    unit: str = "it",
    file: IO[str] | None = None,
    mode: Mode = "auto",
    every_pct: float = EVERY_PCT,
    every_s: float = EVERY_S,
    **kwargs: Any,
) -> _std_tqdm:
    """A progress bar over ``iterable`` (or a manual one: ``total=``, ``.update(n)``).

    ``mode="auto"`` draws a bar on a terminal and writes lines elsewhere (see the module
    docstring); ``"bar"``/``"lines"`` force one. ``enabled=False`` shows nothing."""
    stream = file if file is not None else sys.stderr
    if not enabled:
        return _std_tqdm(iterable, total=total, disable=True)
    if mode not in ("auto", "bar", "lines"):
        raise ValueError(f"progress mode must be 'auto', 'bar' or 'lines', got {mode!r}")
    if mode == "lines" or (mode == "auto" and not _is_tty(stream)):
        return LineBar(
            iterable,
            desc=desc,
            total=total,
            leave=leave,
            unit=unit,
            file=stream,
            every_pct=every_pct,
            every_s=every_s,
            **kwargs,
        )
    return _auto_tqdm(
        iterable,
        desc=desc,
        total=total,
        leave=leave,
        unit=unit,
        file=stream,
        dynamic_ncols=True,
        **kwargs,
    )


class Waited:
    """Iterates ``items`` and adds up, in ``seconds``, the time spent waiting for each one (a
    ``DataLoader``: decoding, transforms, worker hand-off): the data share of a loop's time."""

    def __init__(self, items: Iterable) -> None:
        self.items, self.seconds = items, 0.0

    def __len__(self) -> int:
        return len(self.items)  # type: ignore[arg-type]

    def __iter__(self):
        it = iter(self.items)
        while True:
            t0 = time.perf_counter()
            try:
                item = next(it)
            except StopIteration:
                return
            finally:
                self.seconds += time.perf_counter() - t0
            yield item


__all__ = ["EVERY_PCT", "EVERY_S", "LineBar", "Waited", "bar"]
