"""advcal.progress: line mode off a terminal (no carriage returns), nothing when disabled."""

from __future__ import annotations

import io

import pytest

from advcal import progress


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_line_mode_off_a_terminal_every_ten_percent():
    f = io.StringIO()  # not a terminal: a log file, a pipe
    b = progress.bar(range(50), desc="calibrate epoch 1/2", file=f)
    for i in b:
        b.set_postfix(loss=f"{i:.1f}")
    text = f.getvalue()
    lines = text.splitlines()
    assert "\r" not in text and "\x1b" not in text
    assert len(lines) == 10  # 10%, 20%, ..., 100%
    assert lines[0].startswith("calibrate epoch 1/2:  10%") and "5/50" in lines[0]
    assert lines[-1].startswith("calibrate epoch 1/2: 100%") and "loss=49.0" in lines[-1]


def test_line_mode_time_trigger_and_unknown_total():
    f = io.StringIO()
    for _ in progress.bar(iter(range(4)), desc="x", file=f, every_s=0.0):
        pass
    lines = f.getvalue().splitlines()
    assert [ln.split(" ")[1] for ln in lines] == ["1it", "2it", "3it", "4it"]


def test_line_mode_manual_updates_and_a_last_line_at_close():
    f = io.StringIO()
    b = progress.bar(total=1000, desc="eval", file=f, every_pct=50)
    b.update(10)
    b.update(5)  # 1.5%: no line yet
    assert f.getvalue() == ""
    b.close()  # where it stopped, once
    assert f.getvalue().splitlines() == [f.getvalue().strip()] and "15/1000" in f.getvalue()
    b.close()
    assert f.getvalue().count("\n") == 1


def test_disabled_writes_nothing_but_takes_calls():
    f = io.StringIO()
    b = progress.bar(range(3), desc="quiet", file=f, enabled=False)
    for _ in b:
        b.set_postfix(loss="1")
    b.update(0)
    b.close()
    assert f.getvalue() == ""


def test_terminal_gets_a_redrawn_bar():
    f = _Tty()
    for _ in progress.bar(range(3), desc="tty", file=f, mininterval=0):
        pass
    assert "\r" in f.getvalue()  # the normal tqdm bar, redrawn in place
    assert progress.bar(range(1), file=f, mode="lines").__class__ is progress.LineBar


def test_unknown_mode_is_refused():
    with pytest.raises(ValueError, match="progress mode must be"):
        progress.bar(range(1), mode="fancy")


def test_waited_adds_up_the_time_spent_waiting_for_items():
    """Waited yields the items unchanged and counts only the time spent producing them."""
    import time

    from advcal.progress import Waited

    def slow():
        for i in range(3):
            time.sleep(0.02)  # producing an item: counted
            yield i

    w = Waited(slow())
    got = []
    for i in w:
        time.sleep(0.2)  # the consumer's work: not counted
        got.append(i)
    assert got == [0, 1, 2]
    assert 0.06 <= w.seconds < 0.36  # the 3 x 20 ms (and scheduling), none of the 3 x 200 ms
    assert len(Waited([1, 2])) == 2
