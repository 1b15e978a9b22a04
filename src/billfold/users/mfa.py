"""Two-factor: TOTP enrolment and use, and step-up for sensitive actions.

Step-up is what other services ask for when fraud says "challenge": the caller proves
presence again with a TOTP code, a code sent by SMS or email, or a signature by the
session's device key, and gets a short-lived, single-use step-up token bound to its
session, a purpose and optionally a reference (the payment or transfer id). The service
then checks it with `verify_step_up`.
"""

from __future__ import annotations

import hmac
import json
import secrets
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import pyotp

from billfold.gateway import Principal
from billfold.platform.clock import utcnow
from billfold.platform.db import UnitOfWork
from billfold.platform.errors import (
    Conflict,
    Forbidden,
    NotFound,
    ProblemError,
    TooManyRequests,
    Unprocessable,
)
from billfold.platform.ids import is_opaque_token, new_id
from billfold.users import auth, events
from billfold.users.models import (
    StartStepUp,
    StepUpChallenge,
    StepUpToken,
    TotpEnrolment,
    TwoFactorStatus,
    VerifyStepUp,
    mask_email,
    mask_phone,
)
from billfold.users.runtime import UsersRuntime
from billfold.users.store import accounts as accounts_store
from billfold.users.store import mfa as store
from billfold.users.store import sessions as sessions_store

TOTP_ISSUER = "billfold"
TOTP_VALID_WINDOW = 1  # one 30-second step either side, for clock drift
TOTP_MAX_FAILURES = 5
TOTP_FAILURE_WINDOW_SECONDS = 15 * 60
TOTP_LOCKOUT_SECONDS = 15 * 60

STEP_UP_TOKEN_TTL_SECONDS = 300
STEP_UP_CODE_TTL_SECONDS = 300
STEP_UP_MAX_ATTEMPTS = 5
STEP_UP_CODES_PER_WINDOW = 5  # SMS/email codes a user may request per window
STEP_UP_CODE_WINDOW_SECONDS = 15 * 60
STEP_UP_METHODS = ("totp", "sms", "email", "device_signature")
_AMR = {"totp": ["otp"], "sms": ["sms"], "email": ["email"], "device_signature": ["hwk"]}
_CLOCK_SKEW = 30


# --- TOTP ----------------------------------------------------------------------------------------


def _open_secret(rt: UsersRuntime, user_id: str, sealed: bytes) -> str:
    return rt.sealed.open(bytes(sealed), aad=user_id.encode()).decode()


def _failures_key(rt: UsersRuntime, user_id: str) -> str:
    return rt.key("totp-failures", user_id)


async def _check_not_locked(rt: UsersRuntime, user_id: str) -> None:
    ttl = await rt.redis.ttl(_failures_key(rt, user_id) + ":locked")
    if ttl and ttl > 0:
        raise TooManyRequests(
            "Too many wrong codes; try again later",
            code="too_many_attempts",
            headers={"Retry-After": str(ttl)},
        )


def invalid_code(attempts_left: int, then: str | None = None) -> ProblemError:
    """422 `invalid_code` for a wrong one-time code, with `attempts_left`; once none are left
    the detail says what to do instead (`then`)."""
    return ProblemError(
        "The code is not correct" + (f"; {then}" if then and not attempts_left else ""),
        status=422,
        code="invalid_code",
        extra={"attempts_left": attempts_left},
    )


async def _count_failure(rt: UsersRuntime, user_id: str) -> ProblemError:
    """Kept in Redis, so a failure counts although the request's transaction rolls back."""
    key = _failures_key(rt, user_id)
    async with rt.redis.pipeline(transaction=True) as pipe:
        pipe.incr(key)
        pipe.expire(key, TOTP_FAILURE_WINDOW_SECONDS)
        failures, _ = await pipe.execute()
    left = TOTP_MAX_FAILURES - int(failures)
    if left <= 0:
        await rt.redis.set(key + ":locked", "1", ex=TOTP_LOCKOUT_SECONDS)
        await rt.redis.delete(key)
        return TooManyRequests(
            "Too many wrong codes; try again later",
            code="too_many_attempts",
            headers={"Retry-After": str(TOTP_LOCKOUT_SECONDS)},
        )
    return invalid_code(left)


