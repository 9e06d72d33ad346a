"""Write docs/configuration.md from the settings classes, so the reference cannot drift.

`make docs` runs it; `tests/test_docs.py` fails when the committed file differs from what this
produces. Everything comes from the code: field names, types, bounds and defaults from pydantic;
the explanations from the comments above each field in the class's source (a comment describes
the fields that follow it up to the next comment or blank line, so the settings files stay the
only place a setting is explained); CLI flags from the commands' own argparse parsers.

It lives in docs/ because it imports both `edge` and `agent`, which nothing inside either
package (or `shared`) may do.
"""

from __future__ import annotations

import argparse
import ast
import inspect
import io
import json
import sys
import textwrap
import tokenize
import types
import typing
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

import annotated_types
from pydantic import BaseModel, SecretStr
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from agent import run as agent_run
from agent.settings import AgentSettings
from edge import serve as edge_serve
from edge.settings import EdgeSettings

OUTPUT = Path(__file__).with_name("configuration.md")


@dataclass
class Group:
    """Fields that share one explanation (a comment and the fields after it)."""

    comment: str
    fields: list[str]


def field_groups(cls: type[BaseModel]) -> dict[str, Group]:
    """Each field of `cls` (inherited ones included) -> the group whose comment explains it."""
    groups: dict[str, Group] = {}
    for klass in reversed(cls.__mro__):
        if klass is BaseModel or not (isinstance(klass, type) and issubclass(klass, BaseModel)):
            continue
        if "__module__" not in vars(klass) or klass.__module__.startswith("pydantic"):
            continue
        for group in list(_source_groups(klass)):  # complete groups: fields join as parsed
            for name in group.fields:
                groups[name] = group
    return groups


def _source_groups(klass: type) -> Iterator[Group]:
    source = textwrap.dedent(inspect.getsource(klass))
    comments: dict[int, str] = {}  # line -> comment text, for lines that are only a comment
    trailing: dict[int, str] = {}  # line -> comment after code
    code_lines: set[int] = set()
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            text = tok.string.lstrip("#").strip()
            if tok.line.strip().startswith("#"):
                comments[tok.start[0]] = text
            else:
                trailing[tok.start[0]] = text
        elif tok.type not in (tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT):
            code_lines.add(tok.start[0])
    lines = source.splitlines()
    body = ast.parse(source).body[0]
    assert isinstance(body, ast.ClassDef)
    current: Group | None = None
    previous_end = 0
    for node in body.body:
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
            current = None
            previous_end = node.end_lineno or node.lineno
            continue
        name = node.target.id
        above: list[str] = []
        line = node.lineno - 1
        while line > previous_end and line in comments:
            above.insert(0, comments[line])
            line -= 1
        blank_between = any(not lines[i - 1].strip() for i in range(previous_end + 1, node.lineno))
        end = node.end_lineno or node.lineno
        if above:
            current = Group(" ".join(above), [])
        elif current is None or blank_between:
            current = Group("", [])
        tail = trailing.get(end)
        if tail and not above:
            # A trailing comment explains its own line only.
            yield Group(tail, [name])
        else:
            current.fields.append(name)
            if len(current.fields) == 1:
                yield current
            if tail:
                current.comment += f" `{name}`: {tail}"
        previous_end = end


def type_text(annotation: Any) -> str:
    """How a value is written, in words a person configuring it reads."""
    origin, args = get_origin(annotation), get_args(annotation)
    if origin in (Union, types.UnionType):
        present = [a for a in args if a is not type(None)]
        inner = " or ".join(type_text(a) for a in present)
        return f"{inner}, or unset" if len(present) < len(args) else inner
    if origin is Literal:
        return "one of " + ", ".join(f"`{a}`" for a in args)
    if origin is list:
        return f"list of {type_text(args[0])}s (JSON in the environment)"
    if origin is dict:
        return f"table of {type_text(args[1])} by name"
    if origin is typing.Annotated:
        return type_text(args[0])
    simple = {
        str: "string",
        int: "integer",
        float: "number",
        bool: "boolean",
        Path: "path",
        SecretStr: "secret string",
        Any: "any JSON value",
    }
    if annotation in simple:
        return simple[annotation]
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return f"`{annotation.__name__}`"
    return str(annotation).replace("typing.", "")


def bounds_text(info: FieldInfo) -> str:
    parts = []
    for meta in info.metadata:
        for attr, sign in (("ge", "≥"), ("gt", ">"), ("le", "≤"), ("lt", "<")):
            if isinstance(meta, getattr(annotated_types, attr.capitalize())):
                parts.append(f"{sign} {getattr(meta, attr)}")
    return ", ".join(parts)


class _Named(dict[str, Any]):
    """What a default made from other settings sees: each setting's name in brackets, so
    `state_dir / "keys.json"` reads `<state_dir>/keys.json`."""

    def __missing__(self, key: str) -> Path:
        return Path(f"<{key}>")


def default_text(info: FieldInfo) -> str:
    if info.default_factory is not None and info.default_factory_takes_validated_data:
        return f"`{info.default_factory(_Named())}`"
    if info.default is PydanticUndefined:
        return "required"
    value = info.default
    if value is None:
        return "unset"
    if isinstance(value, Path):
        value = str(value)
    if isinstance(value, float) and value.is_integer():
        return f"`{value:g}`"
    return f"`{json.dumps(value)}`"


