"""The automatic checks a site admin reads beside an item a researcher asked to release through the airlock.

Human output checking, as in the UK's trusted research environments (OpenSAFELY, SACRO): a person decides, these
checks say where to look. They follow the rule set of ACRO, SACRO's checker, at its default risk appetite: a
threshold of 10; n-k dominance with n = 2, k = 0.9 (the largest 2 contributions make up over 90% of a total); the
p-ratio with p = 10% (all but the largest 2 add up to under 10% of the largest); zeros flagged as possibly
disclosive. ``acro`` itself is not used (it pins pandas<=2.3.3, and this project runs pandas 3): the code is our own.

Text is split into tokens once, with each token's lines, so that the site's values (up to some 100,000 identifiers)
are looked up in a set, never searched for one by one. A detail is one sentence of at most 300 characters; it is
stored in the audit log, so it quotes no identifier, NHS number, date or value (it gives their lines), only a path.

Pure functions over data: numpy, pandas, re; no I/O.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

MAX_DETAIL = 300
SHOWN = 5  # cells, columns or line numbers a detail names before "and N more"
TAIL_ROWS = 20  # below this many values a 5% tail holds less than one row
SPAN = 6  # the most tokens one looked-for value may hold

_COMPOUND = re.compile(r"[^\W_]+(?:[._-][^\W_]+)*")
_SEPARATOR = re.compile(r"([_-]|(?<!\d)\.|\.(?!\d))")  # not a decimal point
_NHS = re.compile(r"(?<![\w.])(\d{3})([ -]?)(\d{3})\2(\d{4})(?!\w|\.\d)")
_DAY = r"(?:0?[1-9]|[12]\d|3[01])"
_MONTH = r"(?:jan|feb|mar|apr|may|jun|jul|aug|sep|oct|nov|dec)[a-z]{0,6}\.?"
_DATE = re.compile(
    rf"(?<!\d)\d{{4}}[-/](?:0[1-9]|1[0-2])[-/](?:0[1-9]|[12]\d|3[01])(?!\d)"  # 2024-03-01, 2024-03-01T09:30
    rf"|(?<![\d.])(?:{_DAY}[/.-]){{2}}(?:19|20)\d\d(?!\d)"  # 01/03/2024, 1.3.2024, 03/15/2024
    rf"|(?<!\d){_DAY}(?:st|nd|rd|th)?[ -]{_MONTH}[ -](?:\d{{4}}|\d\d)(?!\d)"  # 1 March 2024, 01-Mar-24
    rf"|(?<![a-z]){_MONTH} {_DAY}(?:st|nd|rd|th)?,? \d{{4}}(?!\d)",  # March 1, 2024
    re.IGNORECASE,
)
_PATH = re.compile(
    r"(?<![\w.:/\\-])~?(?:/[\w.@%+~-]+){2,}/?"  # /data/site/x.csv, not a URL's nor a relative path's tail
    r"|(?<!\w)[A-Za-z]:\\[^\s\"'<>|*?:]+|\\\\[\w.$-]+\\[^\s\"'<>|*?:]+"  # C:\data\x.csv, \\server\share
)
_FRAME = re.compile(r"^\s*(?:File \".*\", line \d+|Cell In\[\d+\], line \d+)|Traceback \(most recent call last\)")
_LOCAL = re.compile(r"^(?: {4,}|[\s│┃|]*[│┃|] +)(?:global )?[A-Za-z_][\w.]* = \S")
_DATA_MARK = re.compile(r"(?<![\w.])(?:array|tensor)\(\[|(?:^|,\s)dtype: \w|^\[\d+ rows x \d+ columns\]")
_ROW = re.compile(r"^\s*\S+(?: {2,}\S+)+\s*$")
# what can hide or rewrite text on the admin's terminal: escape sequences, carriage returns, backspaces, bidirectional
# overrides, zero-width characters (tab and newline are text)
_CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u200b-\u200f\u2028-\u202e\u2060-\u2069\ufeff]")
_NUMBER = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?|NaN|nan|<NA>|None")


@dataclass(frozen=True)
class Check:
    """One rule's finding: its fixed name, whether it passed, a sentence for the site admin on what and where."""

    name: str
    passed: bool
    detail: str


