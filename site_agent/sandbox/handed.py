"""The site's files, handed in: opened before the sandbox (by the agent's user), read through their descriptors
inside it, so their modes need not let the task user read them. Which files a task process is handed is the
data's to say (``site_agent.data.formats.handed_files``); this is the mechanism.
"""

from __future__ import annotations

import errno
import io
import os
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO


@dataclass
class HandedFiles:
    """Files opened before the sandbox (by the agent's user), read through their descriptors inside it."""

    fds: dict[str, int] = field(default_factory=dict)

    @classmethod
    def open(cls, paths: Iterable[Path]) -> HandedFiles:
        handed = cls()
        for path in paths:
            try:
                handed.fds[str(path)] = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            except OSError as exc:
                print(f"WARNING: {path} cannot be opened for tasks ({exc.strerror})", file=sys.stderr, flush=True)
        return handed

    def opener(self, path: Path) -> IO[bytes]:
        """A fresh reader of ``path`` from its descriptor (FileNotFoundError: it was not handed in)."""
        fd = self.fds.get(str(path))
        if fd is None:
            raise FileNotFoundError(errno.ENOENT, "not handed to the task", str(path))
        chunks, offset = [], 0
        while chunk := os.pread(fd, 1 << 20, offset):
            chunks.append(chunk)
            offset += len(chunk)
        return io.BytesIO(b"".join(chunks))
