"""The airlock's automatic checks (site_agent.disclosure.checks): count tables, magnitudes and tracebacks, on items
small enough to check by hand, and real tracebacks built here."""

from __future__ import annotations

import json
import re
import traceback
from collections.abc import Callable

import numpy as np
import pandas as pd
import pytest

from site_agent.disclosure.checks import (
    MAX_DETAIL,
    Check,
    as_records,
    count_checks,
    magnitude_checks,
    summary,
    text_checks,
    visible,
)

T = 10  # the threshold these tests use
SITE = "/srv/flip/site-a/data"
TEXT_RULES = ["identifiers", "NHS numbers", "dates", "data values", "paths", "local variables", "control characters"]
MAGNITUDE_RULES = ["few values", "dominance (n-k)", "dominance (p-ratio)", "extremes"]


def by_name(checks: list[Check]) -> dict[str, Check]:
    return {check.name: check for check in checks}


def cited(detail: str) -> set[int]:
    """The line numbers a detail names ("line 4", "lines 3, 7 and 9"), leaving out an "and N more"."""
    found: set[int] = set()
    for listed in re.findall(r"\blines? ((?:\d+(?:, | and )?)+)", re.sub(r" and \d+ more", "", detail)):
        found |= {int(number) for number in re.findall(r"\d+", listed)}
    return found


def lines_with(text: str, needle: str) -> set[int]:
    return {number for number, line in enumerate(text.split("\n"), 1) if needle in line}


def nhs_number(first_nine: str) -> str | None:
    """The 10-digit NHS number that starts with these 9 digits, or None where no check digit makes one valid."""
    check = (
        11 - sum(int(digit) * weight for digit, weight in zip(first_nine, range(10, 1, -1), strict=True)) % 11
    ) % 11
    return None if check == 10 else first_nine + str(check)


OTHER_NHS = next(number for start in range(401023210, 401023299) if (number := nhs_number(str(start))))


def formatted(function: Callable[[str], object], argument: str, capture_locals: bool = True) -> str:
    """The traceback of ``function(argument)`` as ``traceback`` prints it, with each frame's locals."""
    try:
        function(argument)
    except Exception as error:
        return "".join(traceback.TracebackException.from_exception(error, capture_locals=capture_locals).format())
    raise AssertionError("the function did not raise")


def load_scan(patient: str) -> None:
    nhs = "943 476 5919"
    also = OTHER_NHS
    age = 54.5
    path = f"{SITE}/scans/{patient}.nii.gz"
    raise FileNotFoundError(
        f"no scan for {patient} ({nhs} or {also}, not 943-476-5918), age {age}, admitted 1 March 2024: {path}"
    )


def multiply(batch: str) -> int:
    raise RuntimeError("mat1 and mat2 shapes cannot be multiplied (32x512 and 128x10)")


def forward(batch: str) -> int:
    product = multiply(batch)
    return product


# count tables


def test_a_small_cell_and_a_zero_fail_naming_their_cells() -> None:
    table = pd.DataFrame(
        {"sex": ["F", "F", "M", "M"], "band": ["<50", "50+", "<50", "50+"], "count": [3, 0, 25, 40]}
    ).set_index("sex")
    checks = count_checks(table, T)
    assert [check.name for check in checks] == ["small cells", "zeros"]
    small, zeros = checks
    assert not small.passed and "1 of 4 cells" in small.detail and "sex=F, band=<50 (3)" in small.detail
    assert not zeros.passed and "sex=F, band=50+" in zeros.detail and "attribute disclosure" in zeros.detail
    assert "no patient" in zeros.detail


def test_a_clean_count_table_passes_and_unknown_counts_are_not_cells() -> None:
    table = pd.DataFrame({"count": [10, 25, None, np.nan]}, index=pd.Index(["a", "b", "c", "d"], name="site"))
    checks = count_checks(table, T)
    assert all(check.passed for check in checks)
    assert "2 known cells" in checks[0].detail


def test_many_small_cells_name_five_and_say_how_many_in_all() -> None:
    table = pd.DataFrame({"count": [1, 2, 3, 4, 5, 6, 7, 50]}, index=[f"band {i}" for i in range(8)])
    small = count_checks(table, T)[0]
    assert not small.passed and small.detail.startswith("7 of 8 cells")
    assert "band 4 (5)" in small.detail and "band 5" not in small.detail and "and 2 more" in small.detail


def test_cells_of_a_multi_index_are_named_by_its_levels() -> None:
    index = pd.MultiIndex.from_tuples([("F", "<50"), ("M", "50+")], names=["sex", "band"])
    small = count_checks(pd.DataFrame({"count": [12, 4]}, index=index), T)[0]
    assert not small.passed and "sex=M, band=50+ (4)" in small.detail


