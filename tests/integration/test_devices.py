"""Devices, device-signature ("biometric") sign-in, and sessions."""

from __future__ import annotations

import base64

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

from tests.conftest import device_key, sign_up


def _b64url(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


async def _enrol(client, user, *, platform="ios", public_key=None, name="My phone"):
    body = {"name": name, "platform": platform, "push_token": "apns-token-0123456789"}
    if public_key:
        body["public_key"] = public_key
    r = await client.post("/v1/devices", json=body, headers=user.headers)
    assert r.status_code == 201, r.text
    return r.json()


async def _device_login(client, device_id, key, *, raw=False, mutate=None):
    ch = await client.post("/v1/auth/challenge", json={"device_id": device_id})
    assert ch.status_code == 201, ch.text
    challenge = ch.json()
    der = key.sign(challenge["signing_input"].encode(), ec.ECDSA(hashes.SHA256()))
    if raw:
        r, s = decode_dss_signature(der)
        sig = r.to_bytes(32, "big") + s.to_bytes(32, "big")
    else:
        sig = der
    form = {
        "grant_type": "device_signature",
        "device_id": device_id,
        "challenge_id": challenge["challenge_id"],
        "signature": _b64url(sig),
    }
    if mutate:
        mutate(form)
    return await client.post("/v1/auth/token", data=form), form


async def test_enrol_list_get_rename_device(client, alice):
    _, pem = device_key()
    device = await _enrol(client, alice, public_key=pem)
    assert device["id"].startswith("dev_")
    assert device["has_device_key"] and device["has_push_token"]
    assert "public_key" not in device and "push_token" not in device
    listed = (await client.get("/v1/devices", headers=alice.headers)).json()
    assert [d["id"] for d in listed["data"]] == [device["id"]]
    assert listed["next_cursor"] is None
    r = await client.patch(
        f"/v1/devices/{device['id']}", json={"name": "Work phone"}, headers=alice.headers
    )
    assert r.status_code == 200 and r.json()["name"] == "Work phone"
    assert (await client.get(f"/v1/devices/{device['id']}", headers=alice.headers)).json()[
        "name"
    ] == "Work phone"


async def test_device_list_paginates(client):
    user = await sign_up(client)
    ids = [(await _enrol(client, user, name=f"d{i}"))["id"] for i in range(5)]
    seen, cursor = [], None
    while True:
        params = {"limit": 2, **({"cursor": cursor} if cursor else {})}
        page = (await client.get("/v1/devices", params=params, headers=user.headers)).json()
        seen += [d["id"] for d in page["data"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == sorted(ids, reverse=True)
    bad = await client.get("/v1/devices", params={"cursor": "!!!"}, headers=user.headers)
    assert bad.status_code == 422 and bad.json()["code"] == "invalid_cursor"
    bad = await client.get("/v1/devices", params={"limit": 1000}, headers=user.headers)
    assert bad.status_code == 422 and bad.json()["errors"][0]["parameter"] == "limit"


async def test_bad_device_input_is_422_and_changes_nothing(client, alice):
    before = (await client.get("/v1/devices", headers=alice.headers)).json()["data"]
    for body in (
        {"name": "x", "platform": "symbian"},
        {"name": "", "platform": "ios"},
        {"name": "x", "platform": "ios", "public_key": "not a key"},
        {"name": "x", "platform": "ios", "public_key": _rsa_pem()},
        # PostgreSQL cannot store these; they were 500s
        {"name": "a\u0000b", "platform": "ios"},
        {"name": "x", "platform": "ios", "attestation": {"fmt": "\u0000"}},
        {"name": "x", "platform": "ios", "attestation": {"\u0000": 1}},
        '{"name": "x", "platform": "ios", "attestation": {"n": [NaN]}}',
    ):
        if isinstance(body, str):
            headers = {**alice.headers, "content-type": "application/json"}
            r = await client.post("/v1/devices", content=body, headers=headers)
        else:
            r = await client.post("/v1/devices", json=body, headers=alice.headers)
        assert r.status_code == 422, body
        assert r.headers["content-type"].startswith("application/problem+json")
    assert (await client.get("/v1/devices", headers=alice.headers)).json()["data"] == before


def _rsa_pem() -> str:
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return (
        key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )


async def test_someone_elses_device_is_404(client, alice, bob):
    device = await _enrol(client, alice)
    for method, kwargs in (("GET", {}), ("PATCH", {"json": {"name": "mine now"}}), ("DELETE", {})):
        r = await client.request(
            method, f"/v1/devices/{device['id']}", headers=bob.headers, **kwargs
        )
        assert r.status_code == 404, method
    assert (await client.get("/v1/devices/dev_garbage", headers=bob.headers)).status_code == 404
    assert (
        await client.get(f"/v1/devices/{device['id']}", headers=alice.headers)
    ).status_code == 200


async def test_device_signature_sign_in_with_a_real_p256_key(client, alice):
    key, pem = device_key()
    device = await _enrol(client, alice, public_key=pem)
    for raw in (False, True):  # DER (Secure Enclave) and raw r||s (WebCrypto)
        r, _ = await _device_login(client, device["id"], key, raw=raw)
        assert r.status_code == 200, r.text
        tokens = r.json()
        me = await client.get(
            "/v1/me", headers={"Authorization": f"Bearer {tokens['access_token']}"}
        )
        assert me.json()["id"] == alice.user["id"]
    sessions = (await client.get("/v1/sessions", headers=alice.headers)).json()["data"]
    assert any(s["device_id"] == device["id"] and s["auth_method"] == "device" for s in sessions)


async def test_device_signature_failures(client, alice):
    key, pem = device_key()
    other_key, _ = device_key()
    device = await _enrol(client, alice, public_key=pem)
    # Signed by a key that is not the enrolled one.
    r, _ = await _device_login(client, device["id"], other_key)
    assert r.status_code == 400 and r.json()["code"] == "invalid_grant"
    # A challenge is single use.
    r, form = await _device_login(client, device["id"], key)
    assert r.status_code == 200
    replay = await client.post("/v1/auth/token", data=form)
    assert replay.status_code == 400
    # A challenge made for one device does not sign in another.
    second = await _enrol(client, alice, public_key=pem, name="tablet")
    r, _ = await _device_login(
        client, device["id"], key, mutate=lambda f: f.update(device_id=second["id"])
    )
    assert r.status_code == 400
    # Unknown device: the challenge is still issued (no probing), the grant fails.
    ch = await client.post("/v1/auth/challenge", json={"device_id": "dev_doesnotexist"})
    assert ch.status_code == 201
    # A device without a key cannot use this grant.
    keyless = await _enrol(client, alice, name="no key")
    r, _ = await _device_login(client, keyless["id"], key)
    assert r.status_code == 400
    # Garbage signature.
    r, _ = await _device_login(
        client, device["id"], key, mutate=lambda f: f.update(signature="%%%")
    )
    assert r.status_code == 400


async def test_watch_gets_pay_scope_only(client, alice):
    key, pem = device_key()
    watch = await _enrol(client, alice, platform="watch", public_key=pem, name="Watch")
    assert watch["scopes"] == ["pay"]
    r, _ = await _device_login(client, watch["id"], key)
    assert r.status_code == 200 and r.json()["scope"] == "pay"
    headers = {"Authorization": f"Bearer {r.json()['access_token']}"}
    me = await client.get("/v1/me", headers=headers)
    assert me.status_code == 403 and me.json()["code"] == "insufficient_scope"
    assert (await client.get("/v1/devices", headers=headers)).status_code == 403


async def test_revoking_a_device_revokes_its_sessions_and_tokens(client):
    user = await sign_up(client)
    key, pem = device_key()
    device = await _enrol(client, user, public_key=pem)
    r, _ = await _device_login(client, device["id"], key)
    phone = r.json()
    phone_headers = {"Authorization": f"Bearer {phone['access_token']}"}
    assert (await client.get("/v1/me", headers=phone_headers)).status_code == 200
    assert (
        await client.delete(f"/v1/devices/{device['id']}", headers=user.headers)
    ).status_code == 204
    assert (await client.get("/v1/me", headers=phone_headers)).status_code == 401
    refreshed = await client.post(
        "/v1/auth/token",
        data={"grant_type": "refresh_token", "refresh_token": phone["refresh_token"]},
    )
    assert refreshed.status_code == 400
    r, _ = await _device_login(client, device["id"], key)
    assert r.status_code == 400
    assert (
        await client.get(f"/v1/devices/{device['id']}", headers=user.headers)
    ).status_code == 404
    # The web session that revoked it lives on.
    assert (await client.get("/v1/me", headers=user.headers)).status_code == 200


async def test_sessions_list_and_revoke(client, alice, bob):
    second = await client.post(
        "/v1/auth/token",
        data={"grant_type": "password", "username": alice.email, "password": alice.password},
        headers={"User-Agent": "billfold-ios/1.0"},
    )
    other = second.json()
    sessions = (await client.get("/v1/sessions", headers=alice.headers)).json()["data"]
    by_id = {s["id"]: s for s in sessions}
    assert by_id[alice.tokens["session_id"]]["current"] is True
    assert by_id[other["session_id"]]["user_agent"] == "billfold-ios/1.0"
    # Bob cannot see or end Alice's session.
    r = await client.delete(f"/v1/sessions/{other['session_id']}", headers=bob.headers)
    assert r.status_code == 404
    assert (
        await client.delete(f"/v1/sessions/{other['session_id']}", headers=alice.headers)
    ).status_code == 204
    headers = {"Authorization": f"Bearer {other['access_token']}"}
    assert (await client.get("/v1/me", headers=headers)).status_code == 401
    assert (
        await client.delete(f"/v1/sessions/{other['session_id']}", headers=alice.headers)
    ).status_code == 404
    assert (await client.delete("/v1/sessions/ses_nope", headers=alice.headers)).status_code == 404


async def test_password_grant_bound_to_a_device(client, alice, bob):
    device = await _enrol(client, alice)
    r = await client.post(
        "/v1/auth/token",
        data={
            "grant_type": "password",
            "username": alice.email,
            "password": alice.password,
            "device_id": device["id"],
        },
    )
    assert r.status_code == 200
    # Bob's credentials with Alice's device id do not bind.
    r = await client.post(
        "/v1/auth/token",
        data={
            "grant_type": "password",
            "username": bob.email,
            "password": bob.password,
            "device_id": device["id"],
        },
    )
    assert r.status_code == 400
