"""A small Playwright (sync API) driver for JupyterLab 4 and the FLIP run widget.

Independent of how the server was started: plain ``jupyter lab`` (pass its ``token``) or a
single-user server behind JupyterHub (log in with :func:`hub_login`, which returns the user's
server URL). Every wait is a Playwright wait with a timeout; nothing sleeps.

    browser = launch(playwright)
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    lab = hub_login(page, hub_url, "alice", "pw")            # or lab = "http://127.0.0.1:8888"
    open_notebook(page, lab, "quickstart.ipynb")             # token="..." for a plain lab
    run_all(page)                                            # returns once the kernel started on it
    wait_for_chart_rounds(page, 3, timeout=120)
    wait_for_run_all(page, timeout=300)                      # every queued cell executed
    assert site_rows(page) == ["Cleveland", "Hungary", "Switzerland", "VA"]
    screenshot(page, tmp_path / "lab.png")

The run widget (flip_magics/widgets.py, flip_magics/chart.py) is three ``ipywidgets.HTML`` in a
VBox (and, once the run ends, a static copy of them in the same output): ``div.flip-header``, an SVG
chart with a ``g.panel[data-metric=M]`` per metric (its own ``g.xticks``: a tick line and its label per
round number; ``g.series[data-series=NAME]``: one ``circle`` per plotted round) and ``table.flip-sites``
(one ``tr.flip-site-<status>`` per site). The readers below look at the last run widget on the
page (the most recent run) and map each circle's ``cx`` back to a round number through its panel's
ticks, so :func:`chart_rounds` is the highest round that has a point, not a count of ticks
(the x axis is padded when only one round is drawn).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any
from urllib.parse import quote

from playwright.sync_api import Browser, Page, Playwright, expect

__all__ = [
    "CHROMIUM",
    "launch",
    "hub_login",
    "open_notebook",
    "kernel_status",
    "wait_for_kernel_idle",
    "run_all",
    "wait_for_run_all",
    "cell_prompts",
    "error_outputs",
    "run_widget",
    "chart_series",
    "chart_rounds",
    "wait_for_chart_rounds",
    "site_rows",
    "site_statuses",
    "wait_for_sites",
    "header_text",
    "show_run_widget",
    "screenshot",
]

CHROMIUM = os.environ.get("FLIP_CHROMIUM", "/usr/bin/chromium")
MS = 1000

# ---------------------------------------------------------------------------------------------
# JavaScript run in the page. One reader for the whole widget, used by both the Python getters
# and wait_for_function, so a wait and a later read always agree.
_WIDGET_JS = r"""
() => {
  const headers = document.querySelectorAll('.jp-NotebookPanel:not(.lm-mod-hidden) div.flip-header');
  if (!headers.length) return null;
  const header = headers[headers.length - 1];
  const box = header.closest('.widget-vbox, .widget-box') || header.closest('.jp-OutputArea-output');
  const out = {header: header.textContent.trim(), series: {}, sites: []};
  if (!box) return out;
  const svg = box.querySelector('svg');
  if (svg) {
    // one panel per metric, each with its own round axis: a series is keyed "metric series"
    for (const panel of svg.querySelectorAll('g.panel')) {
      const ticks = [];
      const xt = panel.querySelector('g.xticks');
      if (xt) {
        const lines = xt.querySelectorAll('line');
        const labels = [...xt.querySelectorAll('text')].filter(t => /^-?\d+$/.test(t.textContent.trim()));
        for (let i = 0; i < Math.min(lines.length, labels.length); i++)
          ticks.push([parseFloat(lines[i].getAttribute('x1')), parseInt(labels[i].textContent.trim(), 10)]);
      }
      for (const g of panel.querySelectorAll('g.series')) {
        const xs = [...g.querySelectorAll('circle')].map(c => parseFloat(c.getAttribute('cx')));
        let rounds;
        if (ticks.length >= 2) {
          const [[x0, r0], [x1, r1]] = [ticks[0], ticks[ticks.length - 1]];
          rounds = xs.map(x => Math.round(r0 + (x - x0) * (r1 - r0) / (x1 - x0)));
        } else {  // no usable ticks: number the distinct x positions 1..n
          const uniq = [...new Set(xs)].sort((a, b) => a - b);
          rounds = xs.map(x => uniq.indexOf(x) + 1);
        }
        out.series[g.getAttribute('data-metric') + ' ' + g.getAttribute('data-series')] = rounds;
      }
    }
  }
  const table = box.querySelector('table.flip-sites');
  if (table) {
    for (const tr of table.querySelectorAll('tbody tr')) {
      const cls = [...tr.classList].find(c => c.startsWith('flip-site-'));
      if (!cls) continue;  // the "no sites yet" placeholder row
      const cell = tr.querySelector('td');
      out.sites.push({site: cell ? cell.textContent.trim() : '', status: cls.slice('flip-site-'.length)});
    }
  }
  return out;
}
"""

# Input prompts of the current notebook's code cells: "[ ]:", "[*]:", "[3]:".
_PROMPTS_JS = r"""
() => [...document.querySelectorAll(
    '.jp-NotebookPanel:not(.lm-mod-hidden) .jp-CodeCell .jp-InputArea-prompt')].map(p => p.textContent.trim())
