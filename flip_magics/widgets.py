"""Live ipywidgets view of one FLIP run: header, metric panels and site table.

:class:`RunWidget` only assigns ``.value`` on ``ipywidgets.HTML`` widgets, so
:meth:`RunWidget.update` may be called from a background polling thread.  It
never prints or displays anything; the caller displays the widget once.
"""

from __future__ import annotations

import threading
from typing import Any

import ipywidgets

from .chart import Point, render_chart, render_header, render_site_table, render_summary

__all__ = ["RunWidget"]


class RunWidget:
    """A VBox of three HTML widgets (header, chart, table) re-rendered on update."""

    def __init__(self, name: str, run_id: str, rounds: int) -> None:
        self.name = name
        self.run_id = run_id
        self.rounds = rounds
        self._lock = threading.Lock()
        self._last: dict[str, str] = {}
        header = render_header(name, run_id, "pending", 0, rounds)
        chart = render_chart([])
        table = render_site_table([])
        self.header = ipywidgets.HTML(value=header)
        self.chart = ipywidgets.HTML(value=chart)
        self.table = ipywidgets.HTML(value=table)
        self._last = {"header": header, "chart": chart, "table": table}
        self._points: list[Point] = []
        self._status, self._summary = "pending", ""
        self.box = ipywidgets.VBox([self.header, self.chart, self.table])

    def _assign(self, key: str, widget: Any, value: str) -> bool:
        """Set ``widget.value`` unless it equals the last rendered string."""
        if self._last.get(key) == value:
            return False
        widget.value = value
        self._last[key] = value
        return True

    def update(
        self,
        *,
        status: str,
        round_: int,
        points: list[Point],
        sites: list[dict[str, object]],
        message: str = "",
    ) -> None:
        """Re-render header, chart and table; unchanged strings are not re-assigned."""
        header = render_header(self.name, self.run_id, status, round_, self.rounds, message)
        chart = render_chart(list(points))
        table = render_site_table(list(sites))
        summary = render_summary(list(points)) if points else ""
        with self._lock:
            self._points, self._status, self._summary = list(points), status, summary
            self._assign("header", self.header, header)
            self._assign("chart", self.chart, chart)
            self._assign("table", self.table, table)

    def static_bundle(self) -> dict[str, str]:
        """A static copy of the widget as last drawn, for outputs kept without a live frontend (papermill,
        nbconvert, a code host's viewer): the header, the chart, the final metrics and the sites' table as HTML,
        the chart alone as SVG, and a line of text."""
        with self._lock:
            header, chart, table = self._last["header"], self._last["chart"], self._last["table"]
            summary, status = self._summary, self._status
        return {
            "text/html": f'<div class="flip-run-static">{header}{chart}{summary}{table}</div>',
            "image/svg+xml": chart,
            "text/plain": f"<FLIP run {self.run_id} {self.name!r}: {status}>",
        }

    def _repr_mimebundle_(self, **kwargs: Any) -> Any:
        """Delegate rich display to the underlying VBox so ``display(w)`` works."""
        return self.box._repr_mimebundle_(**kwargs)
