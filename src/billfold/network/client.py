"""`Iso8583Network`: the production payment network client (`CardNetwork` over ISO 8583/TCP).

- A small pool of TCP connections (`pool_size`), opened on first use and re-opened after a
  failure. Each carries any number of messages in flight: a reader task matches every answer to
  its request by STAN (field 11) and RRN (field 37), so one slow answer never blocks the others.
- Every request has a timeout. A purchase or authorization that was sent but not answered may
  have been approved, so the client queues a 0420 reversal advice for it before raising
  `NetworkTimeout`; advices (0420, 0220, 0120) are repeated (0421…) with backoff until the
  network acknowledges them, in order per original transaction.
- A circuit breaker: `breaker_failures` consecutive failures (timeouts, lost or refused
  connections; a decline is an answer, not a failure) open it; while open nothing is sent and
  calls fail at once; after `breaker_reset` seconds one 0800 echo probes the network (half-open)
  and closes it again on an answer.
- Stand-in when the network is down (open breaker, no connection): an authorization of at most
  `stand_in_floor_limit` minor units, with at most that much stand-in per token per outage, is
  approved by billfold (`stand_in=True`, auth code `S…`) and reported later in a 0120 advice;
  anything else is declined 91. Other requests raise `NetworkUnavailable`.

Advices waiting for the network live in this process's memory: `aclose()` tries to deliver them
first, and a crash loses them. So the caller may name an authorization's RRN (`rrn=`, from
`new_rrn()`) and store it before asking: the transactions worker then reverses by that RRN an
authorization or increment a crash left unanswered (see docs/architecture.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools
import secrets
import string
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Literal

from billfold.network import wire
from billfold.network.models import (
    AccountVerification,
    Authorization,
    Charge,
    Merchant,
    NetworkCard,
    NetworkTimeout,
    NetworkUnavailable,
    TokenisedCard,
)
from billfold.platform.observability import get_logger

log = get_logger("billfold.network")


@dataclass(frozen=True)
class NetworkClientConfig:
    host: str = "127.0.0.1"
    port: int = 8583
    pool_size: int = 2
    timeout: float = 5.0  # seconds per request
    connect_timeout: float = 2.0
    breaker_failures: int = 5
    breaker_reset: float = 10.0
    stand_in_floor_limit: int = 0  # minor units; 0 = never approve in stand-in
    advice_retry_initial: float = 0.2
    advice_retry_max: float = 30.0
    acquirer_id: str = "489537"  # field 32
    terminal_id: str = "BILLFOLD"  # field 41

    @classmethod
    def parse_address(cls, address: str) -> tuple[str, int]:
        host, _, port = address.rpartition(":")
        if not host or not port.isdigit():
            raise ValueError("the network address is host:port")
        return host.strip("[]"), int(port)


# Loop passes a timed-out request waits for the reader to match an answer already received:
# a poll of the socket, the reader's step, the hand-over to the waiting request (and spare).
_READ_PASSES = 8


class _NoAnswer(Exception):
    """Sent, but no answer came (timeout or the connection dropped after sending)."""


class _NotSent(Exception):
    """Nothing was sent: the breaker is open or no connection could be made."""


BreakerState = Literal["closed", "open", "half_open"]


class CircuitBreaker:
    """closed → (N consecutive failures) → open → (reset time) → half_open: one probe; an
    answer closes it, a failure opens it again for another reset period."""

    def __init__(self, failures: int, reset: float) -> None:
        self.threshold = failures
        self.reset = reset
        self.state: BreakerState = "closed"
        self.failures = 0
        self.opened_at = 0.0
        self._probe: asyncio.Task[bool] | None = None

    def success(self) -> None:
        self.failures = 0
        self.state = "closed"

    def failure(self) -> None:
        self.failures += 1
        if self.state == "half_open" or self.failures >= self.threshold:
            if self.state != "open":
                log.warning("payment network circuit opened", failures=self.failures)
            self.state = "open"
            self.opened_at = time.monotonic()

    async def admit(self, probe: object) -> None:
        """Return if a request may go out; raise `_NotSent` otherwise."""
        if self.state == "closed":
            return
        if time.monotonic() - self.opened_at < self.reset:
            raise _NotSent("circuit open")
        if self._probe is None or self._probe.done():
            self.state = "half_open"
            assert callable(probe)
            self._probe = asyncio.ensure_future(probe())
        ok = await asyncio.shield(self._probe)
        if not ok:
            raise _NotSent("circuit open")


class _Connection:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.pending: dict[tuple[str, str], asyncio.Future[wire.Message]] = {}
        self.task = asyncio.create_task(self._read(), name="billfold-network-reader")

    @property
    def alive(self) -> bool:
        return not self.task.done() and not self.writer.is_closing()

    async def _read(self) -> None:
        try:
            while True:
                body = await wire.read_frame(self.reader)
                try:
                    message = wire.decode(body)
                except wire.WireError as exc:
                    log.warning("payment network sent a malformed message", error=str(exc))
                    continue
                future = self.pending.pop((message.get("11", ""), message.get("37", "")), None)
                if future is not None and not future.done():
                    future.set_result(message)
                # else: the answer to a request that already timed out (its reversal is queued)
        except (asyncio.IncompleteReadError, ConnectionError, OSError, wire.WireError):
            pass
        finally:
            self.writer.close()
            for future in self.pending.values():
                if not future.done():
                    future.set_exception(_NoAnswer("connection lost"))
            self.pending.clear()

    async def close(self) -> None:
        self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await self.task


class Iso8583Network:
    """`CardNetwork` over billfold's ISO 8583 dialect (`billfold.network.wire`)."""

    def __init__(self, config: NetworkClientConfig) -> None:
        self.config = config
        self.breaker = CircuitBreaker(config.breaker_failures, config.breaker_reset)
        self._slots: list[_Connection | None] = [None] * max(1, config.pool_size)
        self._connecting: list[asyncio.Lock] = [asyncio.Lock() for _ in self._slots]
        self._turn = itertools.count()
        self._stan = itertools.count(secrets.randbelow(999_999))
        self._advices: set[asyncio.Task[None]] = set()
        self._chains: dict[str, asyncio.Task[None]] = {}
        self._stand_in_used: dict[str, int] = {}
        self._closed = False

    # --- CardNetwork --------------------------------------------------------------------------

    async def verify_account(self, card: NetworkCard, cvv: str) -> AccountVerification:
        message = self._base("0100", wire.PURCHASE, 0, "USD")
        message |= {
            "2": card.pan,
            "14": wire.expiry(card.expiry_month, card.expiry_year),
            "22": wire.ENTRY_KEYED,
            "48": wire.encode_private({"92": cvv}),
        }
        answer = await self._request(message, reverse_on_timeout=False)
        private = wire.decode_private(answer.get("48", ""))
        return AccountVerification(answer.get("39", "96"), message["37"], private.get("CR", "P"))

    async def charge(
        self, card: NetworkCard, *, amount: int, currency: str, reference: str
    ) -> Charge:
        message = self._base("0200", wire.PURCHASE, amount, currency)
        message |= {
            "2": card.pan,
            "14": wire.expiry(card.expiry_month, card.expiry_year),
            "22": wire.ENTRY_STORED,
            "48": wire.encode_private({"TX": reference[:99]}),
        }
        answer = await self._request(message, reverse_on_timeout=True)
        code = answer.get("39", "96")
        return Charge(code, message["37"], answer.get("38") if code == "00" else None)

    async def authorize(
        self,
        card: TokenisedCard,
        *,
        amount: int,
        currency: str,
        merchant: Merchant,
        channel: str,
        transaction_id: str,
        rrn: str | None = None,
    ) -> Authorization:
        message = self._tokenised("0100", card, amount, currency, merchant, channel, rrn)
        message["48"] = self._private(card, merchant, channel, TX=transaction_id)
        try:
            answer = await self._request(message, reverse_on_timeout=True, stand_in=True)
        except _NotSent:
            return self._stand_in(message, card, amount, currency)
        return self._authorization(message, answer, amount, currency)

    async def increment(
        self,
        original: Authorization,
        card: TokenisedCard,
        *,
        amount: int,
        merchant: Merchant,
        transaction_id: str,
        channel: str = "ecommerce",
        rrn: str | None = None,
    ) -> Authorization:
        message = self._tokenised("0100", card, amount, original.currency, merchant, channel, rrn)
        message["48"] = self._private(
            card, merchant, channel, TX=transaction_id, IN="1", OR=original.rrn
        )
        answer = await self._request(message, reverse_on_timeout=True)
        return self._authorization(message, answer, amount, original.currency)

    async def reverse(self, original: Authorization, *, amount: int, reason: str) -> None:
        message = self._base("0420", wire.PURCHASE, amount, original.currency)
        message["48"] = wire.encode_private({"OR": original.rrn, "RR": reason[:60]})
        message["90"] = self._original_data("0100", original.stan)
        await self._advise(message, original.rrn, wait=True)

    async def complete(self, original: Authorization, *, amount: int, final: bool) -> None:
        message = self._base("0220", wire.PURCHASE, amount, original.currency)
        message["48"] = wire.encode_private({"OR": original.rrn, "FN": "1" if final else "0"})
        message["90"] = self._original_data("0100", original.stan)
        await self._advise(message, original.rrn, wait=True)

    async def refund(
        self,
        original: Authorization,
        card: TokenisedCard | None,
        *,
        amount: int,
        refund_id: str,
    ) -> Authorization:
        """A timeout raises `NetworkTimeout` without a reversal: the issuer applies a refund id
        once, so asking again with the same `refund_id` is the way to learn the answer."""
        message = self._base("0200", wire.REFUND, amount, original.currency)
        if card is not None:
            message["2"] = card.dpan
            message["14"] = wire.expiry(card.expiry_month, card.expiry_year)
        message["48"] = wire.encode_private({"OR": original.rrn, "RF": refund_id[:99]})
        message["90"] = self._original_data("0100", original.stan)
        answer = await self._request(message, reverse_on_timeout=False)
        return self._authorization(message, answer, amount, original.currency)

    # --- operations ---------------------------------------------------------------------------

    async def echo(self) -> bool:
        """0800/0810 network management echo, bypassing the breaker (its half-open probe)."""
        message = {
            "t": "0800",
            "7": wire.transmission_time()["7"],
            "37": new_rrn(),
            "70": wire.ECHO,
        }
        try:
            answer = await self._exchange(message)
        except (_NoAnswer, _NotSent):
            return False
        return answer.get("39") == "00"

    @property
    def pending_advices(self) -> int:
        return sum(1 for t in self._advices if not t.done())

    async def flush(self, wait_seconds: float = 5.0) -> bool:
        """Wait until every queued advice was acknowledged (True) or `wait_seconds` pass."""
        tasks = [t for t in self._advices if not t.done()]
        if not tasks:
            return True
        _, pending = await asyncio.wait(tasks, timeout=wait_seconds)
        return not pending

    async def aclose(self) -> None:
        if not await self.flush(2.0):
            log.error(
                "payment network advices not delivered at shutdown", count=self.pending_advices
            )
        self._closed = True
        for task in list(self._advices):
            task.cancel()
        for i, conn in enumerate(self._slots):
            if conn is not None:
                await conn.close()
                self._slots[i] = None

    # --- messages -----------------------------------------------------------------------------

    def _base(
        self, mti: str, processing: str, amount: int, currency: str, rrn: str | None = None
    ) -> wire.Message:
        return {
            "t": mti,
            "3": processing,
            "4": wire.n12(amount),
            **wire.transmission_time(),
            "32": self.config.acquirer_id,
            "37": rrn or new_rrn(),
            "41": self.config.terminal_id,
            "49": wire.currency_numeric(currency),
        }

    def _tokenised(
        self,
        mti: str,
        card: TokenisedCard,
        amount: int,
        currency: str,
        merchant: Merchant,
        channel: str,
        rrn: str | None = None,
    ) -> wire.Message:
        currency_code = wire.currency_numeric(currency)
        emv = wire.encode_tlv(
            {
                "9F26": bytes.fromhex(card.arqc),
                "9F36": card.atc.to_bytes(2, "big"),
                "9F10": bytes.fromhex(card.issuer_application_data),
                "9F37": bytes.fromhex(card.unpredictable_number),
                "9F02": bytes.fromhex(wire.n12(amount)),
                "9F03": bytes.fromhex(wire.n12(card.other_amount)),
                "5F2A": wire.bcd("0" + currency_code),
                "9A": bytes.fromhex(card.transaction_date.strftime("%y%m%d")),
                "9C": bytes.fromhex(card.transaction_type),
                "95": bytes.fromhex(card.tvr),
                "82": bytes.fromhex(card.aip),
                "9F1A": wire.bcd("0" + card.country_numeric),
            }
        )
        # Folded to printable ASCII before it is cut and padded, so the field keeps its 40
        # characters whatever the merchant's name is written in.
        name = wire.printable_ascii(merchant.name)
        city = wire.printable_ascii(merchant.city or "")
        location = f"{name[:25]:<25}{city[:13]:<13}{merchant.country[:2]:<2}"
        return self._base(mti, wire.PURCHASE, amount, currency, rrn) | {
            "2": card.dpan,
            "14": wire.expiry(card.expiry_month, card.expiry_year),
            "18": merchant.mcc,
            "22": wire.ENTRY_MODES.get(channel, wire.ENTRY_MODES["ecommerce"]),
            "42": f"{merchant.id[:15]:<15}",
            "43": location,
            "55": emv.hex().upper(),
        }

    @staticmethod
    def _private(card: TokenisedCard, merchant: Merchant, channel: str, **extra: str | None) -> str:
        return wire.encode_private(
            {
                "CH": channel,
                "DV": card.device_id,
                "MI": card.merchant_id,
                "CV": card.cryptogram_version,
                "DC": card.dynamic_cvv,
                **{k: (v[:99] if v else v) for k, v in extra.items()},
            }
        )

    def _original_data(self, mti: str, stan: str) -> str:
        # MTI, STAN, transmission time, acquirer, forwarder: 4 + 6 + 10 + 11 + 11.
        return f"{mti}{stan:0>6}{'0' * 10}{self.config.acquirer_id:0>11}{'0' * 11}"

    @staticmethod
    def _authorization(
        message: wire.Message, answer: wire.Message, amount: int, currency: str
    ) -> Authorization:
        code = answer.get("39", "96")
        return Authorization(
            response_code=code,
            auth_code=answer.get("38") if code == "00" else None,
            stan=message["11"],
            rrn=message["37"],
            amount=amount,
            currency=currency,
        )

    def _stand_in(
        self, message: wire.Message, card: TokenisedCard, amount: int, currency: str
    ) -> Authorization:
        message.setdefault("11", self._next_stan())
        key = hashlib.sha256(card.dpan.encode()).hexdigest()
        used = self._stand_in_used.get(key, 0)
        limit = self.config.stand_in_floor_limit
        if 0 < amount and used + amount <= limit:
            self._stand_in_used[key] = used + amount
            auth_code = "S" + "".join(secrets.choice(string.digits) for _ in range(5))
            advice = dict(message)
            advice["t"] = "0120"
            advice["38"] = auth_code
            advice["39"] = "00"
            log.warning("payment network down: stand-in approval", rrn=message["37"])
            self._spawn_advice(advice, message["37"])
            return Authorization(
                "00", auth_code, message["11"], message["37"], amount, currency, True
            )
        log.warning("payment network down: stand-in decline", rrn=message["37"])
        return Authorization("91", None, message["11"], message["37"], amount, currency, True)

    # --- sending ------------------------------------------------------------------------------

    async def _request(
        self, message: wire.Message, *, reverse_on_timeout: bool, stand_in: bool = False
    ) -> wire.Message:
        try:
            await self.breaker.admit(self.echo)
            return await self._exchange(message)
        except _NotSent:
            if stand_in:
                raise
            raise NetworkUnavailable("The payment network cannot be reached") from None
        except _NoAnswer:
            log.warning("payment network timeout", mti=message["t"], rrn=message["37"])
            if reverse_on_timeout:
                reversal = self._base("0420", wire.PURCHASE, int(message["4"]), "USD")
                reversal["49"] = message["49"]
                reversal["48"] = wire.encode_private({"OR": message["37"], "RR": "timeout"})
                reversal["90"] = self._original_data(message["t"], message["11"])
                self._spawn_advice(reversal, message["37"])
            raise NetworkTimeout(
                "The payment network did not answer in time; nothing was charged"
            ) from None

    async def _exchange(self, message: wire.Message) -> wire.Message:
        """Send one message and wait for its answer; `_NotSent` / `_NoAnswer` otherwise."""
        if self._closed:
            raise _NotSent("client closed")
        conn = await self._connection()
        stan = message.get("11") or self._next_stan()
        message["11"] = stan
        key = (stan, message["37"])
        while key in conn.pending:  # a STAN still in flight (after a wrap): take the next
            stan = message["11"] = self._next_stan()
            key = (stan, message["37"])
        frame = wire.encode(message)  # a WireError here is a bug of ours: nothing was sent
        future: asyncio.Future[wire.Message] = asyncio.get_running_loop().create_future()
        conn.pending[key] = future
        try:
            conn.writer.write(frame)
            await conn.writer.drain()
        except (ConnectionError, OSError):
            conn.pending.pop(key, None)
            self.breaker.failure()
            raise _NoAnswer("connection lost while sending") from None
        try:
            answer = await self._answer(future)
        except _NoAnswer:
            conn.pending.pop(key, None)
            self.breaker.failure()
            raise _NoAnswer("no answer") from None
        finally:
            conn.pending.pop(key, None)
        self.breaker.success()
        if self.breaker.failures == 0:
            self._stand_in_used.clear()
        return answer

    async def _answer(self, future: asyncio.Future[wire.Message]) -> wire.Message:
        """The answer to a message just sent, or `_NoAnswer` if the network has not answered
        within `timeout` of the send.

        The timer only says that the time is up; whether the answer came is decided after
        this process has read what its socket already holds. On a busy event loop the timer
        can fire while the answer waits unread (uvloop runs due timers before it polls the
        sockets, and the reader task needs a few loop passes to match an answer): that delay
        is ours, not the network's, and timing the payment out for it would reverse an
        approval the network gave in time."""
        try:
            return await asyncio.wait_for(asyncio.shield(future), self.config.timeout)
        except TimeoutError:
            pass
        for _ in range(_READ_PASSES):
            if future.done():
                break
            await asyncio.sleep(0)  # one loop pass: a socket poll, then the reader's step
        if not future.done():
            future.cancel()
            raise _NoAnswer("no answer")
        return future.result()  # or the reader's `_NoAnswer` (the connection dropped)

    async def _connection(self) -> _Connection:
        i = next(self._turn) % len(self._slots)
        conn = self._slots[i]
        if conn is not None and conn.alive:
            return conn
        async with self._connecting[i]:
            conn = self._slots[i]
            if conn is not None and conn.alive:
                return conn
            try:
                reader, writer = await asyncio.wait_for(
                    asyncio.open_connection(self.config.host, self.config.port),
                    self.config.connect_timeout,
                )
            except (OSError, TimeoutError):
                self.breaker.failure()
                raise _NotSent("cannot connect") from None
            conn = self._slots[i] = _Connection(reader, writer)
            return conn

    def _next_stan(self) -> str:
        return f"{next(self._stan) % 999_999 + 1:06d}"

    # --- advices ------------------------------------------------------------------------------

    async def _advise(self, message: wire.Message, original_rrn: str, *, wait: bool) -> None:
        """Queue an advice; with `wait`, return after its first attempt (acknowledged, or failed:
        at once while the breaker is open), or at once when it queues behind an earlier advice
        of the same original that is still being repeated. Repeats carry on in the
        background, so a capture or a void never waits out an outage."""
        previous = self._chains.get(original_rrn)
        behind = previous is not None and not previous.done()
        first: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._spawn_advice(message, original_rrn, first)
        if wait and not behind:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(asyncio.shield(first), self.config.timeout * 1.5)

    def _spawn_advice(
        self,
        message: wire.Message,
        original_rrn: str,
        first: asyncio.Future[None] | None = None,
    ) -> asyncio.Task[None]:
        previous = self._chains.get(original_rrn)
        task = asyncio.create_task(self._deliver(message, previous, first), name="billfold-advice")
        self._advices.add(task)
        self._chains[original_rrn] = task

        def done(t: asyncio.Task[None]) -> None:
            _settle(first)
            self._advices.discard(t)
            if self._chains.get(original_rrn) is t:
                del self._chains[original_rrn]

        task.add_done_callback(done)
        return task

    async def _deliver(
        self,
        message: wire.Message,
        previous: asyncio.Task[None] | None,
        first: asyncio.Future[None] | None = None,
    ) -> None:
        """Send an advice until acknowledged, after `previous` (the same original's earlier
        advice) is done; `first` is settled when the first attempt ends, whatever its fate."""
        if previous is not None:
            with contextlib.suppress(BaseException):
                await asyncio.shield(previous)
        delay = self.config.advice_retry_initial
        attempt = 0
        while not self._closed:
            try:
                if attempt:
                    # An advice repeated: 0421 instead of 0420 (0221, 0121), same RRN.
                    message["t"] = message["t"][:3] + "1"
                    message.pop("11", None)
                await self.breaker.admit(self.echo)
                answer = await self._exchange(message)
            except wire.WireError:
                log.error("payment network advice cannot be encoded", mti=message.get("t"))
                return
            except (_NotSent, _NoAnswer):
                attempt += 1
                _settle(first)
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.config.advice_retry_max)
                continue
            log.info(
                "payment network advice acknowledged",
                mti=message["t"],
                rrn=message["37"],
                code=answer.get("39"),
            )
            return


def _settle(future: asyncio.Future[None] | None) -> None:
    if future is not None and not future.done():
        future.set_result(None)


def new_rrn() -> str:
    """A retrieval reference number (field 37): YDDD (last digit of the year, day of the year)
    + 8 random hex digits. The network names an authorization by it in every advice that
    follows (a reversal, a completion)."""
    now = datetime.now(UTC)
    return f"{now.year % 10}{now.timetuple().tm_yday:03d}{secrets.token_hex(4).upper()}"
