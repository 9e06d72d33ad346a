"""Model names as Ollama reads them, and which models callers may use.

A vocabulary, not a wire detail: the body policy, the API keys' model lists and the metrics'
labels all compare names with `canonical_model()`. Pure functions, tested without a network;
names follow Ollama's internal/modelref and types/model/name.go (the facts behind the `*-cloud`
refusal are in ../shared/research/gateway-anchors.md §1.4).
"""

from __future__ import annotations

import functools


class ModelPolicy:
    """Which models callers may use: an explicit list, or all but the `*-cloud` ones."""

    def __init__(self, allowed: list[str]) -> None:
        self._allowed = frozenset(canonical_model(m) for m in allowed)

    def allows(self, model: str) -> bool:
        if is_cloud_model(model):
            return False
        return not self._allowed or canonical_model(model) in self._allowed


# Go's `unicode.IsSpace`, which `strings.TrimSpace` uses: Python's `str.strip()` also takes
# \x1c-\x1f, which Ollama would keep as part of the name.
GO_SPACE = (
    "\t\n\v\f\r \x85\xa0\u1680"
    + "".join(map(chr, range(0x2000, 0x200B)))
    + "\u2028\u2029\u202f\u205f\u3000"
)
# Go compares names folded: model name parts with `strings.EqualFold`, JSON keys with
# encoding/json's `foldName`. Both are Unicode simple folding, and besides ASCII case only KELVIN
# SIGN and LONG S fold to ASCII letters (every rune checked with Go's unicode.SimpleFold).
_FOLD = str.maketrans(
    {**{chr(c): chr(c + 32) for c in range(65, 91)}, "\u212a": "k", "\u017f": "s"}
)


def go_fold(text: str) -> str:
    """`text` as Go compares it with another folded name (a JSON key, a model name part)."""
    return text.translate(_FOLD)


_DEFAULT_HOST, _DEFAULT_NAMESPACE, _DEFAULT_TAG = "registry.ollama.ai", "library", "latest"
_MISSING = "!missing!"


@functools.lru_cache(maxsize=1024)  # a request names its model three times over; bounded
def canonical_model(name: str) -> str:
    """The model `name` names to Ollama, spelled one way, for comparing names.

    Ollama (internal/modelref, types/model/name.go, server `getExistingName`) trims the name,
    takes an explicit `:local` suffix off, fills in the default registry, namespace and tag,
    and matches each part case-insensitively: `LLAMA3.2`, ` library/llama3.2:latest` and
    `registry.ollama.ai/library/llama3.2:local` are all `llama3.2:latest`. The default
    registry and namespace are left out of the result. A cloud name keeps its tag (lower-cased),
    so it never equals a local one; `is_cloud_model` tells them apart.
    """
    base, source = _source_suffix(name.strip(GO_SPACE))
    if source != "local":
        base = name.strip(GO_SPACE)  # a cloud name keeps its tag
    host = namespace = tag = ""
    if base.rfind(":") > base.rfind("/"):  # a registry host's port is not a tag
        base, tag = _cut(base, ":")
    model = base
    if "/" in base:
        rest, model = _cut(base, "/")
        namespace = rest
        if "/" in rest:
            rest, namespace = _cut(rest, "/")
            scheme, sep, host = rest.partition("://")
            host = host if sep else scheme
    host, namespace = host or _DEFAULT_HOST, namespace or _DEFAULT_NAMESPACE
    full = f"{model}:{tag or _DEFAULT_TAG}"
    if host.translate(_FOLD) != _DEFAULT_HOST:
        full = f"{host}/{namespace}/{full}"
    elif namespace.translate(_FOLD) != _DEFAULT_NAMESPACE:
        full = f"{namespace}/{full}"
    return full.translate(_FOLD)


def _cut(s: str, sep: str) -> tuple[str, str]:
    """name.go's `cutPromised` on a name holding `sep`: split at the last one; an empty side is
    a missing part, which makes the name invalid to Ollama (so it never equals a valid one)."""
    before, _, after = s.rpartition(sep)
    return before or _MISSING, after or _MISSING


def is_cloud_model(name: str) -> bool:
    """Cloud models run on ollama.com, billed to the workstation owner's account.

    As Ollama reads a name (internal/modelref `ParseRef`): after trimming, the text after the
    last colon, trimmed and lower-cased, is `cloud` or ends in `-cloud`. A name with two source
    suffixes (`x:cloud:local`) is an error to Ollama; here it counts as cloud too.
    """
    base, source = _source_suffix(name.strip(GO_SPACE))
    return source == "cloud" or (source == "local" and _source_suffix(base)[1] is not None)


def _source_suffix(raw: str) -> tuple[str, str | None]:
    """`(base, "cloud" | "local" | None)`: modelref's `parseSourceSuffix`."""
    head, colon, tail = raw.rpartition(":")
    if not colon:
        return raw, None
    suffix = tail.strip(GO_SPACE).translate(_FOLD)
    if suffix in ("cloud", "local"):
        return head, suffix
    if "/" not in tail and suffix.endswith("-cloud"):
        return f"{head}:{tail.strip(GO_SPACE)[: -len('-cloud')]}", "cloud"
    return raw, None
