"""Swarm simulator: the real allocation, rebalance and routing functions at 100 and 1 000 nodes.

    .venv/bin/python benchmarks/swarm_sim.py [--sizes 100 1000] [--duration 600] [--seed 0]
        [--models 70b 8b] [--plot]

No sockets and no wall clock: simulated time advances in steps of `--dt` seconds. Nodes are
drawn from DEVICES (memory, GFLOP/s, bandwidth; each node reports its figures with ±`--noise`
(5 %) measurement noise, the simulator runs it at the true ones) and placed in REGIONS (RTT between
two nodes = the regions' base RTT + each node's last mile). Joins and leaves are Poisson
(`--churn` events per minute per 100 nodes); requests arrive as a Poisson process offering
1.2 × the bound, each wanting `--tokens` tokens, after a backlog that fills every pipeline.

Throughput model (stated with the results). A node's decode capacity is its roofline speed as
the allocator defines it (`node_speed`: min(GFLOP/s / 8, GB/s), weight-GB read per second at a
batch of 8) → `c = 8 × speed / layer_bytes` layer-tokens per second. A pipeline emits at most
`min over stages of c / layers` tokens/s (its bottleneck) and, with R requests in flight, at most
`R / T` where T is the per-token cost (cost model: layers × per-layer step time + hops); R is
bounded by `--max-running` per pipeline. **The bound** is total capacity ÷ layers per token:
`Σ c over alive nodes / num_layers` tokens/s (every node busy all the time, no network cost).
After a change, a pipeline whose nodes must load new layers is down for bytes / `--load-gbps`.

Strategies, all in the same run over the same events:
- `ours`: `allocate` once, then `rebalance` on every event, with the latency matrix; routing by
  `route` with hop latencies.
- `scratch`: a fresh network-aware `allocate` on every event (Parallax's global rebalance).
- `memory-only`: layers split in proportion to memory over nodes in join order (exo /
  llama.cpp RPC style), re-split from scratch on every event; no latency in routing.

Routing: each `route` decision fills the chosen pipeline's free slots from the queue (so a
1 000-node run routes thousands, not hundreds of thousands, of times). Reports per model and size: allocation and rebalance wall time (ms), throughput as a share of
the bound (steady state = the first quarter skipped), layer bytes moved per churn event, and the
share of requests that needed a replay (their pipeline lost a node or moved), and where the rest
of the bound goes (LOSSES: nodes in no pipeline, pipelines loading, unbalanced stages, too few
requests in flight). `--plot` writes benchmarks/results/swarm_<model>_<n>.png (needs matplotlib:
pip install -e '.[bench]').
"""

from __future__ import annotations

import argparse
import math
import os
import random
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from parallax.scheduler.allocation import (
    DEFAULT_KV_RESERVE_TOKENS,
    DEFAULT_MEMORY_FRACTION,
    Allocation,
    ModelSpec,
    NodeInfo,
    Stage,
    allocate,
    layer_capacity,
    node_speed,
)
from parallax.scheduler.cost import Link
from parallax.scheduler.rebalance import rebalance
from parallax.scheduler.routing import NodeLoad, route

GB = 10**9
BATCH = 8  # node_speed's decode intensity: 8 FLOPs per weight byte ≈ a batch of 8

# name: (memory GB usable, GFLOP/s, memory GB/s, share of the swarm)
DEVICES = {
    "RTX 4090": (24, 82_000, 1000, 0.15),
    "RTX 3060": (12, 13_000, 360, 0.25),
    "M2 laptop": (16, 3_600, 100, 0.25),
    "64-core CPU server": (256, 2_000, 200, 0.05),
    "8 GB laptop": (8, 500, 50, 0.30),
}
# region: share of nodes; base RTT (ms) between regions
REGIONS = {"us-west": 0.3, "us-east": 0.3, "europe": 0.3, "asia": 0.1}
BASE_RTT = {
    frozenset({"us-west"}): 2, frozenset({"us-east"}): 2, frozenset({"europe"}): 2,
    frozenset({"asia"}): 2, frozenset({"us-west", "us-east"}): 65,
    frozenset({"us-west", "europe"}): 140, frozenset({"us-east", "europe"}): 80,
    frozenset({"us-west", "asia"}): 110, frozenset({"us-east", "asia"}): 180,
    frozenset({"europe", "asia"}): 200,
}
MODELS = {
    # Llama-3-70B-class at ~4.5 bits per weight (Q4_K_M-like packed sizes)
    "70b": ModelSpec("70B-class Q4", 80, 480_000_000, 580_000_000, 580_000_000, 4096,
                     activation_bytes=8192 * 2),
    # Llama-3-8B-class in fp16
    "8b": ModelSpec("8B-class fp16", 32, 436_000_000, 1_050_000_000, 1_050_000_000, 4096,
                    activation_bytes=4096 * 2),
}


