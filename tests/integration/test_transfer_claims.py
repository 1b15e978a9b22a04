"""Transfers to an e-mail/phone: escrow, claims by the verified owner, expiry, and no leaks.

The claim consumers are run on the real outbox rows through the worker's own sink
(`jobs.event_sink`), so the wiring the worker uses is the one tested.
"""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
from sqlalchemy import text

from billfold import p2p
from tests.conftest import SignedIn, fund, idem, new_phone, sign_up
from tests.integration.p2p_contact_support import (
    EMAIL_DOMAIN,
    assert_escrow_conserved,
    deliver,
    escrow,
    unregistered_email,
    verify_contact,
)
from tests.integration.transfer_support import (
    available,
    outbox_events,
    postings,
    send,
    transfer_row,
)


async def test_invite_by_email_waits_in_escrow_until_the_verified_owner_claims_it_once(
    client: httpx.AsyncClient, app: Any, alice: SignedIn
) -> None:
    await fund(app, alice.user["id"], 10_000)
    email = unregistered_email()
    escrow_before = await escrow(app)

    r = await send(client, alice, 2_500, email=email)
    assert r.status_code == 201, r.text
    sent = r.json()
    assert sent["status"] == "pending_claim"
    assert sent["recipient"] == {
        "user_id": None,
        "name": None,
        "handle": None,
        "contact": f"u***@{EMAIL_DOMAIN}",
    }
    assert sent["claim_expires_at"] is not None
    assert await available(app, alice.user["id"]) == 7_500
    assert await escrow(app) == escrow_before + 2_500
    await assert_escrow_conserved(app)

    # Registered but not verified: neither the consumer nor the claim endpoint hands it over.
    carol = await sign_up(client, email=email, name="Carol Example")
    await deliver(app, "billfold.p2p.transfer.pending_claim", sent["id"])
    nothing = await client.post("/v1/transfers/claims", headers=carol.headers)
    assert nothing.status_code == 200 and nothing.json() == {"data": []}
    assert (await transfer_row(app, sent["id"])).status == "pending_claim"
    assert await available(app, carol.user["id"]) == 0
    hidden = await client.get(f"/v1/transfers/{sent['id']}", headers=carol.headers)
    assert hidden.status_code == 404

    # Verified: the contact.verified consumer claims it; a redelivery changes nothing.
    await verify_contact(client, app, carol, "email")
    assert await deliver(app, "billfold.users.contact.verified", carol.user["id"], times=2) == 1
    row = await transfer_row(app, sent["id"])
    assert (row.status, row.recipient_id, row.recipient_name) == (
        "completed",
        carol.user["id"],
        "Carol Example",
    )
    assert await available(app, carol.user["id"]) == 2_500
    assert await available(app, alice.user["id"]) == 7_500
    assert await escrow(app) == escrow_before
    assert await postings(app, sent["id"], "p2p_claim") == 1
    await assert_escrow_conserved(app)

    seen = (await client.get(f"/v1/transfers/{sent['id']}", headers=carol.headers)).json()
    assert seen["status"] == "completed" and seen["direction"] == "received"
    assert seen["recipient"]["user_id"] == carol.user["id"]
    completed = await outbox_events(app, "billfold.p2p.transfer.completed", sent["id"])
    assert len(completed) == 1 and completed[0]["data"]["claimed"] is True
    # The sender sees who claimed it.
    mine = (await client.get(f"/v1/transfers/{sent['id']}", headers=alice.headers)).json()
    assert mine["recipient"]["user_id"] == carol.user["id"] and mine["direction"] == "sent"


async def test_a_verified_owner_addressed_by_phone_gets_it_from_the_pending_claim_event(
    client: httpx.AsyncClient, app: Any, alice: SignedIn
) -> None:
    phone = new_phone()
    dave = await sign_up(client, phone=phone, name="Dave Example")
    await verify_contact(client, app, dave, "phone")
    await fund(app, alice.user["id"], 5_000)

    r = await send(client, alice, 1_200, phone=phone)
    assert r.status_code == 201, r.text
    assert r.json()["status"] == "pending_claim"  # the answer does not say dave exists
    assert r.json()["recipient"]["user_id"] is None

    await deliver(app, "billfold.p2p.transfer.pending_claim", r.json()["id"], times=2)
    row = await transfer_row(app, r.json()["id"])
    assert (row.status, row.recipient_id) == ("completed", dave.user["id"])
    assert await available(app, dave.user["id"]) == 1_200
    assert await postings(app, row.id, "p2p_claim") == 1
    await assert_escrow_conserved(app)


