"""GGUF export figures: file size, conversion and round-trip time, and the round trip's numbers,
per model directory and type, through the real command (`posttrain export DIR --type T`).

    .venv/bin/python scripts/bench_export.py runs/demo/merge runs/smollm2-cpu/merge runs/gemma3-cpu/merge
    .venv/bin/python scripts/bench_export.py --types f16 q8_0 -o /tmp/exports DIR ...

Each export runs in its own process under GNU time (peak RSS: the largest process of the export,
posttrain's or the converter's); prints one Markdown row per export for docs/benchmarks.md. The machine's numbers: say
which machine they came from.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

BIN = Path(sys.executable).with_name("posttrain")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("dirs", nargs="+", help="finished model stages (merge outputs) or model directories")
    ap.add_argument("--types", nargs="+", default=["f16", "bf16", "q8_0"])
    ap.add_argument("-o", "--output", default="runs/bench-export")
    args = ap.parse_args()
    print("| model | type | file MB | tensors | convert s | round trip s | total s | peak RSS GB | max abs Δlogit "
          "| of logit scale | argmax agree | same greedy answers | first answer (file) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for d in args.dirs:
        for t in args.types:
            out = Path(args.output) / f"{Path(d).parent.name}-{Path(d).name}-{t}"
            t0 = time.time()
            r = subprocess.run(["/usr/bin/time", "-f", "PEAK_KB %M", str(BIN), "export", d, "--type", t, "-o",
                                str(out), "--overwrite"], capture_output=True, text=True)
            wall = time.time() - t0
            if r.returncode != 0:
                print(f"| {d} | {t} | failed: {r.stderr.strip().splitlines()[-1][:150]} |")
                continue
            rss = int(r.stderr.rsplit("PEAK_KB ", 1)[1].split()[0]) / 1e6  # the largest process of the export
            m = json.loads((out / "posttrain.json").read_text())
            trip, metrics = m["checks"]["round_trip"], m["metrics"]
            print(f"| {d} | {t} | {m['file']['size_bytes'] / 1e6:.1f} | {m['file']['tensor_types']} "
                  f"| {metrics['convert_s']:.1f} | {metrics['round_trip_s']:.1f} | {wall:.1f} | {rss:.2f} "
                  f"| {trip['max_abs_diff']:.3g} | {trip['relative_diff']:.2e} (scale {trip['logit_scale']:.1f}) "
                  f"| {trip['argmax_agreement']:.3f} | {trip['same_answers']}/{trip['probes']} "
                  f"| {trip['samples'][0]['file'][:40]!r} |", flush=True)


if __name__ == "__main__":
    main()
