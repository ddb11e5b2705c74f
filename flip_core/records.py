"""Two run records side by side: does every metric match, and if not, which inputs changed.

Pure functions over the records the coordinator keeps (``coordinator.records`` adds what they hold beyond the
task). ``flip rerun`` and ``%flip_compare`` print what :func:`compare` finds. A rerun with the same seed, code,
sites, data and packages on CPU gives the same bits; the :attr:`Comparison.notes` say what can break that even
when no input changed (a GPU, differential privacy's fresh noise, a model summed in arrival order)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

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


def metric_values(record: dict[str, Any]) -> dict[Key, float]:
    values: dict[Key, float] = {}
    for row in record.get("history") or []:
        values[(int(row["round"]), str(row["site"]), str(row["phase"]), str(row["metric"]))] = float(row["value"])
    return values


def final_metrics(history: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Per series (``global`` or a site) and ``"phase metric"``, the value of the last round."""
    last: dict[tuple[str, str], tuple[int, float]] = {}
    for row in history:
        series, key = str(row.get("site", "global")), f"{row.get('phase', '')} {row.get('metric', '')}".strip()
        round_ = int(row.get("round") or 0)
        if (series, key) not in last or round_ >= last[series, key][0]:
            last[series, key] = (round_, float(row.get("value", float("nan"))))
    out: dict[str, dict[str, float]] = {}
    for (series, key), (_, value) in sorted(last.items()):
        out.setdefault(series, {})[key] = value
    return out


def compare(a: dict[str, Any], b: dict[str, Any]) -> Comparison:
    """Record ``a`` beside record ``b``: each metric (equal only when bit-identical) and what changed."""
    out = Comparison(str(a.get("run_id", "A")), str(b.get("run_id", "B")))
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
    out.models = (a.get("model_sha256"), b.get("model_sha256"))
    out.changes = changed_inputs(a, b)
    out.notes = _notes(a) + [n for n in _notes(b) if n not in _notes(a)]
    return out


def _short(value: Any) -> str:
    text = str(value)
    return text[:19] + "…" if len(text) > 20 and ":" in text[:8] else text


def _diff(label: str, x: Any, y: Any) -> list[str]:
    return [] if x == y else [f"{label} changed ({_short(x)} → {_short(y)})"]


def _dict_diff(label: str, x: dict[str, Any] | None, y: dict[str, Any] | None) -> list[str]:
    x, y = x or {}, y or {}
    return [s for k in sorted(set(x) | set(y)) for s in _diff(f"{label} {k}", x.get(k, "absent"), y.get(k, "absent"))]


def changed_inputs(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    """The recorded inputs of two runs that differ, each in a sentence that names it (and the site)."""
    out = _diff("the seed", a.get("seed"), b.get("seed"))
    out += _diff("the cell's code hash", a.get("source_hash"), b.get("source_hash"))
    for label in ("dataset", "rounds", "strategy"):
        out += _diff(f"the {label}", a.get(label), b.get(label))
    out += _dict_diff("the strategy option", a.get("strategy_options"), b.get("strategy_options"))
    out += _dict_diff("--config", a.get("config"), b.get("config"))
    out += _diff("the cohort", (a.get("cohort") or {}).get("where"), (b.get("cohort") or {}).get("where"))
    na, nb = a.get("notebook") or {}, b.get("notebook") or {}
    out += _diff("the notebook file", na.get("sha256"), nb.get("sha256"))
    out += _dict_diff("the notebook parameter", na.get("parameters"), nb.get("parameters"))
    out += _dict_diff("the hub's", a.get("hub_packages"), b.get("hub_packages"))
    out += _diff("the hub's installed package set", a.get("hub_environment"), b.get("hub_environment"))
    out += _dict_diff("the notebook kernel's", a.get("client_packages"), b.get("client_packages"))
    out += _diff(
        "the notebook kernel's installed package set", a.get("client_environment"), b.get("client_environment")
    )
    out += _sites(a, b)
    if not out:
        out += _diff("the initial model", a.get("initial_model_sha256"), b.get("initial_model_sha256"))
    return out


def _site_view(record: dict[str, Any], site: str) -> dict[str, Any]:
    announced = (record.get("site_datasets") or {}).get(site) or {}
    used = (record.get("site_info") or {}).get(site) or {}
    environment = (record.get("site_packages") or {}).get(site) or {}
    return {
        "fingerprint": used.get("fingerprint") or announced.get("fingerprint", ""),
        "rows": (used.get("train_rows"), used.get("test_rows")),
        "device": used.get("device", ""),
        "threads": used.get("threads"),
        "version": used.get("version", ""),
        "packages": environment.get("packages") or {},
        "environment": environment.get("hash", ""),
    }


def _sites(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    sa, sb = list(a.get("sites") or []), list(b.get("sites") or [])
    out = [f"site {s} took part in {a.get('run_id')} but not in {b.get('run_id')}" for s in sa if s not in sb]
    out += [f"site {s} took part in {b.get('run_id')} but not in {a.get('run_id')}" for s in sb if s not in sa]
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


def _notes(record: dict[str, Any]) -> list[str]:
    run = record.get("run_id", "?")
    notes = []
    if (record.get("config") or {}).get("dp_epsilon") is not None:
        notes.append(
            f"run {run} is differentially private: each site draws fresh noise every run (never from the seed), "
            "so its metrics differ from run to run"
        )
    for site, info in sorted((record.get("site_info") or {}).items()):
        if str((info or {}).get("device", "")).startswith("cuda"):
            notes.append(f"run {run}: site {site} trained on a GPU ({info['device']}), whose kernels need not repeat")
    if record.get("aggregation_ordered") is False:
        notes.append(
            f"run {run}: the hub summed the sites' updates as they arrived (a model over 64 MiB), so its last bits "
            "depend on the order of the replies"
        )
    if record.get("status") not in (None, "completed"):
        notes.append(f"run {run} did not complete ({record.get('status')})")
    return notes


__all__ = ["Comparison", "changed_inputs", "compare", "final_metrics", "metric_values"]
