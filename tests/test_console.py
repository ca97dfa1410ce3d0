"""posttrain.console: PeakMemory, the peak memory of one chain stage that the chain summary and the
report show."""

from __future__ import annotations


def test_peak_memory_sees_an_allocation_inside_the_block():
    """In a fresh process (a long-lived one may serve the allocation from memory it already holds,
    so its RSS would not move): 300 MB allocated, touched and freed inside one call that holds the
    GIL (a sampling thread alone would miss it) is in that block's peak, and neither in the block
    before it nor in the one after it."""
    import json
    import subprocess
    import sys

    code = """
import json
from posttrain.console import PeakMemory
with PeakMemory() as before:
    pass
with PeakMemory(interval=0.01) as peak:
    block = bytearray(300 * 2**20)
    block[::4096] = b"x" * len(block[::4096])
    del block
with PeakMemory() as after:  # the next stage: not charged with the one before's peak
    pass
print(json.dumps([before.rss_mb, peak.rss_mb, peak.cuda_mb, after.rss_mb]))
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    before, peak, cuda, after = json.loads(r.stdout.strip().splitlines()[-1])
    assert peak > before + 250 and after < peak - 250
    assert cuda is None  # torch is never imported in that process, so there is no CUDA peak to read
