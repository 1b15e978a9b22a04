"""P2P transfers over HTTP on real PostgreSQL: atomic, validated, owner-checked, idempotent.

Every refused transfer is checked to have changed nothing: balances, holds, postings, limit
usage, transfers and the outbox are compared with a snapshot taken before the request.
Limits are in test_transfer_limits.py, history in test_transfer_history.py.
"""

from __future__ import annotations

import json
import uuid
from typing import Any

import httpx
import pytest

from billfold.p2p import fail_pending, release_pending
from billfold.p2p.models import TransferNotFound
from billfold.platform.db import unit_of_work
from tests.conftest import SignedIn, fund, idem, new_phone, sign_up
from tests.integration.transfer_support import (
    Always,
    Balance,
    ChallengeUnlessSteppedUp,
    all_events,
    available,
    balance,
    events,
    make_admin,
    outbox_events,
    patch_me,
    risk,
    send,
    send_ok,
    set_status,
    snapshot,
    sql,
    usage,
)

PROBLEM = "application/problem+json"
COMPLETED = "billfold.p2p.transfer.completed"


def assert_problem(r: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith(PROBLEM)
    body: dict[str, Any] = r.json()
    assert body["code"] == code, body
    assert body["status"] == status
    return body


async def refused(
    app: Any,
    parties: tuple[SignedIn, ...],
    request: Any,
    status: int,
    code: str,
) -> dict[str, Any]:
    """Run `request` (an awaitable factory), expect the problem, and check nothing changed."""
    before = await snapshot(app, *parties)
    body = assert_problem(await request(), status, code)
    assert await snapshot(app, *parties) == before
    return body


# --- sending ---------------------------------------------------------------------------------------


async def test_send_to_user_moves_money_atomically(
    client: httpx.AsyncClient, app: Any, alice: SignedIn, bob: SignedIn
) -> None:
    await fund(app, alice.user["id"], 10_000)
    r = await client.post(
        "/v1/transfers",
        json={
            "recipient": {"user_id": bob.user["id"]},
            "amount": 2_500,
            "currency": "USD",
            "note": "lunch",
        },
        headers=idem(**alice.headers),
    )
    assert r.status_code == 201, r.text
    body = r.json()
    assert body["id"].startswith("p2p_")
    assert body["status"] == "completed"
    assert body["direction"] == "sent"
    assert body["amount"] == 2_500 and body["currency"] == "USD" and body["note"] == "lunch"
    assert body["sender"] == {
        "user_id": alice.user["id"],
        "name": "Alice Example",
        "handle": None,
        "contact": None,
    }
    assert body["recipient"]["user_id"] == bob.user["id"]
    assert body["recipient"]["name"] == "Bob Example"
    assert body["completed_at"] is not None
    assert await balance(app, alice) == Balance(7_500, 0)
    assert await available(app, alice) == 7_500
    assert await available(app, bob) == 2_500
    seen = await client.get(f"/v1/transfers/{body['id']}", headers=bob.headers)
    assert seen.status_code == 200 and seen.json()["direction"] == "received"

    # One event, in the same transaction as the money, saying exactly what happened.
    assert await events(app, COMPLETED, body["id"]) == [
        {
            "transfer_id": body["id"],
            "status": "completed",
            "sender_id": alice.user["id"],
            "recipient_id": bob.user["id"],
            "amount": 2_500,
            "currency": "USD",
            "request_id": None,
        }
    ]
    assert await all_events(app, body["id"]) == [COMPLETED]
    # The ledger posting is referenced by the transfer and balanced.
    (posting,) = await sql(
        app,
        "SELECT p.kind, p.reference, p.memo, sum(e.amount) AS net, count(*) AS legs"
        " FROM ledger.postings p JOIN ledger.entries e ON e.posting_id = p.id"
        " JOIN p2p.transfers t ON t.posting_id = p.id WHERE t.id = :t"
        " GROUP BY p.kind, p.reference, p.memo",
        t=body["id"],
    )
    assert (posting.kind, posting.reference, posting.memo) == ("p2p_transfer", body["id"], "lunch")
    assert (posting.net, posting.legs) == (0, 2)


async def test_send_by_handle(client: httpx.AsyncClient, app: Any, alice: SignedIn) -> None:
    bob = await sign_up(client, name="Bob Handle")
    handle = f"bob_{uuid.uuid4().hex[:12]}"
    await patch_me(client, bob, handle=handle)
    await fund(app, alice.user["id"], 1_000)
    # Handles are case-insensitive and may be written with the @.
    r = await send(client, alice, 400, handle=f"@{handle.upper()}", note="  tickets  ")
    assert r.status_code == 201, r.text
    body = r.json()
    assert body["status"] == "completed"
    assert body["recipient"] == {
        "user_id": bob.user["id"],
        "name": "Bob Handle",
        "handle": f"@{handle}",
        "contact": None,
    }
    assert body["note"] == "tickets"  # surrounding blanks are not kept
    assert await available(app, alice) == 600
    assert await available(app, bob) == 400
    (event,) = await events(app, COMPLETED, body["id"])
    assert event["recipient_id"] == bob.user["id"] and event["amount"] == 400


async def test_a_name_that_looks_like_a_handle_is_not_shown_as_one(
    client: httpx.AsyncClient, app: Any, alice: SignedIn
) -> None:
    # Names are free text: "@someone" as a name must not pass for the handle @someone.
    mallory = await sign_up(client, name="@alice_real")
    await fund(app, alice.user["id"], 1_000)
    r = await send(client, alice, 100, user_id=mallory.user["id"])
    assert r.status_code == 201, r.text
    assert r.json()["recipient"] == {
        "user_id": mallory.user["id"],
        "name": "@alice_real",
        "handle": None,
        "contact": None,
    }


async def test_many_transfers_keep_the_books_exact(
    client: httpx.AsyncClient, app: Any, alice: SignedIn, bob: SignedIn
) -> None:
    await fund(app, alice.user["id"], 5_000)
    await fund(app, bob.user["id"], 5_000)
    for amount in (1, 999, 1_234):
        await send_ok(client, alice, amount, bob)
    await send_ok(client, bob, 2_000, alice)
    assert await available(app, alice) == 5_000 - 1 - 999 - 1_234 + 2_000
    assert await available(app, bob) == 5_000 + 1 + 999 + 1_234 - 2_000
    (total,) = await sql(
        app,
        "SELECT sum(posted) AS s FROM ledger.accounts WHERE owner_id = ANY(:ids)",
        ids=[alice.user["id"], bob.user["id"]],
    )
    assert total.s == 10_000


async def test_transfer_in_another_supported_currency(
    client: httpx.AsyncClient, app: Any, alice: SignedIn, bob: SignedIn
) -> None:
    await fund(app, alice.user["id"], 1_000, "EUR")
    await fund(app, alice.user["id"], 1_000, "USD")
    await send_ok(client, alice, 300, bob, "EUR")
    assert await available(app, alice, "EUR") == 700
    assert await available(app, bob, "EUR") == 300
    assert await available(app, alice, "USD") == 1_000  # other currencies untouched
    assert await available(app, bob, "USD") == 0


# --- validation ------------------------------------------------------------------------------------


NOBODY = "usr_" + "0" * 26  # replaced by a real recipient in the test


def _body(**overrides: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "recipient": {"user_id": NOBODY},
        "amount": 100,
        "currency": "USD",
    }
    body.update(overrides)
    return {k: v for k, v in body.items() if v is not ...}


# (body, code, pointer): every one is refused before anything is looked up or moved.
V = "validation_failed"
INVALID_BODIES: list[tuple[dict[str, Any], str, str | None]] = [
    (_body(amount=...), V, "#/amount"),
    (_body(amount=0), "invalid_amount", "#/amount"),
    (_body(amount=-100), "invalid_amount", "#/amount"),
    (_body(amount="1.00"), V, "#/amount"),
    (_body(amount="100"), V, "#/amount"),
    (_body(amount=1.5), V, "#/amount"),
    (_body(amount=100.0), V, "#/amount"),
    (_body(amount=True), V, "#/amount"),
    (_body(amount=None), V, "#/amount"),
    (_body(amount=2**63), V, "#/amount"),
    (_body(amount=10**30), V, "#/amount"),
    (_body(currency=...), V, "#/currency"),
    (_body(currency="usd"), V, "#/currency"),
    (_body(currency="ABC"), V, "#/currency"),
    (_body(currency="XAU"), V, "#/currency"),
    (_body(currency=840), V, "#/currency"),
    (_body(recipient=...), V, "#/recipient"),
    (_body(recipient={}), V, "#/recipient"),
    (_body(recipient="usr_x"), V, "#/recipient"),
    (_body(recipient={"user_id": "usr_" + "0" * 26, "handle": "bobby"}), V, "#/recipient"),
    (_body(recipient={"email": "a@example.com", "phone": "+4915112345678"}), V, "#/recipient"),
    (_body(recipient={"user_id": "bob"}), V, "#/recipient/user_id"),
    (_body(recipient={"user_id": "usr_" + "0" * 25}), V, "#/recipient/user_id"),
    (_body(recipient={"user_id": "dev_" + "0" * 26}), V, "#/recipient/user_id"),
    (_body(recipient={"email": "not-an-email"}), V, "#/recipient/email"),
    (_body(recipient={"phone": "12"}), V, "#/recipient/phone"),
    (_body(recipient={"phone": "+1555"}), V, "#/recipient/phone"),
    (_body(recipient={"handle": "a"}), V, "#/recipient/handle"),
    (_body(recipient={"handle": "bad handle!"}), V, "#/recipient/handle"),
    (_body(recipient={"handle": "x" * 31}), V, "#/recipient/handle"),
    (_body(recipient={"iban": "DE89370400440532013000"}), V, "#/recipient/iban"),
    (_body(note="x" * 141), V, "#/note"),
    (_body(note="nul\x00byte"), V, None),
    (_body(note=12), V, "#/note"),
    (_body(memo="extra field"), V, "#/memo"),
]


async def test_invalid_bodies_are_422_with_pointers(
    client: httpx.AsyncClient, app: Any, alice: SignedIn, bob: SignedIn
) -> None:
    await fund(app, alice.user["id"], 10_000)
    before = await snapshot(app, alice, bob)
    wrong = []
    for template, code, pointer in INVALID_BODIES:
        # Addressed to a real user, so nothing but the invalid field stands in the way.
        body = json.loads(json.dumps(template).replace(NOBODY, bob.user["id"]))
        r = await client.post("/v1/transfers", json=body, headers=idem(**alice.headers))
        problem = r.json()
        pointers = [e.get("pointer") for e in problem.get("errors", [])]
        if (
            r.status_code != 422
            or not r.headers["content-type"].startswith(PROBLEM)
            or problem.get("code") != code
            or not pointers
            or (pointer is not None and pointer not in pointers)
        ):
            wrong.append((body, r.status_code, problem.get("code"), pointers))
    assert wrong == [], "\n".join(map(repr, wrong))
    assert await snapshot(app, alice, bob) == before


async def test_note_limits(
    client: httpx.AsyncClient, app: Any, alice: SignedIn, bob: SignedIn
) -> None:
    await fund(app, alice.user["id"], 1_000)
    # 140 characters, counted as characters, not bytes.
    note = "€" * 140
    r = await send(client, alice, 1, user_id=bob.user["id"], note=note)
    assert r.status_code == 201, r.text
    assert r.json()["note"] == note
    r = await send(client, alice, 1, user_id=bob.user["id"], note="€" * 141)
    assert_problem(r, 422, "validation_failed")


async def test_malformed_json_and_wrong_media_type(
    client: httpx.AsyncClient, app: Any, alice: SignedIn, bob: SignedIn
) -> None:
    await fund(app, alice.user["id"], 1_000)
    before = await snapshot(app, alice, bob)
    r = await client.post(
        "/v1/transfers",
        content=b'{"recipient": {"user_id": ',
        headers=idem(**alice.headers, **{"Content-Type": "application/json"}),
    )
    assert r.status_code == 400 and r.headers["content-type"].startswith(PROBLEM)
    assert r.json()["code"] == "malformed_json"
    r = await client.post(
        "/v1/transfers",
        content=b"[]",
        headers=idem(**alice.headers, **{"Content-Type": "application/json"}),
    )
    assert_problem(r, 422, "validation_failed")
    assert await snapshot(app, alice, bob) == before


# --- business errors -------------------------------------------------------------------------------


async def test_self_transfers_are_refused_however_addressed(
    client: httpx.AsyncClient, app: Any
) -> None:
    phone = new_phone()
    alice = await sign_up(client, name="Alice Self", phone=phone)
    handle = f"alice_{uuid.uuid4().hex[:12]}"
    await patch_me(client, alice, handle=handle)
    await fund(app, alice.user["id"], 1_000)
    for recipient in (
        {"user_id": alice.user["id"]},
        {"handle": handle},
        {"handle": f"@{handle.upper()}"},
        {"email": alice.email},
        {"email": alice.email.upper()},
        {"phone": phone},
    ):
        problem = await refused(
            app,
            (alice,),
            lambda recipient=recipient: send(client, alice, 100, **recipient),
            422,
            "self_transfer",
        )
        assert "errors" not in problem


async def test_unknown_recipients(
    client: httpx.AsyncClient, app: Any, alice: SignedIn, bob: SignedIn
) -> None:
    await fund(app, alice.user["id"], 1_000)
    for recipient in (
        {"user_id": "usr_" + "0" * 26},
        {"user_id": bob.user["id"][:-1] + ("0" if bob.user["id"][-1] != "0" else "1")},
        {"handle": f"nobody_{uuid.uuid4().hex[:12]}"},
    ):
        await refused(
            app,
            (alice, bob),
            lambda recipient=recipient: send(client, alice, 100, **recipient),
            422,
            "recipient_not_found",
        )


@pytest.mark.parametrize("status", ["locked", "closed"])
async def test_inactive_recipient_is_not_found(
    client: httpx.AsyncClient, app: Any, alice: SignedIn, status: str
) -> None:
    bob = await sign_up(client, name="Bob Gone")
    handle = f"gone_{uuid.uuid4().hex[:12]}"
    await patch_me(client, bob, handle=handle)
    await fund(app, alice.user["id"], 1_000)
    await set_status(app, bob, status)
    for recipient in ({"user_id": bob.user["id"]}, {"handle": handle}):
        await refused(
            app,
            (alice, bob),
            lambda recipient=recipient: send(client, alice, 100, **recipient),
            422,
            "recipient_not_found",
        )


@pytest.mark.parametrize("status", ["locked", "closed"])
async def test_inactive_sender_cannot_send(
    client: httpx.AsyncClient, app: Any, bob: SignedIn, status: str
) -> None:
    alice = await sign_up(client, name="Alice Locked")
    await fund(app, alice.user["id"], 1_000)
    await set_status(app, alice, status)
    await refused(
        app,
        (alice, bob),
        lambda: send(client, alice, 100, user_id=bob.user["id"]),
        403,
        "account_not_active",
    )


async def test_insufficient_funds(
    client: httpx.AsyncClient, app: Any, alice: SignedIn, bob: SignedIn
) -> None:
    # Nothing at all, then one minor unit short.
    await refused(
        app,
        (alice, bob),
        lambda: send(client, alice, 1, user_id=bob.user["id"]),
        422,
        "insufficient_funds",
    )
    await fund(app, alice.user["id"], 999)
    await refused(
        app,
        (alice, bob),
        lambda: send(client, alice, 1_000, user_id=bob.user["id"]),
        422,
        "insufficient_funds",
    )
    # Money in another currency does not help.
    await fund(app, alice.user["id"], 5_000, "EUR")
    await refused(
        app,
        (alice, bob),
        lambda: send(client, alice, 1_000, "USD", user_id=bob.user["id"]),
        422,
        "insufficient_funds",
    )
    # Exactly all of it is fine.
    await send_ok(client, alice, 999, bob)
    assert await available(app, alice) == 0


@pytest.mark.parametrize("currency", ["JPY", "BHD", "SEK", "PTS"])
async def test_currencies_not_offered(
    client: httpx.AsyncClient, app: Any, alice: SignedIn, bob: SignedIn, currency: str
) -> None:
    # Loyalty points are a ledger unit, not money people may send each other.
    await fund(app, alice.user["id"], 100_000, currency)
    await refused(
        app,
        (alice, bob),
        lambda: send(client, alice, 100, currency, user_id=bob.user["id"]),
        422,
        "currency_not_supported",
    )


async def test_idempotency_key_is_required(
    client: httpx.AsyncClient, app: Any, alice: SignedIn, bob: SignedIn
) -> None:
    await fund(app, alice.user["id"], 1_000)
    body = {"recipient": {"user_id": bob.user["id"]}, "amount": 100, "currency": "USD"}
    await refused(
        app,
        (alice, bob),
        lambda: client.post("/v1/transfers", json=body, headers=alice.headers),
        428,
        "idempotency_key_required",
    )
    await refused(
        app,
        (alice, bob),
        lambda: client.post(
            "/v1/transfers", json=body, headers={**alice.headers, "Idempotency-Key": ""}
        ),
        422,
        "invalid_idempotency_key",
    )


async def test_needs_a_token_with_the_wallet_scope(
    client: httpx.AsyncClient, app: Any, alice: SignedIn, bob: SignedIn
) -> None:
    from tests.conftest import device_key
    from tests.integration.test_devices import _device_login, _enrol

    await fund(app, alice.user["id"], 1_000)
    key, pem = device_key()
    watch = await _enrol(client, alice, platform="watch", public_key=pem, name="Watch")
    r, _ = await _device_login(client, watch["id"], key)
    assert r.status_code == 200 and r.json()["scope"] == "pay"
    watch_headers = {"Authorization": f"Bearer {r.json()['access_token']}"}
    body = {"recipient": {"user_id": bob.user["id"]}, "amount": 100, "currency": "USD"}
    await refused(
        app,
        (alice, bob),
        lambda: client.post("/v1/transfers", json=body, headers=idem(**watch_headers)),
        403,
        "insufficient_scope",
    )
    for path in ("/v1/transfers", "/v1/transfers/limits"):
        assert_problem(await client.get(path, headers=watch_headers), 403, "insufficient_scope")
    # And without any token.
    await refused(
        app,
        (alice, bob),
        lambda: client.post("/v1/transfers", json=body, headers=idem()),
        401,
        "unauthorized",
    )


# --- idempotency -----------------------------------------------------------------------------------


async def test_retry_with_the_same_key_moves_money_once(
    client: httpx.AsyncClient, app: Any, alice: SignedIn, bob: SignedIn
) -> None:
    await fund(app, alice.user["id"], 1_000)
    headers = idem(**alice.headers)
    body = {"recipient": {"user_id": bob.user["id"]}, "amount": 300, "currency": "USD"}
    first = await client.post("/v1/transfers", json=body, headers=headers)
    assert first.status_code == 201, first.text
    assert "Idempotent-Replayed" not in first.headers
    before = await snapshot(app, alice, bob)
    again = await client.post("/v1/transfers", json=body, headers=headers)
    assert again.status_code == 201, again.text
    assert again.headers["Idempotent-Replayed"] == "true"
    assert again.json() == first.json()
    assert await snapshot(app, alice, bob) == before
    assert await available(app, alice) == 700 and await available(app, bob) == 300

    # The same key with another body is refused and changes nothing.
    other = {**body, "amount": 301}
    await refused(
        app,
        (alice, bob),
        lambda: client.post("/v1/transfers", json=other, headers=headers),
        422,
        "idempotency_key_reuse",
    )
    # Keys belong to their caller: Bob may use the same one for his own transfer.
    await fund(app, bob.user["id"], 100)
    r = await client.post(
        "/v1/transfers",
        json={"recipient": {"user_id": alice.user["id"]}, "amount": 50, "currency": "USD"},
        headers={**bob.headers, "Idempotency-Key": headers["Idempotency-Key"]},
    )
    assert r.status_code == 201 and r.json()["id"] != first.json()["id"]


async def test_a_refused_transfer_is_not_remembered(
    client: httpx.AsyncClient, app: Any, alice: SignedIn, bob: SignedIn
) -> None:
    # Only successes are stored: after topping up, the same key and body go through.
    headers = idem(**alice.headers)
    body = {"recipient": {"user_id": bob.user["id"]}, "amount": 300, "currency": "USD"}
    r = await client.post("/v1/transfers", json=body, headers=headers)
    assert_problem(r, 422, "insufficient_funds")
    await fund(app, alice.user["id"], 300)
    r = await client.post("/v1/transfers", json=body, headers=headers)
    assert r.status_code == 201, r.text
    assert "Idempotent-Replayed" not in r.headers
    assert await available(app, bob) == 300


# --- one transfer ----------------------------------------------------------------------------------


async def test_only_the_two_parties_see_a_transfer(
    client: httpx.AsyncClient, app: Any, alice: SignedIn, bob: SignedIn
) -> None:
    await fund(app, alice.user["id"], 1_000)
    sent = await send_ok(client, alice, 100, bob)
    mine = await client.get(f"/v1/transfers/{sent['id']}", headers=alice.headers)
    assert mine.status_code == 200 and mine.json() == sent
    theirs = await client.get(f"/v1/transfers/{sent['id']}", headers=bob.headers)
    assert theirs.status_code == 200
    assert theirs.json() == {**sent, "direction": "received"}
    carol = await sign_up(client, name="Carol Stranger")
    stranger = await client.get(f"/v1/transfers/{sent['id']}", headers=carol.headers)
    problem = assert_problem(stranger, 404, "transfer_not_found")
    assert sent["id"] not in stranger.text.replace(problem["instance"], "")


@pytest.mark.parametrize(
    "transfer_id",
    [
        "p2p_" + "0" * 26,
        "p2p_nope",
        "usr_" + "0" * 26,
        "nothing",
        "%00",
        "p2p_%00",
        "%E2%82%AC",
        "'%20OR%201=1--",
        "x" * 64,
    ],
)
async def test_malformed_or_unknown_transfer_ids_are_404(
    client: httpx.AsyncClient, alice: SignedIn, transfer_id: str
) -> None:
    r = await client.get(f"/v1/transfers/{transfer_id}", headers=alice.headers)
    assert_problem(r, 404, "transfer_not_found")
    r = await client.post(f"/v1/transfers/{transfer_id}/cancel", headers=alice.headers)
    assert_problem(r, 404, "transfer_not_found")


async def test_too_long_transfer_id_is_422_not_500(
    client: httpx.AsyncClient, alice: SignedIn
) -> None:
    r = await client.get(f"/v1/transfers/{'x' * 65}", headers=alice.headers)
    assert_problem(r, 422, "validation_failed")


# --- cancel ----------------------------------------------------------------------------------------


async def test_a_completed_transfer_cannot_be_cancelled(
    client: httpx.AsyncClient, app: Any, alice: SignedIn, bob: SignedIn
) -> None:
    await fund(app, alice.user["id"], 1_000)
    sent = await send_ok(client, alice, 100, bob)
    url = f"/v1/transfers/{sent['id']}/cancel"
    await refused(
        app,
        (alice, bob),
        lambda: client.post(url, headers=alice.headers),
        409,
        "transfer_not_cancellable",
    )
    await refused(
        app,
        (alice, bob),
        lambda: client.post(url, headers=bob.headers),
        409,
        "transfer_not_cancellable",
    )
    carol = await sign_up(client, name="Carol Stranger")
    await refused(
        app,
        (alice, bob),
        lambda: client.post(url, headers=carol.headers),
        404,
        "transfer_not_found",
    )
    assert (await client.get(f"/v1/transfers/{sent['id']}", headers=alice.headers)).json()[
        "status"
    ] == "completed"


# --- admin reversal --------------------------------------------------------------------------------


async def test_admin_reverses_a_completed_transfer(
    client: httpx.AsyncClient, app: Any, alice: SignedIn, bob: SignedIn, admin: SignedIn
) -> None:
    await fund(app, alice.user["id"], 1_000)
    sent = await send_ok(client, alice, 400, bob)
    url = f"/v1/admin/transfers/{sent['id']}/reverse"
    body = {"reason": "sent to the wrong person"}

    # Not for users, not without a key, not without a reason.
    for who in (alice, bob):
        await refused(
            app,
            (alice, bob),
            lambda who=who: client.post(url, json=body, headers=idem(**who.headers)),
            403,
            "admin_required",
        )
    await refused(
        app,
        (alice, bob),
        lambda: client.post(url, json=body, headers=admin.headers),
        428,
        "idempotency_key_required",
    )
    for bad in ({}, {"reason": "x"}, {"reason": "r" * 501}, {"reason": "ok ok", "extra": 1}):
        await refused(
            app,
            (alice, bob),
            lambda bad=bad: client.post(url, json=bad, headers=idem(**admin.headers)),
            422,
            "validation_failed",
        )

    headers = idem(**admin.headers)
    r = await client.post(url, json=body, headers=headers)
    assert r.status_code == 200, r.text
    reversed_ = r.json()
    assert reversed_["status"] == "reversed"
    # The parties get a stable code; the agent's own words stay in the event.
    assert reversed_["failure_reason"] == "reversed_by_support"
    assert await available(app, alice) == 1_000
    assert await available(app, bob) == 0
    assert await events(app, "billfold.p2p.transfer.reversed", sent["id"]) == [
        {
            "transfer_id": sent["id"],
            "status": "reversed",
            "sender_id": alice.user["id"],
            "recipient_id": bob.user["id"],
            "amount": 400,
            "currency": "USD",
            "request_id": None,
            "reason": "sent to the wrong person",
        }
    ]
    for who, direction in ((alice, "sent"), (bob, "received")):
        seen = (await client.get(f"/v1/transfers/{sent['id']}", headers=who.headers)).json()
        assert seen["status"] == "reversed" and seen["direction"] == direction

    # A retry with the same key replays; a new request finds it already reversed.
    before = await snapshot(app, alice, bob)
    again = await client.post(url, json=body, headers=headers)
    assert again.status_code == 200 and again.headers["Idempotent-Replayed"] == "true"
    assert await snapshot(app, alice, bob) == before
    await refused(
        app,
        (alice, bob),
        lambda: client.post(url, json=body, headers=idem(**admin.headers)),
        409,
        "transfer_not_cancellable",
    )
    # A reversed transfer cannot be cancelled either.
    await refused(
        app,
        (alice, bob),
        lambda: client.post(f"/v1/transfers/{sent['id']}/cancel", headers=alice.headers),
        409,
        "transfer_not_cancellable",
    )


async def test_reversal_needs_the_money_to_still_be_there(
    client: httpx.AsyncClient, app: Any, alice: SignedIn, bob: SignedIn, admin: SignedIn
) -> None:
    carol = await sign_up(client, name="Carol Shop")
    await fund(app, alice.user["id"], 1_000)
    sent = await send_ok(client, alice, 500, bob)
    await send_ok(client, bob, 200, carol)  # Bob spent some of it
    url = f"/v1/admin/transfers/{sent['id']}/reverse"
    await refused(
        app,
        (alice, bob, carol),
        lambda: client.post(url, json={"reason": "chargeback"}, headers=idem(**admin.headers)),
        422,
        "insufficient_funds",
    )
    seen = (await client.get(f"/v1/transfers/{sent['id']}", headers=alice.headers)).json()
    assert seen["status"] == "completed"
    # Once Bob has the money again, the reversal goes through.
    await fund(app, bob.user["id"], 200)
    r = await client.post(url, json={"reason": "chargeback"}, headers=idem(**admin.headers))
    assert r.status_code == 200, r.text
    assert await available(app, alice) == 1_000 and await available(app, bob) == 0


async def test_reversing_unknown_transfers(
    client: httpx.AsyncClient, app: Any, admin: SignedIn
) -> None:
    for transfer_id in ("p2p_" + "0" * 26, "junk", "%00"):
        r = await client.post(
            f"/v1/admin/transfers/{transfer_id}/reverse",
            json={"reason": "whatever"},
            headers=idem(**admin.headers),
        )
        assert_problem(r, 404, "transfer_not_found")


# --- risk hook -------------------------------------------------------------------------------------


async def test_a_blocked_transfer_changes_nothing(
    client: httpx.AsyncClient, app: Any, alice: SignedIn, bob: SignedIn
) -> None:
    await fund(app, alice.user["id"], 1_000)
    with risk(app, Always("block", 950, ("velocity",))) as seen:
        problem = await refused(
            app,
            (alice, bob),
            lambda: send(client, alice, 100, user_id=bob.user["id"]),
            422,
            "transfer_declined",
        )
    assert "reasons" not in problem and "velocity" not in json.dumps(problem)  # no fraud signals
    (asked,) = seen
    assert asked.sender_id == alice.user["id"] and asked.recipient_id == bob.user["id"]
    assert asked.money.amount == 100 and asked.money.currency == "USD"
    assert asked.recipient_kind == "user_id" and not asked.stepped_up
    assert asked.transfer_id.startswith("p2p_")
    # The swap is gone: the next transfer is allowed by the app's own check.
    await send_ok(client, alice, 100, bob)


async def test_review_holds_the_money_then_release_completes_it(
    client: httpx.AsyncClient, app: Any, alice: SignedIn, bob: SignedIn
) -> None:
    await fund(app, alice.user["id"], 1_000)
    with risk(app, Always("review", 700)):
        r = await send(client, alice, 300, user_id=bob.user["id"])
    assert r.status_code == 201, r.text
    pending = r.json()
    assert pending["status"] == "pending" and pending["completed_at"] is None
    # Held, not moved: available drops, posted stays, Bob has nothing yet.
    assert await balance(app, alice) == Balance(1_000, 300)
    assert await available(app, bob) == 0
    (event,) = await events(app, "billfold.p2p.transfer.pending", pending["id"])
    assert event["risk"] == {"action": "review", "score": 700}
    # The held money cannot be spent twice.
    await refused(
        app,
        (alice, bob),
        lambda: send(client, alice, 701, user_id=bob.user["id"]),
        422,
        "insufficient_funds",
    )

    async with unit_of_work(app.state.resources.engine) as uow:
        row = await release_pending(await uow.connection(), app.state.p2p, pending["id"])
    assert row.status == "completed"
    assert await balance(app, alice) == Balance(700, 0)
    assert await available(app, bob) == 300
    assert await all_events(app, pending["id"]) == ["billfold.p2p.transfer.pending", COMPLETED]
    seen = (await client.get(f"/v1/transfers/{pending['id']}", headers=bob.headers)).json()
    assert seen["status"] == "completed" and seen["completed_at"] is not None


async def test_review_then_fail_releases_the_hold(
    client: httpx.AsyncClient, app: Any, alice: SignedIn, bob: SignedIn
) -> None:
    await fund(app, alice.user["id"], 1_000)
    with risk(app, Always("review")):
        pending = (await send(client, alice, 300, user_id=bob.user["id"])).json()
    async with unit_of_work(app.state.resources.engine) as uow:
        row = await fail_pending(await uow.connection(), pending["id"], "fraud_review_declined")
    assert row.status == "failed"
    assert await balance(app, alice) == Balance(1_000, 0)
    assert await available(app, bob) == 0
    (event,) = await events(app, "billfold.p2p.transfer.failed", pending["id"])
    assert event["status"] == "failed" and event["reason"] == "fraud_review_declined"
    seen = (await client.get(f"/v1/transfers/{pending['id']}", headers=alice.headers)).json()
    assert seen["status"] == "failed" and seen["failure_reason"] == "declined_after_review"
    # Neither can be applied twice.
    for decide in (
        lambda c, t: release_pending(c, app.state.p2p, t),
        lambda c, t: fail_pending(c, t, "again"),
    ):
        with pytest.raises(TransferNotFound) as exc:
            async with unit_of_work(app.state.resources.engine) as uow:
                await decide(await uow.connection(), pending["id"])
        assert getattr(exc.value, "code", None) == "transfer_not_found"
    assert await balance(app, alice) == Balance(1_000, 0)


async def test_sender_cancels_a_transfer_under_review(
    client: httpx.AsyncClient, app: Any, alice: SignedIn, bob: SignedIn
) -> None:
    await fund(app, alice.user["id"], 1_000)
    with risk(app, Always("review")):
        pending = (await send(client, alice, 300, user_id=bob.user["id"])).json()
    url = f"/v1/transfers/{pending['id']}/cancel"
    # Under review it is not completed, so there is nothing to reverse yet.
    admin = await make_admin(app, client)
    await refused(
        app,
        (alice, bob),
        lambda: client.post(
            f"/v1/admin/transfers/{pending['id']}/reverse",
            json={"reason": "not yet"},
            headers=idem(**admin.headers),
        ),
        409,
        "transfer_not_cancellable",
    )
    # Only the sender: the recipient is told it is not theirs to cancel, others that it is not there.
    await refused(
        app,
        (alice, bob),
        lambda: client.post(url, headers=bob.headers),
        409,
        "transfer_not_cancellable",
    )
    carol = await sign_up(client, name="Carol Stranger")
    await refused(
        app,
        (alice, bob),
        lambda: client.post(url, headers=carol.headers),
        404,
        "transfer_not_found",
    )
    r = await client.post(url, headers=alice.headers)
    assert r.status_code == 200, r.text
    assert r.json()["status"] == "cancelled"
    assert await balance(app, alice) == Balance(1_000, 0)
    assert await available(app, bob) == 0
    (hold,) = await sql(
        app,
        "SELECT h.status FROM ledger.holds h JOIN p2p.transfers t ON t.hold_id = h.id"
        " WHERE t.id = :t",
        t=pending["id"],
    )
    assert hold.status == "voided"
    (event,) = await events(app, "billfold.p2p.transfer.cancelled", pending["id"])
    assert event["status"] == "cancelled"
    # Cancelled is final.
    await refused(
        app,
        (alice, bob),
        lambda: client.post(url, headers=alice.headers),
        409,
        "transfer_not_cancellable",
    )
    async with unit_of_work(app.state.resources.engine) as uow:
        with pytest.raises(TransferNotFound) as exc:
            await release_pending(await uow.connection(), app.state.p2p, pending["id"])
    assert getattr(exc.value, "code", None) == "transfer_not_found"


async def test_review_with_insufficient_funds_holds_nothing(
    client: httpx.AsyncClient, app: Any, alice: SignedIn, bob: SignedIn
) -> None:
    await fund(app, alice.user["id"], 100)
    with risk(app, Always("review")):
        await refused(
            app,
            (alice, bob),
            lambda: send(client, alice, 101, user_id=bob.user["id"]),
            422,
            "insufficient_funds",
        )


async def _step_up_token(
    app: Any,
    client: httpx.AsyncClient,
    who: SignedIn,
    *,
    totp_secret: str | None = None,
    purpose: str = "transfer",
    reference: str | None = None,
) -> str:
    """A real step-up: by TOTP (the next period's code: the one that confirmed the enrolment is
    spent, and each period's code works once), or by a code e-mailed to the verified address."""
    from tests.integration.test_mfa import code_at, step_up_code

    method = "totp" if totp_secret else "email"
    r = await client.post(
        "/v1/auth/step-up/challenges",
        json={"method": method, "purpose": purpose, "reference": reference},
        headers=who.headers,
    )
    assert r.status_code == 201, r.text
    challenge_id = r.json()["id"]
    if totp_secret:
        code = code_at(totp_secret, 1)
    else:
        code = await step_up_code(app, who.user["id"], challenge_id)
    verify = await client.post(
        f"/v1/auth/step-up/challenges/{challenge_id}/verify",
        json={"code": code},
        headers=who.headers,
    )
    assert verify.status_code == 200, verify.text
    return verify.json()["step_up_token"]  # type: ignore[no-any-return]


@pytest.mark.parametrize("check", [Always("challenge", 600), ChallengeUnlessSteppedUp()])
async def test_challenge_needs_a_step_up(
    client: httpx.AsyncClient, app: Any, bob: SignedIn, check: Any
) -> None:
    from tests.integration.test_mfa import enable_totp, verify_contact

    alice = await sign_up(client, name="Alice Careful")
    secret, _ = await enable_totp(client, alice)
    await verify_contact(app, client, alice, "email")
    await fund(app, alice.user["id"], 1_000)
    await fund(app, bob.user["id"], 1_000)
    body = {"recipient": {"user_id": bob.user["id"]}, "amount": 250, "currency": "USD"}

    def post(who: SignedIn, step_up: str | None = None, json: Any = body) -> Any:
        extra = {"X-Step-Up-Token": step_up} if step_up is not None else {}
        return lambda: client.post("/v1/transfers", json=json, headers=idem(**who.headers, **extra))

    with risk(app, check) as seen:
        problem = await refused(app, (alice, bob), post(alice), 403, "step_up_required")
        assert problem["step_up"]["purpose"] == "transfer"
        assert problem["step_up"]["challenge_url"] == "/v1/auth/step-up/challenges"
        assert "totp" in problem["step_up"]["methods"]

        # Only a valid step-up token for transfers of this session counts: not junk, not an
        # access token, not one made for another purpose, not someone else's.
        # The step-up is for this recipient, amount and currency: the problem names it.
        reference = problem["step_up"]["reference"]
        assert reference.startswith("transfer:")
        wrong_purpose = await _step_up_token(
            app, client, alice, purpose="payment", reference=reference
        )
        no_reference = await _step_up_token(app, client, alice)
        for bad in ("garbage", alice.tokens["access_token"], wrong_purpose, no_reference):
            await refused(app, (alice, bob), post(alice, bad), 403, "invalid_step_up_token")
        # A token for this transfer does not send a bigger one.
        other = await _step_up_token(app, client, alice, reference=reference)
        bigger = {**body, "amount": 500}
        await refused(
            app, (alice, bob), post(alice, other, json=bigger), 403, "invalid_step_up_token"
        )
        alices = await _step_up_token(app, client, alice, reference=reference)
        back = {**body, "recipient": {"user_id": alice.user["id"]}}
        await refused(app, (alice, bob), post(bob, alices, json=back), 403, "invalid_step_up_token")

        token = await _step_up_token(app, client, alice, totp_secret=secret, reference=reference)
        r = await post(alice, token)()
        assert r.status_code == 201, r.text
        assert r.json()["status"] == "completed"
        assert seen[-1].stepped_up
        assert await available(app, alice) == 750 and await available(app, bob) == 1_250

        # A step-up token works once.
        await refused(app, (alice, bob), post(alice, token), 403, "invalid_step_up_token")


async def test_risk_check_is_asked_after_validation_and_never_leaks(
    client: httpx.AsyncClient, app: Any, alice: SignedIn, bob: SignedIn
) -> None:
    # Requests refused before money could move never reach the risk check.
    own = app.state.p2p.risk  # the app's own: the Fraud Service's check
    with risk(app, Always("allow")) as seen:
        await send(client, alice, 100, user_id=alice.user["id"])
        await send(client, alice, 0, user_id=bob.user["id"])
        await send(client, alice, 100, "JPY", user_id=bob.user["id"])
    assert seen == []
    assert app.state.p2p.risk is own


# --- OpenAPI ---------------------------------------------------------------------------------------


async def test_openapi_documents_the_transfer_routes(client: httpx.AsyncClient) -> None:
    spec = (await client.get("/openapi.json")).json()
    paths = spec["paths"]
    expected = {
        ("post", "/v1/transfers"): {"401", "403", "422", "428"},
        ("get", "/v1/transfers"): {"401", "403", "422"},
        ("get", "/v1/transfers/limits"): {"401", "403"},
        ("get", "/v1/transfers/{transfer_id}"): {"401", "403", "404"},
        ("post", "/v1/transfers/{transfer_id}/cancel"): {"401", "403", "404", "409"},
        ("post", "/v1/admin/transfers/{transfer_id}/reverse"): {
            "401",
            "403",
            "404",
            "409",
            "422",
            "428",
        },
        ("put", "/v1/admin/users/{user_id}/transfer-limits/{currency}"): {
            "401",
            "403",
            "404",
            "422",
        },
    }
    for (method, path), statuses in expected.items():
        op = paths[path][method]
        assert statuses <= set(op["responses"]), (method, path, op["responses"].keys())
        for status in statuses:
            content = op["responses"][status]["content"]
            assert content[PROBLEM]["schema"]["$ref"] == "#/components/schemas/Problem"
        assert "transfers" in op["tags"]
    send_op = paths["/v1/transfers"]["post"]
    headers = {p["name"] for p in send_op["parameters"] if p["in"] == "header"}
    assert {"Idempotency-Key", "X-Step-Up-Token"} <= headers
    assert send_op["responses"]["201"]["content"]["application/json"]["schema"]["$ref"].endswith(
        "/Transfer"
    )
    query = {p["name"] for p in paths["/v1/transfers"]["get"]["parameters"] if p["in"] == "query"}
    assert {
        "limit",
        "cursor",
        "status",
        "direction",
        "counterparty",
        "from",
        "to",
        "amount_min",
        "amount_max",
        "currency",
    } <= query


async def test_a_review_that_outlives_its_hold_fails_the_transfer(
    client: httpx.AsyncClient, app: Any, alice: SignedIn, bob: SignedIn
) -> None:
    """The ledger's sweeper releases the expired hold; the P2P consumer of its event fails the
    transfer (`review_expired`) and gives the amount back to the sender's limits, once."""
    from billfold import jobs, ledger

    await fund(app, alice.user["id"], 1_000)
    with risk(app, Always("review")):
        pending = (await send(client, alice, 300, user_id=bob.user["id"])).json()
    assert pending["status"] == "pending"
    row = (await sql(app, "SELECT hold_id FROM p2p.transfers WHERE id = :id", id=pending["id"]))[0]
    await sql(
        app,
        "UPDATE ledger.holds SET expires_at = now() - interval '1 second' WHERE id = :h",
        h=row.hold_id,
    )
    engine = app.state.resources.engine
    await ledger.expire_holds(engine)
    assert await balance(app, alice) == Balance(1_000, 0)

    (expired,) = await outbox_events(app, "billfold.ledger.hold.expired", row.hold_id)
    sink = jobs.event_sink(engine, app.state.p2p)
    for _ in range(2):  # redelivered: one effect
        await sink(expired)
    seen = (await client.get(f"/v1/transfers/{pending['id']}", headers=alice.headers)).json()
    assert (seen["status"], seen["failure_reason"]) == ("failed", "review_expired")
    assert len(await events(app, "billfold.p2p.transfer.failed", pending["id"])) == 1
    assert (await usage(app, alice)).used_today == 0
    assert await available(app, bob) == 0
