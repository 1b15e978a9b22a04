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
from collections import deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from billfold.platform.errors import TooManyRequests


class Overloaded(TooManyRequests):
    code, title = "overloaded", "Too many payments in progress"


class AdmissionGate:
    """A counting gate with two queues (finishing before starting) and a bound on the
    starting queue. Made inside the event loop that uses it."""

    def __init__(self, limit: int, queue_limit: int, retry_after_seconds: int = 1) -> None:
        if limit <= 0 or queue_limit < 0:
            raise ValueError("the gate needs a positive limit and a non-negative queue limit")
        self.limit = limit
        self.queue_limit = queue_limit
        self.retry_after_seconds = retry_after_seconds
        self._free = limit
        self._finishing: deque[asyncio.Future[None]] = deque()
        self._starting: deque[asyncio.Future[None]] = deque()
        self.refused = 0  # payments answered 429 since the process started

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
        if self._free == 0 or self._finishing or self._starting:
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
            self._release()

    @asynccontextmanager
    async def finish(self) -> AsyncIterator[None]:
        """A payment's work after the network answered (tx2): ahead of every start."""
        await self._acquire(self._finishing)
        try:
            yield
        finally:
            self._release()

    async def _acquire(self, queue: deque[asyncio.Future[None]]) -> None:
        # Fair: a free slot goes to a newcomer only when nobody waits for it.
        if self._free > 0 and not self._finishing and not self._starting:
            self._free -= 1
            return
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        queue.append(waiter)
        try:
            await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self._release()  # handed a slot, then cancelled: pass it on
            else:
                with contextlib.suppress(ValueError):
                    queue.remove(waiter)
            raise

    def _release(self) -> None:
        for queue in (self._finishing, self._starting):
            while queue:
                waiter = queue.popleft()
                if not waiter.done():
                    waiter.set_result(None)  # the slot passes straight to the waiter
                    return
        self._free += 1
