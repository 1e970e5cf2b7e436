"""The emulated WAN's delaying proxy (tests/wan_proxy.py) on loopback addresses: each direction
is held for the link's one-way delay, a stalled link delivers nothing until the stall ends, and
a delay change applies to the next bytes."""

from __future__ import annotations

import asyncio
import json
import time

import wan_proxy
from processes import free_port

ONE_WAY_MS = 40.0


async def _echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while data := await reader.read(1024):
        writer.write(data)
        await writer.drain()
    writer.close()


async def _round_trip(port: int) -> float:
    reader, writer = await asyncio.open_connection("127.0.0.2", port)
    start = time.perf_counter()
    writer.write(b"ping")
    await writer.drain()
    assert await reader.readexactly(4) == b"ping"
    writer.close()
    return (time.perf_counter() - start) * 1e3


def test_each_direction_waits_its_delay_and_a_stall_holds_everything(tmp_path) -> None:
    port = free_port()
    plan = {"members": {"me": {"wire": "127.0.0.1", "advertised": "127.0.0.9", "ports": []},
                        "peer": {"wire": "127.0.0.1", "advertised": "127.0.0.2",
                                 "ports": [port]}},
            "delay_ms": {"me": {"peer": ONE_WAY_MS}, "peer": {"me": ONE_WAY_MS}},
            "stall_until": {}}
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(plan))

    async def main() -> tuple[float, float, float]:
        server = await asyncio.start_server(_echo, "127.0.0.1", port)
        proxy = asyncio.create_task(wan_proxy.main(str(path), "me"))
        await asyncio.sleep(0.3)
        normal = await _round_trip(port)
        plan["stall_until"] = {"me": {"peer": time.time() + 1.0}}
        path.write_text(json.dumps(plan))
        await asyncio.sleep(0.2)  # the proxy re-reads its plan at most every 0.1 s
        stalled = await _round_trip(port)
        plan["delay_ms"]["me"]["peer"] = 5.0
        path.write_text(json.dumps(plan))
        await asyncio.sleep(0.2)
        faster = await _round_trip(port)
        proxy.cancel()
        server.close()
        return normal, stalled, faster

    normal, stalled, faster = asyncio.run(main())
    assert 2 * ONE_WAY_MS <= normal < 2 * ONE_WAY_MS + 200
    assert stalled >= 600  # 1 s stall, less the 0.2 s before the ping
    assert faster < 2 * ONE_WAY_MS
