"""Every field of a result but the parameters' and metrics' values: the red team's attacks on what a step says.

The task process runs the researcher's cell beside FLIP's runner, so a cell can rewrite anything there: raise what
it likes (``StepFailed`` itself, a class named at run time), patch the runner so that every later step's result says
what it chooses (``TaskSession.step``), or the worker's own sending (``send_sized``). Each attack wraps a count it
read from the site's rows in the loot marker (``"LEAK" + str(n)``) or in a number the test can recognise, and
asserts that none of it reached the researcher: the site agent builds what leaves field by field, from a fixed
vocabulary and what it knows itself (``site_agent.disclosure.guard``).
"""

from __future__ import annotations

import re
from typing import Any

import pytest

from kit import SITES, Outcome, RedTeam, hostile, still_serves, still_trains

pytestmark = pytest.mark.integration

COUNT = "n = int((data.train['age'] > 50).sum())  # a count of the site's patients"
BIG = 987654321000  # a number no run shows by chance: a forged number is BIG + n, searched for as BIG_SEEN
BIG_SEEN = re.compile(r"9876543210\d\d")

# patches the runner in the task process: every later step's result (here: the run's final evaluation) is rewritten
# by FORGE, a body of lines over ``result`` and ``n``
PATCH = """import site_agent.tasks.runner as runner
if not getattr(runner, 'forged', False):
    runner.forged = True
    honest_step = runner.TaskSession.step
    def forged_step(self, request, n=n):
        result = honest_step(self, request)
{forge}
        return result
    runner.TaskSession.step = forged_step"""

# patches the worker's sending (the worker module: the task process's __main__ where it was started as one, the module
# site_agent.tasks.worker where the site's zygote forked it): every later result leaves as RESEND makes it, from
# ``blob`` (the honest encoding), ``result`` (decoded) and ``n``
SEND = """import sys
from flip_core.protocol import decode_result, encode_result
worker = sys.modules['__main__']
if not hasattr(worker, '_serve'):
    worker = sys.modules['site_agent.tasks.worker']
if not getattr(worker, 'forged', False):
    worker.forged = True
    honest_send = worker.send_sized
    def forged_send(conn, blob, n=n):
        result = decode_result(blob)
{resend}
        honest_send(conn, blob)
    worker.send_sized = forged_send"""


def patched(template: str, slot: str, lines: str) -> str:
    body = "\n".join("        " + line for line in lines.strip().splitlines()).replace("{BIG}", str(BIG))
    return template.replace("{" + slot + "}", body)


def failed(outcome: Outcome) -> dict[str, str]:
    """Each failed site's sentence, as its row in the notebook says it."""
    assert outcome.handle is not None, outcome.said
    events = list(outcome.handle.events)
    return {e["site"]: e["detail"] for e in events if e.get("type") == "site" and e["status"] == "failed"}


def site_rows(outcome: Outcome, status: str = "done") -> list[dict[str, Any]]:
    assert outcome.handle is not None, outcome.said
    return [e for e in list(outcome.handle.events) if e.get("type") == "site" and e["status"] == status]


def test_printed_rows_stay_at_the_site(redteam: RedTeam) -> None:
    outcome = redteam.train(hostile("print('LEAK' + str(len(data.train)))"), "print-rows")
    assert outcome.status == "completed", outcome.said
    assert outcome.leaked() == []
    still_serves(redteam)


def test_error_text_in_flips_own_where_wording(redteam: RedTeam) -> None:
    """The runner's own failure, raised by the cell with its message where FLIP's fixed sentence goes."""
    body = f"{COUNT}\nfrom site_agent.tasks.runner import StepFailed\n"
    body += "raise StepFailed('BadReturn', 3, 'train() (LEAK' + str(n) + ')')"
    outcome = redteam.train(hostile(body), "where-wording")
    assert outcome.leaked() == []
    assert failed(outcome) == {s: "BadReturn in train() (must return a dict of numbers)" for s in SITES}
    still_serves(redteam)


def test_an_exception_class_named_at_run_time_with_a_count(redteam: RedTeam) -> None:
    outcome = redteam.train(hostile(f"{COUNT}\nraise type('LEAK' + str(n), (Exception,), {{}})()"), "class-name")
    assert outcome.leaked() == []
    assert all(re.fullmatch(r"Exception at cell line \d+ in train\(\)", d) for d in failed(outcome).values())
    still_serves(redteam)


def test_a_builtin_lookalike_carrying_a_count_in_its_name_module_or_qualname(redteam: RedTeam) -> None:
    body = (
        f"{COUNT}\n"
        "loot = 'LEAK' + str(n)\n"
        "if data.site == 'Cleveland':  # named exactly like the builtin, the loot in its module and qualname\n"
        "    lookalike = type('ValueError', (ValueError,), {'__module__': loot, '__qualname__': loot})\n"
        "else:  # a dotted name that starts like the builtin's\n"
        "    lookalike = type('ValueError.' + loot, (ValueError,), {})\n"
        "raise lookalike(loot)"
    )
    outcome = redteam.train(hostile(body), "lookalike")
    assert outcome.leaked() == []
    assert all(re.fullmatch(r"ValueError at cell line \d+ in train\(\)", d) for d in failed(outcome).values())
    still_serves(redteam)


def test_a_failure_on_a_line_the_cell_does_not_have(redteam: RedTeam) -> None:
    """The line is the one number a failure still tells: it must be one of the cell's lines."""
    body = (
        f"{COUNT}\nfrom site_agent.tasks.runner import StepFailed\nraise StepFailed('ValueError', {BIG} + n, 'train()')"
    )
    source = hostile(body)
    outcome = redteam.train(source, "line-count")
    details = failed(outcome)
    assert set(details) == set(SITES)
    lines = [int(line) for d in details.values() for line in re.findall(r"at cell line (\d+)", d)]
    assert all(line <= len(source.splitlines()) for line in lines), details
    assert BIG_SEEN.findall(outcome.everything()) == []
    still_serves(redteam)


