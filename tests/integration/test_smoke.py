async def test_register_login_me(client, alice):
    r = await client.get("/v1/me", headers=alice.headers)
    assert r.status_code == 200, r.text
    assert r.json()["email"] == alice.email
