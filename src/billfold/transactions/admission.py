"""The payments' admission gate: how many payments of one API process do their own work at once.

A card payment is mostly waiting: ~1.2 s for the network against a few milliseconds of CPU in
this process, the vault and PostgreSQL. Only the work is bounded here (tx1 with the risk check
and the cryptogram, then tx2 once the network answered), never the wait for the network, so
hundreds of payments can be at the network while the machine's CPU does the rest in turn.

- `limit` payments work at once; the others wait holding nothing (no connection, no timer
  running: the network's timeout starts when the request is sent, after the gate).
- A payment that finishes (tx2 after the network's answer) goes ahead of every payment still
  waiting to start: the network's answer must be recorded, and starting new work while answers
  wait would only lengthen every payment.
- At most `queue_limit` payments wait to start; the next one is refused at once with 429
  `overloaded` and `Retry-After`, before anything is written, so a retry with the same
  Idempotency-Key is a fresh attempt. A finishing payment is never refused.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from billfold.platform.errors import TooManyRequests


class Overloaded(TooManyRequests):
    code, title = "overloaded", "Too many payments in progress"


class AdmissionGate:
    """A counting gate with two queues (finishing before starting), a bound on the starting
    queue and an adaptive bound on the payments at the network. Made inside the event loop
    that uses it.

    The network bound is what keeps a payment from failing in a queue of our own making: when
    answers come back slow (`congested_after` seconds or more, or not at all) the network is
    behind, and sending it more only makes the payments already there time out. So the bound
    drops to three quarters of what is at the network then (at most once a second, never below
    `limit`), and each prompt answer raises it by one (doubling per round trip while the
    network keeps up), up to `network_max`, where it starts. Payments held back by it wait
    before tx1, holding nothing, with no timer running."""

    def __init__(
        self,
        limit: int,
        queue_limit: int,
        retry_after_seconds: int = 1,
        *,
        network_max: int = 4096,
        congested_after: float = 2.5,
    ) -> None:
        if limit <= 0 or queue_limit < 0:
            raise ValueError("the gate needs a positive limit and a non-negative queue limit")
        self.limit = limit
        self.queue_limit = queue_limit
        self.retry_after_seconds = retry_after_seconds
        self.network_max = max(limit, network_max)
        # Optimistic at first: no answer has said the network is behind yet.
        self.network_limit = float(self.network_max)
        self.congested_after = congested_after
        self.refused = 0  # payments answered 429 since the process started
        self.at_network = 0  # payments sent to the network, not yet answered
        self._free = limit
        self._starting_work = 0  # start slots held: payments about to go to the network
        self._finishing: deque[asyncio.Future[None]] = deque()
        self._starting: deque[asyncio.Future[None]] = deque()
        self._last_cut = -1e9

    @property
    def working(self) -> int:
        """Payments holding a slot now."""
        return self.limit - self._free

    @property
    def waiting(self) -> int:
        """Payments waiting to start (the queue `queue_limit` bounds)."""
        return len(self._starting)

    @asynccontextmanager
    async def start(self) -> AsyncIterator[None]:
        """A new payment's work (tx1, the cryptogram). Raises `Overloaded` when the starting
        queue is full."""
        if self._starting or not self._may_start():
            if len(self._starting) >= self.queue_limit:
                self.refused += 1
                raise Overloaded(
                    "billfold is working on as many payments as it can; nothing was done, "
                    "retry with the same Idempotency-Key after Retry-After",
                    headers={"Retry-After": str(self.retry_after_seconds)},
                )
        await self._acquire(self._starting)
        try:
            yield
        finally:
            self._starting_work -= 1
            self._release()

    @asynccontextmanager
    async def finish(self) -> AsyncIterator[None]:
        """A payment's work after the network answered (tx2): ahead of every start."""
        await self._acquire(self._finishing)
        try:
            yield
        finally:
            self._release()

    @asynccontextmanager
    async def network(self) -> AsyncIterator[None]:
        """A payment waiting for the network: counted, and its answer time observed (an
        exception, such as a timeout, counts as congestion)."""
        self.at_network += 1
        sent = time.monotonic()
        prompt = False
        try:
            yield
            prompt = time.monotonic() - sent < self.congested_after
        finally:
            self.at_network -= 1
            if prompt:
                self.network_limit = min(self.network_max, self.network_limit + 1)
            elif time.monotonic() - self._last_cut >= 1.0:
                self._last_cut = time.monotonic()
                pressure = min(self.network_limit, self.at_network + 1)
                self.network_limit = max(float(self.limit), pressure * 0.75)
            self._dispatch()

    def _may_start(self) -> bool:
        return (
            self._free > 0
            and not self._finishing
            and self.at_network + self._starting_work < self.network_limit
        )

    async def _acquire(self, queue: deque[asyncio.Future[None]]) -> None:
        # Fair: a free slot goes to a newcomer only when nobody waits for it.
        if not self._finishing and not self._starting:
            if queue is self._finishing and self._free > 0:
                self._free -= 1
                return
            if queue is self._starting and self._may_start():
                self._free -= 1
                self._starting_work += 1
                return
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        queue.append(waiter)
        self._dispatch()
        try:
            await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                # handed a slot, then cancelled: pass it on
                if queue is self._starting:
                    self._starting_work -= 1
                self._release()
            else:
                with contextlib.suppress(ValueError):
                    queue.remove(waiter)
            raise

    def _release(self) -> None:
        self._free += 1
        self._dispatch()

    def _dispatch(self) -> None:
        """Hand free slots to waiters: finishing ones first, then starting ones while the
        network bound leaves room."""
        while self._free > 0 and self._finishing:
            waiter = self._finishing.popleft()
            if not waiter.done():
                self._free -= 1
                waiter.set_result(None)
        while (
            self._free > 0
            and self._starting
            and self.at_network + self._starting_work < self.network_limit
        ):
            waiter = self._starting.popleft()
            if not waiter.done():
                self._free -= 1
                self._starting_work += 1
                waiter.set_result(None)
