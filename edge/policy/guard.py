"""Who may call, and how often: the ban check, the bearer key and the rate limits.

DESIGN.md §4 step 2, in this order and before the body is read: a banned address is refused
(403 `banned`); then the caller must present a valid key (`Authorization: Bearer bh_...`, what
the openai and ollama SDKs send), unless the route is a health probe or an anonymous feature;
then the key's token budget (429 `budget_exhausted` until its day or month resets,
`edge.policy.budgets`) and the key's and the feature's rate limits apply (429 `rate_limited` +
`Retry-After` and `RateLimit-*`); the route allowlist comes after, so a valid key still gets 404
on a route that is not proxied. A key's tokens per minute and its budget are charged after the
response (`settle`), from the figures the model server reported.

Nothing here awaits: the whole check is a few dict lookups and one SHA-256, well under the
0.2 ms the benchmark allows. The secret is never logged; the telemetry line carries the key's
name.

Anonymous refusals (a 401 to a request that presented no key, a 403 to a banned address) cost
the caller nothing, and each wrote a telemetry line: one client could rotate the whole telemetry
history away in about two minutes. Past a burst per address group (and a cap in all), their
lines are counted instead (`AnonymousLines`) and the counts logged once a minute and at
shutdown as `auth.unauthenticated_suppressed` events, one per address, so the volume stays
visible and nothing vanishes silently; the metrics count every request as before. Why counted in
the log and not as telemetry lines: a line is one request in a fixed schema that `stats`,
`tail` and operators' `jq` read as such, and a line carrying a count would be a request to
every one of them. The guard only marks the exchange (`Exchange.aggregated`) and the middleware,
which writes every line, skips a marked one: the writer and the schema are unchanged.
Wrong keys are not among them: each is a guess, logged and counted towards a ban, and a ban
ends them.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable
from typing import Protocol

import structlog
from aiohttp import hdrs, web

from edge.errors import Banned, BudgetExhausted, Forbidden, RateLimited, Unauthorized, UnknownClient
from edge.exchange import Exchange
from edge.policy.bans import BanList
from edge.policy.budgets import BudgetStore, LocalBudgets, Period
from edge.policy.clients import address_group
from edge.policy.keys import ApiKey, KeyStore
from edge.policy.limits import AloneLimits, Buckets, Check, Decision, Limits, LocalLimits
from edge.routes import OPEN_PATHS
from edge.settings import EdgeSettings

log = structlog.get_logger(__name__)

_CHALLENGE = 'Bearer realm="backhaul"'
_INVALID = 'Bearer realm="backhaul", error="invalid_token"'
# RFC 9110's optional whitespace: what may separate the scheme from the credential.
_OWS = " \t"
# Seconds between two "keys.none" (or "auth.unknown_client") log lines while requests keep
# arriving without a keys file (or through a proxy that does not name its clients).
_MISSING_LOG_INTERVAL_S = 60.0
# Anonymous refusals written one telemetry line each, per minute (token buckets): from one
# address group (10: a person retrying by hand, a client configured without its key), and in
# all (600: at ~500 bytes a line an address spray adds 18 MB an hour at most, so the default
# rotation's 600 MiB still hold a day and more). Past them each is counted for the next report.
_ANONYMOUS_LINES_PER_ADDRESS = 10
_ANONYMOUS_LINES_IN_ALL = 600
# Seconds between two reports of what was counted (and once more at shutdown).
_SUPPRESSED_REPORT_S = 60.0
# Addresses a report names one event each, the largest counts first; the rest share one event.
_REPORTED_ADDRESSES = 100


class Feature(Protocol):
    """What the guard reads of a feature endpoint (`edge.proxy.features.Feature` is one): policy
    sits below the request path and imports nothing from it."""

    @property
    def name(self) -> str: ...
    @property
    def model(self) -> str: ...
    @property
    def anonymous(self) -> bool: ...
    @property
    def rpm(self) -> int | None: ...


class Guard:
    """The edge's gatekeeper: bans, keys, limits. One per edge (`Edge.guard`)."""

    def __init__(
        self,
        settings: EdgeSettings,
        keys: KeyStore | None,
        bans: BanList,
        budgets: BudgetStore | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.keys = keys  # None: auth=none
        self.bans = bans
        self.budgets = budgets if budgets is not None else LocalBudgets(None)
        self.anonymous_rpm = settings.anonymous_rpm
        # This edge's own buckets (rpm, tpm, per feature caller); `limits` decides with them,
        # or with the limits the edges share (`edge.cluster.limits`, which falls back to them).
        self.local_limits = LocalLimits(settings.max_tracked_clients, clock)
        self.limits: Limits = AloneLimits(self.local_limits)
        self.anonymous = AnonymousLines(settings.max_tracked_clients, clock)
        self._missing_logged = -math.inf
        self._unknown_logged = -math.inf

    def start(self) -> None:
        """Read the saved bans and the keys file; say so if there are no keys."""
        self.bans.load()
        if self.keys is not None:
            self.keys.load()
            if not self.keys.present:
                self.log_if_no_keys()

    async def close(self) -> None:
        """At shutdown: report what was counted since the last report, save the ban list."""
        self.anonymous.report()
        await self.bans.close()

    def check_ban(self, ex: Exchange) -> None:
        """Refuse a banned address before anything else (preflights too), and a request from a
        trusted proxy that does not say which client it is from (`edge.exchange.ClientAddress`):
        bans and per-address limits would otherwise fall on the proxy, that is on everyone."""
        if ex.record.client is None and ex.via_proxy:
            now = time.monotonic()
            if now - self._unknown_logged >= _MISSING_LOG_INTERVAL_S:
                self._unknown_logged = now
                log.error(
                    "auth.unknown_client",
                    hint="a trusted proxy sent a request without a usable X-Forwarded-For: "
                    "set it as docs/deploy.md shows (nginx: proxy_set_header X-Forwarded-For "
                    "$remote_addr;); these requests are refused 400 until then",
                )
            raise UnknownClient(
                "the proxy in front of this server did not say which client the request is "
                "from (X-Forwarded-For); its operator must fix the proxy's configuration"
            )
        try:
            self.refuse_banned(ex.record.client)
        except Banned:
            self.anonymous.note(ex, Banned.type)
            raise

    def refuse_banned(self, client: str | None) -> None:
        """Raise `Banned` (with `Retry-After`) when `client`'s address is banned."""
        left = self.bans.banned_for(client)
        if left is not None:
            raise Banned(
                "too many failed authentications from this address; try again later",
                headers={"Retry-After": str(math.ceil(left))},
            )

    async def admit(self, request: web.Request, ex: Exchange, feature: Feature | None) -> None:
        """Authenticate and rate-limit one request; sets `ex.key` and the record's `key`.

        Error handling: raises `Unauthorized` (with `WWW-Authenticate`), `RateLimited` (with
        `Retry-After` and `RateLimit-*`) or `Forbidden` (a feature's model outside the key's
        allowlist); a presented key that fails counts towards a ban of the address.
        """
        if ex.path in OPEN_PATHS:
            return
        key = self._authenticate(request, ex, feature)
        if key is not None:
            ex.key = key
            ex.record.key = key.name
        try:
            await self._limit(ex, key, feature)
        except RateLimited:
            if key is None:  # an anonymous feature's caller: one line per burst, like a 401
                self.anonymous.note(ex, RateLimited.type)
            raise
        if key is not None and feature is not None and not key.allows_model(feature.model):
            raise Forbidden(f"this key may not use feature '{feature.name}'")

    async def settle(self, ex: Exchange) -> None:
        """After the response: charge the tokens it used to the key's tokens-per-minute and
        to its budget's current period."""
        key = ex.key
        if key is None or (key.tpm is None and key.budget is None):
            return
        used = (ex.record.prompt_tokens or 0) + (ex.record.tokens or 0)
        if key.tpm is not None:
            await self.limits.charge(Check("tpm", key.name, key.tpm, used, f"key '{key.name}'"))
        if key.budget is not None and self.keys is not None:
            period = Period.current(key.budget.period, self.keys.clock())
            self.budgets.charge(key.name, period, used)

    def _authenticate(
        self, request: web.Request, ex: Exchange, feature: Feature | None
    ) -> ApiKey | None:
        if self.keys is None:
            return None
        scheme, secret = credentials(request.headers.get(hdrs.AUTHORIZATION))
        if not secret:  # no header, or one that carries no credential: not a guess
            if feature is not None and feature.anonymous:
                return None
            self.log_if_no_keys()
            self.anonymous.note(ex, Unauthorized.type)
            raise Unauthorized(
                "an API key is required: send 'Authorization: Bearer <key>'",
                headers={"WWW-Authenticate": _CHALLENGE},
            )
        if not self.keys.present:  # no keys file: the operator's mistake, not the caller's
            self.log_if_no_keys()
            raise Unauthorized("invalid API key", headers={"WWW-Authenticate": _INVALID})
        key = self.keys.lookup(secret) if scheme == "bearer" else None
        now = self.keys.clock()
        if key is not None and key.enabled and not key.expired(now):
            return key
        if key is None:
            reason, message = "unknown", "invalid API key"
        elif not key.enabled:
            reason, message = "revoked", "this API key was revoked"
        else:
            reason, message = "expired", "this API key has expired"
        client = ex.record.client
        banned = self.bans.fail(client)
        log.warning(
            "auth.failed",
            reason=reason,
            key=key.name if key else None,
            client=client,
            banned=banned,
        )
        raise Unauthorized(message, headers={"WWW-Authenticate": _INVALID})

    def log_if_no_keys(self) -> None:
        assert self.keys is not None
        if self.keys.present:
            return
        now = time.monotonic()
        if now - self._missing_logged < _MISSING_LOG_INTERVAL_S:
            return
        self._missing_logged = now
        log.error(
            "keys.none",
            path=str(self.keys.path),
            hint="every request is refused 401: create a key with `backhaul-edge keys add NAME` "
            "(or set BACKHAUL_EDGE_AUTH=none for an open demo edge)",
        )

    async def _limit(self, ex: Exchange, key: ApiKey | None, feature: Feature | None) -> None:
        # Every check asked, then the takes: a refused request takes nothing from any limit.
        checks: list[Check] = []
        if key is not None:
            self._check_budget(key)
            who = f"key '{key.name}'"
            if key.tpm is not None:  # charged after the answer: here only "not over"
                checks.append(Check("tpm", key.name, key.tpm, 0, who))
            if key.rpm is not None:
                checks.append(Check("rpm", key.name, key.rpm, 1, who))
        if feature is not None:
            limit = feature.rpm if feature.rpm is not None or key else self.anonymous_rpm
            if limit is not None:
                client = ex.record.client
                address = address_group(client) if client is not None else None
                caller = f"key:{key.name}" if key else f"addr:{address}"
                who = f"feature '{feature.name}' from this {'key' if key else 'address'}"
                checks.append(Check("caller", f"{feature.name}|{caller}", limit, 1, who))
        if not checks:
            return
        verdict = await self.limits.take(checks)
        ex.record.limiter = verdict.limiter
        if verdict.refused is not None:
            check, decision = checks[verdict.refused], verdict.decisions[verdict.refused]
            if check.kind == "tpm":
                message = f"{check.who} used its {check.limit} tokens per minute"
            else:
                message = f"{check.who} is over its limit of {check.limit} requests per minute"
            raise _limited(message, decision)
        # The headers speak for the tightest limit on requests (tokens are not requests).
        counted = [d for c, d in zip(checks, verdict.decisions, strict=True) if c.cost]
        if counted:
            ex.rate_headers = min(counted, key=lambda d: d.remaining).headers()

    def _check_budget(self, key: ApiKey) -> None:
        """Refuse a key whose budget is spent for the current period, until the period ends."""
        if key.budget is None or self.keys is None:
            return
        now = self.keys.clock()
        period = Period.current(key.budget.period, now)
        if self.budgets.spent(key.name, period) < key.budget.tokens:
            return
        resets = period.end.isoformat().replace("+00:00", "Z")
        raise BudgetExhausted(
            f"key '{key.name}' used its budget of {key.budget.tokens} tokens per "
            f"{key.budget.period}; it resets at {resets}",
            headers={"Retry-After": str(max(1, math.ceil(period.end.timestamp() - now)))},
        )


class AnonymousLines:
    """Which anonymous refusals get a telemetry line each, and a count of those that did not.

    Memory is bounded: the buckets as `edge.policy.limits` keeps them, and at most `max_entries`
    counted addresses between two reports (the ones past that are counted under `*`).
    """

    def __init__(self, max_entries: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.max_entries = max_entries
        self.clock = clock
        self._addresses = Buckets(max_entries, clock)
        self._all = Buckets(1, clock)
        self._counts: dict[tuple[str, str], int] = {}  # (address group, error type) -> count
        self._since = clock()

    def note(self, ex: Exchange, error_type: str) -> None:
        """One anonymous refusal of `error_type`: within the burst its line is written, past
        it `ex.aggregated` is set and the refusal counted for the next `report()`."""
        client = ex.record.client
        # Per type: the first 403 `banned` after a flood of 401s still gets its line.
        key = (address_group(client) if client is not None else "-", error_type)
        # Both checks before the takes: a counted refusal takes nothing from the other bucket.
        if self._addresses.allows(key, _ANONYMOUS_LINES_PER_ADDRESS) and self._all.allows(
            None, _ANONYMOUS_LINES_IN_ALL
        ):
            self._addresses.take(key, _ANONYMOUS_LINES_PER_ADDRESS)
            self._all.take(None, _ANONYMOUS_LINES_IN_ALL)
            return
        ex.aggregated = True
        if key not in self._counts and len(self._counts) >= self.max_entries:
            key = ("*", error_type)
        self._counts[key] = self._counts.get(key, 0) + 1

    def report(self) -> None:
        """Log what was counted since the last report, one event per address and type (the
        largest first, at most `_REPORTED_ADDRESSES`; the others summed in one), and start
        counting afresh."""
        counts, self._counts = self._counts, {}
        now = self.clock()
        window_s, self._since = round(now - self._since, 1), now
        ranked = sorted(counts.items(), key=lambda item: item[1], reverse=True)
        for (client, error_type), count in ranked[:_REPORTED_ADDRESSES]:
            log.warning(
                "auth.unauthenticated_suppressed",
                client=client,
                type=error_type,
                count=count,
                window_s=window_s,
            )
        rest = ranked[_REPORTED_ADDRESSES:]
        if rest:
            log.warning(
                "auth.unauthenticated_suppressed",
                client="*",
                addresses=len({client for (client, _), _ in rest}),
                count=sum(count for _, count in rest),
                window_s=window_s,
            )

    async def run_reporter(self, interval: float = _SUPPRESSED_REPORT_S) -> None:
        """Report every `interval` seconds, until cancelled."""
        while True:
            await asyncio.sleep(interval)
            self.report()


def credentials(header: str | None) -> tuple[str, str]:
    """The scheme (lower case) and the credential of an `Authorization` header; ("", "") for
    none, and an empty credential for a scheme alone.

    RFC 9110 §11.4: `auth-scheme [ 1*SP token68 ]`, the scheme case-insensitive. Read
    tolerantly, as many servers do: HTAB counts as SP, a run of them is one separator, and
    whitespace around the credential is not part of it. A valid key sent by a client that
    writes the header a little differently is a valid key, not a failed login towards a ban.
    """
    if header is None:
        return "", ""
    value = header.strip(_OWS)
    cut = len(value)
    for separator in _OWS:
        found = value.find(separator)
        if 0 <= found < cut:
            cut = found
    return value[:cut].lower(), value[cut:].strip(_OWS)


def _limited(message: str, decision: Decision) -> RateLimited:
    return RateLimited(
        f"{message}; retry in {decision.retry_after_s} s", headers=decision.headers()
    )
