"""Prometheus `/metrics`: what the edge has served, and the live state of its gate and upstream.

Counters and histograms are fed from one place, the request middleware's `finally` in
`edge.app`, with the same `RequestRecord` that becomes the telemetry line, so the two never
disagree about what a request was; the telemetry line stays the source of truth and carries what
metrics cannot (the request id, the client). Gauges (in flight, queued, agent connected, the
upstream's state) are read from the live objects at scrape time by `_LiveCollector`, so they are
never stale and cost nothing between scrapes.

Every label set is bounded, because each distinct label value is a time series kept forever by
Prometheus: routes come from the allowlist (anything else is `other`), models only when the
model allowlist names them or the model server actually served them, and every label has a cap
on distinct values past which new ones become `other`.

Each app has its own `CollectorRegistry` (the tests build many apps in one process), and
`observe()` never raises into the request path: a metrics bug is logged once and skipped.

Access: `/metrics` answers a loopback peer that did not come through a proxy, or anyone with the
metrics token (`BACKHAUL_EDGE_METRICS_TOKEN`, at least 32 characters, as `Authorization: Bearer
...`, compared in constant time). A TLS proxy on the same VPS connects from loopback too, so a
request whose peer is a trusted proxy (`BACKHAUL_EDGE_TRUSTED_PROXIES`), or which carries any
forwarding header (`X-Forwarded-For`, `Forwarded`, `X-Real-IP`), is never a local scraper: a
proxy need not add one (nginx adds none unless told to). A wrong token is a guess: it counts
towards a ban of the client's address like a wrong API key (`edge.policy.bans`), and a banned
address gets no metrics. Why not a second, loopback-only port instead: it would be one more
listener to own, and the proxy's requests are already told apart by their peer; a Prometheus on
the VPS behind a trusted loopback proxy sends the token, one line of its config.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
from collections.abc import Mapping
from ipaddress import ip_address
from typing import Any

import prometheus_client
import structlog
from aiohttp import hdrs
from prometheus_client import CollectorRegistry, Counter, Histogram
from pydantic import SecretStr

from edge.metrics_live import LiveCollector
from edge.models import canonical_model
from edge.policy.guard import credentials
from edge.record import RequestRecord
from edge.routes import BY_PATH, FEATURE_PREFIX, OWN_PATHS
from edge.telemetry import TelemetryWriter
from edge.upstreams.pool import Pool

log = structlog.get_logger(__name__)

# No `_created` series beside every counter and histogram: they double what each scrape carries
# and Prometheus does not need them (process-wide, and this process is the edge).
prometheus_client.disable_created_metrics()  # type: ignore[no-untyped-call]  # untyped upstream

OTHER = "other"
# The edge's own routes, labelled by name like the allowlisted ones.
# Distinct values kept per label before new ones become "other": a few dozen models or
# features, a few hundred keys, are what one workstation serves; past that it is an attack or a
# bug, and a series per value would bloat every scrape.
_MAX_MODELS = 32
_MAX_FEATURES = 64
_MAX_KEYS = 256
_MAX_REASONS = 32
# Agents are named in the agent-keys file or edge.toml: a bound the operator sets, kept anyway.
_MAX_AGENTS = 64
# Headers a reverse proxy adds: a request carrying one came from outside, even from loopback.
_FORWARDING_HEADERS = ("X-Forwarded-For", "Forwarded", "X-Real-IP")

# Histogram buckets, in seconds or tokens/s, shaped for an LLM behind a tunnel: a refusal takes
# milliseconds, a long generation minutes; a laptop GPU makes 5 tok/s, a big one a few hundred.
_DURATION_BUCKETS_S = (
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0,
)  # fmt: skip
_TTFB_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_QUEUE_BUCKETS_S = (0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_TOK_PER_S_BUCKETS = (1, 2, 5, 10, 15, 20, 30, 40, 50, 75, 100, 150, 200, 300, 500)


class _Bounded:
    """A label's values: the first `limit` distinct ones are kept, later ones become `other`."""

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._seen: set[str] = set()

    def __call__(self, value: str) -> str:
        if value in self._seen:
            return value
        if len(self._seen) >= self._limit:
            return OTHER
        self._seen.add(value)
        return value


