"""Wire facts about the model server's API: the options that reload a model, and filtering
model lists and details (DESIGN.md §4 "Body sanitising"; the body sent upstream is built by
`edge.proxy.body_policy`; model names as Ollama reads them are `edge.models`).

Everything here is a pure function, so it is tested without a network. The facts behind each
rule (which options force a reload, why `*-cloud` models are refused) are in
../shared/research/gateway-anchors.md §1.4; model names follow Ollama's internal/modelref and
types/model/name.go.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import orjson

# Options that Ollama applies only when it loads a model (api/types.go `Runner`, and older
# releases' fields): a caller that varies them forces a reload and evicts everyone else's warm
# model.
LOAD_TIME_OPTIONS = frozenset(
    {
        "num_ctx",
        "num_batch",
        "num_gpu",
        "main_gpu",
        "low_vram",
        "f16_kv",
        "logits_all",
        "vocab_only",
        "use_mmap",
        "use_mlock",
        "num_thread",
        "numa",
        "draft_num_predict",
    }
)
# What a caller of an Ollama route uses instead on a model server that speaks only OpenAI's API
# (llama.cpp's llama-server, vLLM); /api/show and /api/version have no counterpart.
OPENAI_ROUTE_FOR = {
    "/api/chat": "/v1/chat/completions",
    "/api/generate": "/v1/completions",
    "/api/embed": "/v1/embeddings",
    "/api/embeddings": "/v1/embeddings",
    "/api/tags": "/v1/models",
    "/api/ps": "/v1/models",
}
# Fields of /api/show that reveal the owner's system prompts and templates.
SHOW_FIELDS_KEPT = ("details", "model_info", "capabilities", "modified_at")


def is_ollama_error(body: bytes) -> bool:
    """Whether an error body is Ollama's own, `{"error": "..."}`: its 404 "model not found"
    is the model server's word on the request, kept. A 404 in any other shape on an Ollama
    route says the route is not served: llama.cpp's `{"error": {"message": "File Not Found",
    ...}}`, vLLM's (FastAPI's) `{"detail": "Not Found"}`, Go's `404 page not found` text."""
    try:
        obj = orjson.loads(body)
    except orjson.JSONDecodeError:
        return False
    return isinstance(obj, dict) and isinstance(obj.get("error"), str)


def openai_only(path: str) -> str:
    """The message for an Ollama route `path` the model server does not serve."""
    instead = OPENAI_ROUTE_FOR.get(path)
    if instead is None:
        return f"this model server is OpenAI-compatible only: it has no {path}; use the /v1 routes"
    return f"this model server is OpenAI-compatible only: use {instead}"


def filter_models(body: Any, allows: Callable[[str], bool]) -> Any:
    """Remove the models `allows` refuses from every list a model listing carries, and show a
    model file's absolute path as its file name.

    Every list, whatever the route: Ollama's `/api/tags` and `/api/ps` carry `models` (by
    `name` and `model`), OpenAI's `/v1/models` carries `data` (by `id`), and llama.cpp answers
    `/v1/models` with both, its `models` entries naming the model under `name` and `model`
    (tools/server `handle_models`): a filter of `data` alone listed every model there. An entry
    is kept only when each name it carries is allowed, and its `aliases` (llama.cpp's router
    mode) only when allowed; what is not a named entry is dropped.
    """
    if not isinstance(body, dict):
        return body
    show = _file_name if _says_llama_cpp(body.get("data")) else _as_is
    for field, names in _LISTS:
        items = body.get(field)
        if isinstance(items, list):
            body[field] = [
                _shown(item, names, show, allows)
                for item in items
                if _named(item, names, show, allows)
            ]
    return body


# Each list a model listing may carry, and the fields that name a model in its entries.
_LISTS = (("data", ("id",)), ("models", ("name", "model")))
# The name llama.cpp gives itself in `owned_by` (tools/server, every version with /v1/models).
_LLAMA_CPP_OWNER = "llamacpp"


def _says_llama_cpp(data: Any) -> bool:
    return isinstance(data, list) and any(
        isinstance(item, dict) and item.get("owned_by") == _LLAMA_CPP_OWNER for item in data
    )


def _named(
    item: Any, names: tuple[str, ...], show: Callable[[str], str], allows: Callable[[str], bool]
) -> bool:
    """An entry that names a model in at least one of `names`, each allowed as it is shown."""
    if not isinstance(item, dict):
        return False
    present = [item[name] for name in names if name in item]
    return bool(present) and all(isinstance(n, str) and allows(show(n)) for n in present)


def _shown(
    item: dict[str, Any],
    names: tuple[str, ...],
    show: Callable[[str], str],
    allows: Callable[[str], bool],
) -> dict[str, Any]:
    """The entry as the client sees it: names as `show` spells them, aliases filtered."""
    for name in names:
        if name in item:
            item[name] = show(item[name])
    aliases = item.get("aliases")
    if isinstance(aliases, list):
        item["aliases"] = [a for a in aliases if isinstance(a, str) and allows(a)]
    return item


def _file_name(name: str) -> str:
    """`name` without its directory when it is an absolute path (`/home/alice/x.gguf`,
    `C:\\models\\x.gguf`), else `name` itself.

    Why: llama.cpp started with `-m PATH` and no `--alias` names its model by the path, which
    tells every caller the workstation's user name and layout. The file name is still a name
    the caller can send back as `model`: llama.cpp serving one model answers whatever `model`
    a request names. The edge's allowlist reads the same file name, so what is listed is what
    may be asked for. Only llama.cpp's listings are shortened (`filter_models`): vLLM checks
    `model` against its served name exactly, path and all (start it with
    `--served-model-name`).
    """
    if name.startswith("/") or _WINDOWS_ABSOLUTE.match(name):
        return _LAST_PART.split(name)[-1] or name
    return name


def _as_is(name: str) -> str:
    return name


_WINDOWS_ABSOLUTE = re.compile(r"^[A-Za-z]:[\\/]")
_LAST_PART = re.compile(r"[\\/]")


def filter_show(body: Any) -> Any:
    """Keep only the parts of `/api/show` that do not reveal prompts, templates or licences."""
    if not isinstance(body, dict):
        return body
    return {name: body[name] for name in SHOW_FIELDS_KEPT if name in body}