def test_a_table_without_a_count_column_is_refused() -> None:
    with pytest.raises(ValueError, match="count"):
        count_checks(pd.DataFrame({"n": [1, 2]}), T)


# magnitudes


def test_one_dominant_value_fails_both_dominance_rules() -> None:
    checks = by_name(magnitude_checks({"income": np.array([1000.0] + [5.0] * 10)}, T))
    assert list(checks) == MAGNITUDE_RULES
    assert not checks["dominance (n-k)"].passed and "income" in checks["dominance (n-k)"].detail
    assert not checks["dominance (p-ratio)"].passed and "income" in checks["dominance (p-ratio)"].detail
    assert checks["few values"].passed


def test_eleven_similar_values_pass_both_dominance_rules() -> None:
    checks = by_name(magnitude_checks({"age": np.array([50.0, 51, 52, 53, 54, 55, 56, 57, 58, 59, 60])}, T))
    assert checks["dominance (n-k)"].passed and checks["dominance (p-ratio)"].passed
    assert checks["few values"].passed


def test_dominance_is_over_absolute_values_and_the_rules_parameters() -> None:
    values = {"change": np.array([-1000.0] + [5.0] * 12)}
    assert not by_name(magnitude_checks(values, T))["dominance (n-k)"].passed
    # the largest 2 of 20 equal values are 10% of the total: only a k below that fails
    even = {"x": np.full(20, 3.0)}
    assert by_name(magnitude_checks(even, T))["dominance (n-k)"].passed
    assert not by_name(magnitude_checks(even, T, nk=(2, 0.05)))["dominance (n-k)"].passed
    # all but the largest 2 sum to 18 x 3 = 54, 18 times the largest: p-ratio fails only where p is above that
    assert not by_name(magnitude_checks(even, T, p=20.0))["dominance (p-ratio)"].passed


def test_few_values_fail_naming_the_columns_and_missing_ones_are_dropped() -> None:
    values = {"age": np.array([40.0, 41, 42, np.nan]), "bmi": np.arange(30.0), "hba1c": np.array([5.0] * 9)}
    few = by_name(magnitude_checks(values, T))["few values"]
    assert not few.passed and "age (3)" in few.detail and "hba1c (9)" in few.detail and "bmi" not in few.detail


def test_extremes_fail_below_twenty_values_where_a_five_percent_tail_is_less_than_a_row() -> None:
    nineteen = by_name(magnitude_checks({"age": np.arange(19.0) + 40}, T))["extremes"]
    assert not nineteen.passed and "age (19)" in nineteen.detail
    assert by_name(magnitude_checks({"age": np.arange(20.0) + 40}, T))["extremes"].passed


def test_no_column_passes_every_magnitude_rule() -> None:
    assert all(check.passed for check in magnitude_checks({}, T))


# text


def test_a_traceback_with_locals_fails_every_rule_and_says_where() -> None:
    text = formatted(load_scan, "P0042")
    checks = by_name(
        text_checks(
            text,
            identifiers={"patient_id": ["P0041", "P0042", "P0043"]},
            values={"age": ["54.5", "61.0"], "site": ["site-b"]},
            paths={SITE: "the site's data folder"},
        )
    )
    assert list(checks) == TEXT_RULES
    assert [name for name, check in checks.items() if check.passed] == ["control characters"]  # plain text
    message = len(text.rstrip("\n").split("\n"))  # the exception's line is the last
    ids = checks["identifiers"]
    assert "patient_id: 1 value" in ids.detail and message in cited(ids.detail)
    assert cited(ids.detail) <= lines_with(text, "P0042")
    nhs = checks["NHS numbers"]
    assert "2 numbers" in nhs.detail  # 943 476 5919 and OTHER_NHS; 943-476-5918 has a wrong check digit
    assert cited(nhs.detail) == lines_with(text, "943 476 5919") | lines_with(text, OTHER_NHS)
    assert message in cited(checks["dates"].detail)
    values = checks["data values"]
    assert "age: 1 value" in values.detail and "site" not in values.detail.split(":", 1)[1]
    assert cited(values.detail) == lines_with(text, "54.5")
    paths = checks["paths"]
    assert "under the site's data folder" in paths.detail and message in cited(paths.detail)
    assert "P0042" not in paths.detail.split(";")[1]  # a site path is named by its folder
    local = checks["local variables"]
    shown = [number for number, line in enumerate(text.split("\n"), 1) if re.match(r"    \w+ = ", line)]
    assert f"{len(shown)} lines like a frame's local variables" in local.detail
    assert cited(local.detail) == set(shown[:5]) and lines_with(text, "    nhs = '943 476 5919'") <= set(shown)


