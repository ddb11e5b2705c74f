"""The cohort filter language: a researcher's ``where`` text, parsed into a small tree, never run.

A filter such as ``age > 50 and sex = 1 and chol is not null`` travels to each site as text;
the site parses it here and turns the tree into a row mask over its own table
(``site_agent.queries.filtering``). The text is read by sqlglot's parser only: its expression tree is
converted into FLIP's own frozen dataclasses, node by node, from an allowlist (comparisons of a
column with a literal, ``and``/``or``/``not``, ``in``, ``between``, ``is [not] null``). Anything
else, such as a function call, a subquery, arithmetic or ``like``, is refused with a sentence
that names it. Nothing is ever evaluated, compiled or looked up by a user-supplied name.
"""

from __future__ import annotations

import re
import sys
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import TypeAlias

import sqlglot
from sqlglot import exp
from sqlglot.errors import ParseError, TokenError
from sqlglot.tokenizer_core import Token, TokenType
from sqlglot.tokens import Tokenizer

from flip_core.errors import RequestInvalid
from flip_core.query import MAX_QUERY_CHARS

MAX_NODES = 200  # conditions and operators in FLIP's tree (an in list counts once)
MAX_DEPTH = 50  # nesting of parentheses, not, and/or
MAX_IN_VALUES = 500
MAX_TEXT_CHARS = 200  # a string literal or a column name
MAX_LISTED_COLUMNS = 30  # how many column names an unknown-column refusal lists
OPERATORS = ("=", "!=", "<", "<=", ">", ">=")
ALLOWED = "use comparisons, and/or/not, in, between, is null"


class FilterInvalid(RequestInvalid):
    """A filter's text is refused; the message names what is wrong and ``field`` is ``"where"``."""


def _invalid(message: str) -> FilterInvalid:
    return FilterInvalid(message, field="where")


Value: TypeAlias = int | float | str


@dataclass(frozen=True)
class Compare:
    column: str
    op: str  # one of OPERATORS
    value: Value


@dataclass(frozen=True)
class InList:
    """``column in (values)``, or ``column not in (values)`` when ``negated``."""

    column: str
    values: tuple[Value, ...]
    negated: bool = False


@dataclass(frozen=True)
class Between:
    column: str
    low: Value
    high: Value  # both ends included


@dataclass(frozen=True)
class IsNull:
    column: str


@dataclass(frozen=True)
class Not:
    inner: Node


@dataclass(frozen=True)
class And:
    parts: tuple[Node, ...]


@dataclass(frozen=True)
class Or:
    parts: tuple[Node, ...]


@dataclass(frozen=True)
class Everything:
    """The empty filter: every row."""


Node: TypeAlias = Compare | InList | Between | IsNull | Not | And | Or | Everything


@dataclass(frozen=True)
class Filter:
    """A parsed filter: ``text`` is the tree written back canonically (``""`` for every row)."""

    text: str
    tree: Node

    def columns(self) -> tuple[str, ...]:
        """The column names the filter uses, sorted."""
        return tuple(sorted(set(column_names(self.tree))))


def column_names(tree: Node) -> Iterator[str]:
    """The column names in a tree, in the order they appear (repeats included)."""
    stack: list[Node] = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, And | Or):
            stack.extend(reversed(node.parts))
        elif isinstance(node, Not):
            stack.append(node.inner)
        elif not isinstance(node, Everything):
            yield node.column


def unknown_column_error(name: str, columns: Sequence[str]) -> FilterInvalid:
    """The refusal for a column the table does not have, listing (up to 30 of) those it has."""
    shown = ", ".join(str(column) for column in columns[:MAX_LISTED_COLUMNS])
    if len(columns) > MAX_LISTED_COLUMNS:
        shown += ", ..."
    listing = f"the columns are {shown}" if columns else "the table has no columns"
    return _invalid(f"unknown column {name!r} in the filter: {listing}")


