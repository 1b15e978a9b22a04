"""`X-Twilio-Signature` as Twilio computes it, checked against published vectors (the
request-validation example of Twilio's webhook-security documentation, and one from a
third-party implementation's doctest), not only against our own test server, which signs
with code written alongside the verifier."""

from __future__ import annotations

from billfold.notifications.channels.twilio import request_signature, valid_signature

URL = "https://mycompany.com/myapp.php?foo=1&bar=2"
TOKEN = "12345"


def _call(caller: str) -> dict[str, str]:
    return {
        "CallSid": "CA1234567890ABCDE",
        "Caller": caller,
        "Digits": "1234",
        "From": caller,
        "To": "+18005551212",
    }


def test_published_vectors() -> None:
    assert request_signature(TOKEN, URL, _call("+14158675310")) == "GvWf1cFY/Q7PnoempGyD5oXAezc="
    assert request_signature(TOKEN, URL, _call("+12349013030")) == "0/KCTR6DLpKmkAf8muzZqo1nDgQ="


def test_anything_changed_does_not_verify() -> None:
    params, good = _call("+14158675310"), "GvWf1cFY/Q7PnoempGyD5oXAezc="
    assert valid_signature(TOKEN, URL, params, good)
    assert not valid_signature("54321", URL, params, good)
    assert not valid_signature(TOKEN, URL.replace("foo=1", "foo=2"), params, good)
    assert not valid_signature(TOKEN, URL, {**params, "Digits": "1235"}, good)
    assert not valid_signature(TOKEN, URL, params, "")
    assert not valid_signature(TOKEN, URL, params, "GvWf1cFY/Q7PnoempGyD5oXAezc=\u00e9")
