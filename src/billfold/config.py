"""One Settings object for the whole process, read from `BILLFOLD_*` environment variables."""

from __future__ import annotations

from decimal import Decimal
from itertools import pairwise
from pathlib import Path
from typing import Annotated, Literal

from babel.numbers import list_currencies
from pydantic import AfterValidator, BaseModel, Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


def _iso_currency(code: str) -> str:
    # config sits below platform (import-linter), so it asks babel itself rather than
    # platform.money; LoyaltyRuntime checks the wallet's narrower list at start-up too.
    if code not in list_currencies() or code == "PTS":
        raise ValueError(f"{code!r} is not an ISO 4217 currency code such as USD")
    return code


LoyaltyCurrency = Annotated[str, AfterValidator(_iso_currency)]


class LoyaltyTier(BaseModel):
    """A loyalty tier: its earn multiplier and the spend (minor units per currency) it takes."""

    name: str = Field(min_length=1, max_length=40)
    multiplier: Decimal = Field(ge=1, le=100)
    min_spend: dict[LoyaltyCurrency, int] = Field(default_factory=dict)

    @field_validator("min_spend")
    @classmethod
    def _positive(cls, min_spend: dict[str, int]) -> dict[str, int]:
        # A threshold of 0 or less would put everyone in the tier (and divide by zero in
        # the progress to it).
        if any(minimum <= 0 for minimum in min_spend.values()):
            raise ValueError("every min_spend must be a positive number of minor units")
        return min_spend


class LoyaltyRate(BaseModel):
    """How points turn into money of one currency: `points` PTS buy `amount` minor units."""

    points: int = Field(default=1, gt=0)
    amount: int = Field(default=1, gt=0)
    minimum: int = Field(default=100, gt=0)
    step: int = Field(default=100, gt=0)

    @model_validator(mode="after")
    def _exact(self) -> LoyaltyRate:
        # Every allowed redemption converts without a remainder.
        if self.step % self.points or self.minimum % self.step:
            raise ValueError("step must be a multiple of points, minimum a multiple of step")
        # The largest redemption (2**53 points) must stay within a bigint of minor units.
        if self.amount > 1_000 * self.points:
            raise ValueError("a point may be worth at most 1000 minor units")
        return self