"""

# The execution indicator says 'idle' also while the notebook has no kernel at all (e.g. a
# "Select Kernel" dialog is open): report that as 'no-kernel'.
_STATUS_JS = r"""
() => {
  const panel = document.querySelector('.jp-NotebookPanel:not(.lm-mod-hidden)');
  const ind = panel && panel.querySelector('.jp-Notebook-ExecutionIndicator');
  if (!ind) return null;
  const name = panel.querySelector('.jp-KernelName');
  if (!name || !name.innerText.trim() || name.innerText.trim() === 'No Kernel') return 'no-kernel';
  return ind.getAttribute('data-status');
}
"""


# ---------------------------------------------------------------------------------------------
def launch(playwright: Playwright, *, headless: bool = True, executable: str | None = None) -> Browser:
    """Debian's chromium, headless; ``--no-sandbox`` when running as root (chromium refuses otherwise)."""
    args = ["--disable-dev-shm-usage", "--disable-gpu"]
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        args.append("--no-sandbox")
    return playwright.chromium.launch(executable_path=executable or CHROMIUM, headless=headless, args=args)


def hub_login(page: Page, hub_url: str, username: str, password: str, *, timeout: float = 120) -> str:
    """Log in on JupyterHub's form, wait for the user's server to spawn and JupyterLab to load.

    Returns the user's server URL (``{hub_url}/user/NAME``), the ``lab_url`` for :func:`open_notebook`.
    Raises AssertionError with the hub's message when the login is refused."""
    hub_url = hub_url.rstrip("/")
    page.goto(f"{hub_url}/hub/login", timeout=timeout * MS)
    page.fill("input[name=username]", username)
    page.fill("input[name=password]", password)
    page.click("#login_submit, form input[type=submit], form button[type=submit]")
    # Spawning goes /hub/ -> /hub/spawn -> /hub/spawn-pending/NAME (progress page) -> /user/NAME/lab.
    refused = page.locator("p.login_error")
    shell = page.locator("#jp-main-dock-panel")
    user_page = re.compile(r"/user/[^/?#]+/")
    page.wait_for_function(
        "() => !!document.querySelector('p.login_error') || /\\/user\\/[^/?#]+\\//.test(location.pathname)",
        timeout=timeout * MS,
        polling=250,
    )
    if refused.count() and not user_page.search(page.url):
        raise AssertionError(f"JupyterHub refused the login of {username!r}: {refused.first.inner_text()}")
    m = re.search(r"^(.*?/user/[^/?#]+)", page.url)
    assert m, page.url
    lab_url = m.group(1)
    if "/lab" not in page.url:  # a default_url other than /lab (e.g. /tree)
        page.goto(f"{lab_url}/lab", timeout=timeout * MS)
    expect(shell).to_be_visible(timeout=timeout * MS)
    return lab_url


def _current_panel(page: Page) -> Any:
    return page.locator(".jp-NotebookPanel:not(.lm-mod-hidden)")


