"""A secret an operator keeps in a file (the model server's API key): read once, never shown.

Both programs send the model server's own key (vLLM's or llama.cpp's `--api-key`): the edge on
every request and probe through the tunnel, the agent on its own probe and warm-up.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import SecretStr

from shared.errors import ConfigError


def read_key_file(path: Path | None, setting: str) -> SecretStr | None:
    """The key in `path` (surrounding whitespace dropped), or None when no file is set.

    Error handling: raises `ConfigError` naming the file and `setting` (never the content) when
    it cannot be read or holds no single key: the program would otherwise start and be refused
    on every request.
    """
    if path is None:
        return None
    try:
        key = path.read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise ConfigError(f"cannot read {path} ({setting}): {exc.strerror}") from None
    except UnicodeDecodeError:  # its message quotes a byte of the key: not chained, not said
        raise ConfigError(f"{path} ({setting}) is not UTF-8 text") from None
    if not key or any(c.isspace() for c in key):
        raise ConfigError(f"{path} ({setting}) must hold one API key, without spaces")
    return SecretStr(key)
