"""A parsed cohort filter applied to a site's own table: a boolean row mask, computed column-wise.

The filter's tree comes from ``flip_core.filters`` (text parsed, never evaluated); this module
checks it against the table's columns and dtypes first, refusing a mismatch with a sentence,
and then computes the mask with numpy and pandas vector operations only. Missing values follow
SQL's three-valued logic: a comparison with a missing value is unknown, ``not`` of unknown is
unknown, and a row is kept only where the whole condition is true. So ``not (age > 50)`` drops
rows whose age is missing, while ``age is null`` keeps them.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from typing import Any

import numpy as np
import numpy.typing as npt
import pandas as pd
from pandas.api import types as ptypes

from flip_core.filters import (
    And,
    Between,
    Compare,
    Everything,
    Filter,
    FilterInvalid,
    InList,
    IsNull,
    Node,
    Not,
    Or,
    Value,
    column_names,
    to_value_text,
    unknown_column_error,
)

Mask = npt.NDArray[np.bool_]
Truth = tuple[Mask, Mask]  # (true, known): where the condition is true, and where it is not unknown

_OPERATORS: dict[str, Callable[[Any, Any], Any]] = {
    "=": operator.eq,
    "!=": operator.ne,
    "<": operator.lt,
    "<=": operator.le,
    ">": operator.gt,
    ">=": operator.ge,
}
_ORDERING = {"<", "<=", ">", ">="}
NUMBER, TEXT = "number", "text"


def mask(filter: Filter, table: pd.DataFrame) -> Mask:
    """The rows of ``table`` where ``filter`` is true (a bool array, one per row).

    Raises :class:`FilterInvalid` when the filter names a column the table lacks or compares a
    column with a value of the wrong kind; nothing is computed before that check passes.
    """
    check(filter, table)
    true, _known = _truth(filter.tree, table)
    return true


def check(filter: Filter, table: pd.DataFrame) -> None:
    """Refuse a filter that does not fit the table: unknown columns, or values of the wrong kind."""
    for name in column_names(filter.tree):
        _series(table, name)  # every unknown column is refused before any value is looked at
    stack: list[Node] = [filter.tree]
    while stack:
        node = stack.pop()
        if isinstance(node, And | Or):
            stack.extend(node.parts)
        elif isinstance(node, Not):
            stack.append(node.inner)
        elif isinstance(node, Compare | InList | Between):
            kind = column_kind(_series(table, node.column))
            if isinstance(node, Compare):
                _check_value(node.column, kind, node.value, ordered=node.op in _ORDERING)
            for value in node.values if isinstance(node, InList) else ():
                _check_value(node.column, kind, value, ordered=False)
            for value in (node.low, node.high) if isinstance(node, Between) else ():
                _check_value(node.column, kind, value, ordered=True)


def column_kind(series: pd.Series) -> str:
    """``"number"`` (numeric or boolean dtype), ``"text"`` (object, string, category), else the dtype's name."""
    dtype = series.dtype
    if ptypes.is_bool_dtype(dtype) or (ptypes.is_numeric_dtype(dtype) and not ptypes.is_complex_dtype(dtype)):
        return NUMBER
    if ptypes.is_object_dtype(dtype) or ptypes.is_string_dtype(dtype) or isinstance(dtype, pd.CategoricalDtype):
        return TEXT
    return str(dtype)


def _series(table: pd.DataFrame, name: str) -> pd.Series:
    matches = int(np.count_nonzero(table.columns == name))
    if matches == 0:
        raise unknown_column_error(name, [str(column) for column in table.columns])
    if matches > 1:
        raise FilterInvalid(f"column {name!r} appears {matches} times in the table; a filter needs one", field="where")
    return table[name]


