"""Timing, memory and reporting helpers shared by the benchmarks."""

import datetime
import json
import platform
import statistics
import time
import typing as tp
from pathlib import Path

import torch

from moshi_ttt.utils.atomic import atomic_file


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "meta":
        return "meta (memory estimate, no computation)"
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def environment(device: torch.device) -> dict[str, tp.Any]:
    return {"device": device_name(device), "torch": torch.__version__,
            "date": datetime.date.today().isoformat()}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn: tp.Callable[[], tp.Any], device: torch.device, warmup: int = 2, repeat: int = 5) -> float:
    """Median wall time of `fn` in milliseconds, after warm-up runs."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(1000 * (time.perf_counter() - start))
    return statistics.median(times)


def peak_memory_gib(fn: tp.Callable[[], tp.Any], device: torch.device, tracked: tp.Sequence[tp.Any] = ()) -> float | None:
    """Peak memory during `fn` (everything allocated, weights included); None on CPU.

    On CUDA, what the allocator reports. On the meta device, which holds no data, an
    estimate by torch's MemTracker, counting the modules and tensors in `tracked` and
    everything `fn` allocates: GPU memory without a GPU.
    """
    if device.type == "meta":
        from torch.distributed._tools.mem_tracker import MemTracker
        tracker = MemTracker()
        tracker.track_external(*tracked)
        with tracker:
            fn()
        return tracker.get_tracker_snapshot("peak")[device]["Total"] / 2**30
    if device.type != "cuda":
        return None
    synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    synchronize(device)
    return torch.cuda.max_memory_allocated(device) / 2**30


def write_results(path: Path, results: dict[str, tp.Any]) -> None:
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(results, indent=2))


def markdown_table(header: list[str], rows: list[list[tp.Any]]) -> str:
    def cell(value: tp.Any) -> str:
        if isinstance(value, float):
            return f"{value:.3g}" if abs(value) < 100 else f"{value:.1f}"
        return str(value)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)