def _verdict(name: str, failure: str, passing: str) -> Check:
    """A failed check saying ``failure``, or where that is empty a passed one saying ``passing``, cut to size."""
    detail = failure or passing
    return Check(name, not failure, detail if len(detail) <= MAX_DETAIL else detail[: MAX_DETAIL - 1] + "…")


def _listing(items: Sequence[str], word: str = "", total: int | None = None) -> str:
    """``a, b and c``; past ``SHOWN`` items, ``a, b, c, d, e and 3 more`` (of ``total``, if not ``len(items)``);
    ``word`` goes before the list, plural where the items are."""
    total = len(items) if total is None else total
    shown = list(items[:SHOWN]) + ([f"{total - min(len(items), SHOWN)} more"] if total > SHOWN else [])
    listed = ", ".join(shown[:-1]) + " and " + shown[-1] if len(shown) > 1 else "".join(shown)
    return f"{word}{'s' if total > 1 else ''} {listed}" if word else listed


def _lines(numbers: Collection[int]) -> str:
    """``line 3`` or ``lines 3, 7 and 9`` (sorted, each once)."""
    return _listing([str(n) for n in sorted(set(numbers))], "line")


def _plural(count: int, word: str) -> str:
    return f"{count} {word}{'' if count == 1 else 's'}"


def _cell(table: pd.DataFrame, position: int) -> str:
    """A cell's labels: its index (unless a plain row number) and its other columns, as ``name=value``."""
    parts: list[str] = []
    index = table.index
    if not (isinstance(index, pd.RangeIndex) and index.name is None):
        keys = index[position] if isinstance(index[position], tuple) else (index[position],)
        parts += [str(k) if name is None else f"{name}={k}" for name, k in zip(index.names, keys, strict=False)]
    parts += [f"{column}={table.iloc[position][column]}" for column in table.columns if column != "count"]
    label = ", ".join(parts) or f"row {position + 1}"
    return label if len(label) <= 40 else label[:39] + "…"


def count_checks(table: pd.DataFrame, threshold: int) -> list[Check]:
    """ "small cells" and "zeros" of a per-site count table (labels in its index and columns; a column ``count`` of
    whole numbers, NaN or None where unknown). A small cell (above 0, below ``threshold``) fails, naming up to
    ``SHOWN`` cells and how many in all; so does a zero, as in ACRO: it can tell that no patient in a group has a
    value (attribute disclosure)."""
    if "count" not in table.columns:
        raise ValueError("a count table needs a column named 'count'")
    counts = pd.to_numeric(table["count"], errors="coerce").to_numpy(dtype=float, na_value=np.nan)
    small = np.flatnonzero((counts > 0) & (counts < threshold)).tolist()
    zeros = np.flatnonzero(counts == 0).tolist()
    known = int(np.isfinite(counts).sum())
    cells = _listing([f"{_cell(table, i)} ({int(counts[i])})" for i in small[:SHOWN]], total=len(small))
    small_found = f"{len(small)} of {known} cells are above 0 but below {threshold}: {cells}." if small else ""
    named = _listing([_cell(table, i) for i in zeros[:SHOWN]], total=len(zeros))
    why = "a zero can tell that no patient in a group has that value (attribute disclosure), unless structural"
    return [
        _verdict("small cells", small_found, f"none of the {known} known cells is below {threshold} (but above 0)."),
        _verdict("zeros", f"{why}: {_plural(len(zeros), 'cell')}, {named}." if zeros else "", "no cell is zero."),
    ]


