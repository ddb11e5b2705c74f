"""The per-person table a covariate specification declares (``flip_core.covariates``), built in an OMOP CDM database.

The SQL is the site's own: its shape comes from this module, table and column names from :data:`DOMAINS` alone,
and everything the specification gives (concept ids, windows) travels as bound parameters, never as text in the
statement. The concept sets that ask for their ``descendants`` are expanded first, all in one statement, through
the CDM's ``concept_ancestor``. The whole build is held to the source's statement timeout, whatever its statements:
each is given what is left of it. The persons are the run's cohort with its index dates (a Circe cohort's starts), or
every person with the start of observation as index; the table keeps their order (by person id, as the registered
persons' table), so a cohort's frozen row positions and the dataset's registered split by person both apply to it.
The person ids stay in the database: the table holds the declared columns only.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from flip_core.covariates import ConceptSet, Covariates, Feature, Outcome
from site_agent.data.catalog import CatalogError
from site_agent.data.omop_db import Session, session

if TYPE_CHECKING:
    import pandas as pd

    from site_agent.data.omop_db import Source

# each domain's table, its concept column and its date column (the CDM's own names)
DOMAINS = {
    "condition": ("condition_occurrence", "condition_concept_id", "condition_start_date"),
    "drug": ("drug_exposure", "drug_concept_id", "drug_exposure_start_date"),
    "procedure": ("procedure_occurrence", "procedure_concept_id", "procedure_date"),
    "measurement": ("measurement", "measurement_concept_id", "measurement_date"),
    "observation": ("observation", "observation_concept_id", "observation_date"),
}
GENDER = (
    "coalesce(g.concept_name, case p.gender_concept_id when 8507 then 'MALE' when 8532 then 'FEMALE' "
    "else 'unknown' end)"
)


def build(source: Source, spec: Covariates, rows: list[int] | None, index: list[str] | None) -> pd.DataFrame:
    """The table of ``spec`` for the persons at ``rows`` (positions among the database's persons, by id; None:
    all of them), each at its ``index`` date (ISO, one per row; None: the start of its observation); all of it
    within the source's statement timeout, else DatabaseUnanswered."""
    import pandas as pd

    with session(source, "the covariates' query") as db:
        order = db.person_ids()
        chosen = order if rows is None else [order[i] for i in rows]
        if index is not None and len(index) != len(chosen):
            raise CatalogError("the cohort's index dates do not match its rows: the cohort is made again")
        concepts = _expanded(db, source.cdm_schema, [*spec.features, *([spec.outcome] if spec.outcome else [])])
        sql, params = _statement(source.cdm_schema, spec, concepts)
        params.update(persons=chosen, index=index if index is not None else [None] * len(chosen))
        cursor = db.execute(sql, params)
        table = pd.DataFrame(cursor.fetchall(), columns=[d.name for d in cursor.description or ()])
    return _finish(table, spec)


def _expanded(db: Session, cdm: str, sets: list[ConceptSet]) -> list[list[int]]:
    """Each set's concepts, with their descendants in the vocabulary where it asks for them: one statement for all
    the sets (not one each, every one of which the statement timeout alone would allow)."""
    wanted = [sorted(set(s.concepts)) for s in sets]
    asked = [(i, c) for i, s in enumerate(sets) if s.descendants for c in wanted[i]]
    below: dict[int, set[int]] = {}
    if asked:
        found = db.execute(
            "select distinct x.s, a.descendant_concept_id from unnest(%s::int[], %s::bigint[]) as x(s, c) "
            f"join {cdm}.concept_ancestor a on a.ancestor_concept_id = x.c",
            [[i for i, _ in asked], [c for _, c in asked]],
        ).fetchall()
        for i, concept in found:
            below.setdefault(i, set()).add(int(concept))
    return [sorted({*w, *below.get(i, ())}) for i, w in enumerate(wanted)]


def _statement(cdm: str, spec: Covariates, concepts: list[list[int]]) -> tuple[str, dict[str, Any]]:
    """One statement: the persons with their index dates, a left join per feature and for the outcome."""
    params: dict[str, Any] = {}
    columns = [
        f"{GENDER} as gender",
        "extract(year from c.index_date)::int - p.year_of_birth as age",
        "extract(year from c.index_date)::int as index_year",
    ]
    joins = []
    for i, feature in enumerate(spec.features):
        params[f"c{i}"], params[f"lo{i}"], params[f"hi{i}"] = concepts[i], *feature.window
        joins.append(f"left join ({_feature(cdm, feature, i)}) f{i} on f{i}.person_id = c.person_id")
        columns.append(f"f{i}.v as f{i}")
    if spec.outcome is not None:
        o, n = spec.outcome, len(spec.features)
        params["oc"], params["olo"], params["ohi"] = concepts[n], *o.window
        joins.append(f"left join ({_outcome(cdm, o)}) o on o.person_id = c.person_id")
        columns += ["o.days as outcome_days", "(op.last_day - c.index_date)::int as observed_days"]
        columns.append("%(ohi)s::int as o_hi")
    sql = f"""
with c as (
    select x.person_id, coalesce(x.index_date, op.first_day) as index_date
    from unnest(%(persons)s::bigint[], %(index)s::date[]) as x(person_id, index_date)
    left join (select person_id, min(observation_period_start_date) as first_day
               from {cdm}.observation_period group by person_id) op on op.person_id = x.person_id
)
select {", ".join(columns)}
from c
join {cdm}.person p on p.person_id = c.person_id
left join {cdm}.concept g on g.concept_id = p.gender_concept_id
left join (select person_id, max(observation_period_end_date) as last_day
           from {cdm}.observation_period group by person_id) op on op.person_id = c.person_id
{chr(10).join(joins)}
order by c.person_id
"""
    return sql, params


