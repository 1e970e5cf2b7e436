"""Per-link delaying TCP proxies for the emulated WAN test (tests/test_wan_namespace.py).

This kernel has no ``netem`` qdisc, so delay is added in user space. One process runs in each
member's network namespace (``python tests/wan_proxy.py PLAN ME``). For every other member it
listens on that member's *advertised* address (a /32 on this namespace's loopback) at each of
its ports and forwards to the member's *wire* address, holding every chunk, in each direction,
for the one-way delay of the ordered pair (ME, peer) — so each ordered pair of members has its
own link, and two far members can be near each other. The plan file (JSON) is re-read when it
changes: ``delay_ms[me][peer]`` (one way) and ``stall_until[me][peer]`` (a Unix time before
which nothing is delivered: a stalled link). Bandwidth is shaped with ``tbf`` by the test.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time

CHUNK = 65536
QUEUE_CHUNKS = 1024  # per direction of one connection: the reader waits when it is full
CONNECT_TIMEOUT_S = 5.0


class Plan:
    """The plan file, re-read at most every 0.1 s when its mtime changed."""

    def __init__(self, path: str, me: str) -> None:
        self.path, self.me = path, me
        self._mtime = 0.0
        self._checked = 0.0
        self.data: dict = {}
        self.refresh()

    def refresh(self) -> None:
        now = time.monotonic()
        if now - self._checked < 0.1:
            return
        self._checked = now
        mtime = os.stat(self.path).st_mtime
        if mtime != self._mtime:
            with open(self.path) as f:
                self.data = json.load(f)
            self._mtime = mtime

    def delay_s(self, peer: str) -> float:
        self.refresh()
        return self.data["delay_ms"][self.me][peer] / 1e3

    def stall_until(self, peer: str) -> float:
        return self.data.get("stall_until", {}).get(self.me, {}).get(peer, 0.0)


async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, plan: Plan,
                peer: str) -> None:
    """Copy one direction, delivering each chunk one-way-delay after it was read."""
    queue: asyncio.Queue = asyncio.Queue(QUEUE_CHUNKS)

    async def deliver() -> None:
        while True:
            read_at, data = await queue.get()
            if not data:
                break
            due = read_at + plan.delay_s(peer)
            while (wait := max(due - time.monotonic(),
                               plan.stall_until(peer) - time.time())) > 0:
                await asyncio.sleep(min(wait, 0.05))
            writer.write(data)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()

    sender = asyncio.create_task(deliver())
    try:
        while data := await reader.read(CHUNK):
            await queue.put((time.monotonic(), data))
        await queue.put((time.monotonic(), b""))
        await sender
    except (ConnectionError, OSError):
        sender.cancel()
    finally:
        if not sender.done():
            await asyncio.gather(sender, return_exceptions=True)


async def _serve(plan: Plan, peer: str, wire: str, port: int,
                 client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
    try:
        up_r, up_w = await asyncio.wait_for(asyncio.open_connection(wire, port),
                                            CONNECT_TIMEOUT_S)
    except (OSError, asyncio.TimeoutError):
        client_w.close()
        return
    try:
        await asyncio.gather(_pump(client_r, up_w, plan, peer), _pump(up_r, client_w, plan, peer))
    finally:
        for w in (up_w, client_w):
            w.close()


async def main(path: str, me: str) -> None:
    plan = Plan(path, me)
    servers = []
    for peer, member in plan.data["members"].items():
        if peer == me:
            continue
        for port in member["ports"]:
            async def handle(r, w, peer=peer, wire=member["wire"], port=port) -> None:
                await _serve(plan, peer, wire, port, r, w)

            servers.append(await asyncio.start_server(handle, member["advertised"], port))
    print(f"wan_proxy {me}: {len(servers)} listeners", flush=True)
    await asyncio.gather(*(s.serve_forever() for s in servers))


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2]))