class Settings(BaseSettings):
    """Runtime configuration; every field can be set as `BILLFOLD_<NAME>`."""

    model_config = SettingsConfigDict(env_prefix="BILLFOLD_", extra="ignore")

    environment: str = "development"
    data_dir: Path = Path(".billfold")
    # Empty means "start the embedded server in data_dir".
    database_url: str = ""
    redis_url: str = ""
    # Prefix for every Redis key, so runs sharing one Redis never collide.
    redis_prefix: str = "bf:"
    public_url: str = "http://127.0.0.1:8000"
    # The API process's PostgreSQL pool: at least the requests one process has in flight.
    db_pool_size: int = Field(default=20, gt=0)
    db_max_overflow: int = Field(default=10, ge=0)
    # A request waiting longer than this for a row lock gives up with a 503 `database_busy`.
    db_lock_timeout_ms: int = Field(default=10_000, gt=0)

    # Base64 of 32 random bytes; encrypts secrets at rest (JWT keys, TOTP seeds).
    # Empty in development means "generate one into data_dir".
    secret_key: str = ""
    # Seal one-time codes (verification, step-up, password reset) in the events that carry them
    # to the notification service: `kid:base64(32 bytes)`, comma-separated; the first seals,
    # every one opens (rotate by putting a new key first; drop an old one an hour later, when
    # no code sealed under it is still alive). Empty: one key derived from secret_key (`sk1`).
    one_time_code_keys: str = ""

    jwt_issuer: str = "billfold"
    jwt_audience: str = "billfold-api"
    access_token_ttl_seconds: int = Field(default=900, le=900, gt=0)
    refresh_token_ttl_seconds: int = 30 * 24 * 3600
    session_ttl_seconds: int = 30 * 24 * 3600
    signing_key_rotation_seconds: int = 24 * 3600
    # Adding a sign-in credential or changing a contact needs a sign-in this recent, or step-up.
    recent_auth_seconds: int = 600

    login_max_failures: int = 5
    login_lockout_base_seconds: int = 60

    verification_code_ttl_seconds: int = 600
    verification_max_attempts: int = 5

    max_body_bytes: int = 1_100_000
    avatar_max_bytes: int = 1_000_000

    rate_limits_enabled: bool = True
    # "requests/seconds" per route class and key kind.
    rate_limit_auth_ip: str = "30/60"
    rate_limit_write_ip: str = "300/60"
    rate_limit_read_ip: str = "1200/60"
    rate_limit_auth_user: str = "30/60"
    rate_limit_write_user: str = "120/60"
    rate_limit_read_user: str = "600/60"

    idempotency_ttl_seconds: int = 24 * 3600

    # Money sent to an e-mail/phone nobody has claimed returns to the sender after this.
    p2p_claim_ttl_seconds: int = Field(default=14 * 24 * 3600, gt=0)
    # A transfer held for fraud review is released or returned within this time.
    p2p_review_hold_seconds: int = Field(default=7 * 24 * 3600, gt=0)
    transfer_request_ttl_seconds: int = Field(default=30 * 24 * 3600, gt=0)
    # The largest single top-up or withdrawal of the wallet (minor units).
    wallet_max_topup: int = Field(default=1_000_000, gt=0)

    webauthn_rp_id: str = "localhost"
    webauthn_rp_name: str = "billfold"
    webauthn_origin: str = "http://localhost:8000"

    # Where blobs (avatars, receipts) live: `filesystem` = data_dir/blobs, `s3` = the bucket below.
    # S3 credentials come from the standard AWS chain (env, shared config, instance profile).
    blob_store: Literal["filesystem", "s3"] = "filesystem"
    s3_bucket: str = ""
    s3_prefix: str = ""
    # For MinIO or moto; empty = AWS. Region empty = from the AWS chain (AWS_DEFAULT_REGION…).
    s3_endpoint_url: str | None = None
    s3_region: str | None = None
    # Set to encrypt with SSE-KMS under this key; otherwise SSE-S3 (AES256).
    s3_kms_key_id: str | None = None

    sanctions_list_path: Path | None = None
    # Behind Kong or another proxy we trust, take the client address from X-Forwarded-For.
    trust_forwarded_for: bool = False
    log_level: str = "INFO"
    log_json: bool = True

    # Token Vault. `vault_url` empty: the API uses the vault in-process (demo, tests); set it to
    # call the isolated `billfold vault` process over HTTP (production).
    vault_url: str = ""
    vault_host: str = "127.0.0.1"
    vault_port: int = 8700
    # Signs the service tokens the API presents to the vault (base64 of 32 random bytes).
    # Empty in development means "generate one into data_dir".
    vault_service_key: str = ""
    # mTLS to an `https://` vault_url (production): the CA that signed the vault's certificate,
    # and this process's client certificate and key (PEM files). Empty: system CAs, no client cert.
    vault_ca_file: str = ""
    vault_client_cert_file: str = ""
    vault_client_key_file: str = ""
    # Key store that holds the KEK and the fingerprint key: `pkcs11` (an HSM; SoftHSM2 in
    # development and CI) or `software` (demo without an HSM: keys sealed under secret_key).
    vault_keystore: Literal["pkcs11", "software"] = "pkcs11"
    hsm_module: str = "/usr/lib/softhsm/libsofthsm2.so"
    hsm_token_label: str = "billfold"
    # Empty in development means "initialise a SoftHSM2 token in data_dir/hsm with a generated PIN".
    hsm_pin: str = ""
    # Token BIN range the vault issues DPANs from (a test range; production gets one from the scheme).
    token_bin: str = "489537"
    token_ttl_days: int = Field(default=3 * 365, gt=0)

    # Payment network (ISO 8583 over TCP). The API's client connects to `network_address`
    # (host:port); `billfold network` (the simulator) listens on network_host:network_port, and
    # `billfold up` starts it on a free port and points the API at it.
    network_address: str = "127.0.0.1:8583"
    network_host: str = "127.0.0.1"
    network_port: int = 8583
    network_pool_size: int = Field(default=2, gt=0)
    network_timeout_ms: int = Field(default=5_000, gt=0)
    # Consecutive failures (timeouts, lost connections) that open the circuit breaker, and how
    # long it stays open before one echo probes the network again.
    network_breaker_failures: int = Field(default=5, gt=0)
    network_breaker_reset_seconds: float = Field(default=10.0, gt=0)
    # Stand-in: while the network is down, approve authorizations up to this many minor units
    # (per token, per outage) and report them later in a 0120 advice. 0: decline them (91).
    network_stand_in_floor_limit: int = Field(default=0, ge=0)

    # Payment methods.
    micro_deposit_ttl_seconds: int = Field(default=7 * 24 * 3600, gt=0)
    micro_deposit_max_attempts: int = Field(default=3, gt=0)

    # Card and wallet payments (transactions).
    # An authorization not captured in time lapses: the wallet hold is released, a card's
    # remaining authorization is reversed (card schemes allow about 7 days for most merchants).
    payment_authorization_ttl_seconds: int = Field(default=7 * 24 * 3600, gt=0)
    # A payment held for step-up waits this long for the user to confirm it.
    payment_challenge_ttl_seconds: int = Field(default=15 * 60, gt=0)
    # A card payment still `authorizing` after this long was left by a crash between writing it
    # and recording the network's answer: the worker reverses it and marks it failed.
    payment_authorizing_deadline_seconds: int = Field(default=120, gt=0)
    # Payments one API process works on at once (the first transaction and the cryptogram,
    # then the write of the network's answer, which goes first); more wait their turn holding
    # nothing, so a burst queues instead of failing in the database and vault pools. Waiting
    # for the network is not counted. Beyond `payment_admission_queue` payments waiting to
    # start, a new one is answered 429 `overloaded` with Retry-After (transactions/admission.py).
    payment_admission_limit: int = Field(default=32, gt=0)
    payment_admission_queue: int = Field(default=512, ge=0)

    # Fraud Detection Service: every payment and transfer is checked when enabled (off: the
    # payments' and transfers' own allow-all hook).
    fraud_enabled: bool = True
    # Time budget of the live features (Redis) inside one check; past it the check falls back
    # to PostgreSQL-derived features with stricter thresholds.
    fraud_check_budget_ms: int = Field(default=50, gt=0)
    # Score bands (0-1000) of challenge, review and block.
    fraud_threshold_challenge: int = Field(default=500, ge=0, le=1000)
    fraud_threshold_review: int = Field(default=700, ge=0, le=1000)
    fraud_threshold_block: int = Field(default=900, ge=0, le=1000)
    # How much lower every band is when features come from the fallback, and when the model is
    # unavailable (rules only): a check that sees less is stricter.
    fraud_degraded_shift: int = Field(default=150, ge=0, le=1000)
    fraud_model_missing_shift: int = Field(default=100, ge=0, le=1000)
    # What a check answers when it fails unexpectedly (never an error to the caller).
    fraud_error_action: Literal["allow", "challenge", "review", "block"] = "challenge"
    # Lock policy: this many blocked checks of one user within the window request a lock
    # (event `billfold.fraud.user.lock_requested`); 0 disables it.
    fraud_lock_after_blocks: int = Field(default=3, ge=0)
    fraud_lock_window_seconds: int = Field(default=24 * 3600, gt=0)
    # The deployment's model registry (`billfold fraud train` installs champion/challenger
    # there; empty = data_dir/fraud-models). Without a champion there, the one shipped in the
    # package decides.
    fraud_model_dir: Path | None = None

    # Notification Service. A channel whose provider is not configured is not used (in-app
    # always is). FCM HTTP v1: the service-account JSON (project_id, client_email, private_key,
    # token_uri); the endpoint is overridable for tests.
    fcm_service_account_file: str = ""
    fcm_endpoint: str = "https://fcm.googleapis.com"
    # APNs HTTP/2 provider token: the .p8 key (ES256), its key id, the team id, the app's bundle
    # id (apns-topic). apns_ca_file: extra CA to trust (the test server's); empty = system CAs.
    apns_key_file: str = ""
    apns_key_id: str = ""
    apns_team_id: str = ""
    apns_topic: str = ""
    apns_endpoint: str = "https://api.push.apple.com"
    apns_ca_file: str = ""
    # E-mail: `smtp` (aiosmtplib; STARTTLS unless turned off) or `ses` (Amazon SES v2).
    email_provider: Literal["none", "smtp", "ses"] = "none"
    email_from: str = "billfold <no-reply@billfold.example>"
    smtp_host: str = "127.0.0.1"
    smtp_port: int = 587
    smtp_username: str = ""
    smtp_password: str = ""
    smtp_starttls: bool = True
    # Extra CA bundle to verify the SMTP server's STARTTLS certificate; empty = system CAs.
    smtp_ca_file: str = ""
    ses_region: str = "eu-west-1"
    ses_endpoint_url: str | None = None
    # SMS: Twilio's REST Messages API (account SID + auth token, a sender number).
    twilio_account_sid: str = ""
    twilio_auth_token: str = ""
    twilio_from: str = ""
    twilio_endpoint: str = "https://api.twilio.com"
    # Deliveries: attempts before a delivery fails for good, the first retry's delay (doubling),
    # how many outside-channel messages (push/e-mail/SMS) one user gets per hour beyond
    # security alerts, and the available balance (minor units) under which the user is told.
    notifications_max_attempts: int = Field(default=5, gt=0)
    notifications_retry_base_seconds: float = Field(default=30.0, gt=0)
    notifications_rate_limit_per_hour: int = Field(default=30, gt=0)
    notifications_low_balance_threshold: int = Field(default=1_000, ge=0)
    # Live notification streams (SSE) one API process holds open at once. Each holds a Redis
    # connection of the streams' own pool (never the API's); past it a new stream is refused
    # with 503 `stream_capacity` and Retry-After.
    notifications_stream_limit: int = Field(default=100, gt=0)

    # Event bus. Empty: the embedded bus (the relay reads the outbox on LISTEN/NOTIFY and runs
    # the consumers itself). `host:port[,host:port…]`: the relay publishes the outbox to Kafka
    # and the worker's consumers read it in consumer groups (docs/architecture.md, "Event bus").
    kafka_bootstrap: str = ""
    # Topics are `<prefix><service>` (the event type's second segment), plus
    # `<prefix>dead-letters`; consumer groups are `<group prefix><consumer name>`.
    kafka_topic_prefix: str = "billfold."
    kafka_group_prefix: str = "billfold."
    kafka_client_id: str = "billfold"
    # The idempotent producer (no duplicates from the producer's own retries). Kafka supports
    # it; brokers that refuse InitProducerId (tansu, in tests) need it off. Consumers dedupe by
    # their inbox either way.
    kafka_enable_idempotence: bool = True
    # Missing topics are created with these (production usually creates them beforehand).
    kafka_topic_partitions: int = Field(default=6, gt=0)
    kafka_replication_factor: int = Field(default=1, gt=0)
    # TLS to the brokers: the CA file that signed their certificates (empty: plaintext).
    kafka_ssl_cafile: str = ""
    # Consumer-group liveness: a consumer silent this long is presumed dead and its partitions
    # move to the others; a (re)balance waits at most the rebalance timeout for members.
    kafka_session_timeout_ms: int = Field(default=10_000, gt=0)
    kafka_heartbeat_interval_ms: int = Field(default=3_000, gt=0)
    kafka_rebalance_timeout_ms: int = Field(default=10_000, gt=0)
    # A consumer tries one event this often (backoff doubling from the first) before parking it
    # as a dead letter.
    consumer_attempts: int = Field(default=3, gt=0)
    consumer_backoff_seconds: float = Field(default=0.2, ge=0)

    # Loyalty (docs/loyalty.md). Points expire this many days after they were earned; the
    # balance page warns of points expiring within the window.
    loyalty_points_ttl_days: int = Field(default=365, gt=0)
    loyalty_expiring_soon_days: int = Field(default=30, ge=0)
    # Tiers from lowest to highest: the first is everyone's; a higher one is reached by a
    # rolling 12-month net spend (minor units) of at least `min_spend` in any one currency.
    loyalty_tiers: list[LoyaltyTier] = Field(
        default_factory=lambda: [
            LoyaltyTier(name="green", multiplier=Decimal(1)),
            LoyaltyTier(
                name="gold",
                multiplier=Decimal("1.25"),
                min_spend={"USD": 100_000, "EUR": 100_000, "GBP": 80_000},
            ),
            LoyaltyTier(
                name="platinum",
                multiplier=Decimal("1.5"),
                min_spend={"USD": 500_000, "EUR": 500_000, "GBP": 400_000},
            ),
        ],
        min_length=1,
    )
    # Redemption into the wallet per currency: `points` PTS buy `amount` minor units, at least
    # `minimum` points at once, in multiples of `step`. By default USD only (1 PTS = 1 US cent):
    # a point has one value, and another currency needs a rate set from a reference FX rate
    # (docs/loyalty.md, Redemption).
    loyalty_redemption_rates: dict[LoyaltyCurrency, LoyaltyRate] = Field(
        default_factory=lambda: {"USD": LoyaltyRate(points=1, amount=1, minimum=100, step=100)}
    )

    @field_validator("loyalty_tiers")
    @classmethod
    def _tiers_rise(cls, tiers: list[LoyaltyTier]) -> list[LoyaltyTier]:
        names = [tier.name for tier in tiers]
        if len(set(names)) != len(names):
            raise ValueError(f"a tier name appears twice: {names}")
        if tiers[0].min_spend:
            raise ValueError(f"the first tier ({tiers[0].name}) is everyone's: no min_spend")
        for lower, higher in pairwise(tiers):
            if not higher.min_spend:
                raise ValueError(f"tier {higher.name} needs a min_spend in some currency")
            for currency, minimum in higher.min_spend.items():
                below = lower.min_spend.get(currency)
                if below is not None and minimum <= below:
                    raise ValueError(
                        f"tier {higher.name} must need more {currency} spend than {lower.name}"
                    )
        return tiers

    def production_errors(self, process: Literal["api", "vault"]) -> list[str]:
        """Why this configuration must not run in production (empty outside production, or when
        it is fine). `api` covers every process that calls the vault (`serve`, `worker`)."""
        if self.environment != "production":
            return []
        errors: list[str] = []
        if process == "api":
            url = self.vault_url.strip().lower()
            if not url:
                errors.append(
                    "BILLFOLD_VAULT_URL must be set in production: without it this process "
                    "would open the HSM and keep card numbers itself"
                )
            elif not url.startswith("https://"):
                errors.append(
                    "BILLFOLD_VAULT_URL must be https:// in production: card numbers travel "
                    "to the vault in its requests"
                )
            elif not (self.vault_client_cert_file and self.vault_client_key_file):
                errors.append(
                    "BILLFOLD_VAULT_CLIENT_CERT_FILE and BILLFOLD_VAULT_CLIENT_KEY_FILE must be "
                    "set in production (the vault requires mTLS)"
                )
        if process == "api":
            errors += self.notification_transport_errors()
        if process == "vault" and self.vault_keystore == "software":
            errors.append(
                "BILLFOLD_VAULT_KEYSTORE=software is for demos without an HSM: production "
                "keeps its keys in an HSM (pkcs11)"
            )
        return errors

    def notification_transport_errors(self) -> list[str]:
        """Why the configured notification providers must not be used in production: each
        message (one-time codes among them) would cross the network in clear. Empty outside
        production."""
        if self.environment != "production":
            return []
        errors: list[str] = []
        if self.email_provider == "smtp" and not self.smtp_starttls:
            errors.append(
                "BILLFOLD_SMTP_STARTTLS=false is refused in production: e-mails (one-time "
                "codes among them) would reach the SMTP server in clear"
            )
        endpoints = [
            (bool(self.fcm_service_account_file), "BILLFOLD_FCM_ENDPOINT", self.fcm_endpoint),
            (bool(self.apns_key_file), "BILLFOLD_APNS_ENDPOINT", self.apns_endpoint),
            (bool(self.twilio_account_sid), "BILLFOLD_TWILIO_ENDPOINT", self.twilio_endpoint),
            # Twilio posts its signed delivery receipts to the public URL.
            (bool(self.twilio_account_sid), "BILLFOLD_PUBLIC_URL", self.public_url),
            (
                self.email_provider == "ses" and bool(self.ses_endpoint_url),
                "BILLFOLD_SES_ENDPOINT_URL",
                self.ses_endpoint_url or "",
            ),
        ]
        for used, name, url in endpoints:
            if used and not url.strip().lower().startswith("https://"):
                errors.append(
                    f"{name} must be https:// in production: notifications (one-time codes "
                    "among them) and provider credentials travel in its requests"
                )
        return errors
