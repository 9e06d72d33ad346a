"""Wire facts about the model server's API: the options that reload a model, and filtering
model lists and details (DESIGN.md §4 "Body sanitising"; the body sent upstream is built by
`edge.proxy.body_policy`; model names as Ollama reads them are `edge.models`).

Everything here is a pure function, so it is tested without a network. The facts behind each
rule (which options force a reload, why `*-cloud` models are refused) are in
../shared/research/gateway-anchors.md §1.4; model names follow Ollama's internal/modelref and
types/model/name.go.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from edge.routes import Route

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
# Fields of /api/show that reveal the owner's system prompts and templates.
SHOW_FIELDS_KEPT = ("details", "model_info", "capabilities", "modified_at")


def filter_models(route: Route, body: Any, allows: Callable[[str], bool]) -> Any:
    """Remove the models `allows` refuses from a `/api/tags`, `/api/ps` or `/v1/models` body."""
    if not isinstance(body, dict):
        return body
    if route.openai:
        items = body.get("data")
        if isinstance(items, list):
            body["data"] = [m for m in items if _model_name(m, "id", allows)]
        return body
    items = body.get("models")
    if isinstance(items, list):
        body["models"] = [m for m in items if _model_name(m, "name", allows)]
    return body


def _model_name(item: Any, field: str, allows: Callable[[str], bool]) -> bool:
    name = item.get(field) if isinstance(item, dict) else None
    return isinstance(name, str) and allows(name)


def filter_show(body: Any) -> Any:
    """Keep only the parts of `/api/show` that do not reveal prompts, templates or licences."""
    if not isinstance(body, dict):
        return body
    return {name: body[name] for name in SHOW_FIELDS_KEPT if name in body}