def kernel_status(page: Page) -> str | None:
    """The current notebook's kernel status ('idle', 'busy', 'starting', ..., 'no-kernel'), None before
    the toolbar exists."""
    return page.evaluate(_STATUS_JS)


def wait_for_kernel_idle(page: Page, *, timeout: float = 120) -> None:
    page.wait_for_function(f"() => ({_STATUS_JS})() === 'idle'", timeout=timeout * MS, polling=200)


def open_notebook(page: Page, lab_url: str, path: str, *, token: str | None = None, timeout: float = 120) -> None:
    """Open ``{lab_url}/lab/tree/{path}?reset`` (``?reset``: old tabs don't come back) and wait for the
    notebook panel, its cells and an idle kernel. Accepts a kernel-selection dialog if Lab shows one."""
    url = f"{lab_url.rstrip('/')}/lab/tree/{quote(path)}?reset"
    if token:
        url += f"&token={quote(token)}"
    page.goto(url, timeout=timeout * MS)
    panel = _current_panel(page)
    expect(panel).to_be_visible(timeout=timeout * MS)
    expect(panel.locator(".jp-Cell").first).to_be_visible(timeout=timeout * MS)
    dialog_accept = page.locator(".jp-Dialog .jp-mod-accept")
    page.wait_for_function(
        f"() => ({_STATUS_JS})() === 'idle' || !!document.querySelector('.jp-Dialog .jp-mod-accept')",
        timeout=timeout * MS,
        polling=200,
    )
    if dialog_accept.count():  # "Select Kernel": take the preselected one
        dialog_accept.first.click()
        wait_for_kernel_idle(page, timeout=timeout)


def cell_prompts(page: Page) -> list[str]:
    """The input prompts of the current notebook's code cells, e.g. ``['[1]:', '[*]:', '[ ]:']``."""
    return page.evaluate(_PROMPTS_JS)


def _run_all_via_menu(page: Page) -> None:
    page.locator(".lm-MenuBar-itemLabel", has_text=re.compile(r"^Run$")).click()
    item = page.locator(".lm-Menu-content .lm-Menu-item:not(.lm-mod-disabled)", has_text=re.compile(r"^Run All Cells"))
    item.first.click()


def run_all(page: Page, *, attempts: int = 3, start_timeout: float = 15) -> int:
    """Run → Run All Cells, and make sure it took: wait until the kernel goes busy or a prompt changes
    (some cell queued ``[*]`` or executed); retry when it never does (a first action can be swallowed
    while Lab is still wiring up the kernel). Returns as soon as execution started; follow with
    :func:`wait_for_run_all` to wait for the last cell. Returns the number of tries it took."""
    before = cell_prompts(page)
    for attempt in range(1, attempts + 1):
        _current_panel(page).locator(".jp-Notebook").first.click(position={"x": 5, "y": 5})  # focus the notebook
        _run_all_via_menu(page)
        try:
            page.wait_for_function(
                f"""(before) => {{
                    const now = ({_PROMPTS_JS})();
                    return ({_STATUS_JS})() === 'busy' || now.some(p => p.includes('*'))
                        || JSON.stringify(now) !== JSON.stringify(before);
                }}""",
                arg=before,
                timeout=start_timeout * MS,
                polling="raf",
            )
            return attempt
        except Exception:  # noqa: BLE001 - playwright TimeoutError; retry the menu
            if attempt == attempts:
                raise AssertionError(
                    f"Run All Cells never started the kernel ({attempts} tries); "
                    f"kernel status {kernel_status(page)!r}, prompts {cell_prompts(page)}"
                ) from None
            page.keyboard.press("Escape")  # close a menu left open
    return attempts  # not reached


def wait_for_run_all(page: Page, *, timeout: float = 600) -> list[str]:
    """Wait until no code cell is queued or running and the kernel is idle; returns the prompts."""
    page.wait_for_function(
        f"""() => {{
            const now = ({_PROMPTS_JS})();
            return ({_STATUS_JS})() === 'idle' && now.length > 0 && !now.some(p => p.includes('*'));
        }}""",
        timeout=timeout * MS,
        polling=250,
    )
    return cell_prompts(page)


