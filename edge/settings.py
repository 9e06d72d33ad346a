"""The edge's settings (`BACKHAUL_EDGE_...`, `/etc/backhaul/edge.toml`); see DESIGN.md §6."""

from __future__ import annotations

import re
from ipaddress import ip_network
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator
from pydantic_settings import SettingsConfigDict

from edge.proxy.body_policy import check_extra_fields
from shared.protocol import TUNNEL_PORT
from shared.settings import BackhaulSettings

# 32 characters of `openssl rand -hex` are 128 bits: past guessing at any rate a ban allows.
_MIN_METRICS_TOKEN_CHARS = 32


def _in_state_dir(name: str) -> Any:
    """The default of a file the edge keeps: `name` in the `state_dir` it was given."""

    def default(data: dict[str, Any]) -> Path:
        return Path(data["state_dir"]) / name

    return Field(default_factory=default)


class FeatureSettings(BaseModel):
    """One feature endpoint, `POST /features/{name}` (docs/features.md): the browser sends only
    `{"input": ...}`; the model, prompt and options are pinned here."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    # The model every call uses, and its system prompt.
    model: str
    system: str | None = None
    # The user message: `{input}` is replaced by the caller's input (nothing else is expanded).
    prompt: str = "{input}"
    # Sampling options sent with every call: a fixed seed and a low temperature make answers
    # repeatable.
    temperature: float | None = Field(None, ge=0)
    seed: int | None = None
    # Generated tokens at most; never more than the edge's `max_output_tokens`.
    max_tokens: int | None = Field(None, ge=1)
    # JSON Schema of the answer: sent as Ollama's `format`, and every answer checked against it
    # (502 `invalid_model_output` when it does not match).
    json_schema: dict[str, Any] | None = None
    # Longest input accepted, in characters (413 beyond).
    max_input_chars: int = Field(4000, ge=1)
    # Callable without an API key (from a public web page); limited per address then.
    anonymous: bool = False
    # Requests per minute per caller: per key, or per address when anonymous (default
    # `anonymous_rpm`).
    rpm: int | None = Field(None, ge=1)
    # Browser origins allowed to call this feature, besides the edge's `cors_origins`.
    cors_origins: list[str] = []
    # A cloud (`[clouds.NAME]`) that answers this feature when the workstations cannot.
    fallback: str | None = None

    @field_validator("prompt")
    @classmethod
    def _has_input(cls, value: str) -> str:
        if "{input}" not in value:
            raise ValueError("the prompt template must contain {input}")
        return value

    @field_validator("json_schema")
    @classmethod
    def _valid_schema(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        if value is not None:
            import jsonschema  # only when a feature has a schema: 50 ms of import

            try:
                jsonschema.validators.validator_for(value).check_schema(value)
            except jsonschema.SchemaError as exc:
                raise ValueError(f"json_schema is not a valid JSON Schema: {exc.message}") from None
        return value


class Price(BaseModel):
    """A cloud model's price in US dollars per million tokens."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    input: float = Field(ge=0)
    output: float = Field(ge=0)


class CloudSettings(BaseModel):
    """An OpenAI-compatible cloud the edge may fall back to (`[clouds.NAME]`, docs/fallback.md):
    prompts go there only for models, features and keys that name it."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    kind: Literal["openai"] = "openai"
    # The API's base URL, `/v1` included: https://api.openai.com/v1, https://api.groq.com/openai/v1
    base_url: str = Field(pattern=r"^https?://")
    # A file holding its API key (sent as a bearer token; read at start, never logged).
    api_key_file: Path | None = None
    # The cloud's model for each local model name (`"llama3.2:3b" = "gpt-4o-mini"`; "*": any).
    models: dict[str, str] = {}
    # Its price per model, for `cost_usd` (`prices."gpt-4o-mini" = {input = 0.15, output = 0.6}`).
    prices: dict[str, Price] = {}
    # Seconds to its answer's first byte; past it the request fails (504).
    timeout: float = Field(60.0, gt=0)


class UpstreamSettings(BaseModel):
    """One workstation's model server in system-sshd mode (`[[upstreams]]` in edge.toml): the
    loopback address its agent's reverse forward listens on, under the name the pool, the
    telemetry and the metrics know it by."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(pattern=r"^[A-Za-z0-9._@-]{1,64}$")
    url: str
    # Requests it serves at once (its GPU slots); default the edge's `max_inflight`.
    max_inflight: int | None = Field(None, ge=1)