def test_a_metric_name_carrying_a_count(redteam: RedTeam) -> None:
    body = f"{COUNT}\nmetrics = _honest_train(model, data, config)\nmetrics['LEAK' + str(n)] = 0.5\nreturn metrics"
    outcome = redteam.train(hostile(body), "metric-name")
    assert outcome.status == "completed", outcome.said
    assert outcome.leaked() == []
    assert outcome.handle is not None
    assert set(outcome.handle.history.query("phase == 'train'").metric) == {"loss"}  # the one the cell declares
    expected = "train metrics withheld: not declared when the run was submitted (declare them with --metrics)"
    assert {e["site"] for e in site_rows(outcome) if e.get("detail") == expected} == set(SITES)
    still_serves(redteam)


def test_many_metric_names_say_nothing_of_how_many(redteam: RedTeam) -> None:
    body = f"{COUNT}\nmetrics = _honest_train(model, data, config)\nfor i in range(n):\n    metrics[f'm{{i}}'] = 0.0\n"
    outcome = redteam.train(hostile(body + "return metrics"), "many-names")
    assert outcome.status == "completed", outcome.said
    assert outcome.handle is not None
    assert set(outcome.handle.history.query("phase == 'train'").metric) == {"loss"}
    details = [str(e.get("detail", "")) for e in list(outcome.handle.events) if e.get("type") == "site"]
    assert not any(re.search(r"\d", d) for d in details), details  # neither the names nor how many
    still_serves(redteam)


def test_forged_device_threads_fingerprint_seconds_and_version(redteam: RedTeam) -> None:
    forge = """result.device = result.fingerprint = result.version = 'LEAK' + str(n)
result.threads, result.seconds = {BIG} + n, {BIG}.0 + n
result.gpu_peak_bytes, result.gpu_seconds = {BIG} + n, {BIG}.0 + n"""
    outcome = redteam.train(hostile(COUNT + "\n" + patched(PATCH, "forge", forge)), "forged-fields")
    assert outcome.status == "completed", outcome.said
    assert outcome.leaked() == []
    assert BIG_SEEN.findall(outcome.everything()) == []
    assert outcome.handle is not None
    record = outcome.handle.record
    catalog = {s: d.fingerprint for s, d in record.site_datasets.items()}
    for site in SITES:  # what the sites themselves know: their device, the catalog's fingerprint, their threads
        used = record.site_info[site]
        assert (used.device, used.fingerprint, used.threads) == ("cpu", catalog[site], 1), used
    still_serves(redteam)


def test_forged_fields_under_differential_privacy(redteam: RedTeam) -> None:
    """A private run withholds metrics and counts: the fields the task process sets were its way out."""
    forge = """result.device = result.withheld = result.error_where = 'LEAK' + str(n)
result.num_train, result.num_test, result.seconds = {BIG} + n, {BIG} + n, {BIG}.0 + n
result.train_metrics = {'loss': {BIG}.0 + n}"""
    outcome = redteam.train(hostile(COUNT + "\n" + patched(PATCH, "forge", forge)), "forged-private", dp_epsilon=8.0)
    assert outcome.status == "completed", outcome.said
    assert outcome.leaked() == []
    assert BIG_SEEN.findall(outcome.everything()) == []
    assert all(float(e["seconds"]).is_integer() for e in site_rows(outcome)), site_rows(outcome)  # whole seconds
    still_serves(redteam)


def test_a_status_only_the_site_may_say_forged_with_its_sentence(redteam: RedTeam) -> None:
    """Suppression's sentence holds a number (the threshold): a task process claiming it picks the number."""
    forge = """result.status = 'suppressed'
result.error_where = 'fewer than ' + str({BIG} + n) + ' training rows at this site'"""
    outcome = redteam.train(hostile(COUNT + "\n" + patched(PATCH, "forge", forge)), "forged-status")
    assert BIG_SEEN.findall(outcome.everything()) == []
    assert set(failed(outcome).values()) == {"Exception in the task"}
    still_serves(redteam)


def test_the_size_of_what_leaves_carries_nothing_of_the_header_room(redteam: RedTeam) -> None:
    """The frame's header room is the task process's to choose; the bytes a site sent are shown to the researcher."""
    resend = "blob = bytearray(encode_result(result, reserve=4096 + 512 * n))"
    outcome = redteam.train(hostile(COUNT + "\n" + patched(SEND, "resend", resend)), "header-room")
    assert outcome.status == "completed", outcome.said
    sent = {(e["site"], e["round"]): e["sent_bytes"] for e in site_rows(outcome)}
    assert sent[(SITES[0], 1)] == sent[(SITES[1], 1)], sent  # the same model's update: the same size at both
    still_serves(redteam)


def test_a_result_that_is_not_one_names_no_exception_of_the_tasks_choosing(redteam: RedTeam) -> None:
    """The header of what the task process sends is parsed by the agent: which exception that meets is a choice."""
    resend = """import json, struct
head = json.dumps({'status': 'ok', 'LEAK' + str(n): n}).encode()
blob = bytearray(struct.pack('<Q', len(head)) + head)"""
    outcome = redteam.train(hostile(COUNT + "\n" + patched(SEND, "resend", resend)), "not-a-result")
    assert outcome.leaked() == []
    assert set(failed(outcome).values()) == {"BadResult in the task process (its result could not be read)"}
    still_serves(redteam)


def test_after_these_attacks_every_site_still_trains(redteam) -> None:
    still_trains(redteam)
