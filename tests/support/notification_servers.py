"""Local servers that speak the notification providers' real protocols, for the tests.

FCM (OAuth2 token endpoint + HTTP v1 `messages:send`) and Twilio (REST Messages) are small
Starlette apps under uvicorn; APNs is an HTTP/2-only server over TLS (ALPN `h2`, a CA made per
run); SMTP is aiosmtpd; SES is moto (in-process, so its sent messages can be read). Each checks
what the real provider checks (auth, headers, payload shape) and can answer with the provider's
real errors (APNs 410 Unregistered, FCM UNREGISTERED, Twilio 21211) for chosen targets.
"""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import hashlib
import hmac
import ipaddress
import json
import re
import secrets
import ssl
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h2.config
import h2.connection
import h2.events
import httpx
import jwt
import uvicorn
from aiosmtpd.controller import Controller
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from tests.conftest import free_port

_E164 = re.compile(r"^\+[1-9]\d{6,14}$")


class _Uvicorn:
    """A Starlette app on a loopback port, in this event loop."""

    def __init__(self, app: Starlette) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(
            app, host="127.0.0.1", port=self.port, log_level="warning", lifespan="off"
        )
        self._server = uvicorn.Server(config)
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._task = asyncio.create_task(self._server.serve())
        while not self._server.started:
            if self._task.done():
                self._task.result()
            await asyncio.sleep(0.01)

    async def stop(self) -> None:
        self._server.should_exit = True
        if self._task is not None:
            await self._task


# --- FCM -----------------------------------------------------------------------------------------


@dataclass
class FakeFcm:
    """Google's OAuth2 token endpoint and FCM HTTP v1 `messages:send`."""

    project_id: str = "billfold-test"
    client_email: str = "push@billfold-test.iam.gserviceaccount.com"
    messages: list[dict[str, Any]] = field(default_factory=list)
    unregistered: set[str] = field(default_factory=set)
    unavailable: set[str] = field(default_factory=set)
    tokens_issued: int = 0

    def __post_init__(self) -> None:
        self._key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self._access: set[str] = set()
        self._server = _Uvicorn(
            Starlette(
                routes=[
                    Route("/token", self._token, methods=["POST"]),
                    Route("/v1/projects/{project}/messages:send", self._send, methods=["POST"]),
                ]
            )
        )

    @property
    def url(self) -> str:
        return self._server.url

    def service_account(self) -> dict[str, Any]:
        pem = self._key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ).decode()
        return {
            "type": "service_account",
            "project_id": self.project_id,
            "private_key_id": "k1",
            "private_key": pem,
            "client_email": self.client_email,
            "token_uri": f"{self.url}/token",
        }

    async def start(self) -> None:
        await self._server.start()

    async def stop(self) -> None:
        await self._server.stop()

    async def _token(self, request: Request) -> Response:
        form = await request.form()
        if form.get("grant_type") != "urn:ietf:params:oauth:grant-type:jwt-bearer":
            return JSONResponse({"error": "unsupported_grant_type"}, status_code=400)
        try:
            claims = jwt.decode(
                str(form.get("assertion")),
                self._key.public_key(),
                algorithms=["RS256"],
                audience=f"{self.url}/token",
            )
        except jwt.PyJWTError as exc:
            return JSONResponse({"error": "invalid_grant", "detail": str(exc)}, status_code=400)
        if claims.get("iss") != self.client_email or "firebase.messaging" not in claims.get(
            "scope", ""
        ):
            return JSONResponse({"error": "invalid_scope"}, status_code=400)
        token = secrets.token_urlsafe(24)
        self._access.add(token)
        self.tokens_issued += 1
        return JSONResponse({"access_token": token, "expires_in": 3599, "token_type": "Bearer"})

    async def _send(self, request: Request) -> Response:
        auth = request.headers.get("authorization", "")
        if not auth.startswith("Bearer ") or auth[7:] not in self._access:
            return _fcm_error(401, "UNAUTHENTICATED", None)
        if request.path_params["project"] != self.project_id:
            return _fcm_error(403, "PERMISSION_DENIED", "SENDER_ID_MISMATCH")
        body = await request.json()
        message = body.get("message") if isinstance(body, dict) else None
        if (
            not isinstance(message, dict)
            or not isinstance(message.get("token"), str)
            or not isinstance(message.get("notification", {}).get("title"), str)
            or not all(isinstance(v, str) for v in message.get("data", {}).values())
        ):
            return _fcm_error(400, "INVALID_ARGUMENT", "INVALID_ARGUMENT")
        token = message["token"]
        if token in self.unregistered:
            return _fcm_error(404, "NOT_FOUND", "UNREGISTERED")
        if token in self.unavailable:
            return _fcm_error(503, "UNAVAILABLE", "UNAVAILABLE")
        self.messages.append(message)
        name = f"projects/{self.project_id}/messages/{secrets.randbelow(10**16)}"
        return JSONResponse({"name": name})


