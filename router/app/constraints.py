"""What a request asks its output to match, parsed: constrained decoding (``response_format``,
``regex``, ``ebnf``, /generate's ``json_schema`` and ``structural_tag``), and the tools a chat
offers the model with its ``tool_choice``."""

from __future__ import annotations

import json
from typing import Any

import jsonschema

from router.app.errors import invalid, short, unsupported
from router.app.fields import Fields, json_type
from router.app.requests import MAX_TOOLS, TOOL_NAME, Constraint, ToolChoice

# ---- constrained decoding -------------------------------------------------------------------


def output_constraint(f: Fields) -> Constraint | None:
    """The output constraint of a completion or chat request: ``response_format`` (OpenAI's
    json_object and json_schema, SGLang's structural_tag) or SGLang's ``regex`` and ``ebnf``;
    at most one of them."""
    found: list[tuple[str, Constraint]] = []
    fmt = _response_format(f.raw("response_format"))
    if fmt is not None:
        found.append(("response_format", fmt))
    for field in ("regex", "ebnf"):
        text = f.optional_text(field)
        if text is not None:
            found.append((field, _text_constraint(field, text, field)))
    return _one_constraint(found)


def generate_constraint(sp: Fields) -> Constraint | None:
    """``/generate``'s constraint: SGLang's ``sampling_params`` json_schema (JSON text),
    regex, ebnf or structural_tag (JSON text); at most one of them."""
    found = [
        (sp.name(kind), _text_constraint(kind, text, sp.name(kind)))
        for kind in ("json_schema", "regex", "ebnf", "structural_tag")
        if (text := sp.optional_text(kind)) is not None
    ]
    return _one_constraint(found)


def _one_constraint(found: list[tuple[str, Constraint]]) -> Constraint | None:
    if len(found) > 1:
        names = " and ".join(name for name, _ in found)
        raise invalid(f"a request takes at most one output constraint; got {names}", found[1][0])
    return found[0][1] if found else None


def _text_constraint(kind: str, text: str, param: str) -> Constraint:
    if not text.strip():
        raise invalid(f"{param} must not be empty", param)
    if kind in ("json_schema", "structural_tag"):
        try:
            value = json.loads(text)
        except ValueError as exc:
            raise invalid(f"{param} is not valid JSON: {exc}", param) from None
        if not isinstance(value, dict):
            raise invalid(f"{param} must be a JSON object, got {json_type(value)}", param)
    return Constraint(kind, text)


def _response_format(value: Any) -> Constraint | None:
    if value is None:
        return None
    f = Fields(value, "response_format.", "response_format")
    kind = f.text("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return Constraint("json_object")
    if kind == "json_schema":
        if f.raw("json_schema") is None:
            raise invalid(
                'response_format.json_schema is required when type is "json_schema"',
                "response_format.json_schema",
                "missing",
            )
        js = Fields(f.raw("json_schema"), f.name("json_schema."), "response_format.json_schema")
        js.optional_text("name")
        js.flag("strict", False)  # the grammar is always strict: no keys the schema lacks
        schema = js.raw("schema")
        if not isinstance(schema, dict):
            raise invalid(
                f"{js.name('schema')} must be a JSON schema object, got {json_type(schema)} "
                f"{short(schema)}",
                js.name("schema"),
            )
        return Constraint("json_schema", json.dumps(schema))
    if kind == "structural_tag":
        return Constraint("structural_tag", json.dumps(value))
    raise unsupported(
        "response_format.type", kind, '"text", "json_object", "json_schema" or "structural_tag"'
    )


def parse_tools(value: Any) -> tuple[dict[str, Any], ...] | None:
    """``tools``: function tools with distinct names and parameters that are JSON Schemas;
    an empty array is no tools."""
    if value is None:
        return None
    if not isinstance(value, list):
        raise invalid(f"tools must be an array, got {short(value)}", "tools")
    if len(value) > MAX_TOOLS:
        raise invalid(f"tools holds {len(value)} tools; at most {MAX_TOOLS}", "tools")
    names: set[str] = set()
    for i, tool in enumerate(value):
        f = Fields(tool, f"tools[{i}].", f"tools[{i}]")
        if f.raw("type") != "function":
            raise unsupported(f.name("type"), f.raw("type"), '"function"')
        fn = Fields(f.raw("function"), f"tools[{i}].function.", f"tools[{i}].function")
        name = fn.text("name")
        if not TOOL_NAME.fullmatch(name):
            raise invalid(
                f"{fn.name('name')} must be 1 to 64 letters, digits, underscores or dashes, "
                f"got {short(name)}",
                fn.name("name"),
            )
        if name in names:
            raise invalid(f"tools has two functions named {name!r}", fn.name("name"))
        names.add(name)
        fn.optional_text("description")
        fn.flag("strict", False)
        _parameters(fn.raw("parameters"), fn.name("parameters"))
    return tuple(value) or None


def _parameters(schema: Any, param: str) -> None:
    """A function's ``parameters``: absent, or a JSON Schema object."""
    if schema is None:
        return
    if not isinstance(schema, dict):
        raise invalid(f"{param} must be a JSON Schema object, got {short(schema)}", param)
    dialect = schema.get("$schema")
    if dialect is not None and not isinstance(dialect, str):
        raise invalid(f"{param}.$schema must be a string, got {short(dialect)}", param)
    try:
        jsonschema.validators.validator_for(schema).check_schema(schema)
    except jsonschema.SchemaError as exc:
        where = "".join(f"[{p!r}]" for p in exc.path)
        raise invalid(f"{param}{where} is not a valid JSON Schema: {exc.message}", param) from None
    except RecursionError:
        raise invalid(f"{param} nests too deeply", param) from None


def parse_tool_choice(value: Any, tools: tuple[dict[str, Any], ...] | None) -> ToolChoice:
    """``tool_choice``, checked against ``tools``; absent: "auto" with tools, else "none"."""
    if value is None:
        return ToolChoice("auto" if tools else "none")
    if isinstance(value, str):
        if value not in ("none", "auto", "required"):
            raise invalid(
                f'tool_choice must be "none", "auto", "required" or a named function, got '
                f"{short(value)}",
                "tool_choice",
            )
        choice = ToolChoice(value)
    else:
        f = Fields(value, "tool_choice.", "tool_choice")
        if f.raw("type") != "function":
            raise invalid(
                f'tool_choice.type must be "function", got {short(f.raw("type"))}',
                "tool_choice.type",
            )
        fn = Fields(f.raw("function"), "tool_choice.function.", "tool_choice.function")
        choice = ToolChoice("function", fn.text("name"))
    if choice.mode == "none":
        return choice
    if not tools:
        raise invalid(
            f"tool_choice={short(choice.openai())} is only allowed when tools are given",
            "tool_choice",
        )
    names = [t["function"]["name"] for t in tools]
    if choice.function is not None and choice.function not in names:
        raise invalid(
            f"tool_choice names function {choice.function!r}, which is not in tools "
            f"({', '.join(names)})",
            "tool_choice.function.name",
        )
    return choice
