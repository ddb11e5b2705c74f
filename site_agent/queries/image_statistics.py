"""Voxel intensity histograms of an imaging dataset's cases, as a site may release them.

``hist intensity`` over an imaging dataset counts the *voxels* (pixels) of the matching cases' images in
shared bins (below the first edge, each bin, above the last edge), read from the registered files. A
bin's count leaves only when at least the site's threshold of cases have voxels in it; the bins are one
table whose total (the images' voxels) a researcher may know from the images' sizes, so a withheld bin
takes its complements with it (``site_agent.disclosure.suppression.protect`` over the cases behind each bin: at
least two bins withheld, with at least the threshold's number of cases behind them together). As for a
histogram of a column, there is at most one bin for every threshold cases, and the query's case set
passes the site's ledger against differencing first (``site_agent.queries.service``).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from site_agent.data.image_datasets import INTENSITY
from site_agent.data.images import load_array
from site_agent.disclosure.suppression import line_is_safe, protect
from site_agent.queries.statistics import bin_labels, hist_edges


def voxel_histogram(
    images: list[Path],
    edges: tuple[float, ...],
    threshold: int,
    load: Callable[[Path], np.ndarray] = load_array,
) -> dict[str, Any]:
    """The released count table of the voxels of ``images`` (one per matching case) over ``edges``."""
    n = len(images)
    bounds = hist_edges(edges, n, threshold, "cases")
    bins = bounds.size - 1
    counts = np.zeros(bins + 2, dtype=np.int64)
    cases = np.zeros(bins + 2, dtype=np.int64)  # how many cases have voxels in each cell
    for path in images:
        values = np.asarray(load(path), dtype=np.float64).reshape(-1)
        values = values[np.isfinite(values)]
        inside = values[(values >= bounds[0]) & (values <= bounds[-1])]
        in_bins, _ = np.histogram(inside, bins=bounds)  # [e_i, e_i+1), the last bin closed
        own = np.concatenate([[(values < bounds[0]).sum()], in_bins, [(values > bounds[-1]).sum()]])
        counts += own.astype(np.int64)
        cases += own > 0
    whole = np.arange(counts.size, dtype=np.intp)
    withheld = np.ones(counts.size, dtype=bool) if n < threshold else protect(cases, [whole], threshold)
    total_safe = n >= threshold and line_is_safe(cases, withheld, whole, threshold)
    labels = bin_labels(bounds)
    return {
        "dims": [INTENSITY],
        "levels": [labels],
        "cells": [None if hide else int(c) for c, hide in zip(counts.tolist(), withheld.tolist(), strict=True)],
        "total": int(counts.sum()) if total_safe else None,
        "edges": [float(e) for e in bounds],
    }