def test_a_clean_shape_mismatch_traceback_fails_only_on_its_paths() -> None:
    try:
        forward("batch")
    except RuntimeError as error:
        text = "".join(traceback.format_exception(error))
    assert "mat1 and mat2 shapes cannot be multiplied (32x512 and 128x10)" in text
    assert "    product = multiply(batch)" in text  # a frame's source line, not a local variable
    ids = {"patient_id": ["P0042", "512", "x10"]}  # "512" is no token of "32x512"
    checks = by_name(text_checks(text, identifiers=ids, values={"weight": ["54.5"]}, paths=[SITE]))
    assert [name for name, check in checks.items() if not check.passed] == ["paths"]
    files = re.findall(r'File "(/[^"]+)"', text)
    assert checks["paths"].detail.startswith(f"1 absolute path, the first {files[0]} on line 2.")
    assert by_name(text_checks(text, identifiers={"shape": ["32x512"]}))["identifiers"].passed is False


def test_identifiers_are_whole_tokens_not_parts_of_longer_ones() -> None:
    ids = {"patient_id": ["P0042", "1234567", "tok3fa9"]}
    for text in ["P00421 xP0042 P0042x", "12345678 01234567 1234567.5", "tok3fa99 mytok3fa9"]:
        assert text_checks(text, identifiers=ids)[0].passed, text
    for text in ["id=P0042.", "scans/P0042.nii.gz", "'1234567'", "(TOK3FA9)", "site_P0042", "-1234567"]:
        assert not text_checks(text, identifiers=ids)[0].passed, text


def test_identifiers_with_hyphens_dots_or_spaces_are_found_whole() -> None:
    ids = {"mrn": ["RX-0042-A", "12.345", "Smith, John"]}
    first = text_checks("a\nno RX-0042 here\nfile RX-0042-A.csv\n", identifiers=ids)[0]
    assert not first.passed and cited(first.detail) == {3}
    assert not text_checks("value 12.345 seen", identifiers=ids)[0].passed
    assert text_checks("value 112.345 or 12.3456", identifiers=ids)[0].passed
    assert not text_checks("name: smith,  john", identifiers=ids)[0].passed


def test_data_values_say_how_many_hits_of_how_many_values() -> None:
    text = "loss 0.125 at 54.5\nbatch 54.5 and 154.5\n61.25 61.25"
    values = by_name(text_checks(text, values={"age": ["54.5", "61.25", "99.5"], "bmi": ["0.125"]}))["data values"]
    assert not values.passed and values.detail.startswith("5 hits")
    assert "age: 2 values, 4 hits on lines 1, 2 and 3" in values.detail and "bmi: 1 value, 1 hit" in values.detail
    negative = by_name(text_checks("delta -3.25, range 1-3.25", values={"change": ["-3.25"]}))["data values"]
    assert negative.detail.startswith("1 hit ")  # a minus sign is the value's, a hyphen between numbers is not


def test_nhs_numbers_need_a_valid_check_digit() -> None:
    assert nhs_number("943476591") == "9434765919"
    for written in ["9434765919", "943 476 5919", "943-476-5919", OTHER_NHS]:
        assert not by_name(text_checks(f"x {written} y"))["NHS numbers"].passed, written
    for written in ["9434765918", "943 476 5918", "94347659190", "943 4765919", "0.9434765919", "x9434765919"]:
        assert by_name(text_checks(f"x {written} y"))["NHS numbers"].passed, written


@pytest.mark.parametrize(
    "written",
    [
        "2024-03-01",
        "2024-03-01 09:30:00",
        "2024-03-01T09:30",
        "01/03/2024",
        "1 March 2024",
        "01-Mar-2024",
        "Mar 1, 2024",
    ],
)
def test_dates_in_common_forms_are_found(written: str) -> None:
    dates = by_name(text_checks(f"first line\nadmitted {written}, discharged"))["dates"]
    assert not dates.passed and cited(dates.detail) == {2}


def test_numbers_that_are_not_dates_pass() -> None:
    text = "python 3.11.7, torch 2.4.1, shapes (32x512 and 128x10), line 2024, 1/2 of 30, 12-13"
    assert by_name(text_checks(text))["dates"].passed


def test_paths_absolute_posix_and_windows_not_urls_nor_relative_ones() -> None:
    for text in ["see https://example.org/a/b", "data/site/x.csv", "ratio 1/2/3", "a single /tmp"]:
        assert by_name(text_checks(text))["paths"].passed, text
    windows = by_name(text_checks("at C:\\Users\\ward\\cohort.csv now"))["paths"]
    assert not windows.passed and "C:\\Users\\ward\\cohort.csv" in windows.detail
    plain = by_name(text_checks(f"x\nread {SITE}/a.csv and /opt/flip/b.py", paths=[SITE + "/"]))["paths"]
    assert plain.detail.startswith("2 absolute paths, the first /srv/flip/site-a/data/… on line 2")
    assert "1 path under a site folder" in plain.detail


