"""report.md and a self-contained report.html for a chain's output root.

Read from what the chain left behind, nothing else: posttrain-chain.json (stages, time, peak
memory), each stage's posttrain.json (lineage, key metrics) and metrics.jsonl (training curves),
and eval/eval.json (the same held-out metrics for every model, with samples). The report is a list
of blocks (headings, text, tables, images) rendered twice: Markdown that links the PNGs under
report/, and HTML with the same PNGs embedded as data URIs, so it opens offline with nothing
fetched. `posttrain report DIR` rewrites it; `posttrain run` writes it at the end of every run.
"""

from __future__ import annotations

import base64
import html
import json
import math
from dataclasses import dataclass
from pathlib import Path

from posttrain import manifest, registry

CHAIN = "posttrain-chain.json"
FIGURES = "report"


@dataclass
class Table:
    header: list[str]
    rows: list[list[str]]


@dataclass
class Image:
    path: Path
    alt: str


Block = tuple[str, object]  # ("h1" | "h2" | "h3" | "p" | "table" | "image", content)


def _chain_time(chain: dict) -> str:
    """The chain's own time (each stage's when it ran: an up-to-date re-run takes 0.1 s) and the
    last run's wall time, when they differ."""
    own, wall = chain.get("chain_time_s"), chain.get("wall_time_s")
    if own is None:  # a record written before chain_time_s existed
        return f"wall time {wall if wall is not None else '?'} s"
    return f"chain time {own:.0f} s" + (f" (the last run, which skipped up-to-date stages: {wall:.0f} s)"
                                        if wall is not None and abs(wall - own) > 0.1 * max(own, 1.0) else "")


def write(output_dir: str | Path) -> tuple[Path, Path]:
    """Build the report of the chain in `output_dir`; returns (report.md, report.html)."""
    root = Path(output_dir)
    chain = _read_json(root / CHAIN) or {"stages": []}
    stages = [dict(r, manifest=manifest.read(r["path"]) or {}) for r in chain.get("stages", [])]
    ev = _read_json(root / "eval" / "eval.json")
    figures = root / FIGURES
    figures.mkdir(parents=True, exist_ok=True)
    for old in figures.glob("*.png"):
        old.unlink()

    blocks: list[Block] = [("h1", f"posttrain report: {root}")]
    blocks.append(("p", f"Chain: {' → '.join(r['stage'] for r in stages) or '(no chain record)'}. "
                        f"Finished {chain.get('finished', '?')}; {_chain_time(chain)}; "
                        f"git {chain.get('git_commit') or 'unknown'}; "
                        + ", ".join(f"{k} {v}" for k, v in (chain.get("versions") or {}).items() if v) + "."))
    if ev:
        blocks += verdict_blocks(ev, stages)
        blocks += eval_blocks(ev, figures)
    blocks += curve_blocks(stages, figures)
    blocks += lineage_blocks(stages)
    if ev and ev.get("samples"):
        blocks += sample_blocks(ev)

    md, page = root / "report.md", root / "report.html"
    _atomic_write(md, to_markdown(blocks, root))
    _atomic_write(page, to_html(blocks, f"posttrain report: {root.name}"))
    return md, page


# ---------------------------------------------------------------------------------------------
# Sections


