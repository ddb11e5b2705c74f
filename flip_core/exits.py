"""Exit statuses as named tables, one per command (``flip``, ``flip-site``), the way Flower names each component's.

A command's table subclasses :class:`ExitCode`; each member is ``NAME = status, "what it means"``, and
:func:`help_epilog` writes the table for the command's ``--help``, so what a script may test is written once.
"""

from __future__ import annotations

import textwrap
from enum import IntEnum
from typing import Self


class ExitCode(IntEnum):
    """The base of a command's exit statuses: an ``int`` for ``sys.exit``, with the sentence ``--help`` gives."""

    meaning: str

    def __new__(cls, status: int, meaning: str = "") -> Self:
        member = int.__new__(cls, status)
        member._value_ = status
        member.meaning = meaning
        return member


def help_epilog(codes: type[ExitCode]) -> str:
    """The exit statuses of a command, one per line, for its ``--help`` (argparse's ``epilog``)."""
    lines = [
        textwrap.fill(code.meaning, 100, initial_indent=f"  {code.value}  ", subsequent_indent="     ")
        for code in codes
    ]
    return "exit statuses:\n" + "\n".join(lines)


__all__ = ["ExitCode", "help_epilog"]
