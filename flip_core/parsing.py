"""How a request body that does not fit its model is refused: :func:`parse` (a pydantic model or type over JSON
or decoded data) and :func:`sentence` (one pydantic error in FLIP's words, naming the field). The models are
``flip_core.api``'s, which re-exports both."""

from __future__ import annotations

import functools
import json
from typing import Any

from pydantic import TypeAdapter, ValidationError
from pydantic_core import ErrorDetails

from flip_core.errors import RequestInvalid

_KINDS = {
    "int_type": "must be a whole number",
    "int_parsing": "must be a whole number",
    "int_from_float": "must be a whole number",
    "float_type": "must be a number",
    "float_parsing": "must be a number",
    "finite_number": "must be a finite number",
    "string_type": "must be text",
    "bool_type": "must be true or false",
    "dict_type": "must be an object",
    "list_type": "must be a list",
    "model_type": "must be an object",
    "model_attributes_type": "must be an object",
    "missing": "is required",
    "extra_forbidden": "is not a field of this request",
    "string_too_short": "must not be empty",
    "enum": "is not one of the allowed values",
    "literal_error": "is not one of the allowed values",
    "union_tag_invalid": "is not a known kind",
    "union_tag_not_found": "needs a 'type'",
    "none_required": "must be empty",
}


def _where(loc: tuple[int | str, ...]) -> str:
    path = ".".join(str(part) for part in loc if not str(part).startswith(("function-", "tagged-union")))
    return f"field '{path}'" if path else "the body"


def _shown(value: Any) -> str:
    try:
        text = json.dumps(value)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def sentence(error: ErrorDetails, what: str) -> str:
    """One pydantic error as FLIP says it: what is wrong, where, and (briefly) what was sent."""
    kind, where = error["type"], _where(error["loc"])
    if kind == "flip":  # FLIP's own sentence; where it is not the task's own (naming its option), say where
        return (
            str(error["msg"])
            if str(error["msg"]).startswith("--") or what == "the task" and where in ("the body", "field 'source'")
            else f"{what}: {where}: {error['msg']}"
        )
    if kind == "json_invalid":
        return f"{what} is not valid JSON ({error.get('ctx', {}).get('error', 'malformed')})"
    ctx = error.get("ctx", {})
    if kind in ("string_too_long", "too_long"):
        return f"{what}: {where} is too long (at most {ctx.get('max_length')})"
    if kind in ("greater_than_equal", "less_than_equal", "greater_than", "less_than"):
        bound = {
            "greater_than_equal": "at least",
            "less_than_equal": "at most",
            "greater_than": "above",
            "less_than": "below",
        }[kind]
        limit = next(iter(ctx.values()), "")
        return f"{what}: {where} must be {bound} {limit}, not {_shown(error.get('input'))}"
    if kind in ("dict_type", "model_type", "model_attributes_type", "list_type") and where == "the body":
        return f"{what} must be a JSON {'list' if kind == 'list_type' else 'object'}, not {_shown(error.get('input'))}"
    reason = _KINDS.get(kind, str(error["msg"]).lower())
    got = "" if kind in ("missing", "extra_forbidden") else f", not {_shown(error.get('input'))}"
    return f"{what}: {where} {reason}{got}"


@functools.cache
def _adapter(model: Any) -> TypeAdapter[Any]:
    return TypeAdapter(model)


def parse(model: Any, body: bytes | str | Any, what: str) -> Any:
    """``body`` (JSON bytes or text, or already-decoded data) as ``model``; refused with a sentence
    naming the first wrong field (:class:`RequestInvalid`, 400). ``what`` names the body ("the task")."""
    adapter = _adapter(model)
    try:
        if isinstance(body, (bytes, str)):
            return adapter.validate_json(body)
        return adapter.validate_python(body)
    except ValidationError as exc:
        first = exc.errors(include_url=False)[0]
        field = _where(first["loc"]).removeprefix("field '").removesuffix("'")
        raise RequestInvalid(sentence(first, what), field="" if field == "the body" else field) from None


__all__ = ["parse", "sentence"]
