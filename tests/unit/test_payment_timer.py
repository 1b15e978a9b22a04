"""The per-step timings of a payment: a step inside another counts for the inner one only, so the
steps add up to the time the request spent (what the latency budget compares)."""

from __future__ import annotations

import time

from billfold.transactions.service import Timer


def test_nested_steps_are_left_out_of_the_enclosing_one() -> None:
    timer = Timer()
    started = time.perf_counter()
    with timer.step("db"):
        time.sleep(0.01)
        with timer.step("fraud"):
            time.sleep(0.02)
        with timer.step("notify_enqueue"):
            time.sleep(0.01)
        partial = timer.snapshot()
        snapshot_ms = (time.perf_counter() - started) * 1000
    with timer.step("network"):
        time.sleep(0.03)
    with timer.step("db"):
        time.sleep(0.01)
    total_ms = (time.perf_counter() - started) * 1000
    ms = timer.ms
    assert ms["fraud"] >= 20 and ms["notify_enqueue"] >= 10 and ms["network"] >= 30
    assert ms["db"] >= 20
    # Nothing counted twice: the steps never add up to more than the time that passed (the
    # first transaction spanned the risk check and the outbox write: 40 ms, not 10).
    assert sum(ms.values()) <= total_ms + 0.01
    # Inside the first transaction the snapshot had its own time so far, without the nested.
    assert partial["db"] >= 10 and "network" not in partial
    assert partial["db"] + partial["fraud"] + partial["notify_enqueue"] <= snapshot_ms + 0.01


def test_add_accumulates() -> None:
    timer = Timer()
    timer.add("auth", 1.25)
    timer.add("auth", 0.5)
    assert timer.ms == {"auth": 1.75}
