"""The network client's timeout measures the network, not this process's event loop.

The simulator runs in a thread of its own (its own event loop), so it answers while the
client's loop is blocked, as a real network does while a busy API process is on other work.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Callable, Iterator
from datetime import date
from typing import Any

import pytest
import uvloop

from billfold.network import (
    Authorization,
    Iso8583Network,
    Merchant,
    NetworkClientConfig,
    NetworkSimulator,
    NetworkTimeout,
    SimulatorConfig,
    TokenisedCard,
)

SHOP = Merchant(id="mch_coffee", name="Blue Bottle Coffee", mcc="5814", country="US")
CARD = TokenisedCard(
    dpan="4895370012345678",
    expiry_month=12,
    expiry_year=2031,
    arqc="0123456789ABCDEF",
    atc=1,
    unpredictable_number="0A1B2C3D",
    issuer_application_data="0110A00003220000000000000000000000FF",
    dynamic_cvv="123",
    cryptogram_version="18",
    transaction_date=date(2026, 11, 30),
    country_numeric="840",
)
TIMEOUT = 0.3
LOOPS: dict[str, Callable[[], asyncio.AbstractEventLoop]] = {
    "uvloop": uvloop.new_event_loop,
    "asyncio": asyncio.new_event_loop,
}


class _SimulatorThread:
    """A `NetworkSimulator` without a token service (it answers every authorization 14, 50 ms
    after it came: an answer, not a timeout) on its own event loop."""

    def __init__(self) -> None:
        self.simulator = NetworkSimulator(None, SimulatorConfig(latency_ms=50))
        self.port = 0
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=asyncio.run, args=(self._serve(),), daemon=True)

    async def _serve(self) -> None:
        self._loop, self._stop = asyncio.get_running_loop(), asyncio.Event()
        _, self.port = await self.simulator.start("127.0.0.1", 0)
        self._ready.set()
        await self._stop.wait()
        await self.simulator.stop()

    def __enter__(self) -> _SimulatorThread:
        self._thread.start()
        assert self._ready.wait(10)
        return self

    def __exit__(self, *_: Any) -> None:
        assert self._loop is not None and self._stop is not None
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)


@pytest.fixture
def remote_simulator() -> Iterator[_SimulatorThread]:
    with _SimulatorThread() as sim:
        yield sim


async def _authorize_while_the_loop_is_blocked(
    sim: _SimulatorThread, blocked: float
) -> Authorization:
    net = Iso8583Network(NetworkClientConfig(host="127.0.0.1", port=sim.port, timeout=TIMEOUT))
    try:
        answer = asyncio.create_task(
            net.authorize(
                CARD,
                amount=1_000,
                currency="USD",
                merchant=SHOP,
                channel="in_app",
                transaction_id="txn_test",
            )
        )
        # Until the network has the request (it answers 50 ms later).
        for _ in range(5_000):
            if sim.simulator.messages("0100"):
                break
            await asyncio.sleep(0.001)
        assert sim.simulator.messages("0100"), "the request never reached the network"
        # This process is busy for longer than the timeout, in an I/O callback as when it
        # parses a burst of requests; the answer comes meanwhile.
        loop = asyncio.get_running_loop()
        busy, wake = socket.socketpair()
        with busy, wake:

            def work() -> None:
                loop.remove_reader(busy.fileno())
                busy.recv(1)
                time.sleep(blocked)

            loop.add_reader(busy.fileno(), work)
            wake.send(b"!")
            return await answer
    finally:
        await net.aclose()


@pytest.mark.parametrize("loop", LOOPS)
def test_an_answer_that_came_in_time_is_not_timed_out_by_a_busy_loop(
    remote_simulator: _SimulatorThread, loop: str
) -> None:
    with asyncio.Runner(loop_factory=LOOPS[loop]) as runner:
        auth = runner.run(_authorize_while_the_loop_is_blocked(remote_simulator, TIMEOUT * 3))
    assert auth.response_code == "14"  # the simulator's answer, not a timeout
    assert not remote_simulator.simulator.messages("0420")  # and nothing to reverse


@pytest.mark.parametrize("loop", LOOPS)
def test_a_network_that_does_not_answer_still_times_out(
    remote_simulator: _SimulatorThread, loop: str
) -> None:
    remote_simulator.simulator.paused = True

    async def run() -> float:
        started = time.perf_counter()
        with pytest.raises(NetworkTimeout):
            await _authorize_while_the_loop_is_blocked(remote_simulator, 0.0)
        return time.perf_counter() - started

    with asyncio.Runner(loop_factory=LOOPS[loop]) as runner:
        took = runner.run(run())
    assert TIMEOUT <= took < TIMEOUT + 2.5  # aclose() waits up to 2 s for the reversal