_ERRORS_JS = r"""
() => [...document.querySelectorAll(
    '.jp-NotebookPanel:not(.lm-mod-hidden) .jp-OutputArea-output[data-mime-type="application/vnd.jupyter.stderr"]')]
  .map(o => o.innerText)
  .filter(t => t.includes('Traceback (most recent call last)') || /^(\w+\.)*\w*(Error|Exception|Interrupt)\b/m.test(t))
"""


def error_outputs(page: Page) -> list[str]:
    """Texts of the error outputs (tracebacks, ``UsageError: ...``) in the current notebook. Lab renders
    errors and stderr alike (mime ``application/vnd.jupyter.stderr``); warnings are left out."""
    return [t[:3000] for t in page.evaluate(_ERRORS_JS)]


# ---------------------------------------------------------------------------------------------
def run_widget(page: Page) -> dict[str, Any] | None:
    """The last FLIP run widget on the page: ``{'header': str, 'series': {name: [round, ...]},
    'sites': [{'site': str, 'status': str}, ...]}``; None when no run widget has rendered."""
    return page.evaluate(_WIDGET_JS)


def header_text(page: Page) -> str:
    w = run_widget(page)
    return w["header"] if w else ""


def chart_series(page: Page) -> dict[str, list[int]]:
    """Per metric and series (``'evaluate accuracy global'``, ``'train loss VA'``, ...) the rounds with a point."""
    w = run_widget(page)
    return dict(w["series"]) if w else {}


def chart_rounds(page: Page) -> int:
    """The highest round drawn on the chart (0 when nothing is drawn yet)."""
    rounds = [r for rs in chart_series(page).values() for r in rs]
    return max(rounds) if rounds else 0


def wait_for_chart_rounds(page: Page, n: int, timeout: float = 300) -> int:
    """Wait until the chart has a point at round >= ``n``; returns :func:`chart_rounds`."""
    try:
        page.wait_for_function(
            f"""(n) => {{
                const w = ({_WIDGET_JS})();
                return !!w && Object.values(w.series).some(rs => rs.some(r => r >= n));
            }}""",
            arg=n,
            timeout=timeout * MS,
            polling=250,
        )
    except Exception as exc:  # noqa: BLE001 - re-raise with what the page shows
        raise AssertionError(
            f"chart never reached round {n} in {timeout} s: widget {run_widget(page)}, "
            f"kernel {kernel_status(page)!r}, prompts {cell_prompts(page)}, "
            f"errors {error_outputs(page)}"
        ) from exc
    return chart_rounds(page)


def site_statuses(page: Page) -> dict[str, str]:
    w = run_widget(page)
    return {r["site"]: r["status"] for r in w["sites"]} if w else {}


def site_rows(page: Page) -> list[str]:
    """Site names in the run widget's table, in table order."""
    w = run_widget(page)
    return [r["site"] for r in w["sites"]] if w else []


def wait_for_sites(
    page: Page, sites: list[str] | set[str], *, status: str | None = None, timeout: float = 120
) -> dict[str, str]:
    """Wait until the site table lists exactly ``sites`` (and, with ``status``, all in that status)."""
    want = sorted(sites)
    page.wait_for_function(
        f"""([want, status]) => {{
            const w = ({_WIDGET_JS})();
            if (!w) return false;
            const got = w.sites.map(r => r.site).sort();
            return JSON.stringify(got) === JSON.stringify(want) && (!status || w.sites.every(r => r.status === status));
        }}""",
        arg=[want, status],
        timeout=timeout * MS,
        polling=250,
    )
    return site_statuses(page)


def show_run_widget(page: Page) -> bool:
    """Scroll the last run widget into view (for a screenshot); False when there is none."""
    header = _current_panel(page).locator("div.flip-header").last
    if not header.count():
        return False
    header.scroll_into_view_if_needed(timeout=10 * MS)
    return True


def screenshot(page: Page, path: str | Path, *, full_page: bool = False) -> Path:
    """Save a PNG of the page (or, ``full_page``, the whole scrollable page); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(path), full_page=full_page)
    return path