@dataclass
class SimNode:
    info: NodeInfo  # what the node reports (noisy)
    device: str
    region: str
    last_mile_ms: float
    uplink_mbps: float
    true_speed: float  # weight-GB/s it really runs at


class Swarm:
    """The population: devices, regions, network (a Link for every pair, computed on demand)."""

    def __init__(self, rng: random.Random, noise: float = 0.05) -> None:
        self.rng = rng
        self.noise = noise
        self.nodes: dict[str, SimNode] = {}
        self.serial = 0

    def add(self, now: float) -> str:
        rng = self.rng
        device = rng.choices(list(DEVICES), [d[3] for d in DEVICES.values()])[0]
        memory, gflops, bandwidth, _ = DEVICES[device]
        region = rng.choices(list(REGIONS), list(REGIONS.values()))[0]
        noise = lambda: rng.uniform(1 - self.noise, 1 + self.noise)  # noqa: E731
        node_id = f"n{self.serial:05d}"
        self.serial += 1
        info = NodeInfo(node_id, int(memory * GB), gflops * noise(), bandwidth * noise(), now)
        true = node_speed(NodeInfo(node_id, 0, gflops, bandwidth))
        self.nodes[node_id] = SimNode(info, device, region, rng.uniform(1, 8),
                                      rng.choice([20, 50, 100, 500]), true)
        return node_id

    def link(self, a: str, b: str) -> Link:
        if a == b:
            return Link(0.0)
        x, y = self.nodes[a], self.nodes[b]
        rtt = BASE_RTT[frozenset({x.region, y.region})] + x.last_mile_ms + y.last_mile_ms
        return Link(rtt, min(x.uplink_mbps, y.uplink_mbps))

    def infos(self) -> list[NodeInfo]:
        return [n.info for n in self.nodes.values()]


# ---- the memory-only baseline (exo / llama.cpp RPC style) ----------------------------------


def memory_only(nodes: list[NodeInfo], model: ModelSpec) -> Allocation:
    """Nodes in join order fill pipelines; layers in proportion to memory, capped by capacity."""
    pipelines, group = [], []
    for node in sorted(nodes, key=lambda n: (n.joined_at, n.node_id)):
        group.append(node)
        split = _split_by_memory(group, model)
        if split is not None:
            pipelines.append(split)
            group = []
    used = {s.node_id for p in pipelines for s in p}
    unassigned = tuple(n.node_id for n in nodes if n.node_id not in used)
    return Allocation(tuple(pipelines), unassigned, not pipelines, "memory-only")


def _split_by_memory(group: list[NodeInfo], model: ModelSpec) -> tuple[Stage, ...] | None:
    n, total = len(group), model.num_layers
    if n > total:
        return None
    caps = [layer_capacity(g, model, first=i == 0, last=i == n - 1) for i, g in enumerate(group)]
    if sum(caps) < total or min(caps) < 1:
        return None
    memory = sum(g.memory_bytes for g in group)
    layers = [max(1, min(c, int(total * g.memory_bytes / memory)))
              for g, c in zip(group, caps, strict=True)]
    while sum(layers) < total:  # hand out the remainder where room is left
        i = max((i for i in range(n) if layers[i] < caps[i]), key=lambda i: caps[i] - layers[i])
        layers[i] += 1
    while sum(layers) > total:
        i = max(range(n), key=lambda i: layers[i])
        layers[i] -= 1
    stages, start = [], 0
    for g, count in zip(group, layers, strict=True):
        stages.append(Stage(g.node_id, start, start + count))
        start += count
    return tuple(stages)


