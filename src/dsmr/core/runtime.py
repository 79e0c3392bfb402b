"""Where and how the work runs: device choice, autocast, peak-memory meter, recurrent-state size.

Used by training, evaluation, generation and the study (re-exported from dsmr.evaluation.perplexity for older imports).

Peak memory (`PeakMemory.peak_bytes`, `PeakMemory.method` says which):
  * CUDA: `torch.cuda.max_memory_allocated` after a reset of the peak counter: bytes held by tensors,
    weights included.
  * CPU (Linux): the rise of the process's resident-set high-water mark (VmHWM, reset through
    /proc/self/clear_refs) above its resident size when the measurement starts: the memory the measured
    work itself needed, without the interpreter and libraries already loaded. Memory the allocator kept
    from earlier work in the same process is reused without counting, so compare runs made in fresh
    processes (the benchmark does).
  * elsewhere: the same rise, from a thread sampling the resident size every 5 ms (psutil).
"""

from __future__ import annotations

import contextlib
import os
import threading
import time

import torch

from dsmr.errors import DsmrError


class PeakMemory:
    """Measures the peak memory of a block: `with PeakMemory(device) as m: ...; m.peak_bytes`.

    Meters nest (an evaluation inside a training run): resetting the process-wide peak counter for an
    inner meter first hands the counter's value to the meters already running.
    """

    _active: list["PeakMemory"] = []

    def __init__(self, device: torch.device | str):
        self.device = torch.device(device)
        self.peak_bytes = 0
        self.method = ""
        self._carried = 0  # the peak counter's value before an inner meter reset it
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _counter(self) -> int:
        if self.device.type == "cuda":
            return int(torch.cuda.max_memory_allocated(self.device))
        return _hwm_bytes() if self.method == "cpu_rss_high_water_mark_rise" else 0

    def __enter__(self) -> "PeakMemory":
        for outer in PeakMemory._active:
            outer._carried = max(outer._carried, outer._counter())
        PeakMemory._active.append(self)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.method = "cuda_max_memory_allocated"
            return self
        self._start_rss = _rss_bytes()
        if _reset_hwm():
            self.method = "cpu_rss_high_water_mark_rise"
            return self
        self.method = "cpu_rss_sampled_rise"
        self._sampled = self._start_rss
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.005):
            self._sampled = max(self._sampled, _rss_bytes())

    def __exit__(self, *exc) -> None:
        PeakMemory._active.remove(self)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_bytes = max(self._carried, self._counter())
        elif self._thread is not None:
            self._stop.set()
            self._thread.join()
            self.peak_bytes = max(0, max(self._sampled, _rss_bytes()) - self._start_rss)
        else:
            self.peak_bytes = max(0, max(self._carried, self._counter()) - self._start_rss)


def _rss_bytes() -> int:
    import psutil

    return int(psutil.Process().memory_info().rss)


def _reset_hwm() -> bool:
    """Reset the kernel's peak-RSS counter of this process (Linux >= 4.0); False where unavailable."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return _hwm_bytes() > 0
    except OSError:
        return False


def _hwm_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def resolve_device(device: str | torch.device | None) -> torch.device:
    """`auto` (or None): CUDA when available, else CPU; otherwise the named device, checked to exist."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except RuntimeError as err:
        raise DsmrError(f"unknown device {device!r}: {err}") from err
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DsmrError(f"device {device} requested but CUDA is not available")
    return device


def autocast(device: torch.device, enabled: bool = True):
    """bf16 autocast on CUDA; a no-op elsewhere (CPU runs stay fp32 and reproducible)."""
    if device.type == "cuda" and enabled:
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def state_bytes(model, batch: int = 1, bytes_per_value: int | None = None) -> int:
    """Bytes of the model's recurrent state for `batch` lanes: DSMRConfig.state_bytes at the given bytes
    per value (default: the parameters' dtype)."""
    if bytes_per_value is None:
        bytes_per_value = next(model.parameters()).element_size()
    return model.cfg.state_bytes(batch, bytes_per_value)


def usable_cores() -> int:
    """The CPU cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def busy_cores(sample_seconds: float = 0.25) -> float:
    """How many cores other work keeps busy right now: the machine's non-idle CPU time over a short sample
    (/proc/stat; elsewhere the 1-minute load average), in cores."""
    def times():
        with open("/proc/stat") as f:
            values = [int(v) for v in f.readline().split()[1:]]
        return sum(values), values[3] + (values[4] if len(values) > 4 else 0)  # total, idle + iowait

    try:
        total0, idle0 = times()
        time.sleep(sample_seconds)
        total1, idle1 = times()
        cores = os.cpu_count() or 1
        return cores * (1 - (idle1 - idle0) / max(total1 - total0, 1))
    except (OSError, ValueError, IndexError):
        try:
            return os.getloadavg()[0]
        except (OSError, AttributeError):
            return 0.0


def idle_threads(processes: int = 1) -> tuple[int, float]:
    """CPU threads for each of `processes` processes that leave busy cores alone (at least 1), and the busy
    cores measured: a small model on a core another job also runs crawls, and torch's default (every
    core) oversubscribes a shared machine."""
    busy = busy_cores()
    free = max(1, round(usable_cores() - busy))
    return max(1, free // max(1, processes)), busy
