"""Reading configurations: YAML files (UTF-8, aliases bounded), `dotted.key=value` overrides, one-line validation
messages, and the reference table of every key (docs/reference.md: `python -m augment.configfile`). The schema
itself is augment.config.
"""

from __future__ import annotations

import copy
import difflib
from pathlib import Path
from types import UnionType
from typing import Annotated, Literal, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, ValidationError

from augment.config import ConfigError, RunConfig


def _keys(model) -> dict:
    """The fields of a config section (none for any other type: a list, a union, a number)."""
    return model.model_fields if isinstance(model, type) and issubclass(model, BaseModel) else {}


def _field(loc: tuple) -> int:
    """How many leading parts of an error's location name config sections and fields; the rest are list indices
    and the names pydantic gives the members of a union (`base.block_out_channels.list[int].0`)."""
    model = RunConfig
    for i, part in enumerate(loc):
        if part not in _keys(model):
            return i
        model = _keys(model)[part].annotation
    return len(loc)


# keys that moved, by their old place: a config written for an earlier version gets the new place in one line
MOVED = {("evaluation", "workers"): "runner.local_workers"}


def _suggestion(loc: tuple) -> str:
    """` (did you mean ...?)` for an unknown key that is close to a key of its section (a typo, a wrong case), or
    where a key that moved lives now."""
    if tuple(loc) in MOVED:
        return f" (it moved: write {MOVED[tuple(loc)]}, the worker count of every local stage)"
    model = RunConfig
    for part in loc[:-1]:
        model = _keys(model)[part].annotation if part in _keys(model) else None
    keys, typed = list(_keys(model)), str(loc[-1])
    close = difflib.get_close_matches(typed, keys, n=1, cutoff=0.6) or [k for k in keys if k.lower() == typed.lower()]
    return f" (did you mean {close[0]}?)" if close else ""


def _problem(errors: list[dict]) -> str:
    """One line for the errors of one field: a value that fits no member of a union gets one error per member,
    which read as several problems; they are joined, with the value given once."""
    n = _field(errors[0]["loc"])
    key = ".".join(str(p) for p in errors[0]["loc"][:n]) or "(top level)"
    msgs = []
    for e in errors:
        index = "".join(f"[{p}]" for p in e["loc"][n:] if isinstance(p, int))  # an item of a list
        msg = e["msg"].removeprefix("Value error, ")  # our validators' messages need no label
        msgs.append(f"{index}: {msg}" if index and len(errors) > 1 else msg)
        if index and len(errors) == 1:
            key += index
    given = min(errors, key=lambda e: len(e["loc"]))["input"]
    got = repr(given)
    # a section's own check (a dict as input) names its values itself
    value = "" if isinstance(given, dict) else f" (got {got if len(got) <= 100 else got[:97] + '...'})"
    if len(errors) == 1 and errors[0]["type"] == "value_error" and (n == 0 or msgs[0].startswith(key + ".")):
        return f"{msgs[0]}{value}"  # a section's check whose message names its fields itself
    return f"{key}: {', or '.join(msgs)}{value}"


def _format_errors(err: ValidationError, origin: str) -> str:
    """One line for one error; a list, one line each, for several."""
    problems, fields = [], {}
    for e in err.errors():
        if e["type"] == "extra_forbidden":
            problems.append(f"{'.'.join(str(p) for p in e['loc'])}: unknown key{_suggestion(e['loc'])}")
        else:
            fields.setdefault(e["loc"][:_field(e["loc"])], []).append(e)
    problems += [_problem(errors) for errors in fields.values()]
    if len(problems) == 1:
        return f"invalid configuration in {origin}: {problems[0]}"
    return "\n".join([f"invalid configuration in {origin}:"] + [f"  {p}" for p in problems])


def parse_config(data: dict, origin: str = "<dict>") -> RunConfig:
    try:
        return RunConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_errors(err, origin)) from None


def deep_merge(base: dict, patch: dict) -> dict:
    """`base` with `patch` merged in, section by section (a new dict; neither input changes)."""
    out = dict(base)
    for k, v in patch.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


ALIAS_BUDGET = 10_000  # values a YAML document may hold once its aliases are expanded


class _Refused(Exception):
    def __init__(self, problem: str, node: yaml.Node):
        super().__init__(f"line {node.start_mark.line + 1}: {problem}")


def _check_nodes(node: yaml.Node, sizes: dict[int, int | None]) -> int:
    """How many values `node` expands to, every alias counted where it is used; refuse a document past
    ALIAS_BUDGET (a "billion laughs" file is ten lines that expand to 10^9 values, and everything downstream would
    walk them), an alias inside its own anchor, and a key given twice in one mapping (YAML keeps the last one
    silently). Linear in the document: a shared node is counted once and its size reused."""
    if id(node) in sizes:
        if sizes[id(node)] is None:
            raise _Refused("an alias refers to the anchor it is inside of", node)
        return sizes[id(node)]
    sizes[id(node)] = None
    children = node.value if isinstance(node, yaml.SequenceNode) else []
    if isinstance(node, yaml.MappingNode):
        seen = {}
        for key, _ in node.value:
            if isinstance(key, yaml.ScalarNode) and key.tag != "tag:yaml.org,2002:merge":
                if (key.tag, key.value) in seen:
                    raise _Refused(f"key {key.value!r} appears twice in one mapping (first at line "
                                   f"{seen[key.tag, key.value]}); YAML would keep only the last", key)
                seen[key.tag, key.value] = key.start_mark.line + 1
        children = [n for pair in node.value for n in pair]
    size = 1
    for child in children:
        size += _check_nodes(child, sizes)
        if size > ALIAS_BUDGET:
            raise _Refused(f"its aliases expand to more than {ALIAS_BUDGET} values (anchors nested in anchors); "
                           "write the values out", child)
    sizes[id(node)] = size
    return size


