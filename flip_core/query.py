"""A federated query and each site's answer, as plain data, and their bytes.

A query asks every chosen site for one statistic over the rows of a dataset that match a filter
(``flip_core.filters``). Each site computes it on its own rows and applies its disclosure
control before anything leaves (``site_agent.queries.statistics``); the coordinator pools what the
sites released (``coordinator.pooling``). Nothing here computes: it only says what travels.

What a site releases is one of two shapes:

- a **count table** (``count``, ``count by``, ``hist``, ``crosstab``, ``missing``, ``top``): ``dims`` (the
  column names it is counted by, in order), ``levels`` (for each dim, its level labels as text; a
  value too few rows of the site's whole table hold is not named but counted under ``OTHER_LEVEL``),
  ``cells`` (the counts, flattened in C order over the levels; ``None`` for a withheld cell, so
  that a small count and a true zero look the same) and ``total`` (the rows counted, ``None``
  when withheld);
- **column statistics** (``stats``): per column ``n`` (rows with a value), ``missing``, ``mean``,
  ``std`` (sample, ddof 1), ``quantiles`` (p5, p25, p50, p75, p95, the site's own) and ``sketch``
  (centroids ``[mean, weight]``, each the mean of at least the threshold's number of values, for
  pooled quantiles); any of them ``None`` when withheld. ``n`` and ``missing`` are released together
  when ``n`` reaches the threshold (exact pooling needs ``n``, and ``n`` with the cohort's size gives
  ``missing`` anyway), so a small count of missing values can leave here, unlike in ``missing``.

A ``mock`` answer is a synthetic table instead: ``columns``, ``dtypes`` and ``rows`` (lists, ``None``
for a missing value), made at the site from coarse per-column marginals (``site_agent.queries.mock``).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from typing import Any

from flip_core import VERSION
from flip_core.status import StepStatus

MESSAGE_TYPE_QUERY = "query"  # Flower's own message type for questions that are not training
MAX_QUERY_CHARS = 4000  # the longest filter or query text anyone is asked to read
MAX_COLUMNS = 20
# what a query within an OMOP cohort may ask beside the dataset's columns: of each person at the cohort's index date
COHORT_COLUMNS = ("age", "age_group", "index_year")
TOP_DOMAINS = ("condition", "drug", "procedure", "measurement", "observation")  # ``top``'s one column
MAX_BINS = 100
QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)
QUANTILE_NAMES = ("p5", "p25", "p50", "p75", "p95")
MISSING_LEVEL = "(missing)"
OTHER_LEVEL = "(other)"


def level_key(label: str) -> tuple[int, float, str]:
    """Where a level's label sorts, at the sites and in pooling alike: numbers numerically, then text, then
    ``OTHER_LEVEL`` (the values a site does not name: too few rows hold each), then ``MISSING_LEVEL``."""
    if label == MISSING_LEVEL:
        return (3, 0.0, "")
    if label == OTHER_LEVEL:
        return (2, 0.0, "")
    try:
        number = float(label)
    except ValueError:
        return (1, 0.0, label)
    return (1, 0.0, label) if math.isnan(number) else (0, number, label)


class QueryKind(StrEnum):
    COUNT = "count"  # rows, optionally counted by up to three columns
    STATS = "stats"  # n, mean, std, quantiles of numeric columns
    HIST = "hist"  # a histogram of one numeric column over shared edges
    CROSSTAB = "crosstab"  # counts by two columns
    MISSING = "missing"  # how many rows lack a value, per column
    COHORT = "cohort"  # freeze the matching rows at each site under a name, for training (their count leaves)
    MOCK = "mock"  # the site's synthetic mock of the dataset, made there under its disclosure rules (no real row)
    TOP = "top"  # an OMOP database's most frequent concepts of a domain (condition, drug...): persons counted by each
    RELEASE = "release"  # hold an item for the site's airlock (``flip_core.airlock``): its admin reviews it
    RELEASES = "releases"  # the state of the researcher's airlock requests at the site, and released items
    GLM = "glm"  # one step of a model fitted across sites (``model``: its formula, family, stage, coefficients)
    SURVIVAL = "survival"  # Kaplan-Meier counts or one step of a Cox model (``model``: its kind, columns, stage...)


# kinds a researcher does not ask as a query (``POST /api/queries``), and where they are asked instead
ELSEWHERE = {
    QueryKind.RELEASE: "an item is asked of a site's airlock with %flip_request (POST /api/airlock), not as a query",
    QueryKind.RELEASES: "an item is asked of a site's airlock with %flip_request (POST /api/airlock), not as a query",
    QueryKind.GLM: "a model is fitted with %flip_model glm (POST /api/glm), not as a query",
    QueryKind.SURVIVAL: "survival is asked with %flip_survival (POST /api/survival), not as a query",
}


@dataclass(frozen=True)
class QueryRequest:
    """One query at one site (the same for every site asked)."""

    query_id: str
    project: str
    researcher: str
    dataset: str
    kind: QueryKind
    columns: tuple[str, ...] = ()
    where: str = ""  # the filter's text ("" = every row)
    edges: tuple[float, ...] = ()  # hist: the bin edges every site uses (values outside count as below/above)
    threshold: int = 0  # the project's asked threshold: raises the site's, never lowers it
    text: str = ""  # the query as the researcher wrote it (for the site's audit log)
    # COHORT: the name the matching rows are frozen under, per project; any other kind: answer within that frozen
    # cohort's rows (an OMOP cohort's with its index date's columns, ``COHORT_COLUMNS``)
    cohort: str = ""
    circe: str = (
        ""  # COHORT: an OHDSI Circe cohort definition (JSON), rendered to SQL at each site, instead of a filter
    )
    limit: int = 0  # TOP: how many concepts each site names at most (the most frequent)
    # RELEASE: the ask (``flip_core.airlock.ReleaseAsk.to_dict``); RELEASES: {"requests": [ids], "content": bool}
    airlock: dict[str, Any] = field(default_factory=dict)
    # GLM: {"formula", "family", "stage" ("levels" | "step"), "levels" (agreed), "beta", "sites" (how many asked)};
    # SURVIVAL: {"kind" ("km" | "cox"), "time", "event", "edges", "group", "terms", "binned", "stage" ("levels" |
    # "counts" | "step"), "levels", "beta", "sites"}
    model: dict[str, Any] = field(default_factory=dict)


@dataclass
class QueryReply:
    """What one site released for a query."""

    site: str
    status: StepStatus
    reason: str = ""  # a refusal's or failure's sentence, fixed text the researcher may read
    threshold: int = 0  # the disclosure threshold this site applied
    table: dict[str, Any] = field(default_factory=dict)  # a count table or column statistics (see above)
    version: str = VERSION
    seconds: float = 0.0


def encode_query(request: QueryRequest) -> bytes:
    return json.dumps(asdict(request)).encode()


def decode_query(blob: bytes | bytearray) -> QueryRequest:
    head = json.loads(blob)
    head["kind"] = QueryKind(head["kind"])
    head["columns"] = tuple(head["columns"])
    head["edges"] = tuple(float(e) for e in head["edges"])
    return QueryRequest(**head)


def encode_reply(reply: QueryReply) -> bytes:
    return json.dumps(asdict(reply), allow_nan=False).encode()


def decode_reply(blob: bytes | bytearray) -> QueryReply:
    head = json.loads(blob)
    head["status"] = StepStatus(head["status"])
    return QueryReply(**head)


__all__ = [
    "ELSEWHERE",
    "MAX_BINS",
    "MAX_COLUMNS",
    "MAX_QUERY_CHARS",
    "MESSAGE_TYPE_QUERY",
    "MISSING_LEVEL",
    "OTHER_LEVEL",
    "QUANTILES",
    "QUANTILE_NAMES",
    "QueryKind",
    "QueryReply",
    "QueryRequest",
    "decode_query",
    "decode_reply",
    "encode_query",
    "encode_reply",
    "level_key",
]