# ---- one strategy's run ----------------------------------------------------------------------


@dataclass
class Request:
    rid: int
    remaining: float
    pipeline: tuple[Stage, ...] | None = None
    replayed: bool = False


@dataclass
class Strategy:
    name: str
    plan: Callable[[Allocation | None, list[NodeInfo]], Allocation]
    network_routing: bool
    allocation: Allocation | None = None
    down_until: dict[tuple[Stage, ...], float] = field(default_factory=dict)
    queue: list[Request] = field(default_factory=list)
    active: list[Request] = field(default_factory=list)
    tokens: float = 0.0
    series: list[tuple[float, float, float]] = field(default_factory=list)  # t, rate, bound
    plan_ms: list[float] = field(default_factory=list)
    moved_bytes: list[int] = field(default_factory=list)
    replays: int = 0
    last_index: int = -1
    losses: list[tuple[float, dict[str, float]]] = field(default_factory=list)  # t, tok/s lost


def moved_bytes(old: Allocation | None, new: Allocation, model: ModelSpec) -> dict[str, int]:
    """Bytes each node must load: layers of its new range it did not hold before."""
    before = {} if old is None else {
        s.node_id: (s.start_layer, s.end_layer) for p in old.pipelines for s in p}
    out = {}
    for p in new.pipelines:
        for s in p:
            a, b = before.get(s.node_id, (0, 0))
            overlap = max(0, min(b, s.end_layer) - max(a, s.start_layer))
            if s.num_layers - overlap:
                out[s.node_id] = (s.num_layers - overlap) * model.layer_bytes
    return out


def apply_plan(strategy: Strategy, swarm: Swarm, model: ModelSpec, now: float,
               load_gbps: float, gone: str | None) -> None:
    start = time.perf_counter()
    new = strategy.plan(strategy.allocation, swarm.infos())
    strategy.plan_ms.append((time.perf_counter() - start) * 1e3)
    moved = moved_bytes(strategy.allocation, new, model)
    if strategy.allocation is not None:
        strategy.moved_bytes.append(sum(moved.values()))
    strategy.allocation = new
    alive = set(new.pipelines)
    strategy.down_until = {p: t for p, t in strategy.down_until.items() if p in alive}
    for p in new.pipelines:
        load = max((moved.get(s.node_id, 0) for s in p), default=0)
        if load:
            strategy.down_until[p] = now + load / (load_gbps * GB)
    for request in strategy.active:  # requests whose pipeline changed or lost a node replay
        if request.pipeline not in alive or (gone and any(s.node_id == gone
                                                           for s in request.pipeline)):
            if not request.replayed:
                strategy.replays += 1
                request.replayed = True
            request.pipeline = None
            strategy.queue.append(request)
    strategy.active = [r for r in strategy.active if r.pipeline is not None]


def pipeline_figures(p: tuple[Stage, ...], swarm: Swarm, model: ModelSpec
                     ) -> tuple[float, float, list[float]]:
    """(bottleneck tokens/s, per-token latency s, per-layer step ms of each stage)."""
    step_ms = [model.layer_bytes / (swarm.nodes[s.node_id].true_speed * GB) * 1e3 for s in p]
    capacity = [BATCH * swarm.nodes[s.node_id].true_speed * GB / model.layer_bytes for s in p]
    bottleneck = min(c / s.num_layers for c, s in zip(capacity, p, strict=True))
    compute = sum(ms * s.num_layers for ms, s in zip(step_ms, p, strict=True))
    ids = [s.node_id for s in p]
    hops = sum(swarm.link(a, b).hop_ms(model.activation_bytes)
               for a, b in zip(ids, ids[1:], strict=False))
    if len(ids) > 1:
        hops += swarm.link(ids[-1], ids[0]).hop_ms()
    return bottleneck, (compute + hops) / 1e3, step_ms