async def test_an_unverified_phone_owner_gets_nothing(
    client: httpx.AsyncClient, app: Any, alice: SignedIn
) -> None:
    phone = new_phone()
    erin = await sign_up(client, phone=phone)
    await verify_contact(client, app, erin, "email")  # another contact verified: not enough
    await fund(app, alice.user["id"], 5_000)
    r = await send(client, alice, 700, phone=phone)
    await deliver(app, "billfold.p2p.transfer.pending_claim", r.json()["id"])
    await deliver(app, "billfold.users.contact.verified", erin.user["id"])
    claim = await client.post("/v1/transfers/claims", headers=erin.headers)
    assert claim.json() == {"data": []}
    assert (await transfer_row(app, r.json()["id"])).status == "pending_claim"
    assert await available(app, erin.user["id"]) == 0


async def test_sending_to_a_registered_or_unknown_email_looks_the_same(
    client: httpx.AsyncClient, app: Any, alice: SignedIn, bob: SignedIn
) -> None:
    await verify_contact(client, app, bob, "email")
    await fund(app, alice.user["id"], 5_000)
    known = await send(client, alice, 1_000, email=bob.email)
    unknown = await send(client, alice, 1_000, email=unregistered_email())
    assert known.status_code == unknown.status_code == 201

    def scrub(body: dict[str, Any]) -> dict[str, Any]:
        varying = {"id", "created_at", "updated_at", "claim_expires_at"}
        return {k: ("…" if k in varying else v) for k, v in body.items()}

    assert scrub(known.json()) == scrub(unknown.json())
    assert known.headers.keys() == unknown.headers.keys()
    # The events the sender's side causes look alike too (before any consumer runs).
    ev = [
        (await outbox_events(app, "billfold.p2p.transfer.pending_claim", r.json()["id"]))[0]
        for r in (known, unknown)
    ]
    assert ev[0]["data"].keys() == ev[1]["data"].keys()
    assert ev[0]["data"]["recipient_id"] is ev[1]["data"]["recipient_id"] is None


async def test_claim_endpoint_claims_now_and_only_once_even_when_called_concurrently(
    client: httpx.AsyncClient, app: Any, alice: SignedIn
) -> None:
    email = unregistered_email()
    await fund(app, alice.user["id"], 10_000)
    first = (await send(client, alice, 1_000, email=email)).json()
    second = (await send(client, alice, 2_000, email=email)).json()
    frank = await sign_up(client, email=email)
    await verify_contact(client, app, frank, "email")  # no consumer run: the endpoint claims

    answers = await asyncio.gather(
        *(client.post("/v1/transfers/claims", headers=idem(**frank.headers)) for _ in range(3))
    )
    assert all(a.status_code == 200 for a in answers), [a.text for a in answers]
    claimed = [t for a in answers for t in a.json()["data"]]
    assert sorted(t["id"] for t in claimed) == sorted([first["id"], second["id"]])
    assert {(t["status"], t["direction"]) for t in claimed} == {("completed", "received")}
    assert await available(app, frank.user["id"]) == 3_000
    for t in (first, second):
        assert await postings(app, t["id"], "p2p_claim") == 1
    again = await client.post("/v1/transfers/claims", headers=frank.headers)
    assert again.json() == {"data": []}
    await assert_escrow_conserved(app)


async def test_claims_never_reveal_other_peoples_transfers(
    client: httpx.AsyncClient, app: Any, alice: SignedIn, bob: SignedIn
) -> None:
    await fund(app, alice.user["id"], 5_000)
    r = await send(client, alice, 500, email=unregistered_email())
    await verify_contact(client, app, bob, "email")
    claim = await client.post("/v1/transfers/claims", headers=bob.headers)
    assert claim.status_code == 200 and claim.json() == {"data": []}
    assert (await transfer_row(app, r.json()["id"])).status == "pending_claim"
    no_scope = await client.post("/v1/transfers/claims")
    assert no_scope.status_code == 401


