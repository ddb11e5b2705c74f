"""A task process's output in the site's log (``site_agent.tasks.output``): at most a step's lines and bytes, then one
note, and the rest read and dropped."""

from __future__ import annotations

import io
from pathlib import Path

from site_agent.tasks.output import LogLimit, TaskOutput


class Pipe(io.BytesIO):
    """A pipe's reading end as the copier sees it: what the task wrote, in reads of at most ``size``."""

    def __init__(self, data: bytes, size: int = 1000) -> None:
        super().__init__(data)
        self.size = size

    def read1(self, size: int = -1) -> bytes:
        return super().read1(min(self.size, size if size > 0 else self.size))


def copied(tmp_path: Path, data: bytes, limit: LogLimit, cuts: list[str] | None = None) -> str:
    output = TaskOutput(tmp_path / "spare.log", limit, None if cuts is None else cuts.append)
    output.switch(tmp_path / "run.log", "r1")
    output.begin_step()
    output.copy(Pipe(data))
    return (tmp_path / "run.log").read_text()


def test_output_within_the_limit_is_kept_whole(tmp_path: Path) -> None:
    cuts: list[str] = []
    text = "".join(f"line {i}\n" for i in range(50))
    assert copied(tmp_path, text.encode(), LogLimit(lines=50, bytes=10_000), cuts) == text
    assert cuts == []


def test_a_step_past_its_bytes_is_cut_there_with_one_note(tmp_path: Path) -> None:
    cuts: list[str] = []
    kept = copied(tmp_path, b"x" * 50_000, LogLimit(lines=100, bytes=4096), cuts)
    assert kept.startswith("x" * 4096) and kept.count("x") == 4096
    assert kept.count("the rest of it was not kept") == 1
    assert cuts == ["r1"]  # told once, with the run's name


def test_a_step_past_its_lines_is_cut_after_the_last_line_it_may_keep(tmp_path: Path) -> None:
    cuts: list[str] = []
    kept = copied(tmp_path, b"\n" * 10_000 + b"after\n", LogLimit(lines=7, bytes=1 << 20), cuts)
    assert kept.startswith("\n" * 7 + "\n--- FLIP: this step's output passed")
    assert "after" not in kept and cuts == ["r1"]


def test_each_step_starts_afresh(tmp_path: Path) -> None:
    cuts: list[str] = []
    output = TaskOutput(tmp_path / "run.log", LogLimit(lines=1000, bytes=100), cuts.append)
    for step in range(3):
        output.begin_step()
        output.copy(Pipe(f"step {step} ".encode() * 50))
    kept = (tmp_path / "run.log").read_text()
    assert [kept.count(f"step {n} ") for n in range(3)] == [14, 14, 14]  # 100 bytes a step, each step's own
    assert len(cuts) == 3