def _matching_step(secret: str, code: str, last_used_step: int | None) -> tuple[int | None, bool]:
    """The time step `code` belongs to (within the window) and whether it was already used."""
    totp = pyotp.TOTP(secret)
    now_step = int(utcnow().timestamp()) // totp.interval
    replayed = False
    for step in range(now_step - TOTP_VALID_WINDOW, now_step + TOTP_VALID_WINDOW + 1):
        if hmac.compare_digest(totp.generate_otp(step), code):
            if last_used_step is not None and step <= last_used_step:
                replayed = True
                continue
            return step, False
    return None, replayed


async def _use_code(
    uow: UnitOfWork, rt: UsersRuntime, user_id: str, code: str, *, confirmed: bool
) -> int:
    """Check a TOTP code against the user's (confirmed or pending) factor and spend its step."""
    conn = await uow.connection()
    row = await store.get_totp(conn, user_id, for_update=True)  # one use of a code at a time
    # Only under the row lock: checked before it, concurrent guesses all passed the check.
    await _check_not_locked(rt, user_id)
    if row is None or (row.confirmed_at is not None) != confirmed:
        if confirmed:
            raise Conflict(
                "Two-factor authentication with an authenticator app is not enabled",
                code="totp_not_enabled",
            )
        if row is None:
            raise Conflict(
                "No authenticator app enrolment is in progress; start one first",
                code="totp_enrolment_not_started",
            )
        raise Conflict("Two-factor authentication is already enabled", code="totp_already_enabled")
    step, replayed = _matching_step(_open_secret(rt, user_id, row.secret), code, row.last_used_step)
    if step is None:
        if replayed:
            raise ProblemError(
                "This code was already used; wait for the next one",
                status=422,
                code="code_already_used",
            )
        raise await _count_failure(rt, user_id)
    await rt.redis.delete(_failures_key(rt, user_id))
    if confirmed:
        await store.record_totp_step(conn, user_id, step)
    return step


async def two_factor_status(uow: UnitOfWork, user_id: str) -> TwoFactorStatus:
    row = await store.get_totp(await uow.connection(), user_id)
    return TwoFactorStatus(
        totp_enabled=row is not None and row.confirmed_at is not None,
        totp_pending=row is not None and row.confirmed_at is None,
        confirmed_at=row.confirmed_at if row is not None else None,
    )


async def start_totp_enrolment(uow: UnitOfWork, rt: UsersRuntime, user_id: str) -> TotpEnrolment:
    """A new seed, sealed at rest; shown this once. Starting again replaces a pending seed."""
    conn = await uow.connection()
    user = await accounts_store.get_user(conn, user_id, for_update=True)
    if user is None:
        raise NotFound("No such user")
    secret = pyotp.random_base32()
    sealed = rt.sealed.seal(secret.encode(), aad=user_id.encode())
    if not await store.put_pending_totp(conn, user_id, sealed, utcnow()):
        raise Conflict(
            "Two-factor authentication is already enabled; disable it first",
            code="totp_already_enabled",
        )
    totp = pyotp.TOTP(secret)
    return TotpEnrolment(
        secret=secret,
        provisioning_uri=totp.provisioning_uri(name=user.email, issuer_name=TOTP_ISSUER),
        issuer=TOTP_ISSUER,
        digits=totp.digits,
        period=totp.interval,
    )


async def confirm_totp(
    uow: UnitOfWork, rt: UsersRuntime, user_id: str, code: str
) -> TwoFactorStatus:
    step = await _use_code(uow, rt, user_id, code, confirmed=False)
    conn = await uow.connection()
    await store.confirm_totp(conn, user_id, step, utcnow())
    await events.publish(conn, events.TWO_FACTOR_ENABLED, user_id, {"method": "totp"})
    return await two_factor_status(uow, user_id)


async def disable_totp(uow: UnitOfWork, rt: UsersRuntime, user_id: str, code: str | None) -> None:
    """Needs a current code; a pending (unconfirmed) enrolment is simply dropped."""
    conn = await uow.connection()
    row = await store.get_totp(conn, user_id, for_update=True)
    if row is None:
        raise NotFound("Two-factor authentication is not enabled")
    if row.confirmed_at is None:
        await store.delete_totp(conn, user_id)
        return
    if code is None:
        raise Unprocessable(
            "Send a current code from the authenticator app to turn two-factor off",
            code="code_required",
        )
    await _use_code(uow, rt, user_id, code, confirmed=True)
    await store.delete_totp(conn, user_id)
    await events.publish(conn, events.TWO_FACTOR_DISABLED, user_id, {"method": "totp"})