def _fcm_error(status: int, state: str, code: str | None) -> JSONResponse:
    details = (
        [{"@type": "type.googleapis.com/google.firebase.fcm.v1.FcmError", "errorCode": code}]
        if code
        else []
    )
    return JSONResponse(
        {"error": {"code": status, "message": state, "status": state, "details": details}},
        status_code=status,
    )


# --- Twilio --------------------------------------------------------------------------------------


@dataclass
class FakeTwilio:
    """Twilio's `POST /2010-04-01/Accounts/<sid>/Messages.json` with HTTP Basic auth.

    With `report` on, it then calls a message's `StatusCallback` as Twilio does, form-encoded
    and signed (`X-Twilio-Signature`): `sent`, then `delivered`, or `undelivered` (30003) for
    the numbers in `undeliverable`. `report_first`: the reports arrive before the API's answer
    (Twilio's callbacks can overtake the sender's own bookkeeping)."""

    account_sid: str = "AC" + "0" * 32
    auth_token: str = "twilio-test-token"
    sender: str = "+15005550006"
    messages: list[dict[str, str]] = field(default_factory=list)
    invalid: set[str] = field(default_factory=set)
    report: bool = False
    report_first: bool = False
    undeliverable: set[str] = field(default_factory=set)
    # (status reported, the webhook's HTTP status) per callback made.
    reports: list[tuple[str, int]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._reporting: set[asyncio.Task[None]] = set()
        self._server = _Uvicorn(
            Starlette(
                routes=[
                    Route(
                        "/2010-04-01/Accounts/{sid}/Messages.json", self._create, methods=["POST"]
                    )
                ]
            )
        )

    @property
    def url(self) -> str:
        return self._server.url

    async def start(self) -> None:
        await self._server.start()

    async def stop(self) -> None:
        await self.reported()
        await self._server.stop()

    async def _create(self, request: Request) -> Response:
        expected = base64.b64encode(f"{self.account_sid}:{self.auth_token}".encode()).decode()
        if request.headers.get("authorization") != f"Basic {expected}":
            return _twilio_error(401, 20003, "Authenticate")
        if request.path_params["sid"] != self.account_sid:
            return _twilio_error(404, 20404, "The requested resource was not found")
        form = await request.form()
        to, sender, body = form.get("To"), form.get("From"), form.get("Body")
        if not isinstance(to, str) or not _E164.match(to) or to in self.invalid:
            return _twilio_error(400, 21211, f"The 'To' number {to} is not a valid phone number.")
        if sender != self.sender or not isinstance(body, str) or not body:
            return _twilio_error(400, 21602, "Message body is required.")
        sid = "SM" + secrets.token_hex(16)
        callback = form.get("StatusCallback")
        self.messages.append(
            {"sid": sid, "to": to, "from": sender, "body": body, "callback": str(callback or "")}
        )
        if self.report and isinstance(callback, str) and callback:
            reporting = self._report(str(callback), sid, to)
            if self.report_first:
                await reporting
            else:
                task = asyncio.create_task(reporting)
                self._reporting.add(task)
                task.add_done_callback(self._reporting.discard)
        return JSONResponse(
            {"sid": sid, "status": "queued", "to": to, "from": sender, "body": body},
            status_code=201,
        )

    async def _report(self, url: str, sid: str, to: str) -> None:
        final = "undelivered" if to in self.undeliverable else "delivered"
        async with httpx.AsyncClient(timeout=10) as http:
            for status in ("sent", final):
                form = {
                    "AccountSid": self.account_sid,
                    "ApiVersion": "2010-04-01",
                    "From": self.sender,
                    "MessageSid": sid,
                    "MessageStatus": status,
                    "SmsSid": sid,
                    "SmsStatus": status,
                    "To": to,
                }
                if status == "undelivered":
                    form["ErrorCode"] = "30003"
                signature = twilio_signature(self.auth_token, url, form)
                answer = await http.post(url, data=form, headers={"X-Twilio-Signature": signature})
                self.reports.append((status, answer.status_code))

    async def reported(self) -> None:
        """Wait for the status callbacks in flight."""
        while self._reporting:
            await asyncio.gather(*list(self._reporting))


def twilio_signature(auth_token: str, url: str, params: dict[str, str]) -> str:
    """How Twilio signs a webhook request (its "Webhooks security" documentation): the URL, then
    each parameter name immediately followed by its value, names sorted; HMAC-SHA1 under the
    auth token; base64."""
    payload = url
    for name in sorted(params):
        payload += name + params[name]
    mac = hmac.new(auth_token.encode("utf-8"), payload.encode("utf-8"), hashlib.sha1)
    return base64.b64encode(mac.digest()).decode("ascii")


def _twilio_error(status: int, code: int, message: str) -> JSONResponse:
    return JSONResponse(
        {
            "code": code,
            "message": message,
            "more_info": f"https://www.twilio.com/docs/errors/{code}",
            "status": status,
        },
        status_code=status,
    )


# --- APNs ----------------------------------------------------------------------------------------


def make_tls(directory: Path) -> tuple[Path, Path, Path]:
    """A CA and a server certificate for 127.0.0.1 signed by it: (ca, cert, key) PEM files."""
    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "billfold test CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    ca_file, cert_file, key_file = (
        directory / "ca.pem",
        directory / "cert.pem",
        directory / "key.pem",
    )
    ca_file.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return ca_file, cert_file, key_file


