"""Token vault operations through the vault process's HTTP interface, as a ratio to the raw
PKCS#11 AES-GCM operation on the same HSM token.

    .venv/bin/python bench/vault.py [--duration 10] [--concurrency 16] [--quick]

A real `billfold vault` process (the command production runs, one uvicorn worker, log INFO) on a
loopback port with its own SoftHSM2 token in a temporary data dir; this process is the load: N
keep-alive HTTP/1.1 clients, each in a closed loop for a fixed time per scenario, each request
with a freshly signed service token (as `HttpVault` sends). Scenarios:

  aes-gcm     the reference, measured first and last in this process: one PKCS#11 C_Encrypt
              (CKM_AES_GCM, random IV, aad) of a 32-byte data key under an AES-256 key in the
              same token the vault uses, one thread, back to back; ops/s and p99 per op
  healthz     GET /healthz of the vault process (no token, no I/O): what HTTP + the edge cost
  tokenize    POST /internal/v1/cards (a new card number: fingerprint HMAC in the HSM, seal
              under the cached data key, one transaction) then POST …/cards/{id}/tokens (DPAN,
              DPAN-index HMAC in the HSM, token row + event): one operation = both calls
  detokenize  POST /internal/v1/detokenize by card: audit row + open the PAN (cached data key)
  cryptogram  POST /internal/v1/cryptograms: ATC increment, open the DPAN, ARQC + dynamic CVV

Machines are noisy: read the ratios, not the absolute numbers. Any non-2xx answer is an error
and fails the run. PostgreSQL comes from BILLFOLD_DATABASE_URL when set, otherwise an embedded
server is started in a temporary directory (as for the other benchmarks; Redis is not used by the
vault). The run uses a fresh database, dropped at the end.
"""

from __future__ import annotations

import argparse
import base64
import os
import platform
import secrets
import subprocess
import sys
import time
import uuid
from datetime import date
from pathlib import Path
from typing import Any

from billfold.platform.keys import SealedBox
from billfold.vault.emv import luhn_check_digit
from billfold.vault.service_auth import ServiceTokenSigner, generate_service_key
from common import (
    Client,
    RawConnection,
    Request,
    Response,
    Result,
    cpu_model,
    free_port,
    fresh_database,
    percentile,
    run_scenario,
    run_with_servers,
    server_versions,
    servers_label,
    stop,
    versions,
    wait_ready,
)

SCENARIOS = ("healthz", "tokenize", "detokenize", "cryptogram")
LABELS = {
    "aes-gcm": "PKCS#11 AES-GCM encrypt (reference)",
    "healthz": "GET /healthz (vault HTTP + edge)",
    "tokenize": "tokenize (vault card + issue token)",
    "detokenize": "POST /internal/v1/detokenize",
    "cryptogram": "POST /internal/v1/cryptograms",
}


# --- the reference: raw PKCS#11 on the vault's token -------------------------------------------


def hsm_session(data_dir: Path) -> tuple[Any, Any]:
    """A session of this process on the vault's SoftHSM2 token and a session-only AES-256 key
    (gone with the session; the vault's own keys are not touched)."""
    from pkcs11 import Attribute, KeyType
    from pkcs11 import lib as pkcs11_lib

    from billfold.config import Settings
    from billfold.platform.hsm import ensure_softhsm_token

    defaults = Settings()
    token = ensure_softhsm_token(data_dir, defaults.hsm_token_label)
    session = (
        pkcs11_lib(defaults.hsm_module)
        .get_token(token_label=token.label)
        .open(rw=True, user_pin=token.pin)
    )
    key = session.generate_key(
        KeyType.AES,
        256,
        store=False,
        template={Attribute.SENSITIVE: True, Attribute.EXTRACTABLE: False},
    )
    return session, key