# --- step-up -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StepUpClaims:
    """A verified step-up: who, in which session, for what, and how they proved it."""

    user_id: str
    session_id: str
    purpose: str
    reference: str | None
    method: str
    amr: tuple[str, ...]
    jti: str
    expires_at: datetime


def step_up_required(
    purpose: str,
    reference: str | None = None,
    detail: str | None = None,
    *,
    code: str = "step_up_required",
) -> ProblemError:
    """The 403 a service answers when an action needs step-up first (e.g. fraud said challenge):
    its `step_up` member tells the client how to start one for this purpose and reference."""
    return Forbidden(
        detail or "This action needs you to confirm it is you (step-up)",
        code=code,
        extra={
            "step_up": {
                "purpose": purpose,
                "reference": reference,
                "methods": list(STEP_UP_METHODS),
                "challenge_url": "/v1/auth/step-up/challenges",
            }
        },
    )


def _invalid_step_up(purpose: str, reference: str | None, detail: str) -> ProblemError:
    return step_up_required(purpose, reference, detail, code="invalid_step_up_token")


async def verify_step_up(
    rt: UsersRuntime,
    token: str,
    principal: Principal,
    purpose: str,
    reference: str | None = None,
    *,
    consume: bool = True,
) -> StepUpClaims:
    """Check a step-up token for this caller's session, `purpose` and `reference` (which must
    equal the token's, None included). Spends it: a second use fails. Raises a 403
    `invalid_step_up_token` problem (with a `step_up` hint for the client) otherwise."""
    try:
        claims = await rt.tokens.keyring.decode(token)
    except ProblemError:
        raise _invalid_step_up(
            purpose, reference, "The step-up token is invalid or expired"
        ) from None
    if (
        claims.get("token_use") != "step_up"
        or claims.get("sub") != principal.user_id
        or claims.get("sid") != principal.session_id
    ):
        raise _invalid_step_up(purpose, reference, "The step-up token is not for this session")
    if claims.get("purpose") != purpose or claims.get("reference") != reference:
        raise _invalid_step_up(
            purpose, reference, "The step-up token was issued for a different action"
        )
    exp = int(claims["exp"])
    jti = str(claims["jti"])
    if consume:
        ttl = max(1, exp - int(time.time()) + _CLOCK_SKEW)
        first = await rt.redis.set(rt.key("step-up-used", jti), "1", nx=True, ex=ttl)
        if not first:
            raise _invalid_step_up(purpose, reference, "The step-up token was already used")
    return StepUpClaims(
        user_id=str(claims["sub"]),
        session_id=str(claims["sid"]),
        purpose=purpose,
        reference=reference,
        method=str(claims.get("mth", "")),
        amr=tuple(str(a) for a in claims.get("amr") or ()),
        jti=jti,
        expires_at=datetime.fromtimestamp(exp, UTC),
    )


def _challenge_key(rt: UsersRuntime, challenge_id: str) -> str:
    return rt.key("step-up", challenge_id)


def _code_hash(rt: UsersRuntime, challenge_id: str, code: str) -> str:
    return rt.keyed_hash("step-up", f"{challenge_id}:{code}").hex()


def _no_device_key() -> Conflict:
    return Conflict(
        "This session is not bound to a device with an enrolled device key",
        code="device_key_required",
    )


async def _limit_codes(rt: UsersRuntime, user_id: str) -> None:
    key = rt.key("step-up-codes", user_id)
    async with rt.redis.pipeline(transaction=True) as pipe:
        pipe.incr(key)
        pipe.expire(key, STEP_UP_CODE_WINDOW_SECONDS, nx=True)
        pipe.ttl(key)
        count, _, ttl = await pipe.execute()
    if int(count) > STEP_UP_CODES_PER_WINDOW:
        raise TooManyRequests(
            "Too many codes requested; try again later or use another method",
            code="too_many_codes",
            headers={"Retry-After": str(max(1, int(ttl)))},
        )


