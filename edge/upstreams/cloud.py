"""`CloudUpstream`: an OpenAI-compatible cloud the edge falls back to (DESIGN.md §7.4).

Opt-in, always: a request reaches a cloud only when its model (`fallback`), its feature or its
API key names one, and never for a key that is `local_only` (`Fallbacks.for_request`). It then
serves only when the workstations cannot: none serves the model, every candidate stayed busy
past `fallback_wait`, a failure before the first byte, or a prompt longer than the local
context. One hop, never after a byte reached the client (`edge.proxy.cloud_route`).

Each cloud has its own HTTP session, with its own API key as a default header: the model
server's key (`upstream_api_key_file`) is never sent to a cloud, nor a cloud's to a model
server, nor the caller's to either. TLS certificates are verified (aiohttp's default).

The cloud's own refusals are its, not the caller's: its 401/403 is 502 `upstream_refused` (the
operator's key), its 429 is 503 `upstream_busy` with its `Retry-After`, its 5xx is 502.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass

import aiohttp
import structlog
from aiohttp import hdrs

from edge.exchange import Exchange
from edge.models import canonical_model
from edge.settings import CloudSettings, EdgeSettings, Price
from shared.secrets import read_key_file

log = structlog.get_logger(__name__)

ANY_MODEL = "*"
SERVED_BY_PREFIX = "cloud:"


@dataclass(frozen=True, slots=True, eq=False)
class CloudUpstream:
    name: str
    base_url: str  # `/v1` included, no trailing slash
    models: Mapping[str, str]  # canonical local name (or "*") -> the cloud's model
    prices: Mapping[str, Price]
    timeout: float
    session: aiohttp.ClientSession

    @property
    def served_by(self) -> str:
        return SERVED_BY_PREFIX + self.name

    def model_for(self, local: str | None) -> str | None:
        """The cloud's model for a local model name; None when it has none for it."""
        if local is not None:
            found = self.models.get(canonical_model(local))
            if found is not None:
                return found
        return self.models.get(ANY_MODEL)

    def url(self, openai_path: str) -> str:
        """The cloud's URL for an OpenAI route (`/v1/chat/completions`)."""
        return self.base_url + openai_path.removeprefix("/v1")

    def cost(self, model: str, prompt_tokens: int | None, tokens: int | None) -> float | None:
        """What `model`'s answer cost here, in US dollars; None without a price for it."""
        price = self.prices.get(model)
        if price is None or (prompt_tokens is None and tokens is None):
            return None
        spent = (prompt_tokens or 0) * price.input + (tokens or 0) * price.output
        return round(spent / 1_000_000, 8)


class Fallbacks:
    """The clouds, and which one (if any) a request may fall back to."""

    def __init__(self, settings: EdgeSettings, clouds: Mapping[str, CloudUpstream]) -> None:
        self.clouds = clouds
        self._by_model = {
            model if model == ANY_MODEL else canonical_model(model): cloud
            for model, cloud in settings.fallback.items()
        }
        self._by_feature = {name: f.fallback for name, f in settings.features.items()}
        self.wait = settings.fallback_wait
        self.context_tokens = settings.fallback_context_tokens
        reference = settings.cost_reference
        self._reference: tuple[CloudUpstream, str] | None = None
        if reference is not None:
            cloud, _, model = reference.partition(":")
            self._reference = (clouds[cloud], model)

    def for_request(self, ex: Exchange, model: str | None) -> CloudUpstream | None:
        """The cloud this request may fall back to: its feature's, its key's, its model's (in
        that order); None when it names none or its key keeps it local."""
        if not self.clouds:  # the usual edge: no fallback at all, and nothing to look up
            return None
        key = ex.key
        if key is not None and key.local_only:
            return None
        name = self._by_feature.get(ex.record.feature or "")
        if name is None and key is not None:
            name = key.fallback
        if name is None and model is not None:
            name = self._by_model.get(canonical_model(model))
        if name is None:
            name = self._by_model.get(ANY_MODEL)
        cloud = self.clouds.get(name) if name is not None else None
        if cloud is None or cloud.model_for(model) is None:
            return None
        return cloud

    def reference_cost(self, prompt_tokens: int | None, tokens: int | None) -> float | None:
        """What a local answer's tokens would have cost on `cost_reference`."""
        if self._reference is None:
            return None
        cloud, model = self._reference
        return cloud.cost(model, prompt_tokens, tokens)


@asynccontextmanager
async def open_clouds(settings: EdgeSettings) -> AsyncIterator[Fallbacks]:
    """A session per configured cloud (its key read now; `ConfigError` if it cannot be),
    closed on exit."""
    async with AsyncExitStack() as stack:
        clouds = {}
        for name, cloud in settings.clouds.items():
            session = await stack.enter_async_context(_session(name, cloud))
            clouds[name] = CloudUpstream(
                name=name,
                base_url=cloud.base_url.rstrip("/"),
                models={
                    model if model == ANY_MODEL else canonical_model(model): target
                    for model, target in cloud.models.items()
                },
                prices=cloud.prices,
                timeout=cloud.timeout,
                session=session,
            )
        yield Fallbacks(settings, clouds)


@asynccontextmanager
async def _session(name: str, cloud: CloudSettings) -> AsyncIterator[aiohttp.ClientSession]:
    key = read_key_file(cloud.api_key_file, f"clouds.{name}.api_key_file")
    headers = {hdrs.AUTHORIZATION: f"Bearer {key.get_secret_value()}"} if key else {}
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=10.0, sock_read=cloud.timeout)
    async with aiohttp.ClientSession(
        headers=headers,
        timeout=timeout,
        cookie_jar=aiohttp.DummyCookieJar(),
        auto_decompress=True,
    ) as session:
        yield session