def test_printed_data_is_found_and_plain_indented_code_is_not() -> None:
    frame = pd.DataFrame({"age": [54.5, 61.0, 70.25], "sex": ["F", "M", "F"]})
    text = f"values:\n{frame!r}\n{pd.Series([1, 2], name='n')!r}\n{np.array([1.5, 2.5])!r}\n"
    local = by_name(text_checks(text))["local variables"]
    assert not local.passed and "7 lines like printed data (lines 3, 4, 5, 6, 7 and 2 more)" in local.detail
    code = "def f(x):\n    y = x + 1\n    return y\n"  # not a traceback: an indented assignment is code
    assert by_name(text_checks(code))["local variables"].passed


def test_rich_tracebacks_show_locals_in_a_box() -> None:
    text = "╭─── Traceback (most recent call last) ───╮\n│ ╭── locals ──╮ │\n│ │ patient = 'P0042' │ │\n"
    local = by_name(text_checks(text))["local variables"]
    assert not local.passed and cited(local.detail) == {3}


def test_a_large_traceback_against_many_identifiers() -> None:
    rng = np.random.default_rng(7)
    identifiers = [f"tok{value:07x}" for value in rng.choice(1 << 28, size=100_000, replace=False)]
    frames = [
        f'  File "/opt/flip/task/step_{i}.py", line {i}, in fn_{i}\n    out = layer_{i}(x, {i}.5)  # tok{i:07x}z\n'
        for i in range(2000)
    ]
    text = "Traceback (most recent call last):\n" + "".join(frames)
    text = text[: 64 * 1024 - 200] + f"\nValueError: bad row {identifiers[12345]}\n"
    assert len(text) <= 64 * 1024
    checks = by_name(text_checks(text, identifiers={"token": identifiers}, values={"x": identifiers[:5000]}))
    assert "token: 1 value" in checks["identifiers"].detail
    assert cited(checks["identifiers"].detail) == {len(text.split("\n")) - 1}


def test_every_detail_fits_even_with_many_findings() -> None:
    table = pd.DataFrame({"count": [1, 0] * 100}, index=[f"a rather long label for cell {i}" for i in range(200)])
    values = {f"column with a long name {i}": np.array([1e6, 1.0]) for i in range(50)}
    text = "\n".join(f"{SITE}/P{i:04d}.csv 2024-01-{1 + i % 28:02d} P{i:04d}" for i in range(500))
    ids = {f"identifier column {i}": [f"P{j:04d}" for j in range(500)] for i in range(20)}
    checks = count_checks(table, T) + magnitude_checks(values, T) + text_checks(text, identifiers=ids, paths=[SITE])
    assert [check.name for check in checks if check.passed] == [
        "NHS numbers",
        "data values",
        "local variables",
        "control characters",
    ]
    assert all(0 < len(check.detail) <= MAX_DETAIL for check in checks)
    assert any(check.detail.endswith("…") for check in checks)  # cut to fit


# the admin's view


def test_summary_puts_failures_first_and_counts_them() -> None:
    checks = [Check("a", True, "fine."), Check("b", False, "bad."), Check("c", True, "ok."), Check("d", False, "no.")]
    assert summary(checks).split("\n") == [
        "FAIL  b: bad.",
        "FAIL  d: no.",
        "PASS  a: fine.",
        "PASS  c: ok.",
        "2 of 4 checks failed",
    ]
    assert summary(checks[:1]).split("\n")[-1] == "all 1 checks passed"


def test_records_are_json_for_the_audit_log() -> None:
    checks = count_checks(pd.DataFrame({"count": [3]}), T)
    records = as_records(checks)
    assert json.loads(json.dumps(records)) == [
        {"name": "small cells", "passed": False, "detail": checks[0].detail},
        {"name": "zeros", "passed": True, "detail": checks[1].detail},
    ]
    assert "row 1 (3)" in checks[0].detail


def test_text_that_would_hide_itself_on_a_terminal_is_flagged_and_shown_as_escapes() -> None:
    text = "RuntimeError: shapes\n\x1b[8mLEAK42 pt0007\x1b[0m\rall fine\nok \u202etxt.exe\n"
    check = by_name(text_checks(text))["control characters"]
    assert not check.passed and "lines 2 and 3" in check.detail or "2, 3" in check.detail, check.detail
    shown = visible(text)
    assert "\\x1b[8mLEAK42" in shown and "\\x0d" in shown and "\\u202e" in shown and "\x1b" not in shown
    assert visible("plain\ttext\n") == "plain\ttext\n"