async def start_step_up(
    uow: UnitOfWork, rt: UsersRuntime, principal: Principal, request: StartStepUp
) -> StepUpChallenge:
    conn = await uow.connection()
    user = await accounts_store.get_user(conn, principal.user_id)
    if user is None or user.status != "active":
        raise Forbidden(
            "This account cannot confirm actions; contact support", code="user_inactive"
        )
    challenge_id = secrets.token_urlsafe(16)
    record: dict[str, Any] = {
        "user_id": user.id,
        "session_id": principal.session_id,
        "method": request.method,
        "purpose": request.purpose,
        "reference": request.reference,
    }
    ttl = STEP_UP_CODE_TTL_SECONDS
    target = signing_input = None
    if request.method == "totp":
        row = await store.get_totp(conn, user.id)
        if row is None or row.confirmed_at is None:
            raise Conflict(
                "Two-factor authentication with an authenticator app is not enabled",
                code="totp_not_enabled",
            )
    elif request.method in ("sms", "email"):
        sms = request.method == "sms"
        verified = user.phone_verified_at if sms else user.email_verified_at
        if verified is None:
            # A code to an unconfirmed (possibly just changed) contact proves nothing.
            raise Conflict(
                f"Verify your {'phone number' if sms else 'email address'} first",
                code="contact_not_verified",
            )
        await _limit_codes(rt, user.id)
        code = f"{secrets.randbelow(1_000_000):06d}"
        record["code_hash"] = _code_hash(rt, challenge_id, code)
        address = user.phone if sms else user.email
        target = mask_phone(address) if sms else mask_email(address)
        # The notification service delivers the code; the event is its only carrier.
        await events.publish_code(
            conn,
            rt.codes,
            events.STEP_UP_CODE_REQUESTED,
            user.id,
            {
                "challenge_id": challenge_id,
                "channel": request.method,
                "target": address,
                "purpose": request.purpose,
                "reference": request.reference,
                "locale": user.locale,
                "expires_in": ttl,
            },
            code,
        )
    else:  # device_signature
        device = (
            await sessions_store.get_device(conn, user.id, principal.device_id)
            if principal.device_id
            else None
        )
        if device is None or not device.public_key:
            raise _no_device_key()
        dc = await auth.create_device_challenge(rt, device.id, purpose="step_up")
        record["device_id"] = device.id
        record["device_challenge_id"] = dc["challenge_id"]
        signing_input = dc["signing_input"]
        ttl = auth.CHALLENGE_TTL_SECONDS
    await rt.redis.set(_challenge_key(rt, challenge_id), json.dumps(record), ex=ttl)
    return StepUpChallenge(
        id=challenge_id,
        method=request.method,
        purpose=request.purpose,
        reference=request.reference,
        expires_at=utcnow() + timedelta(seconds=ttl),
        target=target,
        signing_input=signing_input,
    )


def _answer_mismatch(method: str) -> Unprocessable:
    wanted = "signature" if method == "device_signature" else "code"
    return Unprocessable(
        f"A {method} step-up is answered with `{wanted}` only", code="validation_failed"
    )


async def verify_step_up_challenge(
    uow: UnitOfWork,
    rt: UsersRuntime,
    principal: Principal,
    challenge_id: str,
    answer: VerifyStepUp,
) -> StepUpToken:
    if not is_opaque_token(challenge_id):
        raise NotFound("No such step-up challenge (it may have expired or been used)")
    key = _challenge_key(rt, challenge_id)
    raw = await rt.redis.get(key)
    record = json.loads(raw) if raw is not None else None
    if (
        record is None
        or record["user_id"] != principal.user_id
        or record["session_id"] != principal.session_id
    ):
        raise NotFound("No such step-up challenge (it may have expired or been used)")
    method = record["method"]
    if method == "device_signature":
        if answer.signature is None or answer.code is not None:
            raise _answer_mismatch(method)
        await _verify_device_answer(uow, rt, principal, key, record, answer.signature)
    else:
        if answer.code is None or answer.signature is not None:
            raise _answer_mismatch(method)
        if method == "totp":
            await _use_code(uow, rt, principal.user_id, answer.code, confirmed=True)
        else:
            await _verify_sent_code(rt, key, challenge_id, record, answer.code)
        if not await rt.redis.delete(key):  # a concurrent verification won
            raise NotFound("No such step-up challenge (it may have expired or been used)")
    return await _issue_step_up_token(rt, principal, method, record)


