"""The cohort filter language: what it parses into, its canonical text, and every refusal."""

from __future__ import annotations

import pickle
import random

import pytest

from flip_core import filters
from flip_core.filters import (
    OPERATORS,
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
    parse,
    to_text,
)
from flip_core.query import MAX_QUERY_CHARS

HEART = ["age", "sex", "cp", "trestbps", "chol", "fbs", "restecg", "thalach", "exang", "oldpeak"]


def refusal(text: str, columns: list[str] | None = None) -> str:
    with pytest.raises(FilterInvalid) as caught:
        parse(text, columns)
    error = caught.value
    assert error.field == "where" and error.status == 400
    message = str(error)
    assert "\n" not in message and "Traceback" not in message and "sqlglot" not in message
    return message


def test_the_example_filters_become_flips_own_tree() -> None:
    first = parse("age > 50 and sex = 1 and chol is not null")
    assert first.tree == And((Compare("age", ">", 50), Compare("sex", "=", 1), Not(IsNull("chol"))))
    assert first.text == "age > 50 and sex = 1 and chol is not null"
    assert first.columns() == ("age", "chol", "sex")
    second = parse("cp in (1, 2) and not (trestbps between 100 and 140)")
    assert second.tree == And((InList("cp", (1, 2)), Not(Between("trestbps", 100, 140))))
    assert second.columns() == ("cp", "trestbps")


@pytest.mark.parametrize(
    ("text", "tree"),
    [
        ("50 < age", Compare("age", ">", 50)),
        ("1 >= age", Compare("age", "<=", 1)),
        ("0 = sex", Compare("sex", "=", 0)),
        ("age <> 3", Compare("age", "!=", 3)),
        ("age != 3", Compare("age", "!=", 3)),
        ("oldpeak > -1.5", Compare("oldpeak", ">", -1.5)),
        ("oldpeak > - - 2", Compare("oldpeak", ">", 2)),
        ("oldpeak < 1.5e3", Compare("oldpeak", "<", 1500.0)),
        ("fbs = true", Compare("fbs", "=", 1)),
        ("fbs = FALSE", Compare("fbs", "=", 0)),
        ("name = 'it''s'", Compare("name", "=", "it's")),
        ('"my col" = 1', Compare("my col", "=", 1)),
        ("Age = 1", Compare("Age", "=", 1)),
        ('"Age" = 1', Compare("Age", "=", 1)),
        ("(age) = (1)", Compare("age", "=", 1)),
        ("cp not in (1, 'a')", InList("cp", (1, "a"), negated=True)),
        ("not (cp in (3))", InList("cp", (3,), negated=True)),
        ("age between -1 and 2", Between("age", -1, 2)),
        ("age not between 1 and 2", Not(Between("age", 1, 2))),
        ("chol IS NULL", IsNull("chol")),
        ("a = 1 or b = 2 or c = 3", Or((Compare("a", "=", 1), Compare("b", "=", 2), Compare("c", "=", 3)))),
        ("a = 1 and (b = 2 and c = 3)", And((Compare("a", "=", 1), Compare("b", "=", 2), Compare("c", "=", 3)))),
        ("a = 1 or b = 2 and c = 3", Or((Compare("a", "=", 1), And((Compare("b", "=", 2), Compare("c", "=", 3)))))),
        ("not not a = 1", Not(Not(Compare("a", "=", 1)))),
        ("age > 1 -- older than one", Compare("age", ">", 1)),
    ],
)
def test_parses_into(text: str, tree: object) -> None:
    assert parse(text).tree == tree


@pytest.mark.parametrize(
    ("text", "canonical"),
    [
        ("AGE>50 AND sex=1", "AGE > 50 and sex = 1"),
        ("50 < age", "age > 50"),
        ("age <> 3", "age != 3"),
        ("cp NOT IN (1,2)", "cp not in (1, 2)"),
        ("not (cp in (1))", "cp not in (1)"),
        ("(a = 1 or b = 2) and c = 3", "(a = 1 or b = 2) and c = 3"),
        ("a = 1 or b = 2 and c = 3", "a = 1 or (b = 2 and c = 3)"),
        ("not x is null", "x is not null"),
        ("not (x between 1 and 2)", "not (x between 1 and 2)"),
        ("x = true", "x = 1"),
        ("x = 1e22", "x = 1e+22"),
        ("x = .5", "x = 0.5"),
        ("\"my col\" = 'a''b'", "\"my col\" = 'a''b'"),
        ("x = 'back\\slash'", "x = 'back\\slash'"),
        ('"select" = 1', '"select" = 1'),
        ('"true" = 1', '"true" = 1'),
        ('"current_date" = 1', '"current_date" = 1'),
        ('"a""b" = 1', '"a""b" = 1'),
        ('"a.b" = 1', '"a.b" = 1'),
        ("left = 1", "left = 1"),
    ],
)
def test_canonical_text_round_trips(text: str, canonical: str) -> None:
    parsed = parse(text)
    assert parsed.text == canonical
    again = parse(parsed.text)
    assert again == parsed and again.text == canonical and to_text(again.tree) == canonical