@dataclass
class FakeApns:
    """APNs provider API: HTTP/2 only, over TLS with ALPN `h2`, provider-token (ES256) auth."""

    directory: Path
    team_id: str = "TEAM123456"
    key_id: str = "KEY1234567"
    topic: str = "com.billfold.app"
    messages: list[dict[str, Any]] = field(default_factory=list)
    unregistered: set[str] = field(default_factory=set)
    protocols: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._key = ec.generate_private_key(ec.SECP256R1())
        self.ca_file, cert, key = make_tls(self.directory)
        self._tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self._tls.load_cert_chain(cert, key)
        self._tls.set_alpn_protocols(["h2"])
        self.port = free_port()
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    def key_file(self) -> Path:
        path = self.directory / "apns-key.p8"
        path.write_bytes(
            self._key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        return path

    async def start(self) -> None:
        self._server = await asyncio.start_server(
            self._connection, "127.0.0.1", self.port, ssl=self._tls
        )

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            for task in list(self._tasks):
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            await self._server.wait_closed()

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            await self._serve(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            self._tasks.discard(task)
            writer.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        ssl_object = writer.get_extra_info("ssl_object")
        protocol = ssl_object.selected_alpn_protocol() if ssl_object else None
        self.protocols.append(str(protocol))
        if protocol != "h2":
            return  # APNs speaks HTTP/2 only
        conn = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=False, header_encoding="utf-8")
        )
        conn.initiate_connection()
        writer.write(conn.data_to_send())
        streams: dict[int, tuple[dict[str, str], bytearray]] = {}
        while True:
            data = await reader.read(65535)
            if not data:
                return
            for event in conn.receive_data(data):
                if isinstance(event, h2.events.RequestReceived):
                    streams[event.stream_id] = (dict(event.headers), bytearray())  # type: ignore[arg-type]
                elif isinstance(event, h2.events.DataReceived):
                    streams[event.stream_id][1].extend(event.data)
                    conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                elif isinstance(event, h2.events.StreamEnded):
                    headers, body = streams.pop(event.stream_id)
                    status, extra, payload = self._respond(headers, bytes(body))
                    conn.send_headers(
                        event.stream_id,
                        [(":status", str(status)), *extra, ("content-length", str(len(payload)))],
                        end_stream=not payload,
                    )
                    if payload:
                        conn.send_data(event.stream_id, payload, end_stream=True)
                elif isinstance(event, h2.events.ConnectionTerminated):
                    writer.write(conn.data_to_send())
                    return
            writer.write(conn.data_to_send())
            await writer.drain()

    def _respond(
        self, headers: dict[str, str], body: bytes
    ) -> tuple[int, list[tuple[str, str]], bytes]:
        apns_id = headers.get("apns-id", "00000000-0000-0000-0000-000000000000")

        def error(
            status: int, reason: str, **more: Any
        ) -> tuple[int, list[tuple[str, str]], bytes]:
            return status, [("apns-id", apns_id)], json.dumps({"reason": reason, **more}).encode()

        path = headers.get(":path", "")
        if headers.get(":method") != "POST" or not path.startswith("/3/device/"):
            return error(405, "MethodNotAllowed")
        token = path.removeprefix("/3/device/")
        auth = headers.get("authorization", "")
        if not auth.startswith("bearer "):
            return error(403, "MissingProviderToken")
        try:
            header = jwt.get_unverified_header(auth[7:])
            claims = jwt.decode(auth[7:], self._key.public_key(), algorithms=["ES256"])
        except jwt.PyJWTError:
            return error(403, "InvalidProviderToken")
        if header.get("kid") != self.key_id or claims.get("iss") != self.team_id:
            return error(403, "InvalidProviderToken")
        if headers.get("apns-topic") != self.topic:
            return error(400, "TopicDisallowed")
        if headers.get("apns-push-type") not in ("alert", "background"):
            return error(400, "InvalidPushType")
        try:
            payload = json.loads(body)
        except ValueError:
            return error(400, "PayloadEmpty")
        if not isinstance(payload, dict) or "aps" not in payload:
            return error(400, "PayloadEmpty")
        if token in self.unregistered:
            return error(
                410, "Unregistered", timestamp=int(dt.datetime.now(dt.UTC).timestamp() * 1000)
            )
        self.messages.append({"token": token, "headers": headers, "payload": payload})
        return 200, [("apns-id", apns_id)], b""


# --- SMTP ----------------------------------------------------------------------------------------


@dataclass
class SmtpMessage:
    mail_from: str
    rcpt_tos: list[str]
    content: bytes
    over_tls: bool = False


class FakeSmtp:
    """aiosmtpd on a loopback port, keeping every message it accepts. With `tls` (certificate
    and key files) it offers STARTTLS and refuses mail before it, as production servers do."""

    def __init__(self, tls: tuple[Path, Path] | None = None) -> None:
        self.messages: list[SmtpMessage] = []
        self.port = free_port()
        kwargs: dict[str, Any] = {}
        if tls is not None:
            context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            context.load_cert_chain(*tls)
            kwargs = {"tls_context": context, "require_starttls": True}
        self._controller = Controller(self, hostname="127.0.0.1", port=self.port, **kwargs)

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.messages.append(
            SmtpMessage(
                envelope.mail_from,
                list(envelope.rcpt_tos),
                bytes(envelope.content),
                session.ssl is not None,
            )
        )
        return "250 Message accepted for delivery"

    def start(self) -> None:
        self._controller.start()

    def stop(self) -> None:
        self._controller.stop()
