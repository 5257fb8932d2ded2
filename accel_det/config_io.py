"""Reading a recipe: TOML/JSON text, ``key=value`` overrides, and every problem as one line naming the file
and the key (``file: table.key: message``), with hints where a mistake is common (a misspelt key, a
duplicate TOML key, an override TOML read as a date). Also the generated recipe reference.

Torch-free, like config.py whose models it validates against.
"""

from __future__ import annotations

import datetime
import json
import re
import sys
from pathlib import Path
from types import UnionType
from typing import Annotated, Any, Literal, Union, get_args, get_origin

from pydantic import BaseModel, ValidationError

from accel_det.catalog import NATIVE_MODELS, default_anchors
from accel_det.config import AnchorConfig, ModelConfig, Recipe
from accel_det.config_types import KeyedError, suggest
from accel_det.errors import RecipeError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


def _model_at(path: tuple[Any, ...]) -> type[BaseModel] | None:
    """The pydantic model class that holds the table at ``path`` (for suggesting keys)."""
    model: type[BaseModel] = Recipe
    for part in path:
        field = model.model_fields.get(str(part))
        if field is None:
            return None
        ann = field.annotation
        nxt = next(
            (a for a in (ann, *getattr(ann, "__args__", ())) if isinstance(a, type) and issubclass(a, BaseModel)),
            None,
        )
        if nxt is None:
            return None
        model = nxt
    return model


def _unwrap(ann: Any) -> Any:
    """Annotated[X, ...] -> X and X | None -> X: neither adds a part to pydantic's error locations."""
    while True:
        origin = get_origin(ann)
        if origin is Annotated:
            ann = get_args(ann)[0]
        elif origin in (Union, UnionType):
            members = [a for a in get_args(ann) if a is not type(None)]
            if len(members) != 1:
                return ann
            ann = members[0]
        else:
            return ann


def _key_loc(loc: tuple[Any, ...]) -> tuple[tuple[Any, ...], bool]:
    """(an error location as recipe keys, whether it went through a union). pydantic adds a tag per union
    member ("literal['auto']", "bool") and per validator ("function-after[...]"); no recipe key is one."""
    out: list[Any] = []
    ann: Any = Recipe
    union = False
    for part in loc:
        ann = _unwrap(ann)
        origin = get_origin(ann)
        if origin in (Union, UnionType):
            union, ann = True, None  # part names the member that failed: not a key
            continue
        if isinstance(part, str) and part.startswith(("function-", "list[")):
            continue
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            field = ann.model_fields.get(str(part))
            ann = field.annotation if field else None
        elif origin in (list, set, frozenset, tuple, dict) and get_args(ann):
            args = get_args(ann)
            if origin is tuple and isinstance(part, int) and Ellipsis not in args:
                ann = args[part] if part < len(args) else None
            else:
                ann = args[-1] if origin is dict else args[0]
        else:
            ann = None
        out.append(part)
    return tuple(out), union


def _format_error(source: str, err: ValidationError, hints: dict[str, str] | None = None) -> str:
    """The first error as ``source: table.key: message``; ``hints``: dotted key -> text to append when the
    error is at (or under) that key."""
    errors = [(*_key_loc(e["loc"]), e) for e in err.errors()]
    loc, union, e = errors[0]
    at = loc
    exc = (e.get("ctx") or {}).get("error")
    if isinstance(exc, KeyedError):
        at = loc + exc.key
    msg = e["msg"]
    if e["type"] == "extra_forbidden" and loc:
        parent = _model_at(loc[:-1])
        hint = suggest(str(loc[-1]), parent.model_fields) if parent else ""
        msg = f"unknown key{hint}"
    elif msg.startswith("Value error, "):
        msg = msg[len("Value error, ") :]
    if union:
        # a value no member of a union accepts gives one error per member, all at this key: say them as one
        prefix = "Input should be "
        msgs = [msg] + [o["msg"] for o_loc, o_union, o in errors[1:] if o_union and o_loc == loc]
        if all(m.startswith(prefix) for m in msgs):
            msg = prefix + " or ".join(m[len(prefix) :] for m in msgs)
        else:
            msg = " or ".join(msgs)
    dotted = ".".join(str(p) for p in at)
    for key, text in (hints or {}).items():
        if dotted == key or dotted.startswith(key + "."):
            msg = f"{msg} {text}"
            break
    others = len({o_loc for o_loc, _, _ in errors} - {loc})
    more = f" (+{others} more)" if others else ""
    return f"{source}: {dotted}: {msg}{more}" if dotted else f"{source}: {msg}{more}"


