"""`billfold up` as a user runs it: embedded PostgreSQL + Valkey, demo data, a real socket,
the token vault and the ISO 8583 network simulator in processes of their own, Ctrl-C stops everything, and a second start on the same
data dir keeps the data."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil

from billfold.users.seed import DEMO_PASSWORD


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _start(
    data_dir: Path, port: int, vault_port: int | None = None, network_port: int | None = None
) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BILLFOLD_")}
    if vault_port is not None:
        env["BILLFOLD_VAULT_PORT"] = str(vault_port)
    if network_port is not None:
        env["BILLFOLD_NETWORK_PORT"] = str(network_port)
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "billfold.cli",
            "up",
            "--data-dir",
            str(data_dir),
            "--port",
            str(port),
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )


def _wait_ready(proc: subprocess.Popen[bytes], base: str, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.stdout.read().decode() if proc.stdout else ""
        try:
            if httpx.get(f"{base}/readyz", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise AssertionError("billfold up did not become ready")


def _stop(proc: subprocess.Popen[bytes]) -> str:
    proc.send_signal(signal.SIGINT)  # what Ctrl-C sends
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out.decode()
    return out.decode()


def _servers_using(data_dir: Path) -> list[psutil.Process]:
    found = []
    for p in psutil.process_iter(["cmdline"]):
        cmd = " ".join(p.info.get("cmdline") or [])
        if str(data_dir) in cmd and ("postgres" in cmd or "valkey" in cmd):
            found.append(p)
    return found


def _vault_processes(
    parent: subprocess.Popen[bytes], command: str = "vault"
) -> list[psutil.Process]:
    found = []
    for p in psutil.Process(parent.pid).children(recursive=True):
        with contextlib.suppress(psutil.Error):
            if p.cmdline()[1:4] == ["-m", "billfold.cli", command]:
                found.append(p)
    return found


def _network_answers_an_echo(proc: subprocess.Popen[bytes], port: int) -> None:
    """The ISO 8583 simulator is a child process of `billfold up` and answers an 0800 echo
    (2-byte length prefix) with 0810 / 00 on its own port."""
    from billfold.network import wire

    assert len(_vault_processes(proc, "network")) == 1
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(
            wire.encode(
                {"t": "0800", "7": "1130120000", "11": "000001", "37": "E2E000000001", "70": "301"}
            )
        )
        size = int.from_bytes(sock.recv(2), "big")
        body = b""
        while len(body) < size:
            body += sock.recv(size - len(body))
    answer = wire.decode(body)
    assert (answer["t"], answer["39"], answer["11"]) == ("0810", "00", "000001")


def _vault_is_its_own_process(proc: subprocess.Popen[bytes], vault: str) -> None:
    """The vault answers on its own port, from a child process of `billfold up`, and refuses a
    call without a service token."""
    ready = httpx.get(f"{vault}/readyz", timeout=5)
    assert ready.status_code == 200, ready.text
    assert ready.json()["checks"] == {"database": "ok", "keystore": "ok"}
    assert len(_vault_processes(proc)) == 1
    refused = httpx.post(f"{vault}/internal/v1/cards", json={}, timeout=5)
    assert refused.status_code == 401
    assert refused.json()["code"] == "invalid_service_token"


def _vault_detokenizations(vault: str) -> float:
    """Successful detokenisations the vault process served, from its Prometheus metrics."""
    metrics = httpx.get(f"{vault}/metrics", timeout=5).text
    pattern = r'^billfold_http_requests_total\{[^}]*route="/internal/v1/detokenize"[^}]*status="200"[^}]*\} (\S+)$'
    return sum(float(v) for v in re.findall(pattern, metrics, flags=re.MULTILINE))


def _auth(base: str, email: str = "alice@demo.billfold.dev") -> dict[str, str]:
    r = httpx.post(
        f"{base}/v1/auth/token",
        data={"grant_type": "password", "username": email, "password": DEMO_PASSWORD},
        timeout=10,
    )
    assert r.status_code == 200, r.text
    return {"Authorization": f"Bearer {r.json()['access_token']}"}


def _sign_in(base: str) -> dict:
    me = httpx.get(f"{base}/v1/me", headers=_auth(base))
    assert me.status_code == 200
    return me.json()


def _send_money_the_demo_way(base: str) -> None:
    """Alice has demo money; money sent to Bob's (verified) phone number waits in escrow and the
    background consumer that `billfold up` runs hands it to Bob moments later."""
    alice = _auth(base)
    wallet = httpx.get(f"{base}/v1/wallet", headers=alice).json()
    assert {"currency": "USD", "available": 100_000, "posted": 100_000, "held": 0} in wallet[
        "balances"
    ]
    sent = httpx.post(
        f"{base}/v1/transfers",
        json={"recipient": {"phone": "+14155550133"}, "amount": 1_250, "currency": "USD"},
        headers={**alice, "Idempotency-Key": "e2e-coffee"},
    )
    assert sent.status_code == 201, sent.text
    assert sent.json()["status"] == "pending_claim"
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        status = httpx.get(f"{base}/v1/transfers/{sent.json()['id']}", headers=alice).json()
        if status["status"] == "completed":
            break
        time.sleep(0.2)
    assert status["status"] == "completed", status
    bob = httpx.get(f"{base}/v1/wallet", headers=_auth(base, "bob@demo.billfold.dev")).json()
    assert {"currency": "USD", "available": 101_250, "posted": 101_250, "held": 0} in bob[
        "balances"
    ]


def _top_up_from_the_demo_card(base: str) -> None:
    """Alice's demo card and bank account are verified; a top-up from the card goes through the
    vault process (the PAN comes back from it over HTTP for the charge)."""
    alice = _auth(base)
    methods = httpx.get(f"{base}/v1/payment-methods", headers=alice).json()["data"]
    assert sorted((m["type"], m["status"]) for m in methods) == [
        ("bank_account", "verified"),
        ("card", "verified"),
    ]
    (card,) = [m for m in methods if m["type"] == "card"]
    topped = httpx.post(
        f"{base}/v1/wallet/topups",
        json={"payment_method_id": card["id"], "amount": 500, "currency": "USD"},
        headers={**alice, "Idempotency-Key": "e2e-topup"},
        timeout=10,
    )
    assert topped.status_code == 201, topped.text
    assert topped.json()["rail"] == "card"


def test_up_serves_demo_data_stops_cleanly_and_reuses_data(tmp_path: Path) -> None:
    data_dir = tmp_path / "wallet"
    port, vault_port, network_port = _free_port(), _free_port(), _free_port()
    base, vault = f"http://127.0.0.1:{port}", f"http://127.0.0.1:{vault_port}"
    proc = _start(data_dir, port, vault_port, network_port)
    try:
        _wait_ready(proc, base)
        _vault_is_its_own_process(proc, vault)
        vault_pid = _vault_processes(proc)[0].pid
        _network_answers_an_echo(proc, network_port)
        network_pid = _vault_processes(proc, "network")[0].pid
        me = _sign_in(base)
        assert me["email"] == "alice@demo.billfold.dev" and me["kyc_status"] == "verified"
        assert httpx.get(f"{base}/openapi.json").status_code == 200
        assert httpx.get(f"{base}/metrics").status_code == 200
        _send_money_the_demo_way(base)
        before = _vault_detokenizations(vault)
        _top_up_from_the_demo_card(base)
        # The API reached the card number through the vault process, not an in-process vault.
        assert _vault_detokenizations(vault) == before + 1
    finally:
        out = _stop(proc)
    assert f"{base}/docs" in out and "alice@demo.billfold.dev" in out and DEMO_PASSWORD in out
    assert f"token vault    {vault} (own process, pid {vault_pid})" in out
    assert (
        f"card network   127.0.0.1:{network_port} (ISO 8583 simulator, own process, "
        f"pid {network_pid})" in out
    )
    time.sleep(0.5)
    assert _servers_using(data_dir) == []
    assert not psutil.pid_exists(vault_pid), "Ctrl-C stops the vault process too"
    assert not psutil.pid_exists(network_pid), "…and the network simulator"

    proc = _start(data_dir, port)
    try:
        _wait_ready(proc, base)
        assert _sign_in(base)["id"] == me["id"]  # the same database, not a new one
    finally:
        _stop(proc)