@pytest.mark.parametrize("text", ["", "   ", "\n\t", "-- only a comment"])
def test_an_empty_filter_is_every_row(text: str) -> None:
    assert parse(text) == Filter("", Everything())
    assert parse(text).columns() == ()


def test_known_columns_pass_and_an_unknown_one_is_named_with_the_list() -> None:
    assert parse("age > 50 and sex = 1", HEART).columns() == ("age", "sex")
    message = refusal("agee > 50", HEART)
    assert message == f"unknown column 'agee' in the filter: the columns are {', '.join(HEART)}"
    assert "unknown column 'Age'" in refusal("Age > 50", HEART)  # names are case-sensitive
    many = [f"c{i}" for i in range(40)]
    message = refusal("c99 = 1", many)
    assert message.endswith("c28, c29, ...") and "c30" not in message


def test_an_error_pickles_with_its_field() -> None:
    with pytest.raises(FilterInvalid) as caught:
        parse("lower(age) > 1")
    back = pickle.loads(pickle.dumps(caught.value))
    assert type(back) is FilterInvalid and str(back) == str(caught.value) and back.field == "where"


@pytest.mark.parametrize(
    ("text", "named"),
    [
        ("a.b > 1", "no table.column (a.b)"),
        ("a.b.c.d.e = 1", "no table.column"),
        ("t.* = 1", "no table.column"),
        ("lower(age) > 1", "function calls are not allowed in a filter (lower)"),
        ("__import__('os')", "function calls are not allowed in a filter (__import__)"),
        ("exec('x') = 1", "function calls are not allowed in a filter (exec)"),
        ("age::int = 1", "function calls are not allowed in a filter (cast)"),
        ("current_date = 1", "function calls are not allowed in a filter (current_date)"),
        ("__class__ > 1", "names starting with '__' are not allowed in a filter (__class__)"),
        ('"__dict__" = 1', "names starting with '__'"),
        ("(select 1) = 1", "subqueries are not allowed"),
        ("age > (select max(age) from t)", "subqueries are not allowed"),
        ("age in (select age from t)", "subqueries are not allowed"),
        ("exists(select 1)", "subqueries are not allowed"),
        ("age + 1 > 2", "arithmetic (+) is not allowed in a filter; use comparisons, and/or/not, in, between, is null"),
        ("age * 2 > 2", "arithmetic (*) is not allowed"),
        ("name like 'a%'", "like is not allowed in a filter; use comparisons"),
        ("* > 1", "* is not allowed in a filter"),
        ("age = ?", "a placeholder is not allowed"),
        ("age = :value", "a placeholder is not allowed"),
        ("age = @value", "a parameter is not allowed"),
        ("age is not distinct from 1", "is not distinct from is not allowed"),
        ("age > 1; drop table x", "';' is not allowed"),
        ("(age > 1", "the filter is not valid: a '(' is never closed"),
        ("age > 1)", "the filter is not valid: a ')' has no matching '('"),
        ("age > 1 and", "the filter is not valid: something is missing after 'and'"),
        ("age = 'open", "the filter is not valid"),
        ("age = 0x10", "the filter is not valid"),
        ("age in ()", "the in list after age is empty"),
        ("age in (1, (2, 3))", "a tuple is not allowed"),
        ("age = null", "null is not a value to compare with"),
        ("age in (1, null)", "null is not a value to compare with"),
        ("age is true", "is goes only with null"),
        ("age", "a column on its own is not a condition (age)"),
        ("not age", "a column on its own is not a condition (age)"),
        ("true", "a value on its own is not a condition"),
        ("age > 1 and 1", "a value on its own is not a condition"),
        ("1 = 1", "a comparison of two values (=) is not allowed"),
        ("age = sex", "a comparison of two columns (age = sex) is not allowed"),
        ('name = "Bob"', "text goes in single quotes"),
        ("name = -'a'", "a minus sign goes only before a number"),
        ("age between 1 and 'z'", "between needs two numbers or two texts"),
        ("age = 1e999", "the number 1e999 in the filter is too large"),
        ('"" = 1', "a column name in the filter is empty"),
        ("name = '" + "x" * 201 + "'", "a text value in the filter is longer than 200 characters"),
        ("cp in (" + ", ".join(["1"] * 501) + ")", "an in list holds at most 500 values; this one holds 501"),
        (" or ".join(["age = 1"] * 201), "more than 200 conditions and operators"),
        ("(" * 51 + "age = 1" + ")" * 51, "nested too deeply"),
        ("not " * 60 + "age = 1", "nested too deeply"),
        ("age = " + "- " * 60 + "1", "nested too deeply"),
        ("age = " + "case when " * 390, "nested too deeply"),  # no parentheses: sqlglot recurses anyway
    ],
)
def test_hostile_or_foreign_input_is_refused_by_name(text: str, named: str) -> None:
    assert named in refusal(text)


