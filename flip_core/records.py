"""Two run records side by side: does every metric match, and if not, which inputs changed.

Pure functions over the records the coordinator keeps (``coordinator.records`` adds what they hold beyond the
task). ``flip rerun`` and ``%flip_compare`` print what :func:`compare` finds. A rerun with the same seed, code,
sites, data and packages on CPU gives the same bits; the :attr:`Comparison.notes` say what can break that even
when no input changed (a GPU, differential privacy's fresh noise, a model summed in arrival order)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from flip_core.runs import MetricRow, RunRecord, SiteUse

Key = tuple[int, str, str, str]  # round, site (or "global"), phase, metric


@dataclass
class Comparison:
    run_a: str
    run_b: str
    rows: list[dict[str, Any]] = field(default_factory=list)  # every metric of either run, side by side
    changes: list[str] = field(default_factory=list)  # the inputs that differ, in sentences
    notes: list[str] = field(default_factory=list)  # what may break bit-identity although no input changed
    models: tuple[str | None, str | None] = (None, None)  # each run's final model checksum

    @property
    def same_model(self) -> bool:
        return self.models[0] is not None and self.models[0] == self.models[1]

    @property
    def differing(self) -> list[dict[str, Any]]:
        return [r for r in self.rows if not r["equal"]]

    @property
    def identical(self) -> bool:
        """Every metric of both runs is present in both and equal to the bit (and both released some), and where
        both runs ended with a model, the models are the same bits."""
        models_differ = None not in self.models and not self.same_model
        return bool(self.rows) and not self.differing and not models_differ

    def summary(self) -> str:
        """A few lines for a terminal: the verdict, the changed inputs, the notes."""
        if self.identical:
            head = f"runs {self.run_a} and {self.run_b}: all {len(self.rows)} metrics identical"
        else:
            head = f"runs {self.run_a} and {self.run_b}: {len(self.differing)} of {len(self.rows)} metrics differ"
        lines = [head]
        if None not in self.models:
            lines.append(f"final models: {'the same' if self.same_model else 'different'} (sha256 "
                         f"{str(self.models[0])[:12]}… and {str(self.models[1])[:12]}…)")  # fmt: skip
        if self.changes:
            lines.append("inputs that changed:")
            lines += [f"  - {c}" for c in self.changes]
        elif not self.identical:
            lines.append("no recorded input changed")
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)


def metric_values(record: RunRecord) -> dict[Key, float]:
    """Every metric of a record by (round, site, phase, metric); a metric released twice keeps its last value."""
    return {(row.round, row.site, row.phase, row.metric): row.value for row in record.history}


def final_metrics(history: list[MetricRow]) -> dict[str, dict[str, float]]:
    """Per series (``global`` or a site) and ``"phase metric"``, the value of the last round."""
    last: dict[tuple[str, str], tuple[int, float]] = {}
    for row in history:
        series, key = row.site, f"{row.phase} {row.metric}".strip()
        if (series, key) not in last or row.round >= last[series, key][0]:
            last[series, key] = (row.round, row.value)
    out: dict[str, dict[str, float]] = {}
    for (series, key), (_, value) in sorted(last.items()):
        out.setdefault(series, {})[key] = value
    return out


def compare(a: RunRecord, b: RunRecord) -> Comparison:
    """Record ``a`` beside record ``b``: each metric (equal only when bit-identical) and what changed."""
    out = Comparison(a.run_id, b.run_id)
    va, vb = metric_values(a), metric_values(b)
    for key in sorted(set(va) | set(vb), key=lambda k: (k[0], k[1] != "global", k[1], k[2], k[3])):
        x, y = va.get(key), vb.get(key)
        out.rows.append(
            {
                "round": key[0],
                "site": key[1],
                "phase": key[2],
                "metric": key[3],
                "a": x,
                "b": y,
                "equal": x is not None and y is not None and x == y,
                "difference": None if x is None or y is None else y - x,
            }
        )
    out.models = (a.model_sha256, b.model_sha256)
    out.changes = changed_inputs(a, b)
    out.notes = _notes(a) + [n for n in _notes(b) if n not in _notes(a)]
    return out


def _short(value: Any) -> str:
    text = str(value)
    return text[:19] + "…" if len(text) > 20 and ":" in text[:8] else text


def _diff(label: str, x: Any, y: Any) -> list[str]:
    return [] if x == y else [f"{label} changed ({_short(x)} → {_short(y)})"]


def _dict_diff(label: str, x: Mapping[str, Any] | None, y: Mapping[str, Any] | None) -> list[str]:
    x, y = x or {}, y or {}
    return [s for k in sorted(set(x) | set(y)) for s in _diff(f"{label} {k}", x.get(k, "absent"), y.get(k, "absent"))]


def changed_inputs(a: RunRecord, b: RunRecord) -> list[str]:
    """The recorded inputs of two runs that differ, each in a sentence that names it (and the site)."""
    out = _diff("the seed", a.seed, b.seed)
    out += _diff("the cell's code hash", a.source_hash, b.source_hash)
    out += _diff("the dataset", a.dataset, b.dataset)
    out += _diff("the rounds", a.rounds, b.rounds)
    out += _diff("the strategy", a.strategy, b.strategy)
    out += _dict_diff("the strategy option", a.strategy_options, b.strategy_options)
    out += _dict_diff("--config", a.config, b.config)
    out += _diff("the cohort", a.cohort.where if a.cohort else None, b.cohort.where if b.cohort else None)
    out += _dict_diff("the covariates'", a.covariates, b.covariates)
    na, nb = a.notebook, b.notebook
    out += _diff("the notebook file", na.sha256 if na else None, nb.sha256 if nb else None)
    out += _dict_diff("the notebook parameter", na.parameters if na else None, nb.parameters if nb else None)
    out += _dict_diff("the hub's", a.hub_packages, b.hub_packages)
    out += _diff("the hub's installed package set", a.hub_environment, b.hub_environment)
    out += _dict_diff("the notebook kernel's", a.client_packages, b.client_packages)
    out += _diff("the notebook kernel's installed package set", a.client_environment, b.client_environment)
    out += _sites(a, b)
    if not out:
        out += _diff("the initial model", a.initial_model_sha256, b.initial_model_sha256)
    return out


def _site_view(record: RunRecord, site: str) -> dict[str, Any]:
    announced = record.site_datasets.get(site)
    used = record.site_info.get(site) or SiteUse()
    environment = record.site_packages.get(site)
    return {
        "fingerprint": used.fingerprint or (announced.fingerprint if announced else ""),
        "rows": (used.train_rows, used.test_rows),
        "device": used.device,
        "threads": used.threads,
        "version": used.version,
        "packages": environment.packages if environment else {},
        "environment": environment.hash if environment else "",
    }


def _sites(a: RunRecord, b: RunRecord) -> list[str]:
    sa, sb = a.sites, b.sites
    out = [f"site {s} took part in {a.run_id} but not in {b.run_id}" for s in sa if s not in sb]
    out += [f"site {s} took part in {b.run_id} but not in {a.run_id}" for s in sb if s not in sa]
    for site in (s for s in sa if s in sb):
        x, y = _site_view(a, site), _site_view(b, site)
        out += _diff(f"site {site}'s dataset fingerprint", x["fingerprint"], y["fingerprint"])
        if x["fingerprint"] == y["fingerprint"]:
            out += _diff(f"site {site}'s train/test rows", x["rows"], y["rows"])
        out += _diff(f"site {site}'s device", x["device"], y["device"])
        out += _diff(f"site {site}'s torch threads", x["threads"], y["threads"])
        out += _diff(f"site {site}'s FLIP version", x["version"], y["version"])
        out += _dict_diff(f"site {site}'s", x["packages"], y["packages"])
        out += _diff(f"site {site}'s installed package set", x["environment"], y["environment"])
    return out


def _notes(record: RunRecord) -> list[str]:
    run = record.run_id
    notes = []
    if record.config.get("dp_epsilon") is not None:
        notes.append(
            f"run {run} is differentially private: each site draws fresh noise every run (never from the seed), "
            "so its metrics differ from run to run"
        )
    for site, info in sorted(record.site_info.items()):
        if info.device.startswith("cuda"):
            notes.append(f"run {run}: site {site} trained on a GPU ({info.device}), whose kernels need not repeat")
    if record.aggregation_ordered is False:
        notes.append(
            f"run {run}: the hub summed the sites' updates as they arrived (a model over 64 MiB), so its last bits "
            "depend on the order of the replies"
        )
    if record.status not in ("", "completed"):
        notes.append(f"run {run} did not complete ({record.status})")
    return notes


__all__ = ["Comparison", "changed_inputs", "compare", "final_metrics", "metric_values"]
