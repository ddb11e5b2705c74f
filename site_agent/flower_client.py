"""The Flower ClientApp that a site's SuperNode starts for each FLIP message.

It is FLIP's own code, installed at the site: the bundle that arrives from the hub only
names it. It stays light (no torch, no pandas): it decodes the message, hands the step to
the site agent's warm task process over the site's local socket, and replies with what came
back.
"""

from __future__ import annotations

from pathlib import Path

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from site_agent.protocol import decode_result, encode_request
from site_agent.tasks import connect
from site_agent.wire import content_to_request, result_to_content

NODE_CONFIG_SITE_DIR = "flip-site-dir"

app = ClientApp()


def _handle(msg: Message, context: Context) -> Message:
    site_dir = context.node_config.get(NODE_CONFIG_SITE_DIR)
    if not site_dir:
        raise RuntimeError(f"this SuperNode has no {NODE_CONFIG_SITE_DIR!r} in its node config")
    request = content_to_request(msg.content)
    with connect(Path(str(site_dir))) as conn:
        conn.send_bytes(encode_request(request))
        result = decode_result(conn.recv_bytes())
    return Message(result_to_content(result), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    return _handle(msg, context)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    return _handle(msg, context)