def parse(text: str, columns: Sequence[str] | None = None) -> Filter:
    """Parse a filter's text (with ``columns``, it may use only those); refuses with :class:`FilterInvalid`."""
    if not isinstance(text, str):
        raise _invalid(f"the filter must be text, not {type(text).__name__}")
    if len(text) > MAX_QUERY_CHARS:
        raise _invalid(f"the filter is {len(text)} characters long; the limit is {MAX_QUERY_CHARS}")
    if not _check_tokens(text):
        return Filter("", Everything())
    tree = _Converter().condition(_parse_sql(text), 0)
    if columns is not None:
        known = set(columns)
        for name in column_names(tree):
            if name not in known:
                raise unknown_column_error(name, columns)
    return Filter(to_text(tree), tree)


# ---- reading the text: tokens first (cheap, iterative), then sqlglot's recursive parser ----

_PARSE_LOCK = threading.Lock()
_PARSE_FRAMES = 2500  # sqlglot's parser takes about 20 frames a level; 50 levels need more than the default 1000


def _check_tokens(text: str) -> bool:
    """Refuse what the tokens show (unreadable text, ``;``, unbalanced or deep nesting); False if none."""
    try:
        tokens: list[Token] = Tokenizer().tokenize(text)
    except TokenError as error:
        raise _invalid(f"the filter is not valid: {_short(str(error))} (is a quote left open?)") from None
    depth = 0  # of parentheses; deep not/- chains and the like end in sqlglot's RecursionError, caught
    for token in tokens:
        kind = token.token_type
        if kind == TokenType.SEMICOLON:
            raise _invalid("the filter is not valid: ';' is not allowed (a filter is one condition, not statements)")
        depth += 1 if kind == TokenType.L_PAREN else -1 if kind == TokenType.R_PAREN else 0
        if depth < 0:
            raise _invalid("the filter is not valid: a ')' has no matching '('")
        if depth > MAX_DEPTH:
            raise _too_deep()
    if depth > 0:
        raise _invalid("the filter is not valid: a '(' is never closed")
    return bool(tokens)


def _parse_sql(text: str) -> exp.Expr:
    with _PARSE_LOCK:  # one parse at a time, so that the raised recursion limit is put back reliably
        limit = sys.getrecursionlimit()
        sys.setrecursionlimit(limit + _PARSE_FRAMES)
        try:
            return sqlglot.condition(text)
        except (ParseError, TokenError) as error:
            raise _invalid(f"the filter is not valid: {_parse_reason(error)}") from None
        except RecursionError:
            raise _too_deep() from None
        finally:
            sys.setrecursionlimit(limit)


def _too_deep() -> FilterInvalid:
    return _invalid(f"the filter is nested too deeply: at most {MAX_DEPTH} levels of parentheses, not, and/or")


def _short(reason: str, limit: int = 200) -> str:
    reason = " ".join(reason.split())
    return reason if len(reason) <= limit else reason[: limit - 3] + "..."


def _parse_reason(error: ParseError | TokenError) -> str:
    errors = error.errors if isinstance(error, ParseError) else []
    if not errors:
        return _short(str(error))
    first = errors[0]
    description = str(first.get("description") or "")
    near = _short(str(first.get("highlight") or ""), 60)
    if description.startswith("Required keyword"):
        return f"something is missing after '{near}'"
    if description.startswith("Invalid expression") or not description:
        return f"unexpected '{near}'"
    description = re.sub(r"<class '(?:\w+\.)*(\w+)'>", r"\1", description)
    return _short(f"{description} near '{near}'")


# ---- sqlglot's tree to FLIP's ----

