"""WebAuthn passkeys end to end, with a software authenticator made in the test."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import struct
from dataclasses import dataclass, field
from typing import Any

import cbor2
import httpx
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from sqlalchemy import text

from tests.conftest import SignedIn
from tests.integration.test_mfa import new_user, outbox

PROBLEM = "application/problem+json"
UP, UV, AT = 0x01, 0x04, 0x40


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def unb64url(value: str) -> bytes:
    return base64.urlsafe_b64decode(value + "=" * (-len(value) % 4))


@dataclass
class SoftAuthenticator:
    """A platform authenticator in software: one P-256 credential, attestation "none"."""

    rp_id: str
    origin: str
    key: ec.EllipticCurvePrivateKey = field(
        default_factory=lambda: ec.generate_private_key(ec.SECP256R1())
    )
    credential_id: bytes = field(default_factory=lambda: os.urandom(32))
    sign_count: int = 0
    user_handle: bytes | None = None

    def cose_key(self) -> bytes:
        numbers = self.key.public_key().public_numbers()
        return cbor2.dumps(
            {
                1: 2,  # kty: EC2
                3: -7,  # alg: ES256
                -1: 1,  # crv: P-256
                -2: numbers.x.to_bytes(32, "big"),
                -3: numbers.y.to_bytes(32, "big"),
            }
        )

    def rp_id_hash(self, rp_id: str | None = None) -> bytes:
        return hashlib.sha256((rp_id or self.rp_id).encode()).digest()

    def client_data(self, type_: str, challenge: str, origin: str | None = None) -> bytes:
        return json.dumps(
            {
                "type": type_,
                "challenge": challenge,
                "origin": origin or self.origin,
                "crossOrigin": False,
            }
        ).encode()

    def create(
        self, options: dict[str, Any], *, origin: str | None = None, challenge: str | None = None
    ) -> dict[str, Any]:
        """navigator.credentials.create()"""
        assert options["rp"]["id"] == self.rp_id
        self.user_handle = unb64url(options["user"]["id"])
        attested = (
            bytes(16)  # AAGUID
            + struct.pack(">H", len(self.credential_id))
            + self.credential_id
            + self.cose_key()
        )
        auth_data = (
            self.rp_id_hash()
            + bytes([UP | UV | AT])
            + struct.pack(">I", self.sign_count)
            + attested
        )
        attestation = cbor2.dumps({"fmt": "none", "attStmt": {}, "authData": auth_data})
        client_data = self.client_data("webauthn.create", challenge or options["challenge"], origin)
        return {
            "id": b64url(self.credential_id),
            "rawId": b64url(self.credential_id),
            "type": "public-key",
            "response": {
                "clientDataJSON": b64url(client_data),
                "attestationObject": b64url(attestation),
                "transports": ["internal", "hybrid"],
            },
            "clientExtensionResults": {},
            "authenticatorAttachment": "platform",
        }

    def get(
        self,
        options: dict[str, Any],
        *,
        origin: str | None = None,
        challenge: str | None = None,
        sign_count: int | None = None,
        rp_id: str | None = None,
    ) -> dict[str, Any]:
        """navigator.credentials.get()"""
        self.sign_count = self.sign_count + 1 if sign_count is None else sign_count
        auth_data = self.rp_id_hash(rp_id) + bytes([UP | UV]) + struct.pack(">I", self.sign_count)
        client_data = self.client_data("webauthn.get", challenge or options["challenge"], origin)
        signature = self.key.sign(
            auth_data + hashlib.sha256(client_data).digest(), ec.ECDSA(hashes.SHA256())
        )
        return {
            "id": b64url(self.credential_id),
            "rawId": b64url(self.credential_id),
            "type": "public-key",
            "response": {
                "clientDataJSON": b64url(client_data),
                "authenticatorData": b64url(auth_data),
                "signature": b64url(signature),
                "userHandle": b64url(self.user_handle) if self.user_handle else None,
            },
            "clientExtensionResults": {},
        }


def authenticator(app: Any) -> SoftAuthenticator:
    s = app.state.users.settings
    return SoftAuthenticator(rp_id=s.webauthn_rp_id, origin=s.webauthn_origin)


async def registration_options(client: httpx.AsyncClient, user: SignedIn) -> dict[str, Any]:
    r = await client.post("/v1/me/passkeys/registration-options", headers=user.headers)
    assert r.status_code == 200, r.text
    return r.json()


async def register(
    client: httpx.AsyncClient, user: SignedIn, device: SoftAuthenticator, name: str = "Laptop"
) -> dict[str, Any]:
    opts = await registration_options(client, user)
    r = await client.post(
        "/v1/me/passkeys",
        json={
            "challenge_id": opts["challenge_id"],
            "credential": device.create(opts["options"]),
            "name": name,
        },
        headers=user.headers,
    )
    assert r.status_code == 201, r.text
    return r.json()


async def sign_in_options(client: httpx.AsyncClient, email: str | None = None) -> dict[str, Any]:
    if email is None:
        r = await client.post("/v1/auth/passkey/options")
    else:
        r = await client.post("/v1/auth/passkey/options", json={"email": email})
    assert r.status_code == 200, r.text
    return r.json()


async def passkey_token(
    client: httpx.AsyncClient, challenge_id: str, credential: dict[str, Any]
) -> httpx.Response:
    return await client.post(
        "/v1/auth/token",
        json={"grant_type": "passkey", "challenge_id": challenge_id, "credential": credential},
    )


async def stored_count(app: Any, passkey_id: str) -> int:
    async with app.state.resources.engine.connect() as conn:
        return int(
            (
                await conn.execute(
                    text("SELECT sign_count FROM users.webauthn_credentials WHERE id = :id"),
                    {"id": passkey_id},
                )
            ).scalar_one()
        )


async def list_passkeys(client: httpx.AsyncClient, user: SignedIn) -> list[dict[str, Any]]:
    r = await client.get("/v1/me/passkeys", headers=user.headers)
    assert r.status_code == 200, r.text
    return r.json()["data"]


# --- registration --------------------------------------------------------------------------------


async def test_register_list_and_sign_in(client, app):
    user = await new_user(client)
    device = authenticator(app)
    opts = await registration_options(client, user)
    options = opts["options"]
    assert options["rp"] == {"id": "localhost", "name": "billfold"}
    assert unb64url(options["user"]["id"]) == user.user["id"].encode()
    assert options["user"]["name"] == user.email
    assert {"type": "public-key", "alg": -7} in options["pubKeyCredParams"]
    assert options["authenticatorSelection"]["userVerification"] == "required"
    assert options["excludeCredentials"] == []

    r = await client.post(
        "/v1/me/passkeys",
        json={
            "challenge_id": opts["challenge_id"],
            "credential": device.create(options),
            "name": "MacBook",
        },
        headers=user.headers,
    )
    assert r.status_code == 201, r.text
    passkey = r.json()
    assert passkey["id"].startswith("cred_")
    assert passkey["name"] == "MacBook"
    assert passkey["credential_id"] == b64url(device.credential_id)
    assert passkey["transports"] == ["hybrid", "internal"]
    assert passkey["last_used_at"] is None
    assert [p["id"] for p in await list_passkeys(client, user)] == [passkey["id"]]
    r = await client.get(f"/v1/me/passkeys/{passkey['id']}", headers=user.headers)
    assert r.status_code == 200
    registered = await outbox(app, "billfold.users.passkey.registered", user.user["id"])
    assert [e["passkey_id"] for e in registered] == [passkey["id"]]

    # New options exclude the registered credential.
    again = await registration_options(client, user)
    assert [c["id"] for c in again["options"]["excludeCredentials"]] == [
        b64url(device.credential_id)
    ]

    # Sign in naming the account: the options never list credentials (all are discoverable).
    opts = await sign_in_options(client, user.email)
    assert opts["options"]["allowCredentials"] == []
    assert opts["options"]["rpId"] == "localhost"
    r = await passkey_token(client, opts["challenge_id"], device.get(opts["options"]))
    assert r.status_code == 200, r.text
    tokens = r.json()
    me = await client.get("/v1/me", headers={"Authorization": f"Bearer {tokens['access_token']}"})
    assert me.status_code == 200 and me.json()["id"] == user.user["id"]
    assert await stored_count(app, passkey["id"]) == 1
    sessions = await client.get("/v1/sessions", headers=user.headers)
    methods = {s["id"]: s["auth_method"] for s in sessions.json()["data"]}
    assert methods[tokens["session_id"]] == "passkey"

    # Sign in with a discoverable credential (no email).
    opts = await sign_in_options(client)
    assert opts["options"]["allowCredentials"] == []
    r = await passkey_token(client, opts["challenge_id"], device.get(opts["options"]))
    assert r.status_code == 200, r.text
    assert await stored_count(app, passkey["id"]) == 2
    got = await client.get(f"/v1/me/passkeys/{passkey['id']}", headers=user.headers)
    assert got.json()["last_used_at"] is not None

    # The refresh token of a passkey session works like any other.
    r = await client.post(
        "/v1/auth/token",
        data={"grant_type": "refresh_token", "refresh_token": r.json()["refresh_token"]},
    )
    assert r.status_code == 200


async def test_authenticator_without_counter(client, app):
    """Many platform passkeys always report 0; that is allowed while it stays 0."""
    user = await new_user(client)
    device = authenticator(app)
    passkey = await register(client, user, device)
    for _ in range(2):
        opts = await sign_in_options(client)
        r = await passkey_token(
            client, opts["challenge_id"], device.get(opts["options"], sign_count=0)
        )
        assert r.status_code == 200, r.text
    assert await stored_count(app, passkey["id"]) == 0


async def test_registration_failures_change_nothing(client, app):
    user = await new_user(client)
    device = authenticator(app)

    async def attempt(**create_args: Any) -> httpx.Response:
        opts = await registration_options(client, user)
        return await client.post(
            "/v1/me/passkeys",
            json={
                "challenge_id": opts["challenge_id"],
                "credential": device.create(opts["options"], **create_args),
            },
            headers=user.headers,
        )

    r = await attempt(origin="https://evil.example")
    assert r.status_code == 422
    assert r.headers["content-type"] == PROBLEM
    assert r.json()["code"] == "invalid_credential"
    r = await attempt(challenge=b64url(os.urandom(64)))
    assert r.status_code == 422
    assert r.json()["code"] == "invalid_credential"

    opts = await registration_options(client, user)
    for junk in ({}, {"id": "x", "rawId": "y", "type": "public-key", "response": {}}):
        r = await client.post(
            "/v1/me/passkeys",
            json={"challenge_id": opts["challenge_id"], "credential": junk},
            headers=user.headers,
        )
        assert r.status_code in (400, 422), r.text
    r = await client.post(
        "/v1/me/passkeys",
        json={"challenge_id": opts["challenge_id"], "credential": "nope"},
        headers=user.headers,
    )
    assert r.status_code == 422

    assert await list_passkeys(client, user) == []
    assert await outbox(app, "billfold.users.passkey.registered", user.user["id"]) == []


async def test_registration_challenge_is_single_use_and_owned(client, app):
    alice = await new_user(client)
    bob = await new_user(client)
    device = authenticator(app)
    opts = await registration_options(client, alice)
    credential = device.create(opts["options"])

    # Bob cannot use (or burn) Alice's challenge.
    r = await client.post(
        "/v1/me/passkeys",
        json={"challenge_id": opts["challenge_id"], "credential": credential},
        headers=bob.headers,
    )
    assert r.status_code == 400
    assert r.json()["code"] == "invalid_challenge"

    body = {"challenge_id": opts["challenge_id"], "credential": credential}
    r = await client.post("/v1/me/passkeys", json=body, headers=alice.headers)
    assert r.status_code == 201, r.text
    r = await client.post("/v1/me/passkeys", json=body, headers=alice.headers)
    assert r.status_code == 400
    assert r.json()["code"] == "invalid_challenge"

    # The same authenticator credential cannot be registered twice (by anyone).
    opts = await registration_options(client, bob)
    r = await client.post(
        "/v1/me/passkeys",
        json={"challenge_id": opts["challenge_id"], "credential": device.create(opts["options"])},
        headers=bob.headers,
    )
    assert r.status_code == 409
    assert r.json()["code"] == "passkey_already_registered"
    assert await list_passkeys(client, bob) == []
    assert len(await list_passkeys(client, alice)) == 1


async def test_delete_and_ownership(client, app):
    alice = await new_user(client)
    bob = await new_user(client)
    device = authenticator(app)
    passkey = await register(client, alice, device)

    for path in (f"/v1/me/passkeys/{passkey['id']}", "/v1/me/passkeys/cred_nope"):
        r = await client.delete(path, headers=bob.headers)
        assert r.status_code == 404
        assert r.headers["content-type"] == PROBLEM
        r = await client.get(path, headers=bob.headers)
        assert r.status_code == 404
    assert len(await list_passkeys(client, alice)) == 1

    r = await client.delete(f"/v1/me/passkeys/{passkey['id']}", headers=alice.headers)
    assert r.status_code == 204
    removed = await outbox(app, "billfold.users.passkey.removed", alice.user["id"])
    assert [e["passkey_id"] for e in removed] == [passkey["id"]]
    r = await client.delete(f"/v1/me/passkeys/{passkey['id']}", headers=alice.headers)
    assert r.status_code == 404
    assert await list_passkeys(client, alice) == []

    opts = await sign_in_options(client)
    r = await passkey_token(client, opts["challenge_id"], device.get(opts["options"]))
    assert r.status_code == 400
    assert r.json()["error"] == "invalid_grant"


async def test_passkey_routes_need_devices_scope(client):
    user = await new_user(client)
    r = await client.post("/v1/me/passkeys/registration-options")
    assert r.status_code == 401
    t = await client.post(
        "/v1/auth/token",
        data={
            "grant_type": "password",
            "username": user.email,
            "password": user.password,
            "scope": "profile",
        },
    )
    headers = {"Authorization": f"Bearer {t.json()['access_token']}"}
    r = await client.get("/v1/me/passkeys", headers=headers)
    assert r.status_code == 403


# --- sign-in ---------------------------------------------------------------------------------------


async def test_sign_in_failures(client, app):
    user = await new_user(client)
    device = authenticator(app)
    passkey = await register(client, user, device)

    async def attempt(**get_args: Any) -> httpx.Response:
        opts = await sign_in_options(client)
        return await passkey_token(
            client, opts["challenge_id"], device.get(opts["options"], **get_args)
        )

    for args in (
        {"origin": "https://evil.example"},
        {"challenge": b64url(os.urandom(64))},
        {"rp_id": "evil.example"},
    ):
        r = await attempt(**args)
        assert r.status_code == 400, args
        assert r.headers["content-type"] == PROBLEM
        assert r.json()["code"] == "invalid_grant"
    assert await stored_count(app, passkey["id"]) == 0

    # Replayed challenge: the first use spends it.
    opts = await sign_in_options(client)
    assertion = device.get(opts["options"])
    r = await passkey_token(client, opts["challenge_id"], assertion)
    assert r.status_code == 200, r.text
    r = await passkey_token(client, opts["challenge_id"], assertion)
    assert r.status_code == 400
    # The same assertion under a fresh challenge fails too (wrong challenge, stale counter).
    opts = await sign_in_options(client)
    r = await passkey_token(client, opts["challenge_id"], assertion)
    assert r.status_code == 400

    # Counter regression: a genuine signature whose counter went backwards (a clone).
    r = await attempt(sign_count=10)
    assert r.status_code == 200, r.text
    assert await stored_count(app, passkey["id"]) == 10
    for count in (10, 3, 0):
        r = await attempt(sign_count=count)
        assert r.status_code == 400, count
        assert "counter" in r.json()["detail"]
    assert await stored_count(app, passkey["id"]) == 10

    # A tampered signature.
    opts = await sign_in_options(client)
    assertion = device.get(opts["options"])
    sig = bytearray(unb64url(assertion["response"]["signature"]))
    sig[-1] ^= 1
    assertion["response"]["signature"] = b64url(bytes(sig))
    r = await passkey_token(client, opts["challenge_id"], assertion)
    assert r.status_code == 400

    # Unknown credential, wrong user handle, junk.
    stranger = authenticator(app)
    stranger.user_handle = user.user["id"].encode()
    opts = await sign_in_options(client)
    r = await passkey_token(client, opts["challenge_id"], stranger.get(opts["options"]))
    assert r.status_code == 400
    opts = await sign_in_options(client)
    assertion = device.get(opts["options"])
    assertion["response"]["userHandle"] = b64url(b"usr_someone_else")
    r = await passkey_token(client, opts["challenge_id"], assertion)
    assert r.status_code == 400
    for junk in (
        {},
        {"rawId": 5},
        {"rawId": "!!", "response": []},
        {"rawId": b64url(device.credential_id)},
    ):
        opts = await sign_in_options(client)
        r = await passkey_token(client, opts["challenge_id"], junk)
        assert r.status_code == 400, junk
    r = await passkey_token(client, "no-such-challenge", device.get({"challenge": "AAAA"}))
    assert r.status_code == 400
    r = await client.post(
        "/v1/auth/token",
        json={"grant_type": "passkey", "challenge_id": "x", "credential": "not an object"},
    )
    assert r.status_code == 422


async def test_email_options_reveal_nothing(client, app):
    with_passkey = await new_user(client)
    without_passkey = await new_user(client)
    device = authenticator(app)
    await register(client, with_passkey, device)

    answers = [
        await sign_in_options(client, email)
        for email in (with_passkey.email, without_passkey.email, "nobody-here@example.com")
    ]

    # Apart from the fresh challenge, the three answers are the same, byte for byte.
    def without_challenge(a):
        options = {k: v for k, v in a["options"].items() if k != "challenge"}
        return sorted(a.keys()), options

    assert without_challenge(answers[0]) == without_challenge(answers[1])
    assert without_challenge(answers[1]) == without_challenge(answers[2])
    assert answers[0]["options"]["allowCredentials"] == []

    # A challenge for one account cannot be answered with another account's passkey.
    for opts in answers[1:]:
        r = await passkey_token(client, opts["challenge_id"], device.get(opts["options"]))
        assert r.status_code == 400
    r = await client.post("/v1/auth/passkey/options", json={"email": "not-an-email"})
    assert r.status_code == 422
    r = await client.post("/v1/auth/passkey/options", json={"email": None, "x": 1})
    assert r.status_code == 422
