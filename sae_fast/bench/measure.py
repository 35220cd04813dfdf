"""Measuring rows: synchronised timing (median of round-robin calls), peak memory of one call, and the records
they fill (Row per contestant, Result per workload)."""
from __future__ import annotations

import contextlib
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from .workloads import Workload

PHASES = ("fwd", "fwd_bwd", "step")
PHASE_TITLE = {"fwd": "fwd", "fwd_bwd": "fwd+bwd", "step": "step"}


@dataclass
class Row:
    label: str
    kind: str                       # floor | sae-fast | peer
    settings: str
    status: str = "ok"              # ok | failed | not installed | not applicable
    error: str | None = None
    phases: dict = field(default_factory=dict)   # phase -> {median_ms, times_ms, peak_bytes}
    xhat_rel_err: float | None = None

    def median(self, phase: str) -> float | None:
        p = self.phases.get(phase)
        return p["median_ms"] if p else None


@dataclass
class Result:
    workload: Workload
    dtype: str
    rows: list
    notes: list
    interleaved: bool = False

    @property
    def floor_ms(self) -> float:
        return self.rows[0].median("fwd")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def error_text(exc: BaseException) -> str:
    """One line naming the exception, at most 240 characters (for a row's status)."""
    text = f"{type(exc).__name__}: {exc}".strip().splitlines()[0]
    return text if len(text) <= 240 else text[:237] + "..."


# ============================================================================ peak memory
MEMORY_METHOD = {
    "cuda": "CUDA caching-allocator peak (torch.cuda.max_memory_allocated) during one call, above the "
            "bytes allocated at its start",
    "cpu": "peak live bytes allocated through torch's CPU allocator during one call, above the bytes live at "
           "its start, from torch.profiler memory events (excludes BLAS/OpenMP scratch and Python objects)",
}


def peak_memory(fn: Callable[[], object], device: torch.device) -> int | None:
    """Peak extra bytes while ``fn`` runs (see MEMORY_METHOD); None when it cannot be measured."""
    if device.type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        sync(device)
        return torch.cuda.max_memory_allocated(device) - base
    from torch.profiler import ProfilerActivity, profile
    with _quiet_fd2(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    try:
        events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
        current = peak = 0
        for e in sorted(events, key=lambda e: e.start_ns()):
            current += e.nbytes()
            peak = max(peak, current)
        return peak
    except AttributeError:  # the profiler's result API moved: say "not measured" rather than guess
        return None


@contextlib.contextmanager
def _quiet_fd2():
    """The profiler's C++ side writes start/stop lines to file descriptor 2; keep them off the table."""
    try:
        saved = os.dup(2)
    except OSError:
        yield
        return
    try:
        sys.stderr.flush()
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


# ============================================================================ timing
def measure_phase(phase: str, entries: list, device: torch.device, warmup: int, repeats: int) -> None:
    """Time each (row, call) pair ``repeats`` times after ``warmup`` untimed calls, round-robin over the rows
    with the starting row rotated each round, so a change of load on a shared machine hits every row alike.
    Stores the median, the raw times and the peak memory (one more call) in ``row.phases[phase]``; a call that
    raises marks its row failed and drops it."""
    def ok(row, fn) -> bool:
        try:
            fn()
            sync(device)
            return True
        except Exception as exc:  # a peer that breaks here is a row saying so
            row.status, row.error = "failed", f"in {PHASE_TITLE[phase]}: {error_text(exc)}"
            return False

    live = [(row, fn) for row, fn in entries if row.status == "ok"]
    for _ in range(warmup):
        live = [(row, fn) for row, fn in live if ok(row, fn)]
    times = {id(row): [] for row, _ in live}
    for i in range(repeats):
        turn = i % len(live) if live else 0
        for row, fn in live[turn:] + live[:turn]:
            if row.status != "ok":
                continue
            start = time.perf_counter()
            if ok(row, fn):
                times[id(row)].append(time.perf_counter() - start)
    for row, fn in live:
        if row.status == "ok":
            t = times[id(row)]
            row.phases[phase] = {"median_ms": statistics.median(t) * 1e3, "times_ms": [round(v * 1e3, 4) for v in t],
                                 "peak_bytes": peak_memory(fn, device)}
