"""The pipeline's report card: ``<storage.root>/pipeline/<run_name>/report.md`` with PNG plots, in the spirit of
nanochat's report: what a person would rather look at than read from logs.

Sections: per-stage timing; held-out corpus perplexity after every training stage (forgetting); loss curves of
every training stage; held-out accuracy per level over steps; GRPO's reward and completion length; the evaluation
table (with and without thinking); the compression report; the lineage of the final model with its hashes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from r1ray.observe.log import get_logger

log = get_logger(__name__)

__all__ = ["write_report"]


def _plot(path: Path, title: str, series: dict[str, list[tuple[float, float]]], ylabel: str) -> bool:
    """One PNG line chart; False when there is nothing to draw."""
    series = {k: v for k, v in series.items() if v}
    if not series:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.2), dpi=100)
    for label, points in series.items():
        xs, ys = zip(*points, strict=True)
        ax.plot(xs, ys, marker="o", markersize=2.5, linewidth=1.2, label=label)
    ax.set_title(title)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


def _series(reports: list[dict[str, Any]], key: str) -> list[tuple[float, float]]:
    return [(r["step"], r[key]) for r in reports if key in r and r.get(key) is not None]


def write_report(root: Path, p: Any, outcomes: list[Any], chain: list[dict[str, Any]]) -> str:
    """Write the report card and its plots under ``root``; returns the Markdown file's path."""
    plots = root / "plots"
    plots.mkdir(parents=True, exist_ok=True)
    lines = [f"# Pipeline `{p.run_name}`", "", "| stage | status | seconds | artifact |", "|---|---|---|---|"]
    for o in outcomes:
        lines.append(f"| {o.stage} | {o.status} | {o.seconds:.0f} | `{o.artifact or ''}` |")
    lines.append("")
    ppl = [(o.stage, o.summary["corpus_perplexity"]) for o in outcomes if o.summary.get("corpus_perplexity")]
    if ppl:
        base = ppl[0][1]["perplexity"]
        lines += ["## Held-out corpus perplexity after each stage", "",
                  f"The validation split of the corpus ({ppl[0][1]['tokens']} tokens), scored after every training "
                  f"stage: what fine-tuning kept of the language pretraining taught (x {ppl[0][0]}: the ratio to the "
                  f"first stage's).", "", f"| stage | perplexity | bits per token | x {ppl[0][0]} |", "|---|---|---|---|"]
        lines += [f"| {stage} | {r['perplexity']:.2f} | {r['bits_per_token']:.3f} | {r['perplexity'] / base:.2f} |"
                  for stage, r in ppl]
        lines.append("")
    for o in outcomes:
        reports = o.summary.get("reports") or []
        if not reports:
            continue
        lines.append(f"## {o.stage}")
        metrics = o.summary.get("metrics") or {}
        if metrics:
            lines.append("")
            lines.append("| metric | value |")
            lines.append("|---|---|")
            lines.extend(f"| {k} | {v:.4g} |" for k, v in sorted(metrics.items()) if isinstance(v, (int, float)))
        png = plots / f"{o.stage}_loss.png"
        if _plot(png, f"{o.stage}: loss", {"train": _series(reports, "train_loss"),
                                           "validation": _series(reports, "val_loss")}, "loss"):
            lines += ["", f"![{o.stage} loss](plots/{png.name})"]
        if o.stage == "grpo":
            rewards = {k: _series(reports, k) for k in sorted({k for r in reports for k in r})
                       if k.startswith("reward") and k.endswith("mean")}
            png = plots / "grpo_reward.png"
            if _plot(png, "grpo: reward", rewards, "reward"):
                lines += ["", f"![grpo reward](plots/{png.name})"]
            lengths = {k: _series(reports, k) for k in sorted({k for r in reports for k in r})
                       if "length" in k and not k.endswith("max")}
            png = plots / "grpo_length.png"
            if _plot(png, "grpo: completion length", lengths, "tokens"):
                lines += ["", f"![grpo completion length](plots/{png.name})"]
        accuracy = {k: _series(reports, k) for k in sorted({k for r in reports for k in r})
                    if k == "accuracy" or k.startswith("accuracy_d")}
        png = plots / f"{o.stage}_accuracy.png"
        if _plot(png, f"{o.stage}: held-out accuracy", accuracy, "accuracy"):
            lines += ["", f"![{o.stage} accuracy](plots/{png.name})"]
        lines.append("")
    for o in outcomes:
        if o.stage in ("evaluate", "compress") and o.summary.get("table"):
            lines += [f"## {o.stage}", ""]
            if o.status == "refused":
                lines += ["**The quality gate refused the compressed model; nothing was published and the "
                          "uncompressed model went on to the stages after it** (`on_compress_refused`):", ""]
                lines += [f"- {r}" for r in o.summary.get("refused", [])] + [""]
            lines += [str(o.summary["table"]), ""]
    if chain:
        lines += ["## Lineage of the final model", "", "| stage | artifact | manifest sha256 | status |",
                  "|---|---|---|---|"]
        lines += [f"| {e.get('stage')} | `{e['uri']}` | `{str(e.get('manifest_sha256'))[:16]}` | {e.get('status')} |"
                  for e in chain]
    out = root / "report.md"
    out.write_text("\n".join(lines) + "\n")
    log.info("report card: %s", out)
    return str(out)