def test_a_parse_error_reason_is_short() -> None:
    message = refusal("age = 1 order by " + "x, " * 600 + "y")
    assert message.startswith("the filter is not valid: ") and len(message) <= len("the filter is not valid: ") + 200


def test_nesting_up_to_the_limit_parses() -> None:
    assert parse("(" * 50 + "age = 1" + ")" * 50).tree == Compare("age", "=", 1)
    fifty = parse("not " * 50 + "age = 1")
    assert fifty.text == "not (" * 50 + "age = 1" + ")" * 50 and parse(fifty.text) == fifty
    assert "nested too deeply" in refusal("not " * 51 + "age = 1")
    assert parse("age = " + "- " * 50 + "1").tree == Compare("age", "=", 1)
    deep = "age = 1"
    for _ in range(24):
        deep = f"not ({deep})"
    tree = parse(deep).tree
    for _ in range(24):
        assert isinstance(tree, Not)
        tree = tree.inner
    assert tree == Compare("age", "=", 1)


def test_a_long_text_is_refused_before_it_is_read(monkeypatch: pytest.MonkeyPatch) -> None:
    def unread(text: str) -> None:
        raise AssertionError("a text over the limit was read")

    with monkeypatch.context() as patched:  # neither the tokenizer nor the parser sees it
        patched.setattr(filters, "_check_tokens", unread)
        patched.setattr(filters, "_parse_sql", unread)
        message = refusal("age > 1 and " * 90_000)
    assert message == f"the filter is {len('age > 1 and ' * 90_000)} characters long; the limit is {MAX_QUERY_CHARS}"
    assert "characters long" in refusal("x" * 1_000_000)
    assert parse("age = '" + "a" * 190 + "'" + " " * (MAX_QUERY_CHARS - 198)).columns() == ("age",)


def test_a_filter_that_is_not_text_is_refused() -> None:
    assert "the filter must be text" in refusal(None)  # type: ignore[arg-type]


NAMES = ["age", "Age", "my col", "a.b", 'q"uote', "select", "true", "null", "é", "left", "current_date", "1abc"]
VALUES: list[Value] = [0, -7, 1000, 0.5, -2.25, 1e22, 1.5e-7, "", "it's", "a\\b", "é", "x y", "--", "/*", "\n"]


def _random_leaf(rng: random.Random) -> Node:
    column, kind = rng.choice(NAMES), rng.randrange(4)
    if kind == 0:
        return Compare(column, rng.choice(OPERATORS), rng.choice(VALUES))
    if kind == 1:
        return InList(column, tuple(rng.choice(VALUES) for _ in range(rng.randint(1, 4))), rng.random() < 0.5)
    if kind == 2 and rng.random() < 0.5:
        return Between(column, rng.randint(-5, 5), rng.uniform(-5, 5))
    if kind == 2:
        return Between(column, "a", "b")
    return IsNull(column)


def _random_tree(rng: random.Random, depth: int = 0) -> Node:
    """A tree in the form parse gives: and/or flattened, not over an in list folded into it."""
    kind = rng.randrange(5) if depth < 4 else 0
    if kind <= 1:
        return _random_leaf(rng)
    if kind == 2:
        inner = _random_tree(rng, depth + 1)
        return inner if isinstance(inner, InList) else Not(inner)
    connector = And if kind == 3 else Or
    parts: list[Node] = []
    for _ in range(rng.randint(2, 3)):
        part = _random_tree(rng, depth + 1)
        parts.extend(part.parts if isinstance(part, connector) else [part])
    return connector(tuple(parts))


def test_any_tree_written_as_text_parses_back_to_itself() -> None:
    rng = random.Random(20240611)
    for _ in range(1500):
        tree = _random_tree(rng)
        assert parse(to_text(tree)).tree == tree, to_text(tree)


FRAGMENTS = ["age", '"my col"', "a.b", "(", ")", "and", "or", "not", "in", "between", "is", "null", "true", "=", "<>"]
FRAGMENTS += ["<", ">=", "1", "-", "2.5", "'x'", "'it''s'", ",", "+", "*", "like", "select", "from", "lower(", "case"]
FRAGMENTS += ["when", "end", ";", "?", ":a", "@b", "::", "[", "]", "1e5", "__y", "exists", "cast(", "||", "'", '"']
FRAGMENTS += ["--", "/*", "*/", "$1", "{", "\\", "\x00"]


def test_random_fragments_either_parse_canonically_or_are_refused_as_filter_errors() -> None:
    rng = random.Random(7)
    parsed = 0
    for _ in range(3000):
        text = " ".join(rng.choice(FRAGMENTS) for _ in range(rng.randint(1, 12)))
        try:
            result = parse(text)
        except FilterInvalid as error:
            assert "\n" not in str(error) and len(str(error)) < 400, text
            continue
        parsed += 1
        assert parse(result.text) == result, text
    assert parsed > 0