class EdgeSettings(BackhaulSettings):
    """Everything the edge process reads at start; one frozen instance built in `main()`."""

    model_config = SettingsConfigDict(env_prefix="BACKHAUL_EDGE_")
    default_config_file: ClassVar[Path | None] = Path("/etc/backhaul/edge.toml")

    # HTTP listen address. Behind a TLS proxy on the same VPS keep 127.0.0.1; 0.0.0.0 serves
    # plain HTTP to the world.
    host: str = "127.0.0.1"
    port: int = Field(8080, ge=0, le=65535)
    # The tunnel's loopback end on the VPS, as a URL: the agent's remote_bind. In embedded mode,
    # the address every agent asks to forward (each gets its own port: edge.upstreams.sshd).
    upstream: str = f"http://127.0.0.1:{TUNNEL_PORT}"
    # System-sshd mode with several workstations: each one's name and URL (and slots). Empty:
    # `upstream` is a pool of one (docs/second-workstation.md).
    upstreams: list[UpstreamSettings] = []
    # Send a conversation's next turn to the agent that answered the last, for its prompt cache
    # (edge.upstreams.affinity); false: by load alone.
    pool_affinity: bool = True
    # Cloud fallback (docs/fallback.md): off unless named. The clouds the edge may use, and for
    # which models (`fallback = {"llama3.2:3b" = "openai"}`; "*": every model); features and
    # API keys can name one too, and a key can be kept local whatever is named.
    clouds: dict[str, CloudSettings] = {}
    fallback: dict[str, str] = {}
    # Seconds a request with a fallback waits for a local GPU slot before the cloud serves it.
    fallback_wait: float = Field(2.0, ge=0)
    # The local models' context, in tokens: a prompt estimated longer goes to the fallback.
    # Unset: never decided by size.
    fallback_context_tokens: int | None = Field(None, ge=1)
    # `CLOUD:MODEL` whose prices cost a local answer (`cost_usd`, what the cloud would have
    # charged); unset: local answers have no cost.
    cost_reference: str | None = None
    # A file holding the model server's own API key (vLLM or llama-server started with
    # `--api-key`), sent upstream as `Authorization: Bearer` on every request and probe; read
    # once at start, never logged. Unset: no credential (Ollama needs none). Callers' own keys
    # are never sent upstream.
    upstream_api_key_file: Path | None = None
    # Where the edge keeps its files (the systemd unit's StateDirectory): each path below that is
    # not set is a file in it, never in the working directory.
    state_dir: Path = Path("/var/lib/backhaul-edge")
    # The JSONL telemetry log, one line per request (docs/operations.md); unset = none.
    telemetry_path: Path | None = _in_state_dir("telemetry.jsonl")
    # Rotate the JSONL file when it passes this size (100 MiB keeps `tail -F` and `jq` quick);
    # 0 = never (logrotate with SIGHUP instead).
    telemetry_max_bytes: int = Field(100 * 1024 * 1024, ge=0)
    telemetry_backups: int = Field(5, ge=0)

    # `keys` (the default): every request but health probes and anonymous features needs an API
    # key from `keys_path` (made by `backhaul-edge keys add`); `none`: open to anyone who can
    # reach the port (the demo, tests).
    auth: Literal["none", "keys"] = "keys"
    keys_path: Path = _in_state_dir("keys.json")
    # Seconds between two looks at the keys file for changes (SIGHUP looks at once).
    keys_reload_interval: float = Field(1.0, gt=0)
    # Built-in fail2ban: `ban_threshold` failed authentications from one address within
    # `ban_window` seconds ban it for `ban_period` seconds; bans are kept in `bans_path` across
    # restarts (unset: in memory only).
    bans_path: Path | None = _in_state_dir("bans.json")
    ban_threshold: int = Field(10, ge=1)
    ban_window: float = Field(600.0, gt=0)
    ban_period: float = Field(3600.0, gt=0)
    # What each key with a token budget (`keys add --budget`) spent in the current day or month,
    # saved every few seconds and at shutdown, so a restart keeps it (unset: in memory only).
    budgets_path: Path | None = _in_state_dir("budgets.json")
    # Most entries kept in each table of bans, recent failures and rate-limit buckets: bounds
    # memory under an address spray (about 200 bytes an entry).
    max_tracked_clients: int = Field(10_000, ge=1)
    # Requests per minute per address for anonymous feature calls, unless the feature sets `rpm`.
    anonymous_rpm: int = Field(30, ge=1)
    # Feature endpoints, `POST /features/NAME` (docs/features.md): a `[features.NAME]` table each.
    features: dict[str, FeatureSettings] = {}
    # Allowed models; empty = every model but the `*-cloud` ones (billed to the owner's account).
    models: list[str] = []
    # Origins (`https://www.example.com`) whose web pages may call the edge from a browser.
    cors_origins: list[str] = []
    # Addresses or networks of proxies in front of the edge whose X-Forwarded-For is believed.
    # A request from one of them must name its client there (else 400 `unknown_client`), and is
    # never taken for a local /metrics scraper.
    trusted_proxies: list[str] = []
    # Bearer token that lets a scraper that is not local (or comes through a proxy) read
    # /metrics; at least 32 characters (`openssl rand -hex 32`); unset = direct loopback only.
    # A wrong one counts towards a ban, like a wrong API key.
    metrics_token: SecretStr | None = None
    # Serve the browser demo page (docs/demo.html) at /demo.
    demo_page: bool = False

    # The GPU gate: upstream requests in flight (per workstation), queued requests (for the
    # pool), longest wait in the queue (s).
    max_inflight: int = Field(2, ge=1)
    queue_max: int = Field(64, ge=0)
    queue_timeout: float = Field(30.0, gt=0)
    # A streamed answer is read from the upstream into a buffer of this many bytes, so a slow
    # client never holds a GPU slot: the slot is released when the upstream finishes. 8 MiB
    # holds ~80,000 NDJSON tokens (~36,000 SSE), far past what max_output_tokens allows; a
    # client slower than that fills it, and then the upstream waits for it, slot and all.
    stream_buffer_bytes: int = Field(8 * 1024 * 1024, ge=64 * 1024)
    # Seconds a client may take to accept the next part of a streamed answer (or of a buffered
    # one over 64 KiB); past it the answer is cut (`client_stalled`) and the upstream cancelled
    # if it is still running.
    write_timeout: float = Field(60.0, gt=0)

    # 20 MB: a few base64 images fit, a context bomb does not.
    max_body_bytes: int = Field(20 * 1024 * 1024, ge=1024)
    # Output cap forced onto num_predict / max_tokens; a caller can ask for less, never more.
    max_output_tokens: int = Field(4096, ge=1)
    # Answers one request may ask for: `n` (or `best_of`) times the prompts of a /v1/completions
    # prompt array; more is a 400. The output cap is shared between them.
    max_choices: int = Field(1, ge=1)
    # Request fields the edge drops that the model server should get anyway, passed as the
    # client sends them: top-level names (`cache_prompt`) or options (`options.mirostat`); JSON
    # list. Never a field the edge reads or refuses itself (docs/security.md).
    extra_fields: list[str] = []
    # Context-bomb limits on what the model is asked to read (edge.proxy.body_limits); 413
    # past them.
    # Words are whitespace-separated runs; a token-id array counts a word a token.
    max_prompt_words: int = Field(50_000, ge=1)
    # Characters too, or a prompt without spaces would pass as one word: 8 a word is generous
    # for English (about 6 with its space); code and URLs run longer.
    max_prompt_chars: int = Field(400_000, ge=1)
    # Messages in a conversation, and images in a request (Ollama `images` arrays, OpenAI
    # `image_url` parts): the model encodes every image, a cost of its own.
    max_messages: int = Field(200, ge=1)
    max_images: int = Field(4, ge=0)

    # Slow clients (slowloris). Seconds an idle keep-alive connection stays open, which is also
    # the longest a client may take to send a request's headers: aiohttp's keep-alive timer
    # runs from the connection's start (or the last response) to the next complete header
    # block. 75 s (nginx's default) outlasts nginx's 60 s upstream keep-alive, so a proxy in
    # front never reuses a connection the edge is closing.
    keepalive_timeout: float = Field(75.0, gt=0)
    # Seconds to receive a whole request body, else 408 `request_timeout` (a 20 MB body needs
    # 2.7 Mbit/s to make it). The body is read before the gate: a trickle never holds a slot.
    body_timeout: float = Field(60.0, gt=0)
    # Connections to the HTTP port (docs/security.md, "Connection limits"), refused at accept
    # past these: in total (0 = derived from the descriptor limit, leaving room for what each
    # request opens behind it and for the SSH port), and from one address (an IPv6 /64 counts
    # as one). Trusted proxies are exempt from the per-address cap, not from the total.
    max_connections: int = Field(0, ge=0)
    max_connections_per_address: int = Field(256, ge=1)

    # Seconds. Connect is to a loopback port: if it takes more than 2 s something is wrong.
    connect_timeout: float = Field(2.0, gt=0)
    # First byte (and any silence mid-stream) may include a queue wait and a cold model load.
    read_timeout: float = Field(300.0, gt=0)
    # Liveness probe through the tunnel: a half-open tunnel accepts and then stays silent.
    # Every 2 s: a model server that died leaves the pool within 5 s (one interval, a timeout).
    probe_interval: float = Field(2.0, gt=0)
    probe_timeout: float = Field(2.0, gt=0)
    # Seconds a client is told to wait when the agent is away or the gate is full.
    retry_after: int = Field(5, ge=1)

    # Several edges that agree (docs/scaling.md): a Redis URL (`redis://host:6379/0`, or
    # `rediss://` for TLS) turns on shared rate limits, bans, keys and GPU-gate leases; unset,
    # the edge keeps everything to itself. Its password in a file (never in the URL or the log).
    redis_url: str | None = Field(None, pattern=r"^rediss?://")
    redis_password_file: Path | None = None
    # Seconds a request may wait on Redis (one script call); past it, the edge decides alone.
    redis_timeout: float = Field(0.05, gt=0, le=5)
    # The part of each rate limit one edge allows on its own while Redis is away; unset =
    # 1 / the number of edges last seen (so together they stay near the limit).
    redis_local_share: float | None = Field(None, gt=0, le=1)
    # This edge's name among the edges; unset = its host name and HTTP port.
    edge_id: str | None = Field(None, pattern=r"^[A-Za-z0-9._:@-]{1,64}$")
    # The shared keys this edge last saw, for a restart while Redis is away.
    keys_shared_path: Path = _in_state_dir("keys.shared.json")

    # Embedded SSH server for the agent (DESIGN.md §2); 0 = off (system sshd mode).
    ssh_host: str = "127.0.0.1"
    ssh_port: int = Field(0, ge=0, le=65535)
    ssh_host_key: Path = _in_state_dir("ssh_host_ed25519_key")
    agent_keys: Path = _in_state_dir("agent_keys")
    # Server keepalive: a silent agent is dropped after interval x (count_max + 1) seconds.
    ssh_keepalive_interval: float = Field(10.0, gt=0)
    ssh_keepalive_count_max: int = Field(3, ge=1)
    # Seconds a client has to authenticate: an agent needs milliseconds, a slow link a second.
    ssh_login_timeout: float = Field(5.0, gt=0)
    # Limits on the SSH port, refused at accept before any key exchange: unauthenticated
    # connections as sshd's MaxStartups (`start:rate:full`: past `start`, refuse `rate`% of new
    # ones, rising to all at `full`; or one number: a plain cap) and from one address (sshd's
    # PerSourceMaxStartups), connections in all, and handshakes one address may start (`burst`
    # at once, then `rate` a second; each costs the edge about 2 ms of CPU).
    ssh_max_startups: str = Field("10:30:100", pattern=r"^\d+(:\d+:\d+)?$")
    ssh_max_startups_per_address: int = Field(3, ge=1)
    ssh_max_connections: int = Field(128, ge=1)
    ssh_handshake_rate: float = Field(1.0, gt=0)
    ssh_handshake_burst: int = Field(10, ge=1)

    @field_validator("ssh_max_startups")
    @classmethod
    def _valid_startups(cls, value: str) -> str:
        parts = [int(p) for p in value.split(":")]
        if len(parts) == 3 and not (1 <= parts[0] < parts[2] and parts[1] <= 100):
            raise ValueError("ssh_max_startups start:rate:full: 1 <= start < full, rate <= 100")
        if parts[0] < 1:
            raise ValueError("ssh_max_startups must be at least 1")
        return value

    @field_validator("extra_fields")
    @classmethod
    def _extra_fields(cls, value: list[str]) -> list[str]:
        return check_extra_fields(value)

    @model_validator(mode="after")
    def _clouds_named(self) -> EdgeSettings:
        named = [*self.fallback.values(), *(f.fallback for f in self.features.values())]
        for cloud in named:
            if cloud is not None and cloud not in self.clouds:
                raise ValueError(f"fallback names the cloud {cloud!r}: no [clouds.{cloud}] table")
        if self.cost_reference is not None:
            cloud, _, model = self.cost_reference.partition(":")
            if cloud not in self.clouds or model not in self.clouds[cloud].prices:
                raise ValueError(
                    f"cost_reference {self.cost_reference!r}: CLOUD:MODEL with a price in "
                    "[clouds.CLOUD.prices]"
                )
        return self

    @field_validator("upstreams")
    @classmethod
    def _unique_names(cls, value: list[UpstreamSettings]) -> list[UpstreamSettings]:
        names = [upstream.name for upstream in value]
        if len(set(names)) != len(names):
            raise ValueError("each upstream needs a name of its own")
        return value

    @field_validator("trusted_proxies")
    @classmethod
    def _valid_networks(cls, value: list[str]) -> list[str]:
        for item in value:
            ip_network(item, strict=False)
        return value

    @field_validator("metrics_token")
    @classmethod
    def _long_token(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and len(value.get_secret_value()) < _MIN_METRICS_TOKEN_CHARS:
            raise ValueError(
                f"metrics_token must be at least {_MIN_METRICS_TOKEN_CHARS} characters, "
                "make one with `openssl rand -hex 32`"
            )
        return value

    @field_validator("features")
    @classmethod
    def _feature_names(cls, value: dict[str, FeatureSettings]) -> dict[str, FeatureSettings]:
        for name in value:
            if not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", name):
                raise ValueError(f"feature name {name!r}: use letters, digits, _ and -")
        return value

    @field_validator("upstream")
    @classmethod
    def _http_url(cls, value: str) -> str:
        if not value.startswith(("http://", "https://")):
            raise ValueError("upstream must be an http:// or https:// URL")
        return value.rstrip("/")