def verdict_blocks(ev: dict, stages: list[dict]) -> list[Block]:
    """The verdict first: per evaluated stage, what it changed against its parent (each score and
    the reward, in the sampled decoding when there is one), at what KL and training time, and
    whether it beat the control (more SFT for the same compute) on each score."""
    models, decodings = ev["models"], ev["settings"]["decoding"]
    name = next((d["name"] for d in decodings if d["temperature"] > 0), decodings[0]["name"])
    by_label = {m["label"]: m for m in models}
    seconds = {r["stage"]: r.get("seconds") for r in stages}
    control = by_label.get("control")
    order = [m["label"] for m in models]
    cols = [c for c in _columns(models, name) if c[0] not in ("ended", "length", "distinct-2", "KL to ref")
            and not c[0].startswith("win")]
    rows = []
    for m in models:
        parent = by_label.get(m.get("parent"))
        if parent is None:  # the base model: nothing it was trained from
            continue
        d, before = m["decodings"][name], parent["decodings"][name]
        changes = ", ".join(f"{h} {_delta(get(d), get(before), kind)}" for h, get, kind in cols)
        beyond = "–"
        if control is not None and m is not control and order.index(m["label"]) > order.index("control"):
            c = control["decodings"][name]
            beyond = ", ".join(f"{h} {_delta(get(d), get(c), kind)}" for h, get, kind in cols)
        kl = d.get("kl", {}).get("mean")
        took = seconds.get(m["label"])
        rows.append([m["label"], m["parent"], changes, _fmt(kl, "num") if kl is not None else "–",
                     f"{took:.0f} s" if took is not None else "–", beyond])
    if not rows:
        return []
    return [("h2", "Verdict"),
            ("p", f"Each stage against the model it was trained from ({name} decoding; the tables below have "
                  "every decoding and metric), its KL to the reference, its training time, and what it did beyond "
                  "the control (the SFT model trained on with SFT for the same compute)."),
            ("table", Table(["stage", "from", "change", "KL to ref", "time", "beyond the control"], rows))]


def eval_blocks(ev: dict, figures: Path) -> list[Block]:
    s, models = ev["settings"], ev["models"]
    blocks: list[Block] = [("h2", "Every model on the same held-out data")]
    blocks.append(("p", f"{s['prompts']} held-out prompts of data.{s['data']}"
                        + (f", {s['pair_count']} held-out pairs of data.{s['pairs']}" if s.get("pairs") else "")
                        + f"; template {s['template']} (hash {s['template_hash']}); max {s['max_new_tokens']} new "
                        f"tokens; seed {s['seed']}; device {s['device']}. Reward model: {s['reward_model'] or 'none'}; "
                        f"KL reference: {s['kl_reference'] or 'none'}. Δ is against the model's parent stage "
                        "(the row it was trained from); the control row is the SFT model trained on with SFT for "
                        "the compute the later stages used."))
    for dec in s["decoding"]:
        name = dec["name"]
        how = ("greedy decoding" if dec["temperature"] == 0
               else f"temperature {dec['temperature']}, top-p {dec['top_p']}")
        blocks.append(("h3", f"Generations: {name} ({how})"))
        blocks.append(("table", generation_table(models, name)))
    blocks.append(("h3", "Likelihoods (no generation)"))
    blocks.append(("table", likelihood_table(models)))
    control = next((m for m in models if m["label"] == "control"), None)
    if control is not None:
        blocks.append(("h3", "Beyond more SFT: each later stage minus the control"))
        blocks.append(("table", versus_control_table(models, control, [d["name"] for d in s["decoding"]])))
    if any("lm_eval" in m for m in models):
        blocks.append(("h3", "lm-evaluation-harness"))
        blocks.append(("table", lm_eval_table(models)))
    blocks += [("image", img) for img in (eval_bars(models, s["decoding"], figures), reward_hist(models, s, figures))
               if img is not None]
    return blocks


def _columns(models: list[dict], decoding: str) -> list[tuple[str, callable, str]]:
    """(header, getter, format) for the generation table, only where some model has the value."""
    first = models[0]["decodings"][decoding]
    cols = [(n, lambda d, n=n: d["scores"][n], "pct" if all(0.0 <= m["decodings"][decoding]["scores"][n] <= 1.0
                                                         for m in models) else "num")
            for n in first["scores"]]
    if "reward" in first:
        cols += [("reward", lambda d: d["reward"]["mean"], "num"),
                 ("win vs base", lambda d: d.get("win_rate_vs_base"), "rate"),
                 ("win vs parent", lambda d: d.get("win_rate_vs_parent"), "rate")]
    if "kl" in first:
        cols.append(("KL to ref", lambda d: d["kl"]["mean"], "num"))
    cols += [("ended", lambda d: d["ended"], "pct"), ("length", lambda d: d["length"], "num"),
             ("distinct-2", lambda d: d["distinct_2"], "num")]
    return cols


def generation_table(models: list[dict], decoding: str) -> Table:
    cols = _columns(models, decoding)
    by_label = {m["label"]: m for m in models}
    rows = []
    for m in models:
        d = m["decodings"][decoding]
        parent = by_label.get(m.get("parent") or "")
        cells = [m["label"]]
        for _, get, kind in cols:
            before = get(parent["decodings"][decoding]) if parent and kind != "rate" else None
            cells.append(_cell(get(d), before, "pct" if kind == "rate" else kind))
        rows.append(cells)
    return Table(["model"] + [c[0] for c in cols], rows)