def flags_of(register: Callable[[Any], None], command: str) -> dict[str, str]:
    """Field name -> its command-line flag, from the command's own parser."""
    commands = argparse.ArgumentParser().add_subparsers()
    register(commands)
    sub = commands.choices[command]
    return {
        action.dest: action.option_strings[-1]
        for action in sub._actions
        if action.option_strings and action.dest != "help"
    }


def nested_models(annotation: Any) -> Iterator[type[BaseModel]]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        yield annotation
    for arg in get_args(annotation):
        yield from nested_models(arg)


def render_class(
    cls: type[BaseModel], prefix: str | None, key_prefix: str, flags: dict[str, str]
) -> Iterator[str]:
    """The groups of `cls` as sections of tables."""
    groups = field_groups(cls)
    done: set[int] = set()
    nested: list[tuple[str, type[BaseModel], bool]] = []
    for name, info in cls.model_fields.items():
        group = groups.get(name, Group("", [name]))
        for model in nested_models(info.annotation):
            nested.append((name, model, get_origin(info.annotation) is list))
        if id(group) in done:
            continue
        done.add(id(group))
        members = [n for n in group.fields if n in cls.model_fields]
        yield "#### " + ", ".join(f"`{key_prefix}{n}`" for n in members)
        yield ""
        comment = group.comment[:1].upper() + group.comment[1:]
        yield comment or "(No comment in the source: add one above the field.)"
        yield ""
        heads = ["setting", "type", "default"]
        if prefix is not None:
            heads.append("environment")
        if flags:
            heads.append("flag")
        yield "| " + " | ".join(heads) + " |"
        yield "| " + " | ".join("---" for _ in heads) + " |"
        for member in members:
            field = cls.model_fields[member]
            kind = type_text(field.annotation)
            bound = bounds_text(field)
            row = [
                f"`{key_prefix}{member}`",
                f"{kind} ({bound})" if bound else kind,
                default_text(field),
            ]
            if prefix is not None:
                row.append(f"`{prefix}{member.upper()}`")
            if flags:
                row.append(f"`{flags[member]}`" if member in flags else "")
            yield "| " + " | ".join(row) + " |"
        yield ""
    for name, model, listed in nested:
        table = f"[[{key_prefix}{name}]]" if listed else f"[{key_prefix}{name}.NAME]"
        yield f"#### In each `{table}` table (`{model.__name__}`)"
        yield ""
        yield from render_class(model, None, "", {})


PROGRAMS = (
    (
        "Edge",
        "backhaul-edge serve",
        EdgeSettings,
        "BACKHAUL_EDGE_",
        "/etc/backhaul/edge.toml",
        flags_of(edge_serve.register, "serve"),
    ),
    (
        "Agent",
        "backhaul-agent run",
        AgentSettings,
        "BACKHAUL_AGENT_",
        "/etc/backhaul/agent.toml",
        flags_of(agent_run.register, "run"),
    ),
)

INTRO = """\
<!-- Generated by docs/gen_config.py from the settings classes. Do not edit: change the
     settings (and the comments above them), then run `make docs`. -->
# Configuration reference

Every setting of both programs, generated from their settings classes
(`edge.settings.EdgeSettings`, `agent.settings.AgentSettings`), so it cannot drift from the code.

Each setting can be given four ways; the first one found wins:

1. a command-line flag, for the few settings that have one (the `flag` column);
2. the environment: the prefix plus the name in capitals, e.g. `BACKHAUL_EDGE_MAX_INFLIGHT=4`.
   Lists and tables are JSON (`BACKHAUL_EDGE_MODELS='["llama3.1:8b"]'`); a nested value can
   also be set with `__` (`BACKHAUL_EDGE_FEATURES__SUMMARISE__MODEL=...`);
3. the TOML file: the name as the key (`max_inflight = 4`). Its path is `--config`, or
   `BACKHAUL_EDGE_CONFIG` / `BACKHAUL_AGENT_CONFIG`, or else the default path below if it exists;
4. the default.

Unknown keys are an error, not ignored: a typo stops the program at start with the name of the
setting it did not know. The files a program keeps default to its `state_dir`, the systemd
unit's state directory (`/var/lib/backhaul-edge`, `/var/lib/backhaul-agent`); run by hand, give
it one you can write (`BACKHAUL_EDGE_STATE_DIR=var/edge`). A relative path is relative to the
working directory.
"""


def render() -> str:
    out = [INTRO]
    for title, command, cls, prefix, toml, flags in PROGRAMS:
        out.append(f"## {title}: `{command}`")
        out.append("")
        out.append(f"Environment prefix `{prefix}`; TOML file `{toml}`.")
        out.append("")
        out.extend(render_class(cls, prefix, "", flags))
    return "\n".join(out).rstrip() + "\n"


def main() -> int:
    text = render()
    if "--check" in sys.argv[1:]:
        if OUTPUT.read_text() != text:
            print(f"{OUTPUT} is stale: run `make docs`", file=sys.stderr)
            return 1
        return 0
    OUTPUT.write_text(text)
    print(f"wrote {OUTPUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