def step(strategy: Strategy, swarm: Swarm, model: ModelSpec, now: float, dt: float,
         arrivals: list[Request], max_running: int, bound: float) -> None:
    strategy.queue.extend(arrivals)
    pipelines = [p for p in (strategy.allocation.pipelines if strategy.allocation else ())
                 if strategy.down_until.get(p, 0) <= now]
    figures = {p: pipeline_figures(p, swarm, model) for p in pipelines}
    running = {p: 0 for p in pipelines}
    for r in strategy.active:
        running[r.pipeline] = running.get(r.pipeline, 0) + 1
    links = {}
    if strategy.network_routing:
        for p in pipelines:
            ids = [s.node_id for s in p]
            for a, b in zip(ids, ids[1:] + ids[:1], strict=True):
                links[(a, b)] = swarm.link(a, b).hop_ms(model.activation_bytes)

    def loads_of(p: tuple[Stage, ...]) -> dict[str, NodeLoad]:
        return {s.node_id: NodeLoad(s.node_id, running[p], 0, max_running, ms)
                for s, ms in zip(p, figures[p][2], strict=True)}

    loads = {}
    for p in pipelines:
        loads.update(loads_of(p))
    queue, waiting = strategy.queue, []
    while queue:
        decision = route(pipelines, loads, link_latency_ms=links, last_index=strategy.last_index)
        if decision.pipeline_index is None:  # all busy: the rest waits (the scheduler retries)
            waiting = queue
            break
        strategy.last_index = decision.pipeline_index
        p = pipelines[decision.pipeline_index]
        # one decision fills the chosen pipeline's free slots (keeps 1 000-node runs short;
        # the load it adds is seen by the next decision)
        take = max(1, max_running - running[p])
        for request in queue[:take]:
            request.pipeline = p
            strategy.active.append(request)
        queue = queue[take:]
        running[p] += take
        loads.update(loads_of(p))
    planned = len(strategy.allocation.pipelines) if strategy.allocation else 0
    strategy.queue = waiting[: max_running * max(1, planned)]  # beyond: 429
    produced = 0.0
    by_pipeline: dict[tuple[Stage, ...], list[Request]] = {}
    for r in strategy.active:
        by_pipeline.setdefault(r.pipeline, []).append(r)
    done = set()
    loss = losses_at(strategy, swarm, model, figures)
    for p, requests in by_pipeline.items():
        if p not in figures:
            continue  # down (loading)
        bottleneck, latency, _ = figures[p]
        rate = min(bottleneck, len(requests) / latency)
        loss["in flight"] += bottleneck - rate
        share = rate * dt / len(requests)
        for r in requests:
            got = min(share, r.remaining)
            r.remaining -= got
            produced += got
            if r.remaining <= 0:
                done.add(id(r))
    strategy.active = [r for r in strategy.active if id(r) not in done]
    strategy.tokens += produced
    strategy.series.append((now, produced / dt, bound))
    strategy.losses.append((now, loss))


LOSSES = ("no pipeline", "loading", "unbalanced", "in flight")
"""Where the bound goes: capacity of nodes in no pipeline; of pipelines down while loading
layers; of stages faster than their pipeline's slowest (Σ stage capacity ÷ layers − the
bottleneck); of bottlenecks not reached (too few requests in flight for the per-token latency,
or none routed). The rest of the gap is rounding in the simulated steps."""


def losses_at(strategy: Strategy, swarm: Swarm, model: ModelSpec,
              figures: dict[tuple[Stage, ...], tuple[float, float, list[float]]]
              ) -> dict[str, float]:
    """Tokens/s of the bound lost to each cause of LOSSES this step (pipelines with no request
    at all add their whole bottleneck to "in flight")."""
    def capacity(ids) -> float:
        return sum(BATCH * swarm.nodes[n].true_speed * GB / model.layer_bytes
                   for n in ids) / model.num_layers

    pipelines = strategy.allocation.pipelines if strategy.allocation else ()
    used = {s.node_id for p in pipelines for s in p}
    loss = dict.fromkeys(LOSSES, 0.0)
    loss["no pipeline"] = capacity(n for n in swarm.nodes if n not in used)
    served = {r.pipeline for r in strategy.active}
    for p in pipelines:
        if p not in figures:
            loss["loading"] += capacity(s.node_id for s in p)
            continue
        loss["unbalanced"] += capacity(s.node_id for s in p) - figures[p][0]
        if p not in served:
            loss["in flight"] += figures[p][0]
    return loss