def aes_gcm_reference(key: Any, seconds: float) -> Result:
    """Back-to-back C_Encrypt(CKM_AES_GCM) of a 32-byte data key, as `Pkcs11KeyStore.wrap`."""
    from pkcs11 import Mechanism
    from pkcs11.mechanisms import GCMParams

    result = Result("aes-gcm")
    data, aad = os.urandom(32), b"vault.data_keys:key_bench"
    cpu0, start = time.process_time(), time.perf_counter()
    stop_at = start + seconds
    while True:
        t0 = time.perf_counter()
        if t0 >= stop_at:
            break
        key.encrypt(
            data, mechanism=Mechanism.AES_GCM, mechanism_param=GCMParams(os.urandom(12), aad)
        )
        result.latencies.append(time.perf_counter() - t0)
    result.elapsed = time.perf_counter() - start
    result.client_cpu = time.process_time() - cpu0
    result.succeeded = len(result.latencies)
    return result


# --- the scenarios -------------------------------------------------------------------------------


def luhn_pan(prefix: str = "4", length: int = 16) -> str:
    body = prefix + "".join(str(secrets.randbelow(10)) for _ in range(length - len(prefix) - 1))
    return body + luhn_check_digit(body)


def scenarios(
    signer: ServiceTokenSigner, cards: list[str], tokens: list[str]
) -> dict[str, Request]:
    def auth(method: str, path: str, requester: str | None = None) -> dict[str, str]:
        return {"Authorization": f"Bearer {signer.token(method, path, requester=requester)}"}

    async def healthz(client: Any, i: int) -> Response:
        return await client.get("/healthz")  # type: ignore[no-any-return]

    async def tokenize(client: Any, i: int) -> Response:
        card = {
            "owner_id": f"usr_bench_{uuid.uuid4().hex[:12]}",
            "pan": luhn_pan(),
            "expiry_month": 12,
            "expiry_year": 2031,
            "cardholder_name": "Bench User",
        }
        vaulted: Response = await client.post_json(
            "/internal/v1/cards", card, auth("POST", "/internal/v1/cards")
        )
        if not vaulted.is_success:
            return vaulted
        card_id = vaulted.json()["card_id"]
        return await client.post_json(  # type: ignore[no-any-return]
            f"/internal/v1/cards/{card_id}/tokens",
            {"domain": {}},
            auth("POST", f"/internal/v1/cards/{card_id}/tokens"),
        )

    async def detokenize(client: Any, i: int) -> Response:
        body = {"card_id": cards[i], "purpose": "authorization"}
        return await client.post_json(
            "/internal/v1/detokenize", body, auth("POST", "/internal/v1/detokenize", "network")
        )  # type: ignore[no-any-return]

    today = date.today().isoformat()

    async def cryptogram(client: Any, i: int) -> Response:
        body = {
            "token_id": tokens[i],
            "amount": 1234,
            "currency_numeric": "840",
            "country_numeric": "840",
            "transaction_date": today,
            "unpredictable_number": secrets.token_hex(4).upper(),
            "channel": "ecommerce",
        }
        return await client.post_json(
            "/internal/v1/cryptograms", body, auth("POST", "/internal/v1/cryptograms")
        )  # type: ignore[no-any-return]

    return {
        "healthz": healthz,
        "tokenize": tokenize,
        "detokenize": detokenize,
        "cryptogram": cryptogram,
    }


# --- report --------------------------------------------------------------------------------------


