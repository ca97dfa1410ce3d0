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
    """Peak memory while a block runs, for one chain stage among several in one process: the
    process's RSS sampled every 50 ms (ru_maxrss only ever grows, so it would give later stages the
    earlier ones' peak), and the CUDA allocator's peak when there is a GPU. MB, after the block."""

    def __init__(self, interval: float = 0.05):
        self.interval, self.rss_mb, self.cuda_mb = interval, None, None

    def __enter__(self) -> PeakMemory:
        import threading

        import psutil

        self._process, self._peak = psutil.Process(), 0
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
        self.rss_mb = round(self._peak / 2**20, 1)
        # a block that imported torch itself: nothing used the GPU before it, so the peak is its own
        self._cuda = self._cuda or _cuda()
        if self._cuda is not None:
            self.cuda_mb = round(self._cuda.max_memory_allocated() / 2**20, 1)


def _cuda():
    """torch.cuda when torch is already imported and a GPU is there (never imports torch itself)."""
    import sys

    torch = sys.modules.get("torch")
    return torch.cuda if torch is not None and torch.cuda.is_available() else None
