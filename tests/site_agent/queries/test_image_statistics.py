"""Voxel intensity histograms of an imaging dataset's cases, under the site's disclosure control."""

from __future__ import annotations

import numpy as np
import pytest

from site_agent.queries.image_statistics import voxel_histogram
from site_agent.queries.statistics import QueryRefused

from fakes import fake_images


def test_voxels_are_counted_per_bin_with_the_outside_below_and_above() -> None:
    arrays = {f"case{i}": np.full((4, 4), 10.0 * (i % 3)) for i in range(30)}  # 10 cases each at 0, 10, 20
    arrays["case0"] = np.array([[-5.0, 0.0], [35.0, np.nan]])
    paths, load = fake_images(arrays)
    released = voxel_histogram(paths, (0.0, 15.0, 30.0), threshold=5, load=load)
    assert released["levels"] == [["below 0", "[0, 15)", "[15, 30]", "above 30"]]
    # below and above: one voxel of case0 each, one case behind each; withheld, and since the two together are
    # behind fewer than 5 cases, so is the released bin with the fewest cases behind it ([15, 30]: 10)
    assert released["cells"] == [None, 9 * 16 + 1 + 10 * 16, None, None]
    assert released["total"] == sum(int(np.isfinite(a).sum()) for a in arrays.values())
    assert released["edges"] == [0.0, 15.0, 30.0]


def test_a_bin_behind_too_few_cases_takes_its_smallest_complement_with_it() -> None:
    arrays = {f"case{i}": np.zeros((2, 2)) for i in range(20)}
    arrays["case0"] = np.array([[50.0, 50.0], [0.0, 0.0]])  # the only case with voxels in the top bin
    paths, load = fake_images(arrays)
    released = voxel_histogram(paths, (0.0, 25.0, 75.0), threshold=10, load=load)
    cells = released["cells"]
    assert cells[2] is None  # the top bin: one case behind it
    assert sum(c is None for c in cells) >= 2  # and never alone: the total minus the rest would give it
    with pytest.raises(QueryRefused, match="at most 2"):
        voxel_histogram(paths, (0.0, 1.0, 2.0, 3.0), threshold=10, load=load)


def test_fewer_cases_than_the_threshold_release_nothing() -> None:
    paths, load = fake_images({f"case{i}": np.ones((3, 3)) for i in range(4)})
    released = voxel_histogram(paths, (0.0, 2.0), threshold=5, load=load)
    assert released["cells"] == [None, None, None] and released["total"] is None
