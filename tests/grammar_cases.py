"""Constraints for the constrained-decoding tests, and how to check an output against each.

A random-weight model writes valid output only if the constraint holds it to the grammar, so
every case is bounded (string lengths, array sizes, number ranges, enums): whatever tokens the
model prefers, the output closes within `MAX_TOKENS`.
"""

from __future__ import annotations

import json
import re
from typing import Any

import jsonschema

MAX_TOKENS = 160

_NAME = {"type": "string", "maxLength": 6}
_SMALL = {"type": "integer", "minimum": 0, "maximum": 99}

SCHEMAS: dict[str, dict[str, Any]] = {
    "flat": {
        "type": "object",
        "properties": {"name": _NAME, "age": {"type": "integer", "minimum": 0, "maximum": 120}},
        "required": ["name", "age"],
    },
    "enum": {
        "type": "object",
        "properties": {"color": {"enum": ["red", "green", "blue"]}},
        "required": ["color"],
    },
    "const": {
        "type": "object",
        "properties": {"kind": {"const": "point"}, "x": _SMALL},
        "required": ["kind", "x"],
    },
    "boolean_null": {
        "type": "object",
        "properties": {"ok": {"type": "boolean"}, "why": {"type": "null"}},
        "required": ["ok", "why"],
    },
    "negative_range": {
        "type": "object",
        "properties": {"t": {"type": "integer", "minimum": -40, "maximum": -10}},
        "required": ["t"],
    },
    "exclusive_bounds": {
        "type": "object",
        "properties": {"n": {"type": "integer", "exclusiveMinimum": 3, "exclusiveMaximum": 9}},
        "required": ["n"],
    },
    "optional_keys": {
        "type": "object",
        "properties": {"a": _SMALL, "b": _NAME, "c": {"type": "boolean"}},
        "required": ["a"],
    },
    "all_optional": {
        "type": "object",
        "properties": {"x": {"type": "boolean"}, "y": {"enum": [1, 2, 3]}},
    },
    "nested": {
        "type": "object",
        "properties": {
            "user": {
                "type": "object",
                "properties": {
                    "id": _SMALL,
                    "address": {
                        "type": "object",
                        "properties": {
                            "city": _NAME,
                            "zip": {"type": "string", "pattern": "^[0-9]{5}$"},
                        },
                        "required": ["city", "zip"],
                    },
                },
                "required": ["id", "address"],
            }
        },
        "required": ["user"],
    },
    "int_array": {
        "type": "object",
        "properties": {"xs": {"type": "array", "items": _SMALL, "minItems": 1, "maxItems": 4}},
        "required": ["xs"],
    },
    "enum_array": {
        "type": "object",
        "properties": {
            "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "maxItems": 3}
        },
        "required": ["tags"],
    },
    "object_array": {
        "type": "object",
        "properties": {
            "items": {
                "type": "array",
                "items": {
                    "type": "object",
                    "properties": {
                        "sku": _NAME,
                        "qty": {"type": "integer", "minimum": 1, "maximum": 9},
                    },
                    "required": ["sku", "qty"],
                },
                "minItems": 1,
                "maxItems": 2,
            }
        },
        "required": ["items"],
    },
    "top_level_array": {
        "type": "array",
        "items": {"type": "boolean"},
        "minItems": 2,
        "maxItems": 3,
    },
    "tuple": {
        "type": "array",
        "prefixItems": [{"enum": ["x", "y"]}, _SMALL],
        "items": False,
        "minItems": 2,
    },
    "any_of": {
        "type": "object",
        "properties": {
            "value": {"anyOf": [_SMALL, {"type": "string", "maxLength": 4}, {"type": "boolean"}]}
        },
        "required": ["value"],
    },
    "any_of_objects": {
        "anyOf": [
            {
                "type": "object",
                "properties": {"cat": {"const": "meow"}},
                "required": ["cat"],
            },
            {
                "type": "object",
                "properties": {"dog": {"type": "integer", "minimum": 1, "maximum": 5}},
                "required": ["dog"],
            },
        ]
    },
    "one_of_types": {
        "type": "object",
        "properties": {"v": {"oneOf": [{"type": "boolean"}, {"type": "null"}]}},
        "required": ["v"],
    },
    "pattern": {
        "type": "object",
        "properties": {"code": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{2}$"}},
        "required": ["code"],
    },
    "string_bounds": {
        "type": "object",
        "properties": {"s": {"type": "string", "minLength": 2, "maxLength": 4}},
        "required": ["s"],
    },
    "ref_defs": {
        "type": "object",
        "$defs": {
            "pt": {
                "type": "object",
                "properties": {"x": _SMALL, "y": _SMALL},
                "required": ["x", "y"],
            }
        },
        "properties": {"a": {"$ref": "#/$defs/pt"}, "b": {"$ref": "#/$defs/pt"}},
        "required": ["a", "b"],
    },
    "nullable": {
        "type": "object",
        "properties": {"n": {"type": ["integer", "null"], "minimum": 0, "maximum": 9}},
        "required": ["n"],
    },
    "deep_array": {
        "type": "object",
        "properties": {
            "grid": {
                "type": "array",
                "items": {"type": "array", "items": {"enum": [0, 1]}, "minItems": 1, "maxItems": 2},
                "minItems": 1,
                "maxItems": 2,
            }
        },
        "required": ["grid"],
    },
    "enum_mixed": {
        "type": "object",
        "properties": {"v": {"enum": ["on", "off", 0, 1, True, None]}},
        "required": ["v"],
    },
}

# (regex, the same pattern for Python's `re`: xgrammar matches the whole output)
REGEXES: dict[str, str] = {
    "phone": r"[0-9]{3}-[0-9]{4}",
    "word_choice": r"(yes|no|maybe)",
    "ip": r"((25[0-5]|2[0-4][0-9]|1?[0-9]?[0-9])\.){3}(25[0-5]|2[0-4][0-9]|1?[0-9]?[0-9])",
    "date": r"20[0-9]{2}-(0[1-9]|1[0-2])-(0[1-9]|[12][0-9]|3[01])",
}

# EBNF grammars (xgrammar's dialect; start rule `root`) and Python regexes of their languages.
EBNF: dict[str, tuple[str, str]] = {
    "arith": (
        'root ::= expr\nexpr ::= term ("+" term)?\nterm ::= num ("*" num)?\nnum ::= [1-9] [0-9]?',
        r"[1-9][0-9]?(\*[1-9][0-9]?)?(\+[1-9][0-9]?(\*[1-9][0-9]?)?)?",
    ),
    "answer": (
        'root ::= "ANSWER: " ("A" | "B" | "C" | "D")',
        r"ANSWER: [ABCD]",
    ),
    "list": (
        'root ::= "[" item ("," item)? ("," item)? "]"\nitem ::= "\\"" [a-z] [a-z]? "\\""',
        r'\["[a-z][a-z]?"(,"[a-z][a-z]?"){0,2}\]',
    ),
}


def check_schema(name: str, text: str) -> Any:
    """The parsed output of schema case `name`; raises if it is not valid JSON or not valid
    under the schema."""
    value = json.loads(text)
    jsonschema.validate(value, SCHEMAS[name])
    return value


def check_regex(name: str, text: str) -> None:
    if re.fullmatch(REGEXES[name], text) is None:
        raise AssertionError(f"{text!r} does not match regex {name} {REGEXES[name]!r}")


def check_ebnf(name: str, text: str) -> None:
    if re.fullmatch(EBNF[name][1], text) is None:
        raise AssertionError(f"{text!r} is not in the language of grammar {name}")