def magnitude_checks(
    values: Mapping[str, np.ndarray], threshold: int, *, nk: tuple[int, float] = (2, 0.9), p: float = 0.10
) -> list[Check]:
    """ "few values", "dominance (n-k)", "dominance (p-ratio)" and "extremes" of the columns behind a released
    mean, std or quantiles (``values``: column -> its non-missing values; NaN or infinite ones are dropped), one
    check per rule naming the failing columns. Dominance is over absolute values: where the largest ``n`` make up
    over ``k`` of the total, one or two patients *are* the mean; where all but the largest 2 add up to under ``p``
    of the largest, the second largest contributor can tell the largest within ``p``. Extremes: released quantiles
    are values of the column, and with fewer than ``TAIL_ROWS`` (20) values a 5% tail holds less than one row, so
    p5 is the smallest value itself and p95 the largest, each one patient's own."""
    n, k = nk
    rules = {
        "few values": f"with fewer than {threshold} values",
        "dominance (n-k)": f"where the largest {n} values are over {k:.0%} of the total",
        "dominance (p-ratio)": f"where all but the largest 2 values add up to under {p:.0%} of the largest",
        "extremes": f"where p5 and p95 are one patient's value, with fewer than {TAIL_ROWS} values",
    }
    found: dict[str, list[str]] = {name: [] for name in rules}
    for column, raw in values.items():
        data = np.asarray(raw, dtype=float).ravel()
        data = -np.sort(-np.abs(data[np.isfinite(data)]))
        total, top = float(data.sum()), float(data[:n].sum())
        if data.size < threshold:
            found["few values"].append(f"{column} ({data.size})")
        if total > 0 and top > k * total:
            found["dominance (n-k)"].append(f"{column} ({top / total:.1%})")
        if total > 0 and total - float(data[:2].sum()) < p * float(data[0]):
            found["dominance (p-ratio)"].append(column)
        if 0 < data.size < TAIL_ROWS:
            found["extremes"].append(f"{column} ({data.size})")
    checked = f"({_plural(len(values), 'column')} checked)"
    return [
        _verdict(name, f"columns {rules[name]}: {_listing(hit)}." if hit else "", f"no column {rules[name]} {checked}.")
        for name, hit in found.items()
    ]


def _keys(compound: str) -> set[str]:
    """The tokens a compound such as ``P001.csv``, ``2024-03-01`` or ``site_7`` holds: itself and every run of up to
    ``SPAN`` of its parts split at ``.``, ``-`` and ``_`` (not at a decimal point: ``54.5`` stays whole)."""
    parts = _SEPARATOR.split(compound)
    keys = {compound}
    for i in range(0, len(parts), 2):
        keys.update("".join(parts[i : j + 1]) for j in range(i, min(len(parts), i + 2 * SPAN - 1), 2))
    return keys


def _index(lines: Sequence[str]) -> dict[str, list[int]]:
    """Each token of the text (:func:`_keys`; also with a minus sign before it) and each run of up to ``SPAN`` tokens
    as written, spaces collapsed (``Type 2 diabetes``), casefolded, with the line number of each occurrence."""
    index: dict[str, list[int]] = {}
    for number, line in enumerate(lines, 1):
        found = list(_COMPOUND.finditer(line))
        for i, match in enumerate(found):
            start, word = match.start(), match.group()
            keys = _keys(word)
            if start and line[start - 1] == "-" and not line[start - 2 : start - 1].isalnum():
                keys |= {"-" + key for key in keys if word.startswith(key)}
            for other in found[i + 1 : i + SPAN]:
                keys.add(" ".join(line[start : other.end()].split()))
            for key in keys:
                index.setdefault(key.casefold(), []).append(number)
    return index


