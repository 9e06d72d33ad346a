"""The reference docs cannot drift from the code: regenerated or checked against it here."""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path
from types import ModuleType

import edge.app  # noqa: F401  - imports every module that may define an error type
from edge import errors

DOCS = Path(__file__).resolve().parent.parent / "docs"


def load_generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gen_config", DOCS / "gen_config.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_configuration_reference_is_generated_from_the_settings():
    expected = load_generator().render()
    committed = (DOCS / "configuration.md").read_text()
    assert committed == expected, "docs/configuration.md is stale: run `make docs`"


def test_configuration_reference_names_every_setting():
    from agent.settings import AgentSettings
    from edge.settings import EdgeSettings

    text = (DOCS / "configuration.md").read_text()
    for cls, prefix in ((EdgeSettings, "BACKHAUL_EDGE_"), (AgentSettings, "BACKHAUL_AGENT_")):
        for name in cls.model_fields:
            assert f"`{prefix}{name.upper()}`" in text


def error_types() -> dict[str, int | str]:
    found: dict[str, int | str] = {}
    stack: list[type[errors.EdgeError]] = [errors.EdgeError]
    while stack:
        cls = stack.pop()
        stack.extend(cls.__subclasses__())
        if cls is errors.UpstreamFailed:  # the model server's own 5xx status: documented "any"
            found[cls.type] = "any"
        elif cls is not errors.EdgeError:
            found[cls.type] = cls.status
    return found


def test_errors_reference_has_every_error_type():
    text = (DOCS / "errors.md").read_text()
    # Types recorded without an EdgeError of their own (edge.proxy.handler, edge.app).
    record_only = {"upstream_broken", "http_error"}
    for kind, status in error_types().items():
        row = re.search(rf"^\| {status} \| \[`{kind}`\]", text, re.MULTILINE)
        assert row, f"docs/errors.md: no '{status} {kind}' row in the table"
        section = re.search(rf"^### `{kind}`\n{status}\b", text, re.MULTILINE)
        assert section, f"docs/errors.md: no section for {kind}, starting with its status"
    for kind in record_only:
        assert f"`{kind}`" in text