def _check_value(name: str, kind: str, value: Value, ordered: bool) -> None:
    if kind == NUMBER and isinstance(value, str):
        raise FilterInvalid(f"column {name!r} holds numbers; {to_value_text(value)} is text", field="where")
    if kind == TEXT and ordered and not isinstance(value, str):
        raise FilterInvalid(
            f"column {name!r} holds text; {value!r} is a number, and text is ordered only against text:"
            f" quote it ('{value!r}') or use =, != or in",
            field="where",
        )
    if kind not in (NUMBER, TEXT):
        raise FilterInvalid(
            f"column {name!r} holds {kind} values; a filter compares numbers and text only (is null works on any)",
            field="where",
        )


def _truth(node: Node, table: pd.DataFrame) -> Truth:
    """Kleene logic over (true, known) pairs; a row is false where it is known and not true."""
    if isinstance(node, Everything):
        everywhere = np.ones(len(table), dtype=bool)
        return everywhere, everywhere
    if isinstance(node, Not):
        true, known = _truth(node.inner, table)
        return known & ~true, known
    if isinstance(node, And | Or):
        conjunction = isinstance(node, And)  # and: true if all are, false if any is; or: the other way round
        true, false = np.full(len(table), conjunction), np.full(len(table), not conjunction)
        for part in node.parts:
            part_true, part_known = _truth(part, table)
            if conjunction:
                true, false = true & part_true, false | (part_known & ~part_true)
            else:
                true, false = true | part_true, false & (part_known & ~part_true)
        return true, true | false
    series = _series(table, node.column)
    missing = series.isna().to_numpy(dtype=bool)
    if isinstance(node, IsNull):
        return missing, np.ones(len(table), dtype=bool)
    known = ~missing
    return _leaf(node, series) & known, known


def _leaf(node: Compare | InList | Between, series: pd.Series) -> Mask:
    """Where a comparison holds, for the rows with a value (missing rows are masked off after)."""
    number = column_kind(series) == NUMBER
    if isinstance(node, Compare):
        if number:
            return _compare(_numbers(series), node.op, node.value)
        if isinstance(node.value, str):
            return _compare(_texts(series), node.op, node.value)
        equal = _compare(_as_numbers(series), "=", node.value)  # a text column's values that are this number
        return equal if node.op == "=" else ~equal
    if isinstance(node, Between):
        values = _numbers(series) if number else _texts(series)
        return _compare(values, ">=", node.low) & _compare(values, "<=", node.high)
    found = _isin(series, node.values, number)
    return ~found if node.negated else found


def _isin(series: pd.Series, values: tuple[Value, ...], number: bool) -> Mask:
    numbers = [value for value in values if not isinstance(value, str)]
    texts = [value for value in values if isinstance(value, str)]
    if number:
        return np.isin(_numbers(series), numbers)
    found = np.zeros(len(series), dtype=bool)
    if texts:
        found |= series.astype("string").isin(texts).to_numpy(dtype=bool, na_value=False)
    if numbers:
        found |= np.isin(_as_numbers(series), numbers)
    return found


def _compare(values: Any, op: str, value: Value) -> Mask:
    with np.errstate(invalid="ignore"):
        result = _OPERATORS[op](values, value)
    if isinstance(result, pd.Series):  # pandas strings answer with a nullable boolean
        return result.to_numpy(dtype=bool, na_value=False)
    return np.asarray(result, dtype=bool)


def _numbers(series: pd.Series) -> Any:
    """A numeric column as a numpy array (nullable dtypes as float64 with NaN)."""
    if isinstance(series.dtype, np.dtype) and series.dtype.kind in "biuf":
        return series.to_numpy()
    return series.to_numpy(dtype="float64", na_value=np.nan)


def _texts(series: pd.Series) -> pd.Series:
    """A text column's values as pandas strings (non-string values by their text)."""
    return series.astype(object).astype("string")


def _as_numbers(series: pd.Series) -> Any:
    """A text column's values read as numbers, NaN where a value is not one."""
    numeric = pd.to_numeric(series.astype(object), errors="coerce")
    return pd.Series(numeric).to_numpy(dtype="float64", na_value=np.nan)


__all__ = ["NUMBER", "TEXT", "check", "column_kind", "mask"]
