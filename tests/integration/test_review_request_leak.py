"""A money request to an e-mail/phone tells its requester nothing about whether anyone has that
contact, also after the consumer has found its verified owner."""

from __future__ import annotations

from typing import Any

import httpx

from tests.conftest import SignedIn, idem
from tests.integration.p2p_contact_support import deliver, unregistered_email, verify_contact


async def test_a_request_to_a_verified_contact_does_not_change_when_its_payer_is_found(
    client: httpx.AsyncClient, app: Any, alice: SignedIn, bob: SignedIn
) -> None:
    """Writing down the verified owner as payer touched `updated_at`, which the requester sees:
    a request to a registered e-mail changed a moment after it was made, one to an e-mail
    nobody has never did."""
    asked = {}
    for label, email in (("known", bob.email), ("unknown", unregistered_email())):
        body = {"payer": {"email": email}, "amount": 700, "currency": "USD"}
        r = await client.post("/v1/transfer-requests", json=body, headers=idem(**alice.headers))
        assert r.status_code == 201, r.text
        asked[label] = r.json()
        await deliver(app, "billfold.p2p.request.created", r.json()["id"])
    # The owner verifies afterwards: the contact.verified consumer binds them then.
    await verify_contact(client, app, bob, "email")
    await deliver(app, "billfold.users.contact.verified", bob.user["id"])
    incoming = await client.get(
        f"/v1/transfer-requests/{asked['known']['id']}", headers=bob.headers
    )
    assert incoming.status_code == 200 and incoming.json()["direction"] == "incoming"

    for made in asked.values():
        r = await client.get(f"/v1/transfer-requests/{made['id']}", headers=alice.headers)
        assert r.status_code == 200, r.text
        assert r.json() == made
