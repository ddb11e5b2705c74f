"""ClientApp component, required by Flower's bundle format and never started by FLIP.

FLIP's sites are their own Flower nodes (``flip-site start``, ``site_agent.fleet``): they pull
messages from the fleet API and run each step in the run's warm task process, so no
``flwr-clientapp`` process starts for a FLIP message. A plain ``flower-supernode`` that
receives a FLIP message answers with this error instead of running anything.
"""

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

app = ClientApp()


@app.train()
@app.evaluate()
def refuse(msg: Message, context: Context) -> Message:
    raise RuntimeError("FLIP tasks run only at FLIP site agents (flip-site start), not in a plain SuperNode")


__all__ = ["app"]