class EdgeMetrics:
    """The edge's Prometheus registry and the counters fed from each request's record."""

    def __init__(
        self,
        allowed_models: list[str],
        pool: Pool,
        telemetry: TelemetryWriter,
    ) -> None:
        self._allowed_models = frozenset(canonical_model(m) for m in allowed_models)
        self._children: dict[tuple[Any, tuple[str, ...]], Any] = {}
        self._models = _Bounded(_MAX_MODELS)
        self._features = _Bounded(_MAX_FEATURES)
        self._keys = _Bounded(_MAX_KEYS)
        self._reasons = _Bounded(_MAX_REASONS)
        self._agents = _Bounded(_MAX_AGENTS)
        self._failed = False
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "backhaul_requests",
            "Requests answered, by route (or /features/NAME), status, model and key name.",
            ["route", "status", "model", "key"],
            registry=r,
        )
        self.outcomes = Counter(
            "backhaul_request_outcomes",
            "Requests by how they ended: ok, error, client_gone, upstream_broken.",
            ["outcome"],
            registry=r,
        )
        self.rejected = Counter(
            "backhaul_rejected_requests",
            "Requests that ended in an error, by its type (the `type` of the error body).",
            ["reason"],
            registry=r,
        )
        self.duration = Histogram(
            "backhaul_request_duration_seconds",
            "Time from the request's arrival to its last byte, at the edge.",
            ["route"],
            buckets=_DURATION_BUCKETS_S,
            registry=r,
        )
        self.ttfb = Histogram(
            "backhaul_upstream_ttfb_seconds",
            "Time from sending a request upstream to the model server's response headers.",
            ["route"],
            buckets=_TTFB_BUCKETS_S,
            registry=r,
        )
        self.ttft = Histogram(
            "backhaul_upstream_ttft_seconds",
            "Time from sending a request upstream to its first generated token (a stream), or "
            "the model server's own prompt time (a buffered answer that reports it).",
            ["route"],
            buckets=_TTFB_BUCKETS_S,
            registry=r,
        )
        self.queue_wait = Histogram(
            "backhaul_queue_wait_seconds",
            "Time inference requests waited for a GPU slot in the edge's gate.",
            buckets=_QUEUE_BUCKETS_S,
            registry=r,
        )
        self.tok_per_s = Histogram(
            "backhaul_tokens_per_second",
            "Generation speed of each answer (the model server's own figure where it reports "
            "one, else measured from the first token), by model.",
            ["model"],
            buckets=_TOK_PER_S_BUCKETS,
            registry=r,
        )
        self.tokens = Counter(
            "backhaul_tokens",
            "Tokens by direction (prompt: read by the model, completion: generated), model, key.",
            ["kind", "model", "key"],
            registry=r,
        )
        self.agent_requests = Counter(
            "backhaul_agent_requests",
            "Requests sent to each workstation, by how they ended there (the status).",
            ["agent", "status"],
            registry=r,
        )
        self.failovers = Counter(
            "backhaul_failovers",
            "Requests sent to another workstation after one failed before any byte reached the "
            "client.",
            registry=r,
        )
        self.upstream_retries = Counter(
            "backhaul_upstream_retries",
            "Requests resent on a new connection because a reused one to the model server was "
            "dead before any answer (a server that closes kept-alive connections).",
            registry=r,
        )
        self.limiter = Counter(
            "backhaul_limiter_decisions",
            "Rate-limit decisions by who made them: redis (the edges' shared limits) or local "
            "(this edge's own, or its share while Redis is away).",
            ["limiter"],
            registry=r,
        )
        self.cost = Counter(
            "backhaul_cost_usd",
            "US dollars: what cloud fallbacks charged (where=cloud), and what the answers made "
            "locally would have cost on the cost_reference model (where=local, money saved).",
            ["where"],
            registry=r,
        )
        self.live = LiveCollector(pool, telemetry)
        r.register(self.live)

    def observe(self, record: RequestRecord) -> None:
        """Count one finished request. Never raises: a failure is logged once, then skipped."""
        try:
            self._observe(record)
        except Exception:
            if not self._failed:
                self._failed = True
                log.exception("metrics.observe_failed", request_id=record.id)

    def _observe(self, record: RequestRecord) -> None:
        route = self.route_label(record)
        model = self.model_label(record)
        key = self._keys(record.key) if record.key else ""
        child = self._child
        child(self.requests, route, str(record.status), model, key).inc()
        child(self.outcomes, self._reasons(record.outcome)).inc()
        if record.type is not None:
            child(self.rejected, self._reasons(record.type)).inc()
        child(self.duration, route).observe(record.elapsed_ms / 1000.0)
        if record.ttfb_ms is not None:
            child(self.ttfb, route).observe(record.ttfb_ms / 1000.0)
        if record.ttft_ms is not None:
            child(self.ttft, route).observe(record.ttft_ms / 1000.0)
        if record.queue_ms is not None:
            self.queue_wait.observe(record.queue_ms / 1000.0)
        if record.tok_per_s is not None:
            child(self.tok_per_s, model).observe(record.tok_per_s)
        if record.prompt_tokens:
            child(self.tokens, "prompt", model, key).inc(record.prompt_tokens)
        if record.tokens:
            child(self.tokens, "completion", model, key).inc(record.tokens)
        if record.upstream_retries:
            self.upstream_retries.inc(record.upstream_retries)
        if record.agent is not None:
            child(self.agent_requests, self._agents(record.agent), str(record.status)).inc()
        if record.failovers:
            self.failovers.inc(record.failovers)
        if record.limiter is not None:
            child(self.limiter, record.limiter).inc()
        if record.cost_usd:
            cloud = (record.served_by or "").startswith("cloud:")
            child(self.cost, "cloud" if cloud else "local").inc(record.cost_usd)

    def _child(self, metric: Any, *values: str) -> Any:
        """`metric.labels(*values)`, remembered: `labels()` validates and locks on every call,
        which was most of the cost of counting a request. Bounded: every label value is."""
        found = self._children.get((metric, values))
        if found is None:
            found = self._children[(metric, values)] = metric.labels(*values)
        return found

    def route_label(self, record: RequestRecord) -> str:
        if record.feature:
            return FEATURE_PREFIX + self._features(record.feature)
        if record.route in BY_PATH or record.route in OWN_PATHS:
            return record.route
        return OTHER

    def model_label(self, record: RequestRecord) -> str:
        """The model, when it is a bounded value: on the allowlist, or served by the upstream."""
        if not record.model:
            return ""
        name = canonical_model(record.model)
        if self._allowed_models:
            return name if name in self._allowed_models else OTHER
        # No allowlist: any string a client sends passes to the model server, which refuses
        # the ones it does not have; only what it served is a real model.
        return self._models(name) if 0 < record.status < 400 else OTHER