_COMPARISONS: dict[type[exp.Expr], str] = {exp.EQ: "=", exp.NEQ: "!=", exp.LT: "<", exp.LTE: "<=", exp.GT: ">"}
_COMPARISONS[exp.GTE] = ">="
_FLIPPED = {"=": "=", "!=": "!=", "<": ">", "<=": ">=", ">": "<", ">=": "<="}
_KINDS: dict[type[exp.Expr], str] = {exp.Like: "like", exp.ILike: "ilike", exp.Star: "*", exp.Is: "is null on a value"}
_KINDS |= {kind: f"arithmetic ({sign})" for kind, sign in ((exp.Add, "+"), (exp.Sub, "-"), (exp.Mul, "*"))}
_KINDS |= {exp.Div: "arithmetic (/)", exp.Mod: "arithmetic (%)"}
_KINDS |= {exp.Placeholder: "a placeholder", exp.Parameter: "a parameter", exp.Tuple: "a tuple", exp.Bracket: "[]"}
_KINDS |= {exp.DPipe: "||", exp.NullSafeEQ: "is not distinct from", exp.NullSafeNEQ: "is distinct from"}


def _refusal(node: exp.Expr) -> FilterInvalid:
    """The sentence for a node outside the allowlist."""
    if isinstance(node, exp.Query | exp.Subquery) or node.find(exp.Query) is not None:
        return _invalid("subqueries are not allowed in a filter")
    if isinstance(node, exp.Dot):
        return _dotted("")  # not node.sql(): sqlglot writes a long chain back recursively
    if isinstance(node, exp.Func):
        name = node.name if isinstance(node, exp.Anonymous) else node.sql_name().lower()
        return _invalid(f"function calls are not allowed in a filter ({_short(name, 40)})")
    kind = _KINDS.get(type(node), node.key)
    return _invalid(f"{kind} is not allowed in a filter; {ALLOWED}")


def _dotted(text: str) -> FilterInvalid:
    return _invalid(
        f"column names only, no table.column{f' ({_short(text, 60)})' if text else ''}: "
        'write the column alone, in double quotes if its name holds a dot ("a.b")'
    )


def _unparen(node: exp.Expr) -> exp.Expr:
    while isinstance(node, exp.Paren):
        node = node.this
    return node


def _only(node: exp.Expr, *allowed: str) -> None:
    # the allowlist covers a node's arguments too: refuse any FLIP does not read
    extra = [key for key, value in node.args.items() if value not in (None, False, []) and key not in allowed]
    if extra:
        raise _invalid(f"{node.key} with {', '.join(extra)} is not allowed in a filter; {ALLOWED}")


def _column(node: exp.Expr) -> str | None:
    """The column's name when ``node`` is a plain column, else None."""
    node = _unparen(node)
    if not isinstance(node, exp.Column):
        return None
    if node.args.get("table") or node.args.get("db") or node.args.get("catalog"):
        raise _dotted(".".join(part.name for part in node.parts))
    _only(node, "this")
    identifier = node.this
    if not isinstance(identifier, exp.Identifier):
        raise _refusal(identifier)
    _only(identifier, "this", "quoted")
    name = str(identifier.this)
    if not name:
        raise _invalid("a column name in the filter is empty")
    if name.startswith("__"):
        raise _invalid(f"names starting with '__' are not allowed in a filter ({_short(name, 60)})")
    if len(name) > MAX_TEXT_CHARS:
        raise _invalid(f"a column name in the filter is longer than {MAX_TEXT_CHARS} characters")
    return name


def _number(text: str) -> int | float:
    if not re.fullmatch(r"(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?", text):
        raise _invalid(f"the filter is not valid: {_short(text, 40)!r} is not a number")
    value: int | float = int(text) if text.isdigit() else float(text)
    if not abs(value) < 1e300:  # exact for any int, and False for inf
        raise _invalid(f"the number {_short(text, 40)} in the filter is too large")
    return value


