"""Reading configurations: YAML files (UTF-8, aliases bounded), `dotted.key=value` overrides, one-line validation
messages, and the reference table of every key (docs/reference.md: `python -m augment.configfile`). The schema
itself is augment.config.
"""

from __future__ import annotations

from pathlib import Path

import yaml
from pydantic import BaseModel, ValidationError

from augment.config import ConfigError, RunConfig


def _format_errors(err: ValidationError, origin: str) -> str:
    """One line for one error; a list, one line each, for several."""
    problems = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "(top level)"
        msg = "unknown key" if e["type"] == "extra_forbidden" else e["msg"]
        got = repr(e.get("input"))
        value = "" if e["type"] == "extra_forbidden" else f" (got {got if len(got) <= 100 else got[:97] + '...'})"
        problems.append(f"{key}: {msg}{value}")
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


def load_config(path: str | Path, overrides: list[str] | None = None) -> RunConfig:
    """Read a YAML config (UTF-8); `overrides` are `dotted.key=value` strings applied on top (values parsed as
    YAML)."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"config {path} is a folder; give a YAML file")
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    data = parse_yaml(read_utf8(path), str(path))
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping of sections, got {type(data).__name__}")
    return parse_config(apply_overrides(data, overrides), str(path))


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
            typ = str(ann).replace("typing.", "").replace("<class '", "").replace("'>", "")
            symbols = {"ge": "≥", "gt": ">", "le": "≤", "lt": "<", "min_length": "min items",
                       "max_length": "max items"}
            bounds = ", ".join(f"{symbols[k]} {getattr(m, k)}" for m in f.metadata for k in symbols
                               if getattr(m, k, None) is not None)
            lines.append(f"| `{prefix}{name}` | `{typ}` | `{default!r}` | {f.description or ''}"
                         f"{f' ({bounds})' if bounds else ''} |")

    walk(RunConfig(), "")
    return "| key | type | default | description |\n|---|---|---|---|\n" + "\n".join(lines)


if __name__ == "__main__":
    print(reference_markdown())