def _feature(cdm: str, feature: Feature, i: int) -> str:
    table, concept, date = DOMAINS[feature.domain]
    within = (
        f"from c join {cdm}.{table} x on x.person_id = c.person_id where x.{concept} = any(%(c{i})s) "
        f"and x.{date} between c.index_date + %(lo{i})s::int and c.index_date + %(hi{i})s::int"
    )
    if feature.value == "last":  # the latest value in the window (the highest id on the same day)
        return (
            f"select distinct on (x.person_id) x.person_id, x.value_as_number as v {within} "
            f"order by x.person_id, x.{date} desc, x.measurement_id desc"
        )
    return f"select x.person_id, count(*) as v {within} group by x.person_id"


def _outcome(cdm: str, outcome: Outcome) -> str:
    table, concept, date = DOMAINS[outcome.domain]
    return (
        f"select x.person_id, min(x.{date} - c.index_date) as days from c join {cdm}.{table} x "
        f"on x.person_id = c.person_id where x.{concept} = any(%(oc)s) "
        f"and x.{date} between c.index_date + %(olo)s::int and c.index_date + %(ohi)s::int group by x.person_id"
    )


def _finish(table: pd.DataFrame, spec: Covariates) -> pd.DataFrame:
    """The declared columns, named as declared: presence as 0 or 1, counts as whole numbers, the outcome's event and
    its days (to the event, else censored at the window's end or the end of observation)."""
    import numpy as np
    import pandas as pd

    out: dict[str, Any] = {d: table[d] for d in spec.demographics}  # made a frame once: 200 columns in one go
    for i, feature in enumerate(spec.features):
        value = table[f"f{i}"]
        if feature.value == "last":
            out[feature.name] = pd.to_numeric(value, errors="coerce").astype("float64")
        elif feature.value == "count":
            out[feature.name] = value.fillna(0).astype("int64")
        else:
            out[feature.name] = (value.fillna(0) > 0).astype("int64")
    if spec.outcome is not None:
        event = table["outcome_days"].notna()
        censored = np.minimum(table["o_hi"].astype("int64"), table["observed_days"].fillna(0).astype("int64"))
        out[spec.outcome.name] = event.astype("int64")
        out[f"{spec.outcome.name}_days"] = np.where(event, table["outcome_days"].fillna(0), censored).astype("int64")
    return pd.DataFrame(out, index=table.index).reset_index(drop=True)


def concept_persons(
    source: Source, domain: str, persons: list[int], index: list[str] | None, window: tuple[int, int]
) -> pd.DataFrame:
    """Which persons hold which concepts of ``domain``: the distinct (``person``, ``concept_id``,
    ``concept_name``) of the persons at positions ``persons`` (``person``: the place in that list), dated within
    ``window`` of each one's ``index`` date (None: at any time)."""
    import pandas as pd

    table, concept, date = DOMAINS[domain]
    cdm = source.cdm_schema
    dated = f"and x.{date} between c.index_date + %(lo)s::int and c.index_date + %(hi)s::int" if index else ""
    sql = f"""
with c as (select * from unnest(%(persons)s::bigint[], %(index)s::date[], %(n)s::int[]) as c(person_id, index_date, n))
select distinct c.n as person, x.{concept} as concept_id, coalesce(k.concept_name, '') as concept_name
from c join {cdm}.{table} x on x.person_id = c.person_id
left join {cdm}.concept k on k.concept_id = x.{concept}
where x.{concept} <> 0 {dated}
order by 1, 2
"""
    with session(source, "the concepts' query") as db:
        order = db.person_ids()
        chosen = [order[i] for i in persons]
        params: dict[str, Any] = {
            "persons": chosen, "index": index or [None] * len(chosen), "n": list(range(len(chosen))),
            "lo": window[0], "hi": window[1],
        }  # fmt: skip
        found = db.execute(sql, params).fetchall()
    return pd.DataFrame(found, columns=["person", "concept_id", "concept_name"])


__all__ = ["DOMAINS", "build", "concept_persons"]