def _value(node: exp.Expr) -> Value:
    """A literal: a number (``-`` allowed), a single-quoted string, or true/false as 1/0."""
    signs, node = 0, _unparen(node)
    while isinstance(node, exp.Neg):
        signs, node = signs + 1, _unparen(node.this)
    if signs > MAX_DEPTH:
        raise _too_deep()
    negative = signs % 2 == 1
    if isinstance(node, exp.Literal) and node.is_string:
        if negative:
            raise _invalid("a minus sign goes only before a number, not before text")
        text = str(node.this)
        if len(text) > MAX_TEXT_CHARS:
            raise _invalid(f"a text value in the filter is longer than {MAX_TEXT_CHARS} characters")
        return text
    if isinstance(node, exp.Literal | exp.Boolean):
        number = _number(str(node.this)) if isinstance(node, exp.Literal) else int(bool(node.this))
        return -number if negative else number
    if isinstance(node, exp.Null):
        raise _invalid("null is not a value to compare with: write 'x is null' or 'x is not null'")
    if _column(node) is not None:
        raise _invalid("a column cannot stand where a value is expected here; values are numbers or 'text'")
    if type(node) in _COMPARISONS or isinstance(node, exp.Connector | exp.Not | exp.In | exp.Between):
        raise _invalid("a condition cannot stand where a value is expected; compare a column with a value")
    raise _refusal(node)


class _Converter:
    """One conversion: counts the nodes it makes, refusing past :data:`MAX_NODES`."""

    def __init__(self) -> None:
        self.nodes = 0

    def condition(self, node: exp.Expr, depth: int) -> Node:
        if depth > MAX_DEPTH:
            raise _too_deep()
        self.nodes += 1
        if self.nodes > MAX_NODES:
            raise _invalid(f"the filter has more than {MAX_NODES} conditions and operators; simplify it")
        node = _unparen(node)
        if isinstance(node, exp.And | exp.Or):
            parts = tuple(self.condition(part, depth + 1) for part in _flatten(node))
            return And(parts) if isinstance(node, exp.And) else Or(parts)
        if isinstance(node, exp.Not):
            inner = _unparen(node.this)
            if isinstance(inner, exp.In):
                listed = self.in_list(inner)
                return InList(listed.column, listed.values, not listed.negated)
            return Not(self.condition(inner, depth + 1))
        if type(node) in _COMPARISONS:
            return self.compare(node, _COMPARISONS[type(node)])
        if isinstance(node, exp.In):
            return self.in_list(node)
        if isinstance(node, exp.Between):
            return self.between(node)
        if isinstance(node, exp.Is):
            return self.is_null(node)
        name = _column(node)
        if name is not None:
            raise _invalid(f"a column on its own is not a condition ({name}); compare it with a value, e.g. {name} = 1")
        if isinstance(node, exp.Literal | exp.Boolean | exp.Neg):
            raise _invalid("a value on its own is not a condition; compare a column with it, e.g. age > 50")
        raise _refusal(node)

    def compare(self, node: exp.Expr, op: str) -> Compare:
        left, right = _column(node.this), _column(node.expression)
        if left is not None and right is not None:
            raise _invalid(
                f"a comparison of two columns ({left} {op} {right}) is not allowed; compare a column with a value"
                " (text goes in single quotes: 'text')"
            )
        if left is not None:
            return Compare(left, op, _value(node.expression))
        if right is not None:
            return Compare(right, _FLIPPED[op], _value(node.this))
        _value(node.this)  # these refuse a side that is neither a column nor a value
        _value(node.expression)
        raise _invalid(f"a comparison of two values ({op}) is not allowed; compare a column with a value")

    def in_list(self, node: exp.In) -> InList:
        if node.args.get("query") is not None:
            raise _invalid("subqueries are not allowed in a filter")
        _only(node, "this", "expressions")
        column = _column(node.this)
        if column is None:
            raise _invalid("in needs a column on its left, e.g. cp in (1, 2)")
        values = node.expressions
        if not values:
            raise _invalid(f"the in list after {column} is empty; give at least one value, e.g. {column} in (1, 2)")
        if len(values) > MAX_IN_VALUES:
            raise _invalid(f"an in list holds at most {MAX_IN_VALUES} values; this one holds {len(values)}")
        return InList(column, tuple(_value(value) for value in values))

    def between(self, node: exp.Between) -> Between:
        _only(node, "this", "low", "high")
        column = _column(node.this)
        if column is None:
            raise _invalid("between needs a column on its left, e.g. age between 40 and 60")
        low, high = _value(node.args["low"]), _value(node.args["high"])
        if isinstance(low, str) != isinstance(high, str):
            raise _invalid(f"between needs two numbers or two texts, not {to_value_text(low)}, {to_value_text(high)}")
        return Between(column, low, high)

    def is_null(self, node: exp.Is) -> Node:
        _only(node, "this", "expression", "negate")
        column = _column(node.this)
        if column is None:
            raise _invalid("is null needs a column on its left, e.g. chol is null")
        if not isinstance(node.expression, exp.Null):
            raise _invalid(f"is goes only with null: write {column} is null or {column} is not null (= for values)")
        return Not(IsNull(column)) if node.args.get("negate") else IsNull(column)


