"""`backhaul-edge keys` with `redis_url` set: the keys every edge shares (edge.cluster.shared).

The command writes the keys file on this VPS as always, and with a Redis configured also the
shared `bh:keys` hash (each key as the file holds it: its digest, never its secret), then tells
every edge on the `bh:events` channel; each reloads the hash within a second. A key added on
another VPS is found here too, to list or revoke.
"""

from __future__ import annotations

from contextlib import closing

import orjson
import redis

from edge.cluster.link import CHANNEL
from edge.cluster.shared import KEYS
from edge.policy.keys import ApiKey
from edge.settings import EdgeSettings
from shared.errors import ConfigError
from shared.secrets import read_key_file

_TIMEOUT_S = 5.0


def _client(settings: EdgeSettings) -> redis.Redis:
    assert settings.redis_url is not None
    password = read_key_file(settings.redis_password_file, "BACKHAUL_EDGE_REDIS_PASSWORD_FILE")
    return redis.Redis.from_url(
        settings.redis_url,
        password=password.get_secret_value() if password is not None else None,
        socket_timeout=_TIMEOUT_S,
        socket_connect_timeout=_TIMEOUT_S,
    )


def share(settings: EdgeSettings, keys: list[ApiKey]) -> None:
    """Write `keys` into the shared hash and tell every edge.

    Error handling: raises `ConfigError` when Redis cannot be reached (the keys file was
    written: this VPS's edge has the change; the others get it once it is shared).
    """
    try:
        with closing(_client(settings)) as client:
            client.hset(KEYS, mapping={key.name: key.model_dump_json() for key in keys})
            client.publish(CHANNEL, orjson.dumps({"kind": "keys", "from": "backhaul-edge keys"}))
    except redis.RedisError as exc:
        raise ConfigError(
            f"the keys file was written, but the shared keys in Redis were not: {exc}; "
            "run the command again once Redis answers"
        ) from exc


def shared(settings: EdgeSettings) -> list[ApiKey]:
    """The keys in the shared hash.

    Error handling: raises `ConfigError` when Redis cannot be reached.
    """
    try:
        with closing(_client(settings)) as client:
            rows = client.hgetall(KEYS)
    except redis.RedisError as exc:
        raise ConfigError(f"cannot read the shared keys from Redis: {exc}") from exc
    return [ApiKey.model_validate_json(raw) for raw in rows.values()]
