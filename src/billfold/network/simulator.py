"""`NetworkSimulator`: a payment network and card issuer speaking billfold's ISO 8583 over TCP
(`billfold network`), so the production client (`Iso8583Network`) is what every test and the
demo exercise.

The issuer side maps a DPAN back to its token and funding card through a `TokenService` (the
vault, behind an adapter in `billfold.app`), has the vault verify the ARQC and dynamic CVV (which
also refuses a replayed ATC), then decides with:

1. the token: unknown or deleted → 14, suspended → 62, expired → 54;
2. the cryptogram: ARQC / dynamic CVV that do not verify, or a replayed ATC → 82;
3. the funding card: a PAN failing Luhn → 14, expired → 54, then the test-card rules below;
4. the amount rules (`SimulatorConfig.amount_rules`: an exact amount → a code, or
   `NO_ANSWER`: the issuer holds the money but the answer is lost, as in a real timeout);
5. the card's simulated balance (per card and currency, in memory: every card starts with
   `SimulatorConfig.card_balance`): more than is available → 51; otherwise 00 and a hold.

Test cards (last four digits of the funding PAN → verification code, authorization/charge
code), the well-known processor test numbers:

| PAN ending | verification | authorization / charge |
|---|---|---|
| `0002` | 05 | 05 |
| `9995` | 00 | 51 |
| `0069` | 54 | 54 |
| `9987` | 41 | 41 |
| `9979` | 43 | 43 |
| `0119` | 91 | 91 |

A verification with CVV `000` answers N7. Holds are released by reversals (0420/0421), turned
into postings by completions (0220), and refunds (0200, processing code 20) credit the card.
The state lives in memory: a restarted simulator has forgotten its holds (a demo and test tool,
never run in production: a real card ending in one of these digits would be declined).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import random
import secrets
import string
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from datetime import datetime

from billfold.network import wire
from billfold.network.models import CryptogramCheck, IssuerCard, TokenService
from billfold.platform.cards import luhn_valid
from billfold.platform.clock import utcnow
from billfold.platform.observability import get_logger

log = get_logger("billfold.network.simulator")

# Last four digits of the PAN → (verification response code, charge response code).
TEST_CARD_RULES: dict[str, tuple[str, str]] = {
    "0002": ("05", "05"),
    "9995": ("00", "51"),
    "0069": ("54", "54"),
    "9987": ("41", "41"),
    "9979": ("43", "43"),
    "0119": ("91", "91"),
}
CVV_MISMATCH = "000"
NO_ANSWER = "no-answer"
_TOMBSTONES = 100_000


@dataclass
class SimulatorConfig:
    """How the simulated network behaves; every knob is also a `billfold network` option."""

    latency_ms: float = 0.0
    jitter_ms: float = 0.0
    timeout_rate: float = 0.0  # share of requests processed but never answered
    card_balance: int = 1_000_000  # each card's open-to-buy per currency, minor units
    card_rules: dict[str, tuple[str, str]] = field(default_factory=lambda: dict(TEST_CARD_RULES))
    amount_rules: dict[int, str] = field(default_factory=dict)
    # How long a DPAN's active token and its card stay cached. Safe for much longer than a
    # payment: the cryptogram check still asks the vault every time (a suspended or deleted
    # token fails it, and the card is then asked for afresh), and a token cached as not active
    # is asked for again on its next use, so a resumed one works at once. It was 10 s: at 500
    # cards in use that was ~100 lookups and audited detokenisations a second, more vault work
    # than the payments' own cryptograms and verifications.
    card_cache_seconds: float = 300.0


@dataclass
class Seen:
    """One message the simulator received and what it answered (tests read these)."""

    mti: str
    stan: str
    rrn: str
    amount: int
    response_code: str | None
    original_rrn: str | None = None
    private: dict[str, str] = field(default_factory=dict)
    location: str = ""  # field 43: the card acceptor's name and location, as sent


@dataclass
class _Profile:
    """What the issuer keeps of a card between messages: never the PAN."""

    card: IssuerCard  # with pan=None
    last4: str
    luhn_ok: bool
    expires: float


@dataclass
class _Auth:
    card_key: str
    currency: str
    held: int
    captured: int = 0
    refunded: int = 0


@dataclass
class _Account:
    posted: int = 0  # spent (captured or charged) minus refunds
    held: int = 0


class NetworkSimulator:
    """The simulated network and issuer. `start()` listens; `stop()` closes everything."""

    def __init__(self, tokens: TokenService | None, config: SimulatorConfig | None = None) -> None:
        self.tokens = tokens
        self.config = config or SimulatorConfig()
        self.seen: deque[Seen] = deque(maxlen=50_000)
        self.malformed = 0
        self.paused = False  # True: receive everything, answer nothing, ever (a dead link)
        self._server: asyncio.Server | None = None
        self._connections: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._cards: dict[str, _Profile] = {}
        self._accounts: dict[tuple[str, str], _Account] = {}
        self._auths: dict[str, _Auth] = {}
        self._advices: OrderedDict[str, str] = OrderedDict()  # advice RRN → answer code
        self._refunds: dict[str, tuple[str, str]] = {}  # refund id → (code, auth code)
        self._reversed: OrderedDict[str, int] = OrderedDict()  # reversed before seen
        self._random = random.Random()

    # --- lifecycle --------------------------------------------------------------------------

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> tuple[str, int]:
        self._server = await asyncio.start_server(self._serve, host, port)
        sock = self._server.sockets[0].getsockname()
        log.info("network simulator listening", host=sock[0], port=sock[1])
        return str(sock[0]), int(sock[1])

    @property
    def address(self) -> str:
        assert self._server is not None
        host, port = self._server.sockets[0].getsockname()[:2]
        return f"{host}:{port}"

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for writer in list(self._connections):
            writer.close()
        for task in list(self._tasks):
            task.cancel()
        if self._server is not None:
            with contextlib.suppress(Exception):
                await self._server.wait_closed()
            self._server = None

    async def serve_forever(self) -> None:
        assert self._server is not None
        await self._server.serve_forever()

    # --- what tests look at -----------------------------------------------------------------

    def held(self, card_id: str, currency: str = "USD") -> int:
        """Money held on a card (authorized, neither captured nor reversed)."""
        account = self._accounts.get((card_id, currency))
        return account.held if account else 0

    def posted(self, card_id: str, currency: str = "USD") -> int:
        account = self._accounts.get((card_id, currency))
        return account.posted if account else 0

    def messages(self, mti: str | None = None) -> list[Seen]:
        return [s for s in self.seen if mti is None or s.mti == mti]

    @staticmethod
    def pan_key(pan: str) -> str:
        """The key `held`/`posted` know a card charged by its PAN under (a top-up's card)."""
        return "pan:" + hashlib.sha256(pan.encode()).hexdigest()[:24]

    def forget_cards(self) -> None:
        self._cards.clear()

    # --- the connection ---------------------------------------------------------------------

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._connections.add(writer)
        try:
            while True:
                try:
                    body = await wire.read_frame(reader)
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                except wire.WireError:
                    # The length itself is wrong: the stream cannot be re-synchronised.
                    self.malformed += 1
                    log.warning("network simulator dropped a connection with a bad frame")
                    return
                try:
                    message = wire.decode(body)
                except wire.WireError as exc:
                    self.malformed += 1
                    log.warning("network simulator ignored a malformed message", error=str(exc))
                    continue
                # A dead link loses what it received while dead: decided now, not when the
                # issuer's checks (vault calls) finish, or un-pausing would let messages
                # received while paused be answered late, as if the link had been slow.
                task = asyncio.create_task(self._answer(message, writer, lost=self.paused))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
        finally:
            self._connections.discard(writer)
            writer.close()

    async def _answer(
        self, message: wire.Message, writer: asyncio.StreamWriter, *, lost: bool = False
    ) -> None:
        received = time.monotonic()
        try:
            answer = await self._handle(message)
        except Exception:
            log.exception("network simulator failed on a message", mti=message.get("t"))
            answer = self._reply(message, "96")
        if answer is None or lost or self.paused:
            return
        if self._random.random() < self.config.timeout_rate:
            return
        delay = self.config.latency_ms + self._random.uniform(
            -self.config.jitter_ms, self.config.jitter_ms
        )
        # The latency is the network's whole answer time, the issuer's own checks (its vault
        # calls) included, as a real network's is: an issuer slowed by a busy machine answers
        # later than `latency_ms`, never `latency_ms` after its checks.
        delay -= (time.monotonic() - received) * 1000
        if delay > 0:
            await asyncio.sleep(delay / 1000)
        if writer.is_closing():
            return
        with contextlib.suppress(ConnectionError, wire.WireError):
            writer.write(wire.encode(answer))
            await writer.drain()

    # --- the issuer -------------------------------------------------------------------------

    async def _handle(self, m: wire.Message) -> wire.Message | None:
        mti = m.get("t", "")
        private = wire.decode_private(m.get("48", ""))
        amount = int(m.get("4", "0") or 0)
        seen = Seen(
            mti,
            m.get("11", ""),
            m.get("37", ""),
            amount,
            None,
            private.get("OR"),
            private,
            m.get("43", ""),
        )
        self.seen.append(seen)
        answer: wire.Message | None
        if mti == "0800":
            answer = self._reply(m, "00", extra={"70": m.get("70", wire.ECHO)})
        elif mti == "0100" and "55" in m:
            answer = await self._authorization(m, private, amount)
        elif mti == "0100":
            answer = self._verification(m, private)
        elif mti in ("0120", "0121"):
            answer = await self._stand_in_advice(m, private, amount)
        elif mti == "0200" and m.get("3") == wire.REFUND:
            answer = self._refund(m, private, amount)
        elif mti == "0200":
            answer = self._charge(m, amount)
        elif mti in ("0220", "0221"):
            answer = self._advice(m, lambda: self._complete(private, amount))
        elif mti in ("0420", "0421"):
            answer = self._advice(m, lambda: self._reverse(private, amount))
        else:
            answer = self._reply(m, "12")
        seen.response_code = answer.get("39") if answer else None
        return answer

    def _reply(
        self, m: wire.Message, code: str | None, extra: dict[str, str] | None = None
    ) -> wire.Message:
        out = {"t": wire.response_mti(m.get("t", "0800"))}
        for f in ("3", "4", "7", "11", "12", "13", "37", "41", "42", "49"):
            if f in m:
                out[f] = m[f]
        if code is not None:
            out["39"] = code
        out.update(extra or {})
        return out

    def _approved(self, m: wire.Message, extra: dict[str, str] | None = None) -> wire.Message:
        auth_code = "".join(
            secrets.choice(string.ascii_uppercase + string.digits) for _ in "123456"
        )
        return self._reply(m, "00", {"38": auth_code, **(extra or {})})

    async def _authorization(
        self, m: wire.Message, private: dict[str, str], amount: int
    ) -> wire.Message | None:
        rrn = m.get("37", "")
        currency = wire.currency_alpha(m.get("49", "840"))
        original = private.get("OR") if private.get("IN") == "1" else None
        if original is not None and original not in self._auths:
            return self._reply(m, "25")
        code, card = await self._token_checks(m, private)
        if code is not None or card is None:
            return self._reply(m, code or "14")
        key = card.card.card_id
        code = self._rules(amount)
        if code == NO_ANSWER:
            self._hold(rrn, key, currency, amount, original)
            return None
        if code is not None:
            return self._reply(m, code)
        if amount > self._available(key, currency):
            return self._reply(m, "51")
        self._hold(rrn, key, currency, amount, original)
        return self._approved(m)

    async def _token_checks(
        self, m: wire.Message, private: dict[str, str]
    ) -> tuple[str | None, _Profile | None]:
        dpan = m.get("2", "")
        profile = await self._card(dpan)
        for attempt in range(2):
            if profile is None:
                return "14", None
            code = self._token_code(profile)
            if code is not None:
                return code, profile
            if await self._verify(profile, m, private):
                return self._card_code(profile, authorization=True), profile
            if attempt == 0 and profile.expires > time.monotonic():
                # Maybe the cached token changed (suspended, deleted): ask again for the code.
                profile = await self._card(dpan, fresh=True)
                if profile is not None and self._token_code(profile) is None:
                    return "82", profile
        return "82", profile

    async def _verify(self, profile: _Profile, m: wire.Message, private: dict[str, str]) -> bool:
        if self.tokens is None:
            return False
        try:
            emv = wire.decode_tlv(bytes.fromhex(m.get("55", "")))
            check = CryptogramCheck(
                dpan=m.get("2", ""),
                atc=int.from_bytes(emv["9F36"], "big"),
                arqc=emv["9F26"].hex().upper(),
                issuer_application_data=emv["9F10"].hex().upper(),
                dynamic_cvv=private.get("DC", ""),
                cryptogram_version=private.get("CV", ""),
                aip=emv["82"].hex().upper(),
                amount=int(emv["9F02"].hex()),
                other_amount=int(emv["9F03"].hex()),
                currency_numeric=emv["5F2A"].hex()[-3:],
                country_numeric=emv["9F1A"].hex()[-3:],
                transaction_date=datetime.strptime(emv["9A"].hex(), "%y%m%d").date(),
                transaction_type=emv["9C"].hex(),
                unpredictable_number=emv["9F37"].hex().upper(),
                tvr=emv["95"].hex().upper(),
                channel=private.get("CH", "ecommerce"),  # type: ignore[arg-type]
                device_id=private.get("DV") or None,
                merchant_id=private.get("MI") or None,
            )
        except (KeyError, ValueError):
            return False
        if check.amount != int(m.get("4", "-1")):
            return False  # the cryptogram must cover the amount asked for
        return await self.tokens.verify_cryptogram(profile.card, check)

    async def _card(self, dpan: str, *, fresh: bool = False) -> _Profile | None:
        now = time.monotonic()
        cached = self._cards.get(dpan)
        if (
            cached is not None
            and not fresh
            and cached.expires > now
            and cached.card.token_status == "active"
        ):
            return cached
        if self.tokens is None:
            return None
        card = await self.tokens.card_for_dpan(dpan)
        if card is None:
            self._cards.pop(dpan, None)
            return None
        pan = card.pan or ""
        profile = _Profile(
            card=IssuerCard(
                card.token_id,
                card.token_reference_id,
                card.card_id,
                card.token_status,
                card.token_expiry_month,
                card.token_expiry_year,
                None,
                card.expiry_month,
                card.expiry_year,
            ),
            last4=pan[-4:],
            luhn_ok=_luhn_ok(pan) if pan else True,
            expires=now + self.config.card_cache_seconds,
        )
        del pan, card
        if len(self._cards) > 100_000:
            self._cards.clear()
        self._cards[dpan] = profile
        return profile

    def _token_code(self, profile: _Profile) -> str | None:
        card = profile.card
        if card.token_status == "deleted":
            return "14"
        if card.token_status != "active":
            return "62"
        if _expired(card.token_expiry_month, card.token_expiry_year):
            return "54"
        return None

    def _card_code(self, profile: _Profile, *, authorization: bool) -> str | None:
        if not profile.luhn_ok:
            return "14"
        if _expired(profile.card.expiry_month, profile.card.expiry_year):
            return "54"
        rule = self.config.card_rules.get(profile.last4)
        if rule is not None:
            code = rule[1] if authorization else rule[0]
            return None if code == "00" else code
        return None

    def _rules(self, amount: int) -> str | None:
        return self.config.amount_rules.get(amount)

    def _verification(self, m: wire.Message, private: dict[str, str]) -> wire.Message:
        pan = m.get("2", "")
        code, cvv_result = _pan_code(pan, m.get("14", "")), "P"
        rule = self.config.card_rules.get(pan[-4:])
        if code is None and rule is not None and rule[0] != "00":
            code = rule[0]
        if code is None:
            cvv = private.get("92")
            if cvv is not None:
                cvv_result = "N" if cvv == CVV_MISMATCH else "M"
            code = "N7" if cvv_result == "N" else "00"
        del pan
        return self._reply(m, code, {"48": wire.encode_private({"CR": cvv_result})})

    def _charge(self, m: wire.Message, amount: int) -> wire.Message | None:
        pan = m.get("2", "")
        key = self.pan_key(pan)
        currency = wire.currency_alpha(m.get("49", "840"))
        code = _pan_code(pan, m.get("14", ""))
        rule = self.config.card_rules.get(pan[-4:])
        del pan
        if code is None and rule is not None and rule[1] != "00":
            code = rule[1]
        if code is None:
            code = self._rules(amount)
        if code is not None and code != NO_ANSWER:
            return self._reply(m, code)
        if amount > self._available(key, currency):
            return self._reply(m, "51")
        self._account(key, currency).posted += amount
        # Recorded so that a 0420 (the client's timeout) can undo the purchase.
        rrn = m.get("37", "")
        self._auths[rrn] = _Auth(key, currency, 0, captured=amount)
        late = self._reversed.pop(rrn, 0)
        if late:
            self._reverse({"OR": rrn}, late)
        return None if code == NO_ANSWER else self._approved(m)

    def _refund(self, m: wire.Message, private: dict[str, str], amount: int) -> wire.Message:
        """Applied once per refund id: asking again (after a timeout) gets the same answer."""
        refund_id = private.get("RF") or m.get("37", "")
        done = self._refunds.get(refund_id)
        if done is not None:
            return self._reply(m, done[0], {"38": done[1]} if done[1] else None)
        auth = self._auths.get(private.get("OR", ""))
        if auth is None:
            return self._reply(m, "25")
        if auth.refunded + amount > auth.captured:
            return self._reply(m, "12")  # more back than was spent
        auth.refunded += amount
        self._account(auth.card_key, auth.currency).posted -= amount
        answer = self._approved(m)
        self._refunds[refund_id] = ("00", answer["38"])
        return answer

    async def _stand_in_advice(
        self, m: wire.Message, private: dict[str, str], amount: int
    ) -> wire.Message:
        """The client approved within its floor limit while we were unreachable: the issuer
        takes the hold as it is (stand-in is a promise the network keeps)."""
        rrn = m.get("37", "")
        if rrn in self._advices:
            return self._reply(m, self._advices[rrn])
        profile = await self._card(m.get("2", ""))
        if profile is not None:
            currency = wire.currency_alpha(m.get("49", "840"))
            self._hold(rrn, profile.card.card_id, currency, amount, None)
        self._remember(rrn, "00")
        return self._reply(m, "00")

    def _advice(self, m: wire.Message, apply: object) -> wire.Message:
        """Advices are applied once (by their own RRN) and always acknowledged: a repeat
        (0421) of one already applied changes nothing."""
        rrn = m.get("37", "")
        if rrn not in self._advices:
            assert callable(apply)
            apply()
            self._remember(rrn, "00")
        return self._reply(m, "00")

    def _remember(self, rrn: str, code: str) -> None:
        self._advices[rrn] = code
        while len(self._advices) > _TOMBSTONES:
            self._advices.popitem(last=False)

    def _complete(self, private: dict[str, str], amount: int) -> None:
        auth = self._auths.get(private.get("OR", ""))
        if auth is None:
            return
        taken = min(amount, auth.held)
        account = self._account(auth.card_key, auth.currency)
        auth.held -= taken
        account.held -= taken
        auth.captured += taken
        account.posted += taken
        if private.get("FN") == "1":
            account.held -= auth.held
            auth.held = 0

    def _reverse(self, private: dict[str, str], amount: int) -> None:
        original = private.get("OR", "")
        auth = self._auths.get(original)
        if auth is None:
            # Not seen yet (the request may still be on its way): release it when it comes.
            self._reversed[original] = self._reversed.get(original, 0) + amount
            while len(self._reversed) > _TOMBSTONES:
                self._reversed.popitem(last=False)
            return
        account = self._account(auth.card_key, auth.currency)
        if auth.held == 0 and auth.captured and not auth.refunded:
            # A reversed purchase (a top-up that timed out): give the money back.
            back = min(amount, auth.captured)
            auth.captured -= back
            account.posted -= back
            return
        released = min(amount, auth.held)
        auth.held -= released
        account.held -= released

    def _hold(self, rrn: str, key: str, currency: str, amount: int, original: str | None) -> None:
        account = self._account(key, currency)
        target = self._auths.get(original) if original else None
        if target is None:
            target = _Auth(key, currency, 0)
        # An increment's own RRN names the original's record too: a 0420 for the increment
        # (its timeout) releases from the same hold.
        self._auths[rrn] = target
        target.held += amount
        account.held += amount
        late = self._reversed.pop(rrn, 0)
        if late:
            released = min(late, target.held)
            target.held -= released
            account.held -= released

    def _account(self, key: str, currency: str) -> _Account:
        return self._accounts.setdefault((key, currency), _Account())

    def _available(self, key: str, currency: str) -> int:
        account = self._accounts.get((key, currency)) or _Account()
        return self.config.card_balance - account.posted - account.held


def _luhn_ok(pan: str) -> bool:
    return 12 <= len(pan) <= 19 and luhn_valid(pan)


def _expired(month: int, year: int) -> bool:
    today = utcnow()
    return (year, month) < (today.year, today.month)


def _pan_code(pan: str, expiry_yymm: str) -> str | None:
    """The answer a PAN in clear forces whatever is asked (None: no objection)."""
    if not _luhn_ok(pan):
        return "14"
    if len(expiry_yymm) == 4 and expiry_yymm.isdigit():
        if _expired(int(expiry_yymm[2:]), 2000 + int(expiry_yymm[:2])):
            return "54"
    return None