def likelihood_table(models: list[dict]) -> Table:
    by_label = {m["label"]: m for m in models}
    rows = []
    has_pref = any("preference" in m for m in models)
    for m in models:
        parent = by_label.get(m.get("parent") or "")
        cells = [m["label"], _cell(m["nll"]["nll"], parent["nll"]["nll"] if parent else None, "num"),
                 _cell(m["nll"]["perplexity"], parent["nll"]["perplexity"] if parent else None, "num")]
        if has_pref:
            p, pp = m.get("preference", {}), (parent or {}).get("preference", {})
            cells += [_cell(p.get("accuracy"), pp.get("accuracy"), "pct"),
                      _cell(p.get("margin"), pp.get("margin"), "num")]
        rows.append(cells + [f"{m['seconds']:.0f} s"])
    header = ["model", "NLL / assistant token", "perplexity"]
    header += ["pref accuracy", "pref margin (nats)"] if has_pref else []
    return Table(header + ["eval time"], rows)


def versus_control_table(models: list[dict], control: dict, decodings: list[str]) -> Table:
    """Each model after the control, minus the control, per decoding: what the stage did beyond
    what the same compute spent on more SFT did."""
    cols = [c for c in _columns(models, decodings[0]) if not c[0].startswith("win")]
    order = [m["label"] for m in models]
    later = [m for m in models if order.index(m["label"]) > order.index("control")]
    rows = [[f"{m['label']} ({name})"] + [_delta(get(m["decodings"][name]), get(control["decodings"][name]), kind)
                                          for _, get, kind in cols] for m in later for name in decodings]
    return Table(["model − control"] + [c[0] for c in cols], rows)


def lm_eval_table(models: list[dict]) -> Table:
    keys = sorted({f"{t}/{k}" for m in models for t, v in (m.get("lm_eval", {}).get("results") or {}).items()
                   for k in v})
    rows = []
    for m in models:
        res = m.get("lm_eval", {})
        got = {f"{t}/{k}": v for t, vs in (res.get("results") or {}).items() for k, v in vs.items()}
        rows.append([m["label"]] + [_fmt(got.get(k), "num") if k in got else res.get("skipped", "–")[:40]
                                    for k in keys])
    return Table(["model"] + keys, rows)


def curve_blocks(stages: list[dict], figures: Path) -> list[Block]:
    blocks: list[Block] = []
    for r in stages:
        stage = registry.STAGES.get(r["stage"])  # a stage this version does not know: no curves
        curves = _curves(Path(r["path"]) / "metrics.jsonl", stage.curves if stage else ())
        if curves:
            if not blocks:
                blocks.append(("h2", "Training curves"))
            blocks.append(("image", plot_curves(r["stage"], curves, figures)))
    return blocks


def lineage_blocks(stages: list[dict]) -> list[Block]:
    rows = []
    for r in stages:
        m = r["manifest"]
        parent = m.get("parent") or {}
        peak = r.get("peak_rss_mb")
        mem = "–" if peak is None else f"{peak:,.0f} MB RSS" + (f", {r['peak_cuda_mb']:,.0f} MB CUDA"
                                                                if r.get("peak_cuda_mb") else "")
        source = {"format": "data sources", "eval": "the models in the tables"}.get(r["stage"], "–")
        rows.append([r["stage"], r["path"], str(parent.get("path") or r.get("parent") or source),
                     str(parent.get("hash") or "–"), str(m.get("inputs_key") or "–"), m.get("method", "–"),
                     r.get("status", "–"), "–" if r.get("seconds") is None else f"{r['seconds']:.0f} s", mem,
                     _key_metrics(r.get("metrics") or {})])
    return [("h2", "Lineage, time and memory"),
            ("p", "Each stage's directory, what it started from (path and the hash of that directory's "
                  "identifying files), its inputs key (config sections, data contents, parent: the chain reruns "
                  "a stage when it changes), wall time and peak memory of the run that made it."),
            ("table", Table(["stage", "output", "parent", "parent hash", "inputs key", "method", "status",
                             "time", "peak memory", "key metrics"], rows))]


