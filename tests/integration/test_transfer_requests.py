"""Money requests over HTTP on real PostgreSQL: ask, answer (pay, decline), withdraw, expire."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from sqlalchemy import text
from sqlalchemy.exc import IntegrityError

from billfold import p2p
from tests.conftest import SignedIn, fund, idem, new_phone, set_kyc_tier, sign_up
from tests.integration.p2p_contact_support import (
    EMAIL_DOMAIN,
    deliver,
    unregistered_email,
    verify_contact,
)
from tests.integration.transfer_support import Always, available, outbox_events, risk, sql


async def ask(
    client: httpx.AsyncClient,
    requester: SignedIn,
    payer: dict[str, str],
    amount: Any = 1_500,
    currency: str = "USD",
    **extra: Any,
) -> httpx.Response:
    body = {"payer": payer, "amount": amount, "currency": currency, **extra}
    return await client.post("/v1/transfer-requests", json=body, headers=idem(**requester.headers))


async def ask_ok(
    client: httpx.AsyncClient, requester: SignedIn, payer: SignedIn, amount: int = 1_500
) -> dict[str, Any]:
    r = await ask(client, requester, {"user_id": payer.user["id"]}, amount)
    assert r.status_code == 201, r.text
    return r.json()  # type: ignore[no-any-return]


async def act(
    client: httpx.AsyncClient, who: SignedIn, request_id: str, verb: str
) -> httpx.Response:
    return await client.post(
        f"/v1/transfer-requests/{request_id}/{verb}", headers=idem(**who.headers)
    )


async def request_row(app: Any, request_id: str) -> Any:
    (row,) = await sql(app, "SELECT * FROM p2p.transfer_requests WHERE id = :id", id=request_id)
    return row


async def transfers_for(app: Any, request_id: str) -> list[Any]:
    return await sql(app, "SELECT * FROM p2p.transfers WHERE request_id = :id", id=request_id)


async def count_requests(app: Any, requester_id: str) -> int:
    rows = await sql(
        app,
        "SELECT count(*) AS n FROM p2p.transfer_requests WHERE requester_id = :u",
        u=requester_id,
    )
    return int(rows[0].n)


async def test_ask_a_user_and_both_sides_see_it(
    client: httpx.AsyncClient, app: Any, settings: Any, alice: SignedIn, bob: SignedIn
) -> None:
    before = datetime.now(UTC)
    r = await ask(client, alice, {"user_id": bob.user["id"]}, 1_500, note="pizza")
    assert r.status_code == 201, r.text
    req = r.json()
    assert req["id"].startswith("req_") and req["status"] == "pending"
    assert req["direction"] == "outgoing"
    assert req["requester"]["user_id"] == alice.user["id"]
    assert req["requester"]["name"] == "Alice Example"
    assert req["payer"]["user_id"] == bob.user["id"] and req["payer"]["name"] == "Bob Example"
    assert (req["amount"], req["currency"], req["note"], req["transfer_id"]) == (
        1_500,
        "USD",
        "pizza",
        None,
    )
    expires = datetime.fromisoformat(req["expires_at"])
    ttl = timedelta(seconds=settings.transfer_request_ttl_seconds)
    assert before + ttl - timedelta(seconds=5) < expires < datetime.now(UTC) + ttl
    created = await outbox_events(app, "billfold.p2p.request.created", req["id"])
    assert len(created) == 1 and created[0]["data"]["payer_id"] == bob.user["id"]

    theirs = await client.get(f"/v1/transfer-requests/{req['id']}", headers=bob.headers)
    assert theirs.status_code == 200 and theirs.json()["direction"] == "incoming"
    outgoing = await client.get("/v1/transfer-requests?direction=outgoing", headers=alice.headers)
    assert [x["id"] for x in outgoing.json()["data"]] == [req["id"]]
    incoming = await client.get("/v1/transfer-requests?direction=incoming", headers=alice.headers)
    assert incoming.json()["data"] == []
    both = await client.get("/v1/transfer-requests", headers=bob.headers)
    assert [x["id"] for x in both.json()["data"]] == [req["id"]]
    done = await client.get("/v1/transfer-requests?status=accepted", headers=bob.headers)
    assert done.json()["data"] == []

    stranger = await sign_up(client)
    hidden = await client.get(f"/v1/transfer-requests/{req['id']}", headers=stranger.headers)
    assert hidden.status_code == 404 and hidden.json()["code"] == "request_not_found"
    assert (await client.get("/v1/transfer-requests", headers=stranger.headers)).json()[
        "data"
    ] == []
    for verb in ("accept", "decline", "cancel"):
        r = await act(client, stranger, req["id"], verb)
        assert r.status_code == 404 and r.json()["code"] == "request_not_found"


async def test_bad_requests_are_refused_and_create_nothing(
    client: httpx.AsyncClient, app: Any, alice: SignedIn, bob: SignedIn
) -> None:
    me = alice.user["id"]
    cases = [
        ({"user_id": me}, 100, "USD", 422, "self_request"),
        ({"email": alice.email}, 100, "USD", 422, "self_request"),
        ({"user_id": "usr_" + "0" * 26}, 100, "USD", 422, "recipient_not_found"),
        ({"handle": "nobody_has_this_one"}, 100, "USD", 422, "recipient_not_found"),
        ({"user_id": bob.user["id"]}, 0, "USD", 422, "invalid_amount"),
        ({"user_id": bob.user["id"]}, -5, "USD", 422, "invalid_amount"),
        ({"user_id": bob.user["id"]}, "12.50", "USD", 422, "validation_failed"),
        ({"user_id": bob.user["id"]}, 100, "JPY", 422, "currency_not_supported"),
        ({"user_id": bob.user["id"], "email": bob.email}, 100, "USD", 422, "validation_failed"),
        ({"user_id": bob.user["id"]}, 2**53, "USD", 422, "validation_failed"),
        ({"user_id": bob.user["id"]}, 2**63, "USD", 422, "validation_failed"),
        ({"user_id": bob.user["id"]}, 10**30, "USD", 422, "validation_failed"),
        ({"user_id": bob.user["id"]}, 100, "usd", 422, "validation_failed"),
    ]
    for payer, amount, currency, status, code in cases:
        r = await ask(client, alice, payer, amount, currency)
        assert (r.status_code, r.json()["code"]) == (status, code), (payer, amount, r.text)
    nul = await ask(client, alice, {"user_id": bob.user["id"]}, 100, note="a\x00b")
    assert nul.status_code == 422 and nul.json()["code"] == "validation_failed", nul.text
    no_key = await client.post(
        "/v1/transfer-requests",
        json={"payer": {"user_id": bob.user["id"]}, "amount": 100, "currency": "USD"},
        headers=alice.headers,
    )
    assert no_key.status_code == 428 and no_key.json()["code"] == "idempotency_key_required"
    assert await count_requests(app, me) == 0


async def test_the_payer_pays_once_and_the_requester_is_credited(
    client: httpx.AsyncClient, app: Any, alice: SignedIn, bob: SignedIn
) -> None:
    await fund(app, bob.user["id"], 5_000)
    req = await ask_ok(client, alice, bob, 1_500)

    key = idem(**bob.headers)
    r = await client.post(f"/v1/transfer-requests/{req['id']}/accept", headers=key)
    assert r.status_code == 200, r.text
    paid = r.json()
    assert paid["status"] == "accepted" and paid["transfer_id"].startswith("p2p_")
    assert paid["decided_at"] is not None and paid["direction"] == "incoming"
    assert await available(app, bob.user["id"]) == 3_500
    assert await available(app, alice.user["id"]) == 1_500
    (transfer,) = await transfers_for(app, req["id"])
    assert (transfer.id, transfer.status, transfer.sender_id, transfer.recipient_id) == (
        paid["transfer_id"],
        "completed",
        bob.user["id"],
        alice.user["id"],
    )
    seen = await client.get(f"/v1/transfers/{paid['transfer_id']}", headers=alice.headers)
    assert seen.json()["request_id"] == req["id"] and seen.json()["direction"] == "received"
    accepted = await outbox_events(app, "billfold.p2p.request.accepted", req["id"])
    assert len(accepted) == 1 and accepted[0]["data"]["transfer_id"] == paid["transfer_id"]

    # The same key replays the answer; another key is a second attempt and is refused.
    replay = await client.post(f"/v1/transfer-requests/{req['id']}/accept", headers=key)
    assert replay.status_code == 200 and replay.json() == paid
    again = await act(client, bob, req["id"], "accept")
    assert again.status_code == 409 and again.json()["code"] == "request_not_pending"
    assert again.json()["status"] == "accepted"
    for who, verb in ((bob, "decline"), (alice, "cancel")):
        r = await act(client, who, req["id"], verb)
        assert r.status_code == 409 and r.json()["code"] == "request_not_pending"
    assert len(await transfers_for(app, req["id"])) == 1
    assert await available(app, bob.user["id"]) == 3_500


async def test_accept_needs_an_idempotency_key(
    client: httpx.AsyncClient, app: Any, alice: SignedIn, bob: SignedIn
) -> None:
    req = await ask_ok(client, alice, bob)
    r = await client.post(f"/v1/transfer-requests/{req['id']}/accept", headers=bob.headers)
    assert r.status_code == 428 and r.json()["code"] == "idempotency_key_required"
    assert (await request_row(app, req["id"])).status == "pending"


async def test_a_refused_payment_changes_nothing(
    client: httpx.AsyncClient, app: Any, alice: SignedIn, bob: SignedIn
) -> None:
    await fund(app, bob.user["id"], 1_000)
    broke = await ask_ok(client, alice, bob, 1_001)
    r = await act(client, bob, broke["id"], "accept")
    assert r.status_code == 422 and r.json()["code"] == "insufficient_funds", r.text

    await fund(app, bob.user["id"], 10_000)
    too_big = await ask_ok(client, alice, bob, 6_000)  # tier 0: at most 50.00 per transfer
    r = await act(client, bob, too_big["id"], "accept")
    assert r.status_code == 422 and r.json()["code"] == "limit_exceeded", r.text

    for req in (broke, too_big):
        row = await request_row(app, req["id"])
        assert (row.status, row.transfer_id, row.decided_at) == ("pending", None, None)
        assert await transfers_for(app, req["id"]) == []
    assert await available(app, bob.user["id"]) == 11_000
    assert await available(app, alice.user["id"]) == 0
    limits = (await client.get("/v1/transfers/limits", headers=bob.headers)).json()
    usd = next(x for x in limits["data"] if x["currency"] == "USD")
    assert usd["daily"]["used"] == 0  # the refused attempts used no limit

    # Once allowed, the same request can be paid.
    await set_kyc_tier(app, bob.user["id"], 1)
    r = await act(client, bob, too_big["id"], "accept")
    assert r.status_code == 200 and r.json()["status"] == "accepted"


async def test_decline_and_cancel_belong_to_one_side_each(
    client: httpx.AsyncClient, app: Any, alice: SignedIn, bob: SignedIn
) -> None:
    await fund(app, alice.user["id"], 5_000)
    declined = await ask_ok(client, alice, bob)
    for who, verb in ((alice, "accept"), (alice, "decline"), (bob, "cancel")):
        r = await act(client, who, declined["id"], verb)
        assert r.status_code == 403 and r.json()["code"] == "request_action_not_allowed", verb
    r = await act(client, bob, declined["id"], "decline")
    assert r.status_code == 200 and r.json()["status"] == "declined"
    assert (await act(client, alice, declined["id"], "cancel")).status_code == 409
    assert (await act(client, bob, declined["id"], "accept")).status_code == 409
    assert len(await outbox_events(app, "billfold.p2p.request.declined", declined["id"])) == 1

    cancelled = await ask_ok(client, alice, bob)
    r = await act(client, alice, cancelled["id"], "cancel")
    assert r.status_code == 200 and r.json()["status"] == "cancelled"
    r = await act(client, bob, cancelled["id"], "accept")
    assert r.status_code == 409 and r.json()["status"] == "cancelled"
    assert len(await outbox_events(app, "billfold.p2p.request.cancelled", cancelled["id"])) == 1
    assert await transfers_for(app, cancelled["id"]) == []
    statuses = await client.get("/v1/transfer-requests?status=declined", headers=bob.headers)
    assert [x["id"] for x in statuses.json()["data"]] == [declined["id"]]


async def test_two_concurrent_accepts_make_one_transfer(
    client: httpx.AsyncClient, app: Any, alice: SignedIn, bob: SignedIn
) -> None:
    await fund(app, bob.user["id"], 5_000)
    for _ in range(3):
        req = await ask_ok(client, alice, bob, 1_000)
        answers = await asyncio.gather(*(act(client, bob, req["id"], "accept") for _ in range(3)))
        codes = sorted(a.status_code for a in answers)
        assert codes == [200, 409, 409], [a.text for a in answers]
        assert {a.json()["code"] for a in answers if a.status_code == 409} == {
            "request_not_pending"
        }
        assert len(await transfers_for(app, req["id"])) == 1
    assert await available(app, bob.user["id"]) == 2_000
    assert await available(app, alice.user["id"]) == 3_000


async def test_one_transfer_per_request_even_behind_the_services_back(
    client: httpx.AsyncClient, app: Any, alice: SignedIn, bob: SignedIn
) -> None:
    """The database refuses a second transfer naming the same request."""
    await fund(app, bob.user["id"], 1_000)
    req = await ask_ok(client, alice, bob, 100)
    assert (await act(client, bob, req["id"], "accept")).status_code == 200
    (paid,) = await transfers_for(app, req["id"])
    with pytest.raises(IntegrityError):
        async with app.state.resources.engine.begin() as conn:
            await conn.execute(
                text(
                    "INSERT INTO p2p.transfers (id, sender_id, sender_name, recipient_id, "
                    "recipient_kind, recipient_hint, amount, currency, status, request_id, "
                    "limit_day, limit_month) "
                    "VALUES ('p2p_dup', :s, 'x', :r, 'user_id', 'x', 100, 'USD', 'completed', :q, "
                    "current_date, date_trunc('month', current_date))"
                ),
                {"s": paid.sender_id, "r": paid.recipient_id, "q": req["id"]},
            )


@pytest.mark.parametrize("ending", ["cancelled", "refused", "review_expired"])
async def test_a_request_whose_payment_never_arrives_is_open_again(
    client: httpx.AsyncClient, app: Any, alice: SignedIn, bob: SignedIn, ending: str
) -> None:
    """Accepted with a payment held for review, which then never arrives: the request is
    pending again (an event says so), and the payer can pay it once more."""
    from billfold import jobs, ledger
    from billfold.platform.db import unit_of_work

    await fund(app, bob.user["id"], 5_000)
    req = await ask_ok(client, alice, bob, 1_500)
    with risk(app, Always("review")):
        r = await act(client, bob, req["id"], "accept")
    assert r.status_code == 200 and r.json()["status"] == "accepted", r.text
    held_id = r.json()["transfer_id"]
    assert await available(app, bob.user["id"]) == 3_500

    engine = app.state.resources.engine
    if ending == "cancelled":
        done = await client.post(f"/v1/transfers/{held_id}/cancel", headers=bob.headers)
        assert done.status_code == 200 and done.json()["status"] == "cancelled", done.text
    elif ending == "refused":
        async with unit_of_work(engine) as uow:
            await p2p.fail_pending(await uow.connection(), held_id, "fraud review")
    else:  # the ledger's sweeper releases the hold; the p2p consumer of its event fails it
        (held,) = await transfers_for(app, req["id"])
        await sql(
            app,
            "UPDATE ledger.holds SET expires_at = now() - interval '1 second' WHERE id = :h",
            h=held.hold_id,
        )
        await ledger.expire_holds(engine)
        (expired,) = await outbox_events(app, "billfold.ledger.hold.expired", held.hold_id)
        await jobs.event_sink(engine, app.state.p2p)(expired)
    assert await available(app, bob.user["id"]) == 5_000

    again = await client.get(f"/v1/transfer-requests/{req['id']}", headers=bob.headers)
    assert again.status_code == 200, again.text
    assert (again.json()["status"], again.json()["transfer_id"]) == ("pending", None)
    (reopened,) = await outbox_events(app, "billfold.p2p.request.reopened", req["id"])
    assert reopened["data"]["status"] == "pending"

    paid = await act(client, bob, req["id"], "accept")
    assert paid.status_code == 200 and paid.json()["status"] == "accepted", paid.text
    assert paid.json()["transfer_id"] != held_id
    assert await available(app, alice.user["id"]) == 1_500
    assert sorted(t.status for t in await transfers_for(app, req["id"])) == sorted(
        ["completed", "cancelled" if ending == "cancelled" else "failed"]
    )


async def test_asking_an_email_looks_the_same_whether_or_not_anyone_has_it(
    client: httpx.AsyncClient, app: Any, alice: SignedIn, bob: SignedIn
) -> None:
    await verify_contact(client, app, bob, "email")
    known = await ask(client, alice, {"email": bob.email}, 700)
    unknown = await ask(client, alice, {"email": unregistered_email()}, 700)
    assert known.status_code == unknown.status_code == 201

    def scrub(body: dict[str, Any]) -> dict[str, Any]:
        varying = {"id", "created_at", "updated_at", "expires_at"}
        return {k: ("…" if k in varying else v) for k, v in body.items()}

    assert scrub(known.json()) == scrub(unknown.json())
    assert known.json()["payer"] == {
        "user_id": None,
        "name": None,
        "handle": None,
        "contact": f"u***@{EMAIL_DOMAIN}",
    }
    # Even after the owner has been written down as payer, the requester's view does not say.
    await deliver(app, "billfold.p2p.request.created", known.json()["id"])
    assert (await request_row(app, known.json()["id"])).payer_id == bob.user["id"]
    for r in (known, unknown):
        seen = await client.get(f"/v1/transfer-requests/{r.json()['id']}", headers=alice.headers)
        assert scrub(seen.json()) == scrub(unknown.json())


async def test_a_request_to_a_contact_reaches_its_verified_owner(
    client: httpx.AsyncClient, app: Any, alice: SignedIn
) -> None:
    phone = new_phone()
    r = await ask(client, alice, {"phone": phone}, 900)
    assert r.status_code == 201, r.text
    req = r.json()
    assert req["payer"]["contact"] == f"{phone[:3]}*****{phone[-2:]}"

    # Registered, not verified: it is not theirs.
    jane = await sign_up(client, phone=phone, name="Jane Example")
    await deliver(app, "billfold.p2p.request.created", req["id"])
    assert (
        await client.get(f"/v1/transfer-requests/{req['id']}", headers=jane.headers)
    ).status_code == 404
    assert (await client.get("/v1/transfer-requests", headers=jane.headers)).json()["data"] == []
    assert (await act(client, jane, req["id"], "accept")).status_code == 404

    # Verified: visible at once (before any consumer runs), then written down by the consumer.
    await verify_contact(client, app, jane, "phone")
    listed = await client.get("/v1/transfer-requests?direction=incoming", headers=jane.headers)
    assert [x["id"] for x in listed.json()["data"]] == [req["id"]]
    assert listed.json()["data"][0]["direction"] == "incoming"
    await deliver(app, "billfold.users.contact.verified", jane.user["id"], times=2)
    assert (await request_row(app, req["id"])).payer_id == jane.user["id"]
    mine = await client.get(f"/v1/transfer-requests/{req['id']}", headers=alice.headers)
    assert mine.json()["payer"]["user_id"] is None  # not answered yet: not revealed

    await fund(app, jane.user["id"], 900)
    paid = await act(client, jane, req["id"], "accept")
    assert paid.status_code == 200, paid.text
    assert await available(app, alice.user["id"]) == 900
    mine = await client.get(f"/v1/transfer-requests/{req['id']}", headers=alice.headers)
    assert mine.json()["payer"]["user_id"] == jane.user["id"]
    assert mine.json()["payer"]["name"] == "Jane Example"


async def test_a_verified_owner_may_decline_before_the_consumer_ran(
    client: httpx.AsyncClient, app: Any, alice: SignedIn
) -> None:
    email = unregistered_email()
    kate = await sign_up(client, email=email)
    await verify_contact(client, app, kate, "email")
    req = (await ask(client, alice, {"email": email}, 300)).json()
    r = await act(client, kate, req["id"], "decline")
    assert r.status_code == 200 and r.json()["status"] == "declined"
    row = await request_row(app, req["id"])
    assert (row.status, row.payer_id) == ("declined", kate.user["id"])


async def test_requests_expire_once_even_with_two_workers(
    client: httpx.AsyncClient, app: Any, alice: SignedIn, bob: SignedIn
) -> None:
    await fund(app, bob.user["id"], 5_000)
    due = [await ask_ok(client, alice, bob, 100) for _ in range(3)]
    fresh = await ask_ok(client, alice, bob, 100)
    engine = app.state.resources.engine
    async with engine.begin() as conn:
        await conn.execute(
            text(
                "UPDATE p2p.transfer_requests SET expires_at = now() - interval '1 second' "
                "WHERE id = ANY(:ids)"
            ),
            {"ids": [r["id"] for r in due]},
        )
    # Past its deadline but not swept yet: it cannot be paid.
    late = await act(client, bob, due[0]["id"], "accept")
    assert late.status_code == 409 and late.json()["status"] == "expired"
    assert await available(app, bob.user["id"]) == 5_000

    counts = await asyncio.gather(p2p.expire_requests(engine), p2p.expire_requests(engine))
    assert sum(counts) >= 3
    for r in due:
        row = await request_row(app, r["id"])
        assert row.status == "expired" and row.decided_at is not None
        assert len(await outbox_events(app, "billfold.p2p.request.expired", r["id"])) == 1
    await p2p.expire_requests(engine)
    for r in due:
        assert len(await outbox_events(app, "billfold.p2p.request.expired", r["id"])) == 1
    assert (await request_row(app, fresh["id"])).status == "pending"
    seen = await client.get(f"/v1/transfer-requests/{due[0]['id']}", headers=alice.headers)
    assert seen.json()["status"] == "expired"


async def test_lists_page_newest_first(
    client: httpx.AsyncClient, app: Any, alice: SignedIn
) -> None:
    payers = [await sign_up(client) for _ in range(2)]
    made = [(await ask_ok(client, alice, p, 100 + i))["id"] for i, p in enumerate(payers * 2)]
    seen: list[str] = []
    cursor = None
    while True:
        url = "/v1/transfer-requests?limit=3" + (f"&cursor={cursor}" if cursor else "")
        page = (await client.get(url, headers=alice.headers)).json()
        seen += [x["id"] for x in page["data"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == list(reversed(made))
    bad = await client.get("/v1/transfer-requests?direction=sideways", headers=alice.headers)
    assert bad.status_code == 422


@pytest.mark.parametrize(
    "request_id",
    ["req_" + "0" * 26, "req_nope", "p2p_" + "0" * 26, "%00", "req_%00", "%E2%82%AC", "x" * 64],
)
async def test_malformed_or_unknown_request_ids_are_404(
    client: httpx.AsyncClient, alice: SignedIn, request_id: str
) -> None:
    r = await client.get(f"/v1/transfer-requests/{request_id}", headers=alice.headers)
    assert r.status_code == 404 and r.json()["code"] == "request_not_found", r.text
    for verb in ("accept", "decline", "cancel"):
        r = await act(client, alice, request_id, verb)
        assert r.status_code == 404 and r.json()["code"] == "request_not_found", (verb, r.text)


async def test_the_payer_is_shown_by_handle_and_a_name_is_never_taken_for_one(
    client: httpx.AsyncClient, alice: SignedIn
) -> None:
    handle = f"h_{new_phone()[-8:]}"
    with_handle = await sign_up(client, handle=handle, name="Handy Example")
    r = await ask(client, alice, {"handle": handle.upper()})
    assert r.status_code == 201, r.text
    assert r.json()["payer"] == {
        "user_id": with_handle.user["id"],
        "name": "Handy Example",
        "handle": f"@{handle}",
        "contact": None,
    }
    lookalike = await sign_up(client, name="@alice_real")
    r = await ask(client, alice, {"user_id": lookalike.user["id"]})
    assert r.json()["payer"]["handle"] is None and r.json()["payer"]["name"] == "@alice_real"
