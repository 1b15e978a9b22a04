"""The payments' admission gate (transactions/admission.py): who gets a slot, in what order, and
who is refused."""

from __future__ import annotations

import asyncio

import pytest

from billfold.transactions.admission import AdmissionGate, Overloaded


async def _hold(
    gate: AdmissionGate, kind: str, order: list[str], name: str, release: asyncio.Event
) -> None:
    phase = gate.start() if kind == "start" else gate.finish()
    async with phase:
        order.append(name)
        await release.wait()


async def test_a_finishing_payment_goes_ahead_of_those_waiting_to_start() -> None:
    gate = AdmissionGate(1, queue_limit=10)
    order: list[str] = []
    go = asyncio.Event()
    first = asyncio.create_task(_hold(gate, "start", order, "first", go))
    await asyncio.sleep(0)
    waiting = [asyncio.create_task(_hold(gate, "start", order, f"s{i}", go)) for i in range(3)]
    await asyncio.sleep(0)
    finishing = asyncio.create_task(_hold(gate, "finish", order, "finish", go))
    await asyncio.sleep(0)
    assert order == ["first"] and gate.waiting == 3 and gate.working == 1
    go.set()
    await asyncio.gather(first, finishing, *waiting)
    assert order == ["first", "finish", "s0", "s1", "s2"]
    assert (gate.working, gate.waiting, gate.refused) == (0, 0, 0)


async def test_past_the_queue_a_start_is_refused_at_once_but_a_finish_never() -> None:
    gate = AdmissionGate(1, queue_limit=1)
    go = asyncio.Event()
    order: list[str] = []
    first = asyncio.create_task(_hold(gate, "start", order, "first", go))
    await asyncio.sleep(0)
    queued = asyncio.create_task(_hold(gate, "start", order, "queued", go))
    await asyncio.sleep(0)
    with pytest.raises(Overloaded) as refused:
        async with gate.start():
            pass
    assert refused.value.status == 429 and refused.value.code == "overloaded"
    assert refused.value.headers == {"Retry-After": "1"}
    finishing = asyncio.create_task(_hold(gate, "finish", order, "finish", go))
    await asyncio.sleep(0)
    go.set()
    await asyncio.gather(first, queued, finishing)
    assert order == ["first", "finish", "queued"] and gate.refused == 1
    assert gate.working == 0


async def test_a_waiter_cancelled_after_it_was_given_the_slot_passes_it_on() -> None:
    gate = AdmissionGate(1, queue_limit=10)
    go = asyncio.Event()
    go.set()
    order: list[str] = []
    held = gate.start()
    await held.__aenter__()
    doomed = asyncio.create_task(_hold(gate, "start", order, "doomed", go))
    later = asyncio.create_task(_hold(gate, "start", order, "later", go))
    await asyncio.sleep(0)
    assert gate.waiting == 2
    await held.__aexit__(None, None, None)  # the slot is handed to `doomed`, not yet running
    doomed.cancel()
    await asyncio.gather(doomed, return_exceptions=True)
    await later
    assert order == ["later"] and gate.working == 0 and gate.waiting == 0


async def test_a_waiter_cancelled_while_waiting_leaves_the_queue() -> None:
    gate = AdmissionGate(1, queue_limit=1)
    go = asyncio.Event()
    order: list[str] = []
    first = asyncio.create_task(_hold(gate, "start", order, "first", go))
    await asyncio.sleep(0)
    doomed = asyncio.create_task(_hold(gate, "start", order, "doomed", go))
    await asyncio.sleep(0)
    assert gate.waiting == 1
    doomed.cancel()
    await asyncio.gather(doomed, return_exceptions=True)
    assert gate.waiting == 0  # its place in the queue is free again
    go.set()
    await first
    async with gate.start():
        assert gate.working == 1
    assert gate.working == 0


async def test_payments_at_the_network_are_bounded_and_the_bound_follows_the_answers() -> None:
    gate = AdmissionGate(2, queue_limit=10, congested_after=0.05, network_max=8)
    assert gate.network_limit == 8  # optimistic until an answer says otherwise
    gate.network_limit = 2.0  # as after a cut
    answered = asyncio.Event()
    started: list[int] = []

    async def payment(i: int, slow: bool = False) -> None:
        async with gate.start():
            started.append(i)
        async with gate.network():
            await answered.wait()
            if slow:
                await asyncio.sleep(0.06)

    first = [asyncio.create_task(payment(i)) for i in range(2)]
    await asyncio.sleep(0.01)
    third = asyncio.create_task(payment(2))
    await asyncio.sleep(0.01)
    assert started == [0, 1] and gate.at_network == 2 and gate.waiting == 1  # held back
    answered.set()  # two prompt answers: the bound grows by one each, the third goes
    await asyncio.gather(*first, third)
    assert started == [0, 1, 2] and gate.network_limit == 5
    # A slow answer (the network is behind) cuts the bound, never below the work limit.
    await payment(3, slow=True)
    assert gate.network_limit == 2
    assert (gate.working, gate.at_network, gate.waiting) == (0, 0, 0)


async def test_a_timeout_at_the_network_counts_as_congestion() -> None:
    gate = AdmissionGate(1, queue_limit=10, congested_after=10)
    gate.network_limit = 6.0
    with pytest.raises(TimeoutError):
        async with gate.network():
            raise TimeoutError
    assert gate.network_limit == 1 and gate.at_network == 0
