"""The warm task process: one per run at a site, started by the site agent.

It loads torch, the cell and the site's split once and then serves the run's steps, one at
a time, over the connection the agent handed it (file descriptor ``--fd``). Its stdout and
stderr go to the site log, never to the hub.
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time
from multiprocessing.connection import Connection
from pathlib import Path

from site_agent.catalog import load_site
from site_agent.protocol import decode_request, encode_result
from site_agent.runner import TaskSession
from site_agent.tasks import READY

ENV_THREADS = "FLIP_TASK_THREADS"
PARENT_CHECK_SECONDS = 0.5


def _watch_parent(parent: int) -> None:
    """Exit at once when the site agent is gone, even in the middle of a step."""
    while os.getppid() == parent:
        time.sleep(PARENT_CHECK_SECONDS)
    os._exit(1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m site_agent.worker")
    parser.add_argument("site_dir", type=Path)
    parser.add_argument("--fd", type=int, required=True)
    args = parser.parse_args(argv)
    parent = os.getppid()
    threading.Thread(target=_watch_parent, args=(parent,), daemon=True).start()
    import torch  # once per run, before the first step
    import torch._dynamo  # noqa: F401 - torch imports it when a cell makes its first optimizer (~3 s): here, not in round 1

    if os.environ.get(ENV_THREADS):
        torch.set_num_threads(int(os.environ[ENV_THREADS]))
    session = TaskSession(load_site(args.site_dir))
    conn = Connection(args.fd)
    conn.send_bytes(READY)
    while True:
        try:
            blob = conn.recv_bytes()
        except EOFError:
            return 0
        conn.send_bytes(encode_result(session.step(decode_request(blob))))


if __name__ == "__main__":
    sys.exit(main())
