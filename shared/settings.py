"""The common part of both programs' settings.

Sources, highest first: CLI flags (passed as keyword arguments), the environment
(`BACKHAUL_EDGE_...`, nested with `__`), the TOML file (`--config`, `BACKHAUL_<SIDE>_CONFIG`, else
`/etc/backhaul/<side>.toml` if it exists), then the defaults. Each program builds exactly one
frozen object in `main()` and passes it down; tests build them directly with keyword arguments.
"""

from __future__ import annotations

import argparse
import os
from contextvars import ContextVar
from pathlib import Path
from typing import Any, ClassVar, Self
from urllib.parse import urlsplit

from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from shared.errors import ConfigError


def url_address(url: str) -> tuple[str, int]:
    """The host and port an http(s) URL connects to (80 or 443 when it names none)."""
    parts = urlsplit(url)
    return parts.hostname or "127.0.0.1", parts.port or (443 if parts.scheme == "https" else 80)


_CONFIG_FILE: ContextVar[Path | None] = ContextVar("backhaul_config_file", default=None)


class BackhaulSettings(BaseSettings):
    """Base for `EdgeSettings` and `AgentSettings`: frozen, strict about unknown keys."""

    model_config = SettingsConfigDict(
        frozen=True,
        extra="forbid",
        env_nested_delimiter="__",
        validate_default=True,
    )
    # The default TOML path, e.g. /etc/backhaul/edge.toml; set by each subclass.
    default_config_file: ClassVar[Path | None] = None

    # The program's own log events, on stderr: debug, info, warning or error.
    log_level: str = "info"
    # `json` (one object a line, for journald), `console`, or `auto`: console on a terminal.
    log_format: str = "auto"

    @classmethod
    def load(cls, config: Path | None = None, **overrides: Any) -> Self:
        """Build the settings from every source; `overrides` are the CLI flags that were given.

        Error handling: an unreadable TOML file or invalid value raises `ConfigError` with the
        source named, so `main()` can print it and exit 2.
        """
        path = config or cls._config_from_env()
        if path is None and cls.default_config_file and cls.default_config_file.exists():
            path = cls.default_config_file
        if path is not None and not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        token = _CONFIG_FILE.set(path)
        try:
            return cls(**{k: v for k, v in overrides.items() if v is not None})
        except ValueError as exc:  # pydantic.ValidationError and tomllib errors
            where = f" (config file {path})" if path else ""
            raise ConfigError(f"invalid settings{where}: {exc}") from exc
        finally:
            _CONFIG_FILE.reset(token)

    @classmethod
    def load_args(cls, args: argparse.Namespace, *flags: str) -> Self:
        """`load()` from a command's parsed arguments: `args.config`, and each of `flags`
        (named as the settings fields they set; a flag not given is None and left out)."""
        return cls.load(args.config, **{name: getattr(args, name) for name in flags})

    @classmethod
    def _config_from_env(cls) -> Path | None:
        # The one environment read outside pydantic-settings: where the TOML file is.
        prefix = cls.model_config.get("env_prefix", "")
        value = os.environ.get(f"{prefix}CONFIG")
        return Path(value) if value else None

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        path = _CONFIG_FILE.get()
        if path is not None:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=path))
        sources.append(file_secret_settings)
        return tuple(sources)