class _Loader(yaml.SafeLoader):
    """safe_load, checked by `_check_nodes` between composing (cheap: aliases are shared nodes) and constructing."""

    def compose_document(self):
        node = super().compose_document()
        if node is not None:
            _check_nodes(node, {})
        return node


def parse_yaml(text: str, origin: str):
    """YAML text as Python values; every problem is one ConfigError naming `origin` and the line."""
    try:
        return yaml.load(text, Loader=_Loader)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise ConfigError(f"{origin} is not valid YAML{where}: {getattr(err, 'problem', None) or err}") from None
    except _Refused as err:
        raise ConfigError(f"{origin}, {err}") from None
    except RecursionError:
        raise ConfigError(f"{origin}: nested too deeply (thousands of levels of lists or mappings)") from None


def read_utf8(path: Path, error: type[Exception] = ConfigError) -> str:
    """A text file the user wrote (config, manifest), decoded as UTF-8 (a BOM is dropped); any other encoding is
    one `error` naming the file and the first byte that is not UTF-8, not a UnicodeDecodeError traceback."""
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise error(f"cannot read {path}: {err.strerror or err}") from None
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = raw[:err.start].count(b"\n") + 1
        raise error(f"{path} is not UTF-8 text: byte 0x{raw[err.start]:02x} at line {line} (offset {err.start}); "
                    "save it as UTF-8") from None


def apply_overrides(data: dict, overrides: list[str] | None) -> dict:
    """Apply `dotted.key=value` strings (values parsed as YAML) to a config mapping; returns a new mapping."""
    data = deep_merge(data, {})
    for item in overrides or []:
        key, sep, raw = str(item).partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} must look like section.key=value")
        value = parse_yaml(raw, f"override {item!r}")
        node = data
        *parents, leaf = key.split(".")
        for p in parents:
            node[p] = dict(node[p]) if isinstance(node.get(p), dict) else node.setdefault(p, {})
            node = node[p]
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {p} is not a section")
        node[leaf] = value
    return data


def saved_config(data):
    """A config augment wrote itself (a run folder's config.yaml: every field, defaults included) by an earlier
    version, with each moved key in its new place. A config a user writes gets the one-line hint instead."""
    if not isinstance(data, dict):
        return data
    data = copy.deepcopy(data)
    for (section, key), new in MOVED.items():
        old = data.get(section)
        if isinstance(old, dict) and key in old:
            value = old.pop(key)
            to_section, to_key = new.split(".")
            target = data.setdefault(to_section, {})
            if isinstance(target, dict):
                target.setdefault(to_key, value)
    return data


def load_config(path: str | Path, overrides: list[str] | None = None, saved: bool = False) -> RunConfig:
    """Read a YAML config (UTF-8); `overrides` are `dotted.key=value` strings applied on top (values parsed as
    YAML). `saved`: a run folder's own config.yaml (`saved_config`)."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"config {path} is a folder; give a YAML file")
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    data = parse_yaml(read_utf8(path), str(path))
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping of sections, got {type(data).__name__}")
    return parse_config(apply_overrides(saved_config(data) if saved else data, overrides), str(path))


_SYMBOLS = {"ge": "≥", "gt": ">", "le": "≤", "lt": "<", "min_length": "min items", "max_length": "max items"}


def _bounds(metadata, text: bool = False) -> list[str]:
    """A field's or a type's constraints (`≥ 1`, `max items 4`; a string's min_length is its length)."""
    found = [m for x in metadata for m in getattr(x, "metadata", [x])]
    return [f"{_SYMBOLS[k].replace('items', 'length') if text else _SYMBOLS[k]} {getattr(m, k)}"
            for m in found for k in _SYMBOLS if getattr(m, k, None) is not None]


def _type_name(ann, inner: list[str], where: str = "") -> str:
    """A type as the config's source writes it (`int | None`, `list[int]`); the bounds of values inside it (a
    list's items, a member of a union) are added to `inner`."""
    origin, args = get_origin(ann), get_args(ann)
    if origin is Annotated:
        inner += [f"{where}{b}" for b in _bounds(args[1:], args[0] is str)]
        return _type_name(args[0], inner, where)
    if origin is Literal:
        return f"Literal[{', '.join(map(repr, args))}]"
    if origin in (Union, UnionType):
        return " | ".join(_type_name(a, inner, where) for a in args)
    if origin is not None:
        return f"{origin.__name__}[{', '.join(_type_name(a, inner, 'items ') for a in args)}]"
    return "None" if ann is type(None) else getattr(ann, "__name__", str(ann))


def reference_markdown() -> str:
    """Every config key with its type, default and description (docs/reference.md is generated by this). Defaults
    are read from a default config, not from each section's class: a section's own default can differ from its
    class's (evaluation.model trains 400 steps, a ClassifierConfig 600)."""
    lines = []

    def walk(model: BaseModel, prefix: str) -> None:
        for name, f in type(model).model_fields.items():
            ann, default = f.annotation, getattr(model, name)
            if isinstance(default, BaseModel):
                walk(default, f"{prefix}{name}.")
                continue
            inner: list[str] = []
            typ = _type_name(ann, inner)
            bounds = ", ".join(_bounds(f.metadata, typ in ("str", "str | None")) + inner)
            lines.append(f"| `{prefix}{name}` | `{typ}` | `{default!r}` | {f.description or ''}"
                         f"{f' ({bounds})' if bounds else ''} |")

    walk(RunConfig(), "")
    return "| key | type | default | description |\n|---|---|---|---|\n" + "\n".join(lines)


if __name__ == "__main__":
    print(reference_markdown())