# tomllib's "Cannot overwrite a value (at line 3, column 7)" names no key: find it in the text
_TOML_AT = re.compile(r"\s*\(at line (\d+), column (\d+)\)$")
_TOML_KEY = r"""(?:[A-Za-z0-9_-]+|"(?:[^"\\]|\\.)*"|'[^']*')"""
_TOML_DOTTED = rf"{_TOML_KEY}(?:\s*\.\s*{_TOML_KEY})*"
_TOML_HEADER = re.compile(rf"^\s*(\[\[?)\s*({_TOML_DOTTED})\s*\]\]?\s*(?:#.*)?$")
_TOML_ASSIGN = re.compile(rf"^\s*({_TOML_DOTTED})\s*=")


def _dotted(key: str) -> str:
    return re.sub(r"\s*\.\s*", ".", key.strip())


def _toml_error(text: str, exc: tomllib.TOMLDecodeError) -> str:
    """tomllib's message; for a key or table defined twice, one that names it and its line."""
    msg = str(exc)
    m = _TOML_AT.search(msg)
    reason = msg[: m.start()] if m else msg
    kinds = ("Cannot overwrite a value", "Cannot declare", "Cannot redefine namespace", "Duplicate inline table key")
    if not m or not reason.startswith(kinds):
        return msg
    lines = text.splitlines()

    def starts_statement(i: int) -> bool:
        # tomllib parses top-down, so everything before the statement it failed on parses on its own,
        # and a prefix that ends inside that statement (a multi-line array or string) does not
        try:
            tomllib.loads("\n".join(lines[:i]))
        except tomllib.TOMLDecodeError:
            return False
        return True

    err_i = min(int(m.group(1)), len(lines)) - 1
    stmt = next((i for i in range(err_i, -1, -1) if starts_statement(i)), err_i)
    line = lines[stmt] if 0 <= stmt < len(lines) else ""
    header = _TOML_HEADER.match(line)
    if header:
        table = f"{header.group(1)}{_dotted(header.group(2))}{']' * len(header.group(1))}"
        if reason.startswith("Cannot overwrite a value"):
            return f"{table} redefines the key {_dotted(header.group(2))!r} set earlier (line {stmt + 1})"
        return f"table {table} defined twice (line {stmt + 1})"
    assign = _TOML_ASSIGN.match(line)
    if not assign:
        return msg
    key = _dotted(assign.group(1))
    parent = next(
        (h for i in range(stmt - 1, -1, -1) if (h := _TOML_HEADER.match(lines[i])) and starts_statement(i)), None
    )
    where = f" in {parent.group(1)}{_dotted(parent.group(2))}{']' * len(parent.group(1))}" if parent else ""
    if reason.startswith("Cannot overwrite a value"):
        return f"duplicate key {key!r}{where} (line {stmt + 1})"
    if reason.startswith("Duplicate inline table key"):
        inner = reason.removeprefix("Duplicate inline table key").strip()
        return f"duplicate key {inner} in the inline table {key!r}{where} (line {stmt + 1})"
    # "Cannot redefine namespace": a dotted key reopens a table that a [header] defined
    return f"key {key!r}{where} redefines a table defined earlier with a [header] (line {stmt + 1})"


def parse_override(text: str) -> tuple[list[str], Any]:
    """``a.b=c`` -> (["a", "b"], c) with c parsed as a TOML value (bare words fall back to strings)."""
    if "=" not in text:
        raise RecipeError(f"override {text!r}: expected key=value (e.g. train.max_epoch=5)")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*", key):
        raise RecipeError(f"override {text!r}: bad key {key!r}")
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()
    return key.split("."), value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    for text in overrides:
        keys, value = parse_override(text)
        node = data
        for k in keys[:-1]:
            child = node.setdefault(k, {})
            if not isinstance(child, dict):
                raise RecipeError(f"override {text!r}: {k} is not a table")
            node = child
        node[keys[-1]] = value
    return data


