"""Terminal output: one rich console, the end-of-stage summary table, and human numbers."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

console = Console(stderr=True, highlight=False)


def summary(title: str, rows: dict[str, object]) -> None:
    table = Table(title=title, show_header=False, title_justify="left")
    table.add_column(style="bold", no_wrap=True)
    table.add_column(overflow="fold")
    for k, v in rows.items():
        table.add_row(k, fmt(v))
    console.print(table)


def fmt(v: object) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def peak_memory_mb() -> float:
    """Peak memory of this process: CUDA allocator peak when on GPU, else peak RSS."""
    import resource
    import sys

    try:
        import torch

        if torch.cuda.is_available():
            return torch.cuda.max_memory_allocated() / 2**20
    except ImportError:
        pass
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 2**10


class PeakMemory:
    """Peak memory while a block runs, for one chain stage among several in one process (the
    process-wide ru_maxrss only ever grows, so it would give later stages the earlier ones' peak).
    On Linux the kernel's own high-water mark (VmHWM) is reset at the start (/proc/self/clear_refs)
    and read at the end: exact, even for a peak that lasts a moment. Elsewhere, or where that file
    can't be written, RSS sampled by a thread every `interval` seconds (a peak shorter than that,
    or inside one long call that holds the GIL, can be missed). Plus the CUDA allocator's peak
    when there is a GPU. MB, after the block."""

    def __init__(self, interval: float = 0.05):
        self.interval, self.rss_mb, self.cuda_mb = interval, None, None

    def __enter__(self) -> PeakMemory:
        import threading

        import psutil

        self._process, self._peak = psutil.Process(), 0
        self._kernel = _reset_high_water_mark()
        self._stop = threading.Event()
        self._cuda = _cuda()
        if self._cuda is not None:
            self._cuda.reset_peak_memory_stats()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while True:
            self._peak = max(self._peak, self._process.memory_info().rss)
            if self._stop.wait(self.interval):
                return

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._peak = max(self._peak, self._process.memory_info().rss)
        if self._kernel:
            self._peak = max(self._peak, _high_water_mark() or 0)
        self.rss_mb = round(self._peak / 2**20, 1)
        # a block that imported torch itself: nothing used the GPU before it, so the peak is its own
        self._cuda = self._cuda or _cuda()
        if self._cuda is not None:
            self.cuda_mb = round(self._cuda.max_memory_allocated() / 2**20, 1)


def _reset_high_water_mark() -> bool:
    """Linux: set this process's peak RSS (VmHWM) back to its current RSS. False where it can't."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return _high_water_mark() is not None
    except OSError:
        return False


def _high_water_mark() -> int | None:
    """VmHWM of this process in bytes (Linux), else None."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _cuda():
    """torch.cuda when torch is already imported and a GPU is there (never imports torch itself)."""
    import sys

    torch = sys.modules.get("torch")
    return torch.cuda if torch is not None and torch.cuda.is_available() else None