def sample_blocks(ev: dict) -> list[Block]:
    blocks: list[Block] = [("h2", "Sample generations (same prompts, every model)")]
    decodings = [d["name"] for d in ev["settings"]["decoding"]]
    for s in ev["samples"]:
        rows = [[label] + [resp.get(d, "") or "(empty)" for d in decodings] for label, resp in s["responses"].items()]
        blocks.append(("p", f"Prompt: {s['prompt']} — reference: {s['reference']}"))
        blocks.append(("table", Table(["model"] + decodings, rows)))
    return blocks


# ---------------------------------------------------------------------------------------------
# Plots (matplotlib, Agg: no display needed)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_curves(stage: str, curves: dict[str, tuple[list, list]], figures: Path) -> Image:
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(curves), figsize=(3.6 * len(curves), 2.8), squeeze=False)
    for ax, (name, (xs, ys)) in zip(axes[0], curves.items(), strict=True):
        ax.plot(xs, ys, marker="o" if len(xs) < 30 else None, markersize=3)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    fig.suptitle(stage, fontsize=10)
    fig.tight_layout()
    path = figures / f"curves-{stage}.png"
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return Image(path, f"{stage}: {', '.join(curves)} over training steps")


def eval_bars(models: list[dict], decodings: list[dict], figures: Path) -> Image | None:
    """One subplot per metric (task scores and reward per decoding, preference accuracy), a bar per model."""
    panels: dict[str, list[float | None]] = {}
    for dec in decodings:
        name = dec["name"]
        for score in models[0]["decodings"][name]["scores"]:
            panels[f"{score} ({name})"] = [m["decodings"][name]["scores"][score] for m in models]
        if "reward" in models[0]["decodings"][name]:
            panels[f"reward ({name})"] = [m["decodings"][name]["reward"]["mean"] for m in models]
    if any("preference" in m for m in models):
        panels["preference accuracy"] = [m.get("preference", {}).get("accuracy") for m in models]
    if not panels:
        return None
    plt = _pyplot()
    labels = [m["label"] for m in models]
    ncols = min(4, len(panels))
    nrows = math.ceil(len(panels) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(max(3.0, 0.45 * len(labels) + 1.2) * ncols, 3.0 * nrows),
                             squeeze=False)
    for ax in axes.flat[len(panels):]:
        ax.axis("off")
    colors = [_color(lbl) for lbl in labels]
    for ax, (title, values) in zip(axes.flat, panels.items()):
        ax.bar(range(len(labels)), [0.0 if v is None else v for v in values], color=colors)
        ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right", fontsize=7)
        ax.set_title(title, fontsize=9)
        ax.tick_params(axis="y", labelsize=7)
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    path = figures / "eval-by-model.png"
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return Image(path, "held-out metrics by model")


def reward_hist(models: list[dict], settings: dict, figures: Path) -> Image | None:
    """Reward-model scores of every model's generations, one panel per decoding."""
    names = [d["name"] for d in settings["decoding"]]
    if not any(m["decodings"][n].get("reward_scores") for m in models for n in names):
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(names), figsize=(5.5 * len(names), 3.0), squeeze=False)
    for ax, name in zip(axes[0], names, strict=True):
        scored = [(m["label"], m["decodings"][name].get("reward_scores")) for m in models]
        scored = [(lbl, s) for lbl, s in scored if s]
        lo, hi = min(min(s) for _, s in scored), max(max(s) for _, s in scored)
        bins = [lo + (hi - lo) * i / 30 for i in range(31)] if hi > lo else 10
        for label, s in scored:
            ax.hist(s, bins=bins, histtype="step", linewidth=1.5, label=label, color=_color(label))
        ax.set_title(f"{name} generations", fontsize=9)
        ax.set_xlabel("reward-model score", fontsize=8)
        ax.set_ylabel("responses", fontsize=8)
        ax.tick_params(labelsize=7)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    path = figures / "reward-distributions.png"
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return Image(path, "reward-model scores of each model's generations, per decoding")


BASE_COLOR, OTHER_COLOR = "#9e9e9e", "#bcbd22"  # the base model; a model that is no stage of the table


