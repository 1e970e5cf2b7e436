"""`parallax status`: the scheduler's cluster view in a terminal, refreshing live (rich).

It reads `GET /cluster/status_json` (public; an API key, when given, is sent as a Bearer token
so an operator sees the real join command) and draws the nodes and the pipelines, each stage
with its layers and compute ms per token, the slowest stage of a pipeline marked.
"""

from __future__ import annotations

import time
from typing import Any

import httpx
from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from parallax.serving.proxy import scheduler_url
from parallax.serving.tls import TLSConfig

TIMEOUT_S = 5.0


class SchedulerUnreachable(Exception):
    """The scheduler did not answer (its message is the one line the user sees)."""


def fetch_status(client: httpx.Client, base_url: str) -> dict[str, Any]:
    """The `data` of the scheduler's status object (SchedulerUnreachable when it cannot be
    read)."""
    try:
        response = client.get(f"{base_url}/cluster/status_json")
    except httpx.HTTPError as exc:
        what = "did not answer in time" if isinstance(exc, httpx.TimeoutException) \
            else "is unreachable"
        raise SchedulerUnreachable(f"the scheduler at {base_url} {what} "
                                   f"({type(exc).__name__}); is `parallax run` up there?") \
            from None
    if response.status_code != 200:
        raise SchedulerUnreachable(f"the scheduler at {base_url} answered HTTP "
                                   f"{response.status_code} to /cluster/status_json")
    try:
        data = response.json()["data"]
    except (ValueError, KeyError, TypeError):
        raise SchedulerUnreachable(f"{base_url} did not answer with a cluster status; is it a "
                                   "Parallax scheduler?") from None
    if not isinstance(data, dict):
        raise SchedulerUnreachable(f"{base_url} sent a malformed cluster status")
    return data


def _layers(node: dict[str, Any]) -> str:
    start, end = node.get("start_layer"), node.get("end_layer")
    return "-" if start is None or end is None else f"[{start}, {end})"


def _ms(value: Any) -> str:
    return f"{value:.1f}" if isinstance(value, (int, float)) else "-"


def slowest_of(nodes: list[dict[str, Any]]) -> int | None:
    """Index of the stage with the most ms per token in a pipeline of two or more stages."""
    timed = [(n.get("ms_per_token"), i) for i, n in enumerate(nodes)
             if isinstance(n.get("ms_per_token"), (int, float))]
    return max(timed)[1] if len(nodes) > 1 and timed else None


def render(data: dict[str, Any], base_url: str) -> Group:
    """The view of one status object: a headline, the nodes table, the pipelines table."""
    model = data.get("model_name") or "no model selected"
    head = Text.assemble(("Parallax cluster ", "bold"), (base_url, "cyan"), "  ",
                         (str(data.get("status", "?")), "bold green"
                          if data.get("status") == "available" else "bold yellow"),
                         f"  model: {model}")
    nodes = [n for n in data.get("node_list") or [] if isinstance(n, dict)]
    by_id = {str(n.get("node_id")): n for n in nodes}
    table = Table(title=f"Nodes ({len(nodes)})", title_justify="left", expand=False)
    for column in ("node", "status", "device", "layers", "running", "ms/token"):
        table.add_column(column, justify="right" if column in ("running", "ms/token") else "left")
    for n in nodes:
        table.add_row(str(n.get("node_id")), str(n.get("status", "")),
                      str(n.get("device_name") or n.get("device") or ""), _layers(n),
                      str(n.get("running_requests", 0)), _ms(n.get("ms_per_token")))
    pipelines = Table(title="Pipelines", title_justify="left", expand=False)
    for column in ("pipeline", "stage", "node", "layers", "ms/token", ""):
        pipelines.add_column(column, justify="right" if column == "ms/token" else "left")
    ready = set(data.get("ready_pipelines") or [])
    for k, ids in enumerate(data.get("pipelines") or []):
        stages = [by_id.get(str(i), {"node_id": i}) for i in ids]
        slowest = slowest_of(stages)
        for i, stage in enumerate(stages):
            name = (f"{k + 1}" + ("" if k in ready else " (loading)")) if i == 0 else ""
            pipelines.add_row(name, str(i + 1), str(stage.get("node_id")), _layers(stage),
                              _ms(stage.get("ms_per_token")),
                              "slowest" if i == slowest else "",
                              style="bold red" if i == slowest else None)
    if not data.get("pipelines"):
        pipelines.add_row("-", "", data.get("reason") or "no pipeline yet", "", "", "")
    return Group(head, table, pipelines)


def run_status(address: str, *, api_key: str | None = None, tls: TLSConfig | None = None,
               once: bool = False, interval_s: float = 1.0,
               console: Console | None = None) -> int:
    """Print the cluster view (once, or live until Ctrl-C). SchedulerUnreachable passes up."""
    base_url = scheduler_url(address, tls or TLSConfig())
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    console = console or Console()
    verify = (tls or TLSConfig()).client_verify()
    with httpx.Client(timeout=TIMEOUT_S, headers=headers, trust_env=False,
                      verify=verify) as client:
        data = fetch_status(client, base_url)
        if once:
            console.print(render(data, base_url))
            return 0
        with Live(render(data, base_url), console=console, refresh_per_second=4,
                  screen=False) as live:
            while True:
                time.sleep(interval_s)
                live.update(render(fetch_status(client, base_url), base_url))