def bound_tokens_s(swarm: Swarm, model: ModelSpec) -> float:
    """Σ capacity (layer-tokens/s) of every alive node ÷ layers per token."""
    total = sum(BATCH * n.true_speed * GB / model.layer_bytes for n in swarm.nodes.values())
    return total / model.num_layers


# ---- one scenario --------------------------------------------------------------------------


def run_scenario(model: ModelSpec, size: int, args: argparse.Namespace) -> dict:
    rng = random.Random(args.seed * 7919 + size)
    swarm = Swarm(rng, args.noise)
    for _ in range(size):
        swarm.add(0.0)
    net = swarm.link
    options = {"memory_fraction": DEFAULT_MEMORY_FRACTION,
               "kv_reserve_tokens": DEFAULT_KV_RESERVE_TOKENS}

    def ours(prev, infos):
        if prev is None or not prev.pipelines:
            return allocate(infos, model, network=net, **options)
        return rebalance(prev, infos, model, network=net, **options)

    strategies = [
        Strategy("ours", ours, True),
        Strategy("scratch", lambda _p, infos: allocate(infos, model, network=net, **options),
                 True),
        Strategy("memory-only", lambda _p, infos: memory_only(infos, model), False),
    ]
    for s in strategies:
        apply_plan(s, swarm, model, 0.0, args.load_gbps, None)
    initial_ms = {s.name: s.plan_ms[0] for s in strategies}
    event_rate = args.churn / 60 * size / 100  # events per second
    next_event = rng.expovariate(event_rate) if event_rate > 0 else math.inf
    events: list[float] = []
    # start saturated (a backlog filling every pipeline) so that steady state comes early
    total_requests = rid = args.max_running * len(strategies[0].allocation.pipelines)
    for s in strategies:
        s.queue = [Request(k, args.tokens) for k in range(rid)]
    now = 0.0
    while now < args.duration:
        while next_event <= now:
            gone = None
            if rng.random() < 0.5 and len(swarm.nodes) > size // 2:
                gone = rng.choice(sorted(swarm.nodes))
                del swarm.nodes[gone]
            else:
                swarm.add(now)
            events.append(now)
            for s in strategies:
                apply_plan(s, swarm, model, now, args.load_gbps, gone)
            next_event += rng.expovariate(event_rate)
        bound = bound_tokens_s(swarm, model)
        count = _poisson(rng, 1.2 * bound * args.dt / args.tokens)
        total_requests += count
        for s in strategies:
            arrivals = [Request(rid + k, args.tokens) for k in range(count)]
            step(s, swarm, model, now, args.dt, arrivals, args.max_running, bound)
        rid += count
        now += args.dt
    return {"model": model, "size": size, "strategies": strategies, "events": events,
            "initial_ms": initial_ms, "requests": total_requests, "duration": args.duration}


def _poisson(rng: random.Random, mean: float) -> int:
    if mean > 50:  # normal approximation: exact sampling is slow for large means
        return max(0, round(rng.gauss(mean, math.sqrt(mean))))
    limit, k, p = math.exp(-mean), 0, 1.0
    while True:
        p *= rng.random()
        if p <= limit:
            return k
        k += 1


def summary(result: dict) -> list[dict]:
    rows = []
    steady_from = result["duration"] / 4
    by_name = {s.name: s for s in result["strategies"]}
    scratch_moved = statistics.mean(by_name["scratch"].moved_bytes or [0])
    for s in result["strategies"]:
        steady = [(rate, bound) for t, rate, bound in s.series if t >= steady_from]
        share = sum(r for r, _ in steady) / max(1e-9, sum(b for _, b in steady))
        events = s.plan_ms[1:]
        moved = statistics.mean(s.moved_bytes) if s.moved_bytes else 0.0
        served = max(1, result["requests"])
        rows.append({
            "strategy": s.name, "initial_ms": result["initial_ms"][s.name],
            "event_ms_mean": statistics.mean(events) if events else 0.0,
            "event_ms_max": max(events, default=0.0),
            "share": share, "tokens_s": sum(r for r, _ in steady) / max(1, len(steady)),
            "bound": sum(b for _, b in steady) / max(1, len(steady)),
            "moved_gb": moved / GB,
            "moved_vs_scratch": moved / scratch_moved if scratch_moved else 0.0,
            "replay_share": s.replays / served,
            "losses": {k: sum(loss[k] for t, loss in s.losses if t >= steady_from)
                       / max(1e-9, sum(b for _, b in steady)) for k in LOSSES},
        })
    return rows


