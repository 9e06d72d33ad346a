"""The root of every backhaul error.

```
BackhaulError
├── ConfigError            a setting or file the operator must fix (shared)
├── edge.errors.EdgeError  rendered as an HTTP status and a stable `type`
└── agent.errors.TunnelError   the reconnect loop's table decides transient or permanent
```

Each package adds its own subtree in its own `errors.py`; nothing outside those modules raises a
bare `Exception`.
"""


class BackhaulError(Exception):
    """Root of every error backhaul raises on purpose."""


class ConfigError(BackhaulError):
    """A setting, key file or TOML file is wrong; the message says what to fix."""