def _color(label: str) -> str:
    stage = registry.STAGES.get(label)
    return BASE_COLOR if label == "base" else stage.color if stage and stage.color else OTHER_COLOR


# ---------------------------------------------------------------------------------------------
# Rendering


def to_markdown(blocks: list[Block], root: Path) -> str:
    out = []
    for kind, content in blocks:
        if kind in ("h1", "h2", "h3"):
            out.append("#" * int(kind[1]) + " " + str(content))
        elif kind == "p":
            out.append(str(content))
        elif kind == "table":
            t: Table = content
            esc = [[c.replace("|", "\\|").replace("\n", " ") for c in row] for row in [t.header, *t.rows]]
            out.append("\n".join(["| " + " | ".join(esc[0]) + " |", "|" + "---|" * len(t.header)]
                                 + ["| " + " | ".join(r) + " |" for r in esc[1:]]))
        elif kind == "image":
            img: Image = content
            out.append(f"![{img.alt}]({img.path.relative_to(root).as_posix()})")
    return "\n\n".join(out) + "\n"


_CSS = """body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1200px;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:.6em 0 1.2em;font-size:13px}th,td{border:1px solid #ccc;padding:3px 8px;
text-align:left;vertical-align:top}th{background:#f3f3f3}td.n{text-align:right;font-variant-numeric:tabular-nums}
img{max-width:100%;margin:.5em 0;display:block}h2{border-bottom:1px solid #ddd;padding-bottom:.2em}
p{max-width:70em}"""


def to_html(blocks: list[Block], title: str) -> str:
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
             f"<style>{_CSS}</style></head><body>"]
    for kind, content in blocks:
        if kind in ("h1", "h2", "h3"):
            parts.append(f"<{kind}>{html.escape(str(content))}</{kind}>")
        elif kind == "p":
            parts.append(f"<p>{html.escape(str(content))}</p>")
        elif kind == "table":
            t: Table = content
            head = "".join(f"<th>{html.escape(h)}</th>" for h in t.header)
            body = "".join("<tr>" + "".join(f"<td{' class=n' if _numeric(c) else ''}>{html.escape(c)}</td>"
                                            for c in row) + "</tr>" for row in t.rows)
            parts.append(f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")
        elif kind == "image":
            img: Image = content
            data = base64.b64encode(img.path.read_bytes()).decode()
            parts.append(f"<img alt='{html.escape(img.alt)}' src='data:image/png;base64,{data}'>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


# ---------------------------------------------------------------------------------------------
# Small helpers


def _cell(value, before, kind: str) -> str:
    if value is None:
        return "–"
    text = _fmt(value, kind)
    if before is None or _nan(value) or _nan(before):
        return text
    return f"{text} ({_delta(value, before, kind)})"


def _delta(value, before, kind: str) -> str:
    if value is None or before is None or _nan(value) or _nan(before):
        return "–"
    d = value - before
    return f"{d * 100:+.1f} pt" if kind == "pct" else f"{d:+.3g}"


def _fmt(value, kind: str) -> str:
    if value is None:
        return "–"
    if isinstance(value, str):
        return value
    if _nan(value):
        return "n/a"
    return f"{value:.1%}" if kind in ("pct", "rate") else f"{value:.4g}"


def _nan(x) -> bool:
    return isinstance(x, float) and math.isnan(x)


def _numeric(cell: str) -> bool:
    return bool(cell) and (cell[0].isdigit() or cell[0] in "+-−") and len(cell) < 30


def _key_metrics(metrics: dict) -> str:
    return "; ".join(f"{k} {_fmt(v, 'num') if isinstance(v, float) else v}" for k, v in metrics.items()
                     if v is not None)


def _curves(path: Path, keys: tuple[str, ...]) -> dict[str, tuple[list, list]]:
    if not path.is_file() or not keys:
        return {}
    series: dict[str, dict[int, float]] = {k: {} for k in keys}
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        for k in keys:
            v = rec.get(k)
            if isinstance(v, (int, float)) and not _nan(float(v)) and "step" in rec:
                series[k][rec["step"]] = float(v)  # a resumed run's repeated steps: the last value wins
    return {k: (sorted(v), [v[s] for s in sorted(v)]) for k, v in series.items() if len(v) >= 1}


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.replace(path)