def _quote_strings(raw: str) -> str | None:
    """``[face, coin]`` -> ``["face", "coin"]`` (also in inline tables and nested arrays): every item that
    is not a TOML value becomes a string. None when the result still does not parse."""

    def split(inner: str) -> list[str]:
        items, depth, cur = [], 0, ""
        for ch in inner:
            depth += ch in "[{"
            depth -= ch in "]}"
            if ch == "," and depth == 0:
                items.append(cur)
                cur = ""
            else:
                cur += ch
        return [*items, cur] if cur.strip() else items

    def fix(item: str) -> str:
        item = item.strip()
        if item[:1] in "[{" and item[-1:] == {"[": "]", "{": "}"}[item[0]]:
            if item[0] == "[":
                return "[" + ", ".join(fix(i) for i in split(item[1:-1])) + "]"
            pairs = [p.split("=", 1) for p in split(item[1:-1])]
            if any(len(p) != 2 for p in pairs):
                return item
            return "{" + ", ".join(f"{k.strip()} = {fix(v)}" for k, v in pairs) + "}"
        try:
            value = tomllib.loads(f"v = {item}")["v"]
        except tomllib.TOMLDecodeError:
            return json.dumps(item)
        # 'coin' -> "coin": the hint wraps the whole value in single quotes for the shell
        return json.dumps(value) if isinstance(value, str) else item

    fixed = fix(raw)
    try:
        tomllib.loads(f"v = {fixed}")
    except tomllib.TOMLDecodeError:
        return None
    return fixed


def _override_hints(overrides: list[str]) -> dict[str, str]:
    """Dotted key -> how to quote the override's value, for values TOML did not read as the user meant:
    ``mission.name=2024-05-01`` is a date, and ``data.class_names=[face, coin]`` is no TOML at all (bare
    words), so it became the string "[face, coin]"."""
    hints: dict[str, str] = {}
    for text in overrides:
        keys, value = parse_override(text)
        key, raw = ".".join(keys), text.split("=", 1)[1].strip()
        hints.pop(key, None)  # the last override of a key is the one validated
        if isinstance(value, (datetime.date, datetime.time)):  # datetime is a date
            hints[key] = f"""(quote the value: {key}='"{raw}"')"""
        elif isinstance(value, str) and value == raw and raw[:1] in "[{":
            fixed = _quote_strings(raw)
            example = fixed if fixed is not None else '["a", "b"]' if raw[0] == "[" else '{k = "a"}'
            hints[key] = f"(quote the strings in it: {key}='{example}')"
    return hints


def load_recipe(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Read, override and validate a recipe. Any problem raises RecipeError with one line."""
    source = str(path) if path is not None else "<defaults>"
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        try:
            text = p.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise RecipeError(f"{source}: no such file") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise RecipeError(f"{source}: cannot read: {exc}") from None
        try:
            data = json.loads(text) if p.suffix == ".json" else tomllib.loads(text)
        except json.JSONDecodeError as exc:
            raise RecipeError(f"{source}: not valid JSON: {exc}") from None
        except tomllib.TOMLDecodeError as exc:
            raise RecipeError(f"{source}: not valid TOML: {_toml_error(text, exc)}") from None
    data = apply_overrides(data, list(overrides))
    try:
        return Recipe.model_validate(data)
    except ValidationError as exc:
        raise RecipeError(_format_error(source, exc, _override_hints(list(overrides)))) from None


def _type_name(ann: Any) -> str:
    origin, args = get_origin(ann), get_args(ann)
    if origin is Literal:
        return " \\| ".join(json.dumps(a) for a in args)
    if origin is Annotated:
        return _type_name(args[0])
    if args:
        inner = [_type_name(a) for a in args]
        if origin in (Union, UnionType):
            return " \\| ".join("null" if i == "NoneType" else i for i in inner)
        return f"{getattr(origin, '__name__', str(origin))}[{', '.join(inner)}]"
    return getattr(ann, "__name__", str(ann))


def reference_markdown() -> str:
    """The recipe reference, generated from the models (README's table comes from here)."""
    lines = ["| key | type | default | meaning |", "|---|---|---|---|"]

    def walk(model: type[BaseModel], prefix: str) -> None:
        for name, field in model.model_fields.items():
            path = (*prefix.rstrip(".").split("."), name) if prefix else (name,)
            sub = _model_at(path)
            if sub is not None:
                walk(sub, f"{prefix}{name}.")
                continue
            default = field.get_default(call_default_factory=True)
            ann = _type_name(field.annotation)
            desc = (field.description or "").replace("|", "\\|")
            dflt = "required" if field.is_required() else f"`{json.dumps(default, default=str)}`"
            if model is AnchorConfig:
                # AnchorConfig's own defaults are FaceBoxes'; in a recipe each native model fills in its own
                img_dim = ModelConfig.model_fields["img_dim"].default
                per_model = {json.dumps(default_anchors(m, img_dim)[name]) for m in NATIVE_MODELS}
                dflt = f"`{per_model.pop()}`" if len(per_model) == 1 else "the model's"
            lines.append(f"| `{prefix}{name}` | {ann} | {dflt} | {desc} |")

    walk(Recipe, "")
    return "\n".join(lines)
