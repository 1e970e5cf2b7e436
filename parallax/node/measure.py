"""A node measures itself at start: matmul GFLOP/s, memory bandwidth, memory it may use.

Gradient's Parallax looks GPUs up in a table of names and assumes 50 TFLOPS for anything
unknown; measuring takes well under a second and works for every CPU and GPU.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class DeviceMeasurement:
    device: str  # "cpu" | "cuda"
    device_name: str
    memory_bytes: int  # budget for weights + KV cache
    gflops: float
    bandwidth_gbps: float


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_gflops(device: torch.device, dtype: torch.dtype, size: int = 512,
                   repeats: int = 4) -> float:
    """Best-of-n square matmul rate in the compute dtype."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    torch.matmul(a, b)  # warm-up
    best = float("inf")
    for _ in range(repeats):
        _synchronize(device)
        start = time.perf_counter()
        torch.matmul(a, b)
        _synchronize(device)
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best / 1e9


def measure_bandwidth(device: torch.device, megabytes: int = 128, repeats: int = 3) -> float:
    """Read bandwidth (GB/s) of a sum over a buffer larger than any cache."""
    buffer = torch.ones(megabytes * 2**20 // 4, device=device, dtype=torch.float32)
    buffer.sum()
    best = float("inf")
    for _ in range(repeats):
        _synchronize(device)
        start = time.perf_counter()
        buffer.sum()
        _synchronize(device)
        best = min(best, time.perf_counter() - start)
    return buffer.numel() * 4 / best / 1e9


def available_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    pages = os.sysconf("SC_AVPHYS_PAGES") if hasattr(os, "sysconf") else 0
    return int(pages * os.sysconf("SC_PAGE_SIZE")) if pages else 8 * 2**30


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "cpu"


def measure_device(device: str = "cpu", dtype: torch.dtype = torch.float32,
                   memory_bytes: int | None = None) -> DeviceMeasurement:
    """Everything a joining node reports about its hardware."""
    torch_device = torch.device(device)
    return DeviceMeasurement(
        device=torch_device.type,
        device_name=device_name(torch_device),
        memory_bytes=int(memory_bytes or available_memory_bytes(torch_device)),
        gflops=round(measure_gflops(torch_device, dtype), 1),
        bandwidth_gbps=round(measure_bandwidth(torch_device), 1),
    )