def report(results: dict[str, Result], ref: Result, drift: tuple[Result, Result]) -> None:
    head = f"{'scenario':<38}{'ops':>8}{'ops/s':>9}{'p50 ms':>9}{'p99 ms':>9}{'errors':>7}"
    head += f"{'ops/ref':>10}{'srv CPU/op':>13}{'CPU/ref op':>12}"
    print(head)
    print("-" * len(head))
    ref_cpu = ref.cpu_us(ref.client_cpu)
    for key, r in results.items():
        cpu = ref_cpu if key == "aes-gcm" else r.cpu_us(r.server_cpu)
        line = f"{LABELS[key]:<38}{len(r.latencies):>8}{r.rps:>9.0f}{r.pct(50):>9.3f}"
        line += f"{r.pct(99):>9.3f}{len(r.errors):>7}{r.rps / ref.rps:>10.4f}"
        line += f"{cpu:>10.0f} us{cpu / ref_cpu:>12.1f}"
        print(line)
    first, last = drift
    print(
        f"\nreference drift: AES-GCM {first.rps:.0f} ops/s before, {last.rps:.0f} after "
        f"({(last.rps / first.rps - 1) * 100:+.1f}%); ratios use both pooled"
    )
    print("ops/ref: operations per second / PKCS#11 AES-GCM operations per second (one thread);")
    print("CPU/ref op: vault-process CPU per operation / CPU of one AES-GCM op in this process\n")
    print("ratios to the PKCS#11 AES-GCM reference (the result):")
    for key in ("tokenize", "detokenize", "cryptogram"):
        if key in results:
            r = results[key]
            print(
                f"  {key:<11} throughput {r.rps / ref.rps:7.4f}x   "
                f"p99 {r.pct(99):7.2f} ms = {r.pct(99) / ref.pct(99):7.0f}x one AES-GCM op's p99   "
                f"CPU/op {r.cpu_us(r.server_cpu) / ref_cpu:6.0f}x"
            )


# --- the run -------------------------------------------------------------------------------------


def start_vault(env: dict[str, str], log_path: Path) -> tuple[subprocess.Popen[bytes], int]:
    """`billfold vault` on a free loopback port: (process, port)."""
    port = free_port()
    with log_path.open("ab") as log:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "billfold.cli",
                "vault",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
            ],
            env=env,
            stdout=log,
            stderr=log,
        )
    return proc, port


async def bench(args: argparse.Namespace, admin_url: str, redis_url: str, tmp: Path) -> int:
    proc = None
    async with fresh_database(admin_url) as (_, database_url):
        try:
            pg_version, _ = await server_versions(database_url, redis_url)
            data_dir = tmp / "data"
            service_key = generate_service_key()
            env = {k: v for k, v in os.environ.items() if not k.startswith("BILLFOLD_")}
            env.update(
                {
                    "BILLFOLD_DATABASE_URL": database_url,
                    "BILLFOLD_DATA_DIR": str(data_dir),
                    "BILLFOLD_SECRET_KEY": SealedBox.generate_b64(),
                    "BILLFOLD_VAULT_SERVICE_KEY": service_key,
                    "BILLFOLD_ENVIRONMENT": "bench",
                    "BILLFOLD_LOG_LEVEL": os.environ.get("BILLFOLD_LOG_LEVEL", "INFO"),
                    "BILLFOLD_LOG_JSON": "true",
                }
            )
            log_path = tmp / "vault.log"
            proc, port = start_vault(env, log_path)
            base = f"http://127.0.0.1:{port}"
            await wait_ready(base, proc, log_path)
            signer = ServiceTokenSigner(base64.b64decode(service_key), subject="billfold-api")
            return await _measure(args, proc.pid, port, signer, data_dir, pg_version)
        finally:
            if proc is not None:
                stop(proc)


async def _prepare(port: int, signer: ServiceTokenSigner, n: int) -> tuple[list[str], list[str]]:
    """One card and one token per client (so clients never share an ATC)."""
    connection = RawConnection("127.0.0.1", port)
    cards, tokens = [], []
    try:
        for _ in range(n):
            auth = {"Authorization": f"Bearer {signer.token('POST', '/internal/v1/cards')}"}
            body = {
                "owner_id": "usr_bench",
                "pan": luhn_pan(),
                "expiry_month": 1,
                "expiry_year": 2032,
            }
            r = await connection.post_json("/internal/v1/cards", body, auth)
            if r.status_code != 201:
                raise SystemExit(f"vaulting a card failed: {r.status_code} {r.text}")
            cards.append(r.json()["card_id"])
            path = f"/internal/v1/cards/{cards[-1]}/tokens"
            auth = {"Authorization": f"Bearer {signer.token('POST', path)}"}
            t = await connection.post_json(
                f"/internal/v1/cards/{cards[-1]}/tokens", {"domain": {}}, auth
            )
            if t.status_code != 201:
                raise SystemExit(f"issuing a token failed: {t.status_code} {t.text}")
            tokens.append(t.json()["token_id"])
    finally:
        await connection.aclose()
    return cards, tokens


