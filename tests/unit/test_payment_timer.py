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
    with timer.step("network"):
        time.sleep(0.03)
    with timer.step("db"):
        time.sleep(0.01)
    total_ms = (time.perf_counter() - started) * 1000
    ms = timer.ms
    assert 19 <= ms["fraud"] < 35 and 29 <= ms["network"] < 45
    assert 19 <= ms["db"] < 35  # two transactions of ~10 ms, not the 40 ms the first one spanned
    assert abs(sum(ms.values()) - total_ms) < 2
    # Inside the first transaction the snapshot had its own time so far, not the nested steps'.
    assert 9 <= partial["db"] < 20 and "network" not in partial


def test_add_accumulates() -> None:
    timer = Timer()
    timer.add("auth", 1.25)
    timer.add("auth", 0.5)
    assert timer.ms == {"auth": 1.75}