class Scrape(enum.Enum):
    """What `/metrics` makes of a scrape (see the module doc)."""

    ALLOWED = "allowed"
    REFUSED = "refused"  # neither a local scraper nor the token
    GUESS = "guess"  # a credential was sent and is not the token


def scrape_access(
    peer: str | None, headers: Mapping[str, str], token: SecretStr | None, via_proxy: bool
) -> Scrape:
    """Whether a scraper at `peer` with `headers` may read the metrics; `via_proxy`: the peer
    is a trusted proxy."""
    supplied = headers.get(hdrs.AUTHORIZATION)
    if token is not None and supplied is not None:
        scheme, secret = credentials(supplied)  # read as API keys are: `Bearer<TAB>token` too
        # Digests of both, so the comparison's time says nothing about the token's length either.
        expected = hashlib.sha256(token.get_secret_value().encode()).digest()
        offered = hashlib.sha256(secret.encode()).digest()
        right = hmac.compare_digest(offered, expected)  # before the scheme: one path for all
        return Scrape.ALLOWED if right and scheme == "bearer" else Scrape.GUESS
    if via_proxy or any(name in headers for name in _FORWARDING_HEADERS):
        return Scrape.REFUSED
    try:
        local = peer is not None and ip_address(peer).is_loopback
    except ValueError:  # a Unix socket peer has no IP address
        local = False
    return Scrape.ALLOWED if local else Scrape.REFUSED
