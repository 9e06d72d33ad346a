"""The simulator's model catalogue: what Ollama reports about each model it serves.

One `ModelFacts` per model (family, size, quantisation, context and embedding lengths,
capabilities), taken from the real GGUF files for the default models and made up plausibly for
any other name, and the entries built from it for `GET /api/tags`, `GET /api/ps`,
`POST /api/show` and `GET /v1/models`. Pure data and functions: no clock, no I/O.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

from simulator.gojson import fold

DEFAULT_MODELS = ("llama3.2:1b", "qwen2.5:0.5b", "nomic-embed-text")


def canonical(name: str) -> str:
    """Ollama's model name with the implicit tag: `nomic-embed-text` is `...:latest`."""
    return name if ":" in name.rsplit("/", 1)[-1] else f"{name}:latest"


# Go's unicode.IsSpace (strings.TrimSpace); names fold as strings.EqualFold does (gojson.fold).
_GO_SPACE = "\t\n\v\f\r \x85\xa0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007"
_GO_SPACE += "\u2008\u2009\u200a\u2028\u2029\u202f\u205f\u3000"


def model_key(name: str) -> str:
    """What Ollama looks a model up by: the name trimmed, an explicit `:local` source dropped,
    the default registry and namespace implied and every part compared case-insensitively
    (internal/modelref `ParseRef`, server `getExistingName`)."""
    name = name.strip(_GO_SPACE)
    base, source = _source(name)
    if source == "local":
        name = base
    key = canonical(fold(name))
    return key.removeprefix("registry.ollama.ai/").removeprefix("library/")


def is_cloud(name: str) -> bool:
    """Whether Ollama would send this request to ollama.com (`:cloud`, or a `-cloud` tag)."""
    return _source(name.strip(_GO_SPACE))[1] == "cloud"


def _source(name: str) -> tuple[str, str | None]:
    head, colon, tail = name.rpartition(":")
    suffix = fold(tail.strip(_GO_SPACE))
    if colon and suffix in ("cloud", "local"):
        return head, suffix
    if colon and "/" not in tail and suffix.endswith("-cloud"):
        return name, "cloud"
    return name, None


@dataclass(frozen=True, slots=True)
class ModelFacts:
    """What Ollama reports about one local model (for the defaults, close to the real ones)."""

    family: str
    parameter_size: str
    quantization: str
    size: int  # bytes on disk
    context_length: int
    embedding_length: int
    capabilities: tuple[str, ...]


_KNOWN = {
    "llama3.2:1b": ModelFacts(
        "llama", "1.2B", "Q8_0", 1_321_098_329, 131_072, 2048, ("completion", "tools")
    ),
    "qwen2.5:0.5b": ModelFacts(
        "qwen2", "494.03M", "Q4_K_M", 397_821_319, 32_768, 896, ("completion", "tools")
    ),
    "nomic-embed-text:latest": ModelFacts(
        "nomic-bert", "137M", "F16", 274_302_450, 2048, 768, ("embedding",)
    ),
}
_EMBEDDER = ModelFacts("bert", "137M", "F16", 274_302_450, 2048, 768, ("embedding",))
_GENERIC = ModelFacts("llama", "1.2B", "Q4_K_M", 807_694_464, 131_072, 2048, ("completion",))


def facts(name: str) -> ModelFacts:
    """Facts for a configured model; names the table lacks get plausible generic ones."""
    known = _KNOWN.get(canonical(name))
    if known is not None:
        return known
    return _EMBEDDER if "embed" in name else _GENERIC


# GGUF's file-type numbers for the quantisations above (llama.cpp's `llama_ftype`).
_FILE_TYPES = {"F16": 1, "Q8_0": 7, "Q4_K_M": 15}


def _parameter_count(size: str) -> int:
    """`"494.03M"` -> 494030000: Ollama prints the count; model_info carries the number."""
    return round(float(size[:-1]) * {"K": 1e3, "M": 1e6, "B": 1e9}[size[-1]])


def _digest(name: str) -> str:
    # Stable and obviously synthetic: nobody will mistake it for a real blob's sha256.
    return hashlib.sha256(f"backhaul-simulator:{canonical(name)}".encode()).hexdigest()


def _details(f: ModelFacts) -> dict[str, Any]:
    return {
        "parent_model": "",
        "format": "gguf",
        "family": f.family,
        "families": [f.family],
        "parameter_size": f.parameter_size,
        "quantization_level": f.quantization,
    }


def tags_entry(name: str, modified: str) -> dict[str, Any]:
    """One model of `GET /api/tags`."""
    f, full = facts(name), canonical(name)
    return {
        "name": full,
        "model": full,
        "modified_at": modified,
        "size": f.size,
        "digest": _digest(name),
        "details": _details(f),
    }


def ps_entry(name: str, expires: str) -> dict[str, Any]:
    """One loaded model of `GET /api/ps` (fully in VRAM, default 4096-token context)."""
    f, full = facts(name), canonical(name)
    return {
        "name": full,
        "model": full,
        "size": f.size,
        "digest": _digest(name),
        "details": _details(f),
        "expires_at": expires,
        "size_vram": f.size,
        "context_length": 4096,
    }


def show_body(name: str, modified: str) -> dict[str, Any]:
    """`POST /api/show`: the non-verbose shape (large tokenizer arrays left out, as Ollama does)."""
    f = facts(name)
    arch = f.family
    template = "{{ if .System }}{{ .System }}\n{{ end }}{{ .Prompt }}"
    return {
        "license": "Simulated model: no weights, no licence terms.",
        "modelfile": f"# Modelfile generated by backhaul's simulator\nFROM {canonical(name)}\n"
        f'TEMPLATE """{template}"""\n',
        "parameters": 'stop                           "<|eot_id|>"',
        "template": template,
        "details": _details(f),
        "model_info": {
            "general.architecture": arch,
            "general.file_type": _FILE_TYPES.get(f.quantization, 15),
            "general.parameter_count": _parameter_count(f.parameter_size),
            "general.quantization_version": 2,
            f"{arch}.context_length": f.context_length,
            f"{arch}.embedding_length": f.embedding_length,
            "tokenizer.ggml.model": "gpt2",
            "tokenizer.ggml.tokens": None,
        },
        "capabilities": list(f.capabilities),
        "modified_at": modified,
    }


def openai_model(name: str, created: int) -> dict[str, Any]:
    # `owned_by` is the name's namespace: "library" for every official model.
    namespace = name.split("/")[-2] if "/" in name else "library"
    return {"id": name, "object": "model", "created": created, "owned_by": namespace}