async def _verify_sent_code(
    rt: UsersRuntime, key: str, challenge_id: str, record: dict[str, Any], code: str
) -> None:
    # Count before comparing, so concurrent guesses cannot outnumber the attempts; the counter
    # outlives the challenge, so requests that read the challenge before it was dropped fail too.
    attempts_key = key + ":attempts"
    async with rt.redis.pipeline(transaction=True) as pipe:
        pipe.incr(attempts_key)
        pipe.expire(attempts_key, STEP_UP_CODE_TTL_SECONDS)
        attempts, _ = await pipe.execute()
    if int(attempts) <= STEP_UP_MAX_ATTEMPTS and hmac.compare_digest(
        record["code_hash"], _code_hash(rt, challenge_id, code)
    ):
        return
    left = max(0, STEP_UP_MAX_ATTEMPTS - int(attempts))
    if left == 0:
        await rt.redis.delete(key)
    raise invalid_code(left, then="start a new step-up")


async def _verify_device_answer(
    uow: UnitOfWork,
    rt: UsersRuntime,
    principal: Principal,
    key: str,
    record: dict[str, Any],
    signature: str,
) -> None:
    """One try: the device challenge (taken atomically, so only one caller gets it) is spent
    whatever the outcome, and the step-up challenge with it."""
    device_id = record["device_id"]
    await rt.redis.delete(key)
    try:
        nonce = await auth.consume_device_challenge(
            rt, record["device_challenge_id"], device_id, "step_up"
        )
    except ProblemError:
        raise NotFound("No such step-up challenge (it may have expired or been used)") from None
    conn = await uow.connection()
    device = await sessions_store.get_device(conn, principal.user_id, device_id)
    if device is None or not device.public_key:
        raise _no_device_key()
    raw = auth.b64url_decode(signature)
    message = auth.login_message(record["device_challenge_id"], nonce)
    if raw is None or not auth.verify_device_signature(device.public_key, message, raw):
        raise ProblemError(
            "The device signature does not verify; start a new step-up",
            status=422,
            code="invalid_signature",
        )


async def _issue_step_up_token(
    rt: UsersRuntime, principal: Principal, method: str, record: dict[str, Any]
) -> StepUpToken:
    now = int(time.time())
    amr = _AMR[method]
    claims: dict[str, Any] = {
        "iss": rt.settings.jwt_issuer,
        "aud": rt.settings.jwt_audience,
        "sub": principal.user_id,
        "sid": principal.session_id,
        "token_use": "step_up",
        "purpose": record["purpose"],
        "reference": record["reference"],
        "mth": method,
        "amr": amr,
        "iat": now,
        "nbf": now,
        "exp": now + STEP_UP_TOKEN_TTL_SECONDS,
        "jti": new_id("evt").removeprefix("evt_"),
    }
    if principal.device_id:
        claims["did"] = principal.device_id
    token = await rt.tokens.keyring.sign(claims)
    return StepUpToken(step_up_token=token, expires_in=STEP_UP_TOKEN_TTL_SECONDS, amr=amr)


# --- second factor at sign-in, and recent authentication for sensitive changes -------------------

SENSITIVE_CHANGE = "sensitive_change"


async def mfa_otp_grant(
    uow: UnitOfWork, rt: UsersRuntime, *, mfa_token: str, otp: str, client: auth.ClientContext
) -> auth.TokenGrant:
    """Second step of a password sign-in for an account with TOTP on (after `mfa_required`)."""
    pending = await auth.take_mfa_pending(rt, mfa_token)
    await _use_code(uow, rt, pending["user_id"], otp, confirmed=True)
    return await auth.finish_mfa_sign_in(
        uow, rt, mfa_token=mfa_token, pending=pending, client=client
    )


async def require_recent_auth(
    rt: UsersRuntime, principal: Principal, step_up_token: str | None
) -> None:
    """Adding a way to sign in or changing where codes go must be done by someone who proved
    who they are just now: a sign-in within `recent_auth_seconds`, or a step-up token for
    `sensitive_change`. A stolen access token alone cannot plant a lasting credential."""
    auth_time = principal.claims.get("auth_time")
    fresh = isinstance(auth_time, int) and (
        time.time() - auth_time <= rt.settings.recent_auth_seconds
    )
    if fresh:
        return
    if step_up_token:
        await verify_step_up(rt, step_up_token, principal, SENSITIVE_CHANGE)
        return
    raise step_up_required(
        SENSITIVE_CHANGE,
        detail="Confirm it is you: sign in again or send an X-Step-Up-Token for sensitive_change",
    )