def _hits(index: Mapping[str, list[int]], wanted: Mapping[str, Collection[str]]) -> list[tuple[str, int, list[int]]]:
    """Per column that has any: how many of its values appear as whole tokens, and the line of each hit."""
    hits = []
    for column, given in wanted.items():
        if found := index.keys() & {" ".join(str(value).split()).casefold() for value in given}:
            hits.append((column, len(found), [number for key in found for number in index[key]]))
    return hits


def _nhs_valid(digits: str) -> bool:
    """Whether the last of 10 digits is the NHS mod-11 check digit of the first 9 (weights 10 to 2; 10: invalid)."""
    check = 11 - sum(int(digit) * (10 - i) for i, digit in enumerate(digits[:9])) % 11
    return check != 10 and check % 11 == int(digits[9])


def _printed(lines: Sequence[str]) -> tuple[list[int], list[int]]:
    """The lines that look like a frame's local variables (``    name = value`` after a traceback's frame line
    and its source line; rich's ``│ name = value``), and those that look like printed data: ``array([``,
    ``tensor([``, ``dtype:``, ``[3 rows x 2 columns]``, and two or more rows of a label and numbers in columns."""
    local, data, rows = [], [], []
    in_traceback = after_frame = False
    for number, line in enumerate(lines, 1):
        frame = bool(_FRAME.search(line))
        if in_traceback and not after_frame and not frame and _LOCAL.match(line):
            local.append(number)
        data += [number] if _DATA_MARK.search(line) else []
        if _ROW.match(line) and any(_NUMBER.fullmatch(field) for field in line.split()[1:]):
            rows.append(number)
        else:
            data += rows if len(rows) > 1 else []
            rows = []
        in_traceback, after_frame = in_traceback or frame, frame
    return local, sorted(set(data + (rows if len(rows) > 1 else [])))


def text_checks(
    text: str,
    *,
    identifiers: Mapping[str, Collection[str]] = {},
    values: Mapping[str, Collection[str]] = {},
    paths: Collection[str] = (),
) -> list[Check]:
    """ "identifiers", "NHS numbers", "dates", "data values", "paths", "local variables" and "control characters",
    in that order, of free
    text (a failed step's traceback) an admin is asked to release; lines are numbered from 1.

    ``identifiers`` (column -> the site's values) and ``values`` (other columns -> distinct values worth looking
    for: 4 characters or more, or a decimal point) are found as whole tokens in any case (``P001`` in ``P001.csv``,
    not in ``P0012``); a few hits of a common number still fail, with how many, for the admin to judge. ``paths``:
    folders of the site's (its data folder, its site directory; as a mapping, to the names a hit is told by)."""
    lines = text.split("\n")
    index = _index(lines)
    nhs: dict[str, list[int]] = {}
    dates: list[int] = []
    located: list[tuple[str, int]] = []
    for number, line in enumerate(lines, 1):
        for match in _NHS.finditer(line):
            if _nhs_valid(digits := match.group(1) + match.group(3) + match.group(4)):
                nhs.setdefault(digits, []).append(number)
        dates += [number] * len(_DATE.findall(line))
        located += [(match.group().rstrip(".,;:"), number) for match in _PATH.finditer(line)]
    ids = "; ".join(f"{c}: {_plural(n, 'value')} on {_lines(w)}" for c, n, w in _hits(index, identifiers))
    found = _hits(index, values)
    shown = "; ".join(f"{c}: {_plural(n, 'value')}, {_plural(len(w), 'hit')} on {_lines(w)}" for c, n, w in found)
    local, data = _printed(lines)
    printed = [f"{_plural(len(local), 'line')} like a frame's local variables ({_lines(local)})"] if local else []
    printed += [f"{_plural(len(data), 'line')} like printed data ({_lines(data)})"] if data else []
    printed_found = " and ".join(printed) + "." * bool(printed)
    ids = ids and f"the site's identifiers appear, {ids}."
    on = _lines([number for where in nhs.values() for number in where])
    nhs_found = f"{_plural(len(nhs), 'number')} with a valid NHS check digit on {on}." if nhs else ""
    dated = f"{_plural(len(dates), 'date')} on {_lines(dates)}." if dates else ""
    hits = sum(len(where) for _, _, where in found)
    shown = shown and f"{_plural(hits, 'hit')} of the site's values (a common number may be chance): {shown}."
    looked = [sum(map(len, given.values())) for given in (identifiers, values)]
    return [
        _verdict("identifiers", ids, f"no identifier value appears ({looked[0]} looked for)."),
        _verdict("NHS numbers", nhs_found, "no 10-digit number with a valid NHS check digit."),
        _verdict("dates", dated, "no date in a common form."),
        _verdict("data values", shown, f"no value of the site's data appears ({looked[1]} looked for)."),
        _paths(located, paths),
        _verdict("local variables", printed_found, "no line looks like local variables or data."),
        _controls(lines),
    ]