async def test_the_sender_never_claims_their_own_transfer(
    client: httpx.AsyncClient, app: Any, alice: SignedIn
) -> None:
    email = unregistered_email()
    await fund(app, alice.user["id"], 5_000)
    r = await send(client, alice, 800, email=email)
    # alice takes that address herself afterwards and verifies it.
    moved = await client.patch("/v1/me", json={"email": email}, headers=alice.headers)
    assert moved.status_code == 200, moved.text
    await verify_contact(client, app, alice, "email")
    await deliver(app, "billfold.users.contact.verified", alice.user["id"])
    assert (await client.post("/v1/transfers/claims", headers=alice.headers)).json() == {"data": []}
    assert (await transfer_row(app, r.json()["id"])).status == "pending_claim"
    assert await available(app, alice.user["id"]) == 4_200


async def test_unclaimed_transfers_return_to_the_sender_once_with_two_workers(
    client: httpx.AsyncClient, app: Any, alice: SignedIn
) -> None:
    await fund(app, alice.user["id"], 10_000)
    sent = [(await send(client, alice, 1_000, email=unregistered_email())).json() for _ in range(4)]
    ids = [t["id"] for t in sent]
    assert await available(app, alice.user["id"]) == 6_000
    engine = app.state.resources.engine
    async with engine.begin() as conn:
        await conn.execute(
            text(
                "UPDATE p2p.transfers SET claim_expires_at = now() - interval '1 second' "
                "WHERE id = ANY(:ids)"
            ),
            {"ids": ids},
        )

    counts = await asyncio.gather(p2p.expire_claims(engine), p2p.expire_claims(engine))
    assert sum(counts) >= 4  # others' due claims may be returned too; ours exactly once:
    for transfer_id in ids:
        row = await transfer_row(app, transfer_id)
        assert row.status == "expired"
        assert await postings(app, transfer_id, "p2p_return") == 1
        assert len(await outbox_events(app, "billfold.p2p.transfer.expired", transfer_id)) == 1
    assert await available(app, alice.user["id"]) == 10_000
    await p2p.expire_claims(engine)  # a later run finds nothing of ours left to return
    for transfer_id in ids:
        assert await postings(app, transfer_id, "p2p_return") == 1
    await assert_escrow_conserved(app)

    # An expired transfer is not claimable, nor cancellable.
    seen = await client.get(f"/v1/transfers/{ids[0]}", headers=alice.headers)
    assert seen.json()["status"] == "expired" and seen.json()["claim_expires_at"] is None
    cancel = await client.post(f"/v1/transfers/{ids[0]}/cancel", headers=alice.headers)
    assert cancel.status_code == 409 and cancel.json()["code"] == "transfer_not_cancellable"


async def test_expiry_leaves_transfers_not_yet_due(
    client: httpx.AsyncClient, app: Any, alice: SignedIn
) -> None:
    await fund(app, alice.user["id"], 1_000)
    r = await send(client, alice, 1_000, email=unregistered_email())
    await p2p.expire_claims(app.state.resources.engine)
    assert (await transfer_row(app, r.json()["id"])).status == "pending_claim"
    assert await available(app, alice.user["id"]) == 0


async def test_the_sender_can_cancel_an_unclaimed_transfer(
    client: httpx.AsyncClient, app: Any, alice: SignedIn, bob: SignedIn
) -> None:
    email = unregistered_email()
    await fund(app, alice.user["id"], 3_000)
    r = await send(client, alice, 2_000, email=email)
    transfer_id = r.json()["id"]
    stranger = await client.post(f"/v1/transfers/{transfer_id}/cancel", headers=bob.headers)
    assert stranger.status_code == 404

    cancelled = await client.post(f"/v1/transfers/{transfer_id}/cancel", headers=alice.headers)
    assert cancelled.status_code == 200, cancelled.text
    assert cancelled.json()["status"] == "cancelled"
    assert await available(app, alice.user["id"]) == 3_000
    assert await postings(app, transfer_id, "p2p_return") == 1
    await assert_escrow_conserved(app)
    twice = await client.post(f"/v1/transfers/{transfer_id}/cancel", headers=alice.headers)
    assert twice.status_code == 409 and twice.json()["code"] == "transfer_not_cancellable"

    # The owner who turns up later finds nothing.
    gina = await sign_up(client, email=email)
    await verify_contact(client, app, gina, "email")
    await deliver(app, "billfold.users.contact.verified", gina.user["id"])
    assert (await client.post("/v1/transfers/claims", headers=gina.headers)).json() == {"data": []}
    assert await available(app, gina.user["id"]) == 0