async def _measure(
    args: argparse.Namespace,
    server_pid: int,
    port: int,
    signer: ServiceTokenSigner,
    data_dir: Path,
    pg_version: str,
) -> int:
    print(f"machine   {os.cpu_count()} cores, {cpu_model()}, {platform.platform()}")
    print(f"python    {platform.python_version()} ({sys.executable})")
    print(f"servers   PostgreSQL {pg_version} ({args.servers}); SoftHSM2 token in a temp data dir")
    print(f"packages  {versions()}, python-pkcs11")
    print(
        f"load      {args.concurrency} keep-alive connections (raw HTTP/1.1 client), "
        f"{args.duration:g} s per scenario after {args.warmup:g} s warm-up; "
        "vault: 1 uvicorn worker (`billfold vault`), log INFO\n"
    )
    session, key = hsm_session(data_dir)
    try:
        cards, tokens = await _prepare(port, signer, args.concurrency)
        requests = scenarios(signer, cards, tokens)
        clients: list[Client] = [RawConnection("127.0.0.1", port) for _ in range(args.concurrency)]
        print("  running aes-gcm ...", file=sys.stderr, flush=True)
        aes_gcm_reference(key, args.warmup)
        ref_before = aes_gcm_reference(key, args.duration)
        runs: list[tuple[str, Result]] = []
        for name in args.scenarios:
            print(f"  running {name} ...", file=sys.stderr, flush=True)
            r = await run_scenario(
                clients,
                name,
                requests[name],
                duration=args.duration,
                warmup=args.warmup,
                server_pid=server_pid,
            )
            runs.append((name, r))
            if r.errors:
                break
        print("  running aes-gcm ...", file=sys.stderr, flush=True)
        ref_after = aes_gcm_reference(key, args.duration)
        for connection in clients:
            await connection.aclose()
    finally:
        session.close()

    failed = [(k, r) for k, r in runs if r.errors]
    if failed:
        for k, r in failed:
            print(f"FAILED {k}: {len(r.errors)} non-2xx answers, e.g.:", file=sys.stderr)
            for e in r.errors[:3]:
                print(f"  {e}", file=sys.stderr)
        return 1
    ref = ref_before.merged(ref_after, "aes-gcm")
    ref.succeeded = len(ref.latencies)
    results = {"aes-gcm": ref} | dict(runs)
    report(results, ref, (ref_before, ref_after))
    print(
        f"\nreference: AES-GCM p50 {percentile(ref.latencies, 50) * 1e6:.1f} us, "
        f"p99 {percentile(ref.latencies, 99) * 1e6:.1f} us per op"
    )
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per scenario")
    parser.add_argument("--warmup", type=float, default=2.0, help="seconds before measuring")
    parser.add_argument("--concurrency", type=int, default=16, help="concurrent connections")
    parser.add_argument("--quick", action="store_true", help="a ~20 s smoke run")
    parser.add_argument(
        "--scenarios",
        default=",".join(SCENARIOS),
        help=f"comma-separated subset of {','.join(SCENARIOS)} (aes-gcm always runs)",
    )
    args = parser.parse_args()
    args.scenarios = [k for k in args.scenarios.split(",") if k]
    if not set(args.scenarios) <= set(SCENARIOS):
        parser.error(f"--scenarios: choose from {', '.join(SCENARIOS)}")
    if args.quick:
        args.duration, args.warmup = 2.5, 0.5
    args.servers = servers_label()
    return run_with_servers(lambda admin_url, redis, tmp: bench(args, admin_url, redis, tmp))


if __name__ == "__main__":
    sys.exit(main())
