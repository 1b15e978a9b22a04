"""What the payment flow needs at run time, built once per process by the app (and the worker,
whose sweepers send reversals)."""

from __future__ import annotations

from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Histogram

from billfold import users
from billfold.config import Settings
from billfold.network import CardNetwork
from billfold.platform.idempotency import fingerprint_key
from billfold.transactions.admission import AdmissionGate
from billfold.transactions.risk import AllowAll, PaymentRiskCheck
from billfold.vault import VaultClient

# The steps of an authorization the architecture budgets, as the histogram's `step` label.
STEPS = ("auth", "token", "fraud", "network", "db", "notify_enqueue")


class PaymentMetrics:
    """Per-step latency of payment authorizations and their outcomes, on the app's registry
    (`/metrics`)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.steps = Histogram(
            "billfold_payment_step_duration_seconds",
            "Time spent per step of a payment authorization (auth, token, fraud, network, db, "
            "notify_enqueue)",
            ["step"],
            buckets=(
                0.0005,
                0.001,
                0.0025,
                0.005,
                0.01,
                0.025,
                0.05,
                0.1,
                0.25,
                0.5,
                1,
                1.5,
                2.5,
                5,
            ),
            registry=registry,
        )
        self.outcomes = Counter(
            "billfold_payments_total",
            "Payment authorizations by source and resulting status",
            ["source", "status"],
            registry=registry,
        )

    def observe(self, timings: dict[str, float], source: str, status: str) -> None:
        """`timings` in milliseconds, as recorded in the payment's details."""
        for step, ms in timings.items():
            self.steps.labels(step).observe(ms / 1000)
        self.outcomes.labels(source, status).inc()


@dataclass
class TransactionsRuntime:
    settings: Settings  # with the secret key resolved
    users: users.UsersRuntime
    vault: VaultClient
    network: CardNetwork
    risk: PaymentRiskCheck = field(default_factory=AllowAll)
    metrics: PaymentMetrics | None = None

    def __post_init__(self) -> None:
        self._fingerprint_key = fingerprint_key(self.settings.secret_key)
        self._admission: AdmissionGate | None = None

    @property
    def admission(self) -> AdmissionGate:
        """How many payments may do their own work at once (`payment_admission_limit`), how
        many may wait to start (`payment_admission_queue`): see `transactions.admission`."""
        if self._admission is None:  # made on first use, inside the process's event loop
            self._admission = AdmissionGate(
                self.settings.payment_admission_limit,
                self.settings.payment_admission_queue,
                # Half the network's timeout: an answer that late says the network is behind.
                congested_after=self.settings.network_timeout_ms / 2000,
            )
        return self._admission

    @property
    def fingerprint_key(self) -> bytes:
        """The key of request fingerprints (the same derivation as the edge's idempotency)."""
        return self._fingerprint_key