def _controls(lines: Sequence[str]) -> Check:
    """The "control characters" check: characters that would hide or rewrite text on a terminal."""
    where = [number for number, line in enumerate(lines, 1) if _CONTROL.search(line)]
    said = f"{_plural(len(where), 'line')} ({_lines(where)}) hold characters that can hide or rewrite text on a "
    said += (
        "terminal (escape sequences, carriage returns, bidirectional or zero-width marks): `show` prints each as \\x.."
    )
    return _verdict("control characters", said if where else "", "none: the text reads as it is.")


def visible(text: str) -> str:
    """``text`` with every control character written out (``\\x1b``, ``\\u202e``), so that what a terminal shows
    is what the bytes hold; tab and newline stay."""
    return _CONTROL.sub(
        lambda m: f"\\x{ord(m.group()):02x}" if ord(m.group()) < 256 else f"\\u{ord(m.group()):04x}", text
    )


def _paths(found: Sequence[tuple[str, int]], folders: Collection[str]) -> Check:
    """The "paths" check of the absolute paths found (each with its line), naming those under the site's folders."""
    names: Mapping[str, object] = folders if isinstance(folders, Mapping) else {}
    ends = {folder: folder.replace("\\", "/").rstrip("/") + "/" for folder in folders if folder.strip("/\\")}
    under = {p: next((f for f, e in ends.items() if f"{p}/".replace("\\", "/").startswith(e)), "") for p in dict(found)}
    detail = ""
    if found:
        first, line = found[0]
        quoted = f"{under[first].rstrip('/')}/…" if under[first] else first if len(first) <= 80 else first[:79] + "…"
        detail = f"{_plural(len(under), 'absolute path')}, the first {quoted} on line {line}"
    for folder in dict.fromkeys(folder for folder in under.values() if folder):
        count = _plural(sum(f == folder for f in under.values()), "path")
        where = _lines([number for path, number in found if under[path] == folder])
        detail += f"; {count} under {names.get(folder) or 'a site folder'} ({folder}) on {where}"
    return _verdict("paths", detail and detail + ".", "no absolute file-system path.")


def summary(checks: Sequence[Check]) -> str:
    """The checks as the admin's terminal shows them, ``FAIL  name: detail`` lines first, then a count of failures."""
    ordered = [c for c in checks if not c.passed] + [c for c in checks if c.passed]
    shown = [f"{'PASS' if c.passed else 'FAIL'}  {c.name}: {c.detail}" for c in ordered]
    failed = len(checks) - sum(c.passed for c in checks)
    shown.append(f"{failed} of {len(checks)} checks failed" if failed else f"all {len(checks)} checks passed")
    return "\n".join(shown)


def as_records(checks: Sequence[Check]) -> list[dict[str, object]]:
    """The checks as JSON-able records, to store beside the item and in the audit log."""
    return [{"name": c.name, "passed": c.passed, "detail": c.detail} for c in checks]


__all__ = ["Check", "as_records", "count_checks", "magnitude_checks", "summary", "text_checks", "visible"]