async def test_a_claim_racing_a_cancel_moves_the_money_exactly_once(
    client: httpx.AsyncClient, app: Any, alice: SignedIn
) -> None:
    email = unregistered_email()
    hank = await sign_up(client, email=email)
    await verify_contact(client, app, hank, "email")
    for _ in range(5):
        await fund(app, alice.user["id"], 400)
        r = await send(client, alice, 400, email=email)
        transfer_id = r.json()["id"]
        claim, cancel = await asyncio.gather(
            client.post("/v1/transfers/claims", headers=hank.headers),
            client.post(f"/v1/transfers/{transfer_id}/cancel", headers=alice.headers),
        )
        status = (await transfer_row(app, transfer_id)).status
        if status == "completed":
            assert [t["id"] for t in claim.json()["data"]] == [transfer_id]
            assert cancel.status_code == 409
        else:
            assert status == "cancelled" and cancel.status_code == 200
            assert claim.json() == {"data": []}
        moved = await postings(app, transfer_id, "p2p_claim") + await postings(
            app, transfer_id, "p2p_return"
        )
        assert moved == 1
    total = await available(app, alice.user["id"]) + await available(app, hank.user["id"])
    assert total == 2_000
    await assert_escrow_conserved(app)


async def test_a_second_claim_waits_for_the_first_and_finds_nothing(
    client: httpx.AsyncClient, app: Any, alice: SignedIn
) -> None:
    """Deterministic form of the race: the first claim holds its rows until it commits."""
    email = unregistered_email()
    await fund(app, alice.user["id"], 900)
    r = await send(client, alice, 900, email=email)
    ivy = await sign_up(client, email=email)
    await verify_contact(client, app, ivy, "email")
    engine, rt = app.state.resources.engine, app.state.p2p

    async def claim_in_own_transaction() -> list[Any]:
        async with engine.begin() as conn:
            return await p2p.claim_for_user(conn, rt, ivy.user["id"])

    async with engine.connect() as conn:
        first_tx = await conn.begin()
        first = await p2p.claim_for_user(conn, rt, ivy.user["id"])
        assert [t.id for t in first] == [r.json()["id"]]
        second = asyncio.create_task(claim_in_own_transaction())
        await asyncio.sleep(0.3)
        assert not second.done()  # waiting on the transfer row
        await first_tx.commit()
    assert await second == []
    assert await available(app, ivy.user["id"]) == 900
    assert await postings(app, r.json()["id"], "p2p_claim") == 1


async def test_a_contact_transfer_released_from_review_still_reaches_its_verified_owner(
    client: httpx.AsyncClient, app: Any, alice: SignedIn
) -> None:
    """The risk check held it (no `invitee` went out then); release re-invites from the sealed
    contact, and the consumer hands it to the owner who already has the phone verified."""
    from billfold.platform.db import unit_of_work

    class Review:
        async def assess(self, conn: Any, transfer: Any) -> p2p.RiskDecision:
            return p2p.RiskDecision("review", 700, ("new recipient",))

    phone = new_phone()
    frank = await sign_up(client, phone=phone, name="Frank Example")
    await verify_contact(client, app, frank, "phone")
    await fund(app, alice.user["id"], 5_000)
    original, app.state.p2p.risk = app.state.p2p.risk, Review()
    try:
        r = await send(client, alice, 900, phone=phone)
    finally:
        app.state.p2p.risk = original
    assert r.status_code == 201 and r.json()["status"] == "pending", r.text
    held = await outbox_events(app, "billfold.p2p.transfer.pending", r.json()["id"])
    assert "invitee" not in held[0]["data"]

    async with unit_of_work(app.state.resources.engine) as uow:
        await p2p.release_pending(await uow.connection(), app.state.p2p, r.json()["id"])
    invited = await outbox_events(app, "billfold.p2p.transfer.pending_claim", r.json()["id"])
    assert invited[0]["data"]["invitee"] == {"phone": phone}
    await deliver(app, "billfold.p2p.transfer.pending_claim", r.json()["id"])
    row = await transfer_row(app, r.json()["id"])
    assert (row.status, row.recipient_id) == ("completed", frank.user["id"])
    assert await available(app, frank.user["id"]) == 900
    assert await available(app, alice.user["id"]) == 4_100
    await assert_escrow_conserved(app)