def print_table(result: dict, rows: list[dict]) -> None:
    model, size = result["model"], result["size"]
    pipelines = len(result["strategies"][0].allocation.pipelines)
    print(f"\n**{model.name}, {size} nodes** ({len(result['events'])} churn events, "
          f"{result['requests']} requests, {pipelines} pipelines at the end for ours)\n")
    print("| strategy | first allocation ms | per event ms (mean / max) | tok/s (steady) | "
          "share of bound | GB moved / event | vs scratch | requests replayed |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['strategy']} | {r['initial_ms']:.0f} | {r['event_ms_mean']:.0f} / "
              f"{r['event_ms_max']:.0f} | {r['tokens_s']:.0f} | {100 * r['share']:.1f} % | "
              f"{r['moved_gb']:.2f} | {100 * r['moved_vs_scratch']:.0f} % | "
              f"{100 * r['replay_share']:.2f} % |")
    print(f"\nbound (Σ node capacity ÷ {model.num_layers} layers, steady-state mean): "
          f"{rows[0]['bound']:.0f} tok/s")
    print("where the rest of the bound goes (steady state, share of the bound): " + "; ".join(
        f"{r['strategy']}: " + ", ".join(f"{k} {100 * v:.1f} %" for k, v in r["losses"].items())
        for r in rows))


def plot(result: dict, path: str) -> None:
    try:
        import matplotlib
    except ImportError:
        print("plot skipped: matplotlib is not installed (pip install -e '.[bench]')")
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4))
    style = {"ours": {"lw": 2.2, "zorder": 3}, "scratch": {"lw": 1, "ls": ":", "zorder": 4}}
    for s in result["strategies"]:
        ax.plot([t for t, _, _ in s.series], [r for _, r, _ in s.series], label=s.name,
                **style.get(s.name, {"lw": 1}))
    first = result["strategies"][0].series
    ax.plot([t for t, _, _ in first], [b for _, _, b in first], "k--", lw=1, label="bound")
    for t in result["events"]:
        ax.axvline(t, color="grey", alpha=0.2, lw=0.8)
    ax.set_xlabel("simulated time (s); grey lines: joins / leaves")
    ax.set_ylabel("tokens / s")
    ax.set_title(f"{result['model'].name}, {result['size']} nodes")
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"plot: {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[100, 1000])
    parser.add_argument("--models", nargs="+", default=["70b", "8b"], choices=list(MODELS))
    parser.add_argument("--duration", type=float, default=600.0, help="simulated seconds")
    parser.add_argument("--dt", type=float, default=1.0)
    parser.add_argument("--churn", type=float, default=1.0,
                        help="joins + leaves per minute per 100 nodes")
    parser.add_argument("--tokens", type=int, default=4096, help="tokens per request")
    parser.add_argument("--max-running", type=int, default=64,
                        help="requests in flight per pipeline")
    parser.add_argument("--load-gbps", type=float, default=1.0,
                        help="GB/s a node loads new layers at")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--noise", type=float, default=0.05,
                        help="relative error of the speeds nodes report (uniform ±)")
    parser.add_argument("--plot", action="store_true")
    args = parser.parse_args()
    print(f"swarm_sim: devices {', '.join(DEVICES)}; regions {', '.join(REGIONS)}; "
          f"{args.duration:.0f} s simulated, churn {args.churn}/min/100 nodes, "
          f"{args.tokens} tokens per request, {args.max_running} in flight per pipeline")
    for name in args.models:
        for size in args.sizes:
            result = run_scenario(MODELS[name], size, args)
            print_table(result, summary(result))
            if args.plot:
                out = os.path.join(os.path.dirname(__file__), "results")
                os.makedirs(out, exist_ok=True)
                plot(result, os.path.join(out, f"swarm_{name}_{size}.png"))


if __name__ == "__main__":
    main()