def _flatten(node: exp.Expr) -> list[exp.Expr]:
    """The operands of a chain of the same connector (``a and (b and c)``: a, b, c), without recursion."""
    kind = type(node)
    parts: list[exp.Expr] = []
    stack = [node]
    while stack:
        current = _unparen(stack.pop())
        if type(current) is kind:
            stack.extend((current.expression, current.this))
        else:
            parts.append(current)
    return parts


# ---- FLIP's tree back to text (canonical: parse(to_text(tree)).tree == tree for parsed trees) ----


def to_text(tree: Node) -> str:
    """The tree written as filter text, with the fewest spellings: lower case, one space, ``!=``."""
    if isinstance(tree, Everything):
        return ""
    if isinstance(tree, Compare):
        return f"{_identifier(tree.column)} {tree.op} {to_value_text(tree.value)}"
    if isinstance(tree, InList):
        values = ", ".join(to_value_text(value) for value in tree.values)
        return f"{_identifier(tree.column)} {'not in' if tree.negated else 'in'} ({values})"
    if isinstance(tree, Between):
        low, high = to_value_text(tree.low), to_value_text(tree.high)
        return f"{_identifier(tree.column)} between {low} and {high}"
    if isinstance(tree, IsNull):
        return f"{_identifier(tree.column)} is null"
    if isinstance(tree, Not):
        if isinstance(tree.inner, IsNull):
            return f"{_identifier(tree.inner.column)} is not null"
        return f"not ({to_text(tree.inner)})"
    parts = (f"({to_text(part)})" if isinstance(part, And | Or) else to_text(part) for part in tree.parts)
    return (" and " if isinstance(tree, And) else " or ").join(parts)


def to_value_text(value: Value) -> str:
    """A literal as filter text: ``'text'`` (quotes doubled) or a number."""
    if isinstance(value, str):
        return "'" + value.replace("'", "''") + "'"
    return repr(value)


@lru_cache(maxsize=1024)
def _identifier(name: str) -> str:
    """A column name bare when it reads back as itself, else in double quotes."""
    if re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
        try:
            read = sqlglot.condition(f"{name} = 1")
        except (ParseError, TokenError):
            read = None
        column = read.this if isinstance(read, exp.EQ) else None
        if isinstance(column, exp.Column) and not column.table and column.name == name and not column.this.quoted:
            return name
    return '"' + name.replace('"', '""') + '"'


__all__ = [
    "And",
    "Between",
    "Compare",
    "Everything",
    "Filter",
    "FilterInvalid",
    "InList",
    "IsNull",
    "MAX_DEPTH",
    "MAX_IN_VALUES",
    "MAX_NODES",
    "Node",
    "Not",
    "OPERATORS",
    "Or",
    "Value",
    "column_names",
    "parse",
    "to_text",
    "to_value_text",
    "unknown_column_error",
]
