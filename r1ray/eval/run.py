"""The evaluation run: ``run(EvaluateConfig) -> EvalResult``; ``jobs/evaluate.py`` calls it.

Items first, models second: the perplexity rows/chunks, the task problems (per difficulty level, from the task
registry's eval split) and the reference pairs are fixed from the config alone, so every model, and a second
model under ``compare``, sees exactly the same items and, for pass@k/maj@k, the same per-sample seeds. Each
model is then an export (served by a pool of engine actors started here, ``r1ray.infer.pool``) or an
OpenAI-compatible endpoint; its requests stream through Ray Data (``r1ray.infer.batch``).

Outputs, in ``<storage.root>/eval/<name>/`` (the manifest written last)::

    results.parquet   one row per (model, suite, task, level, metric): value, n
    compare.parquet   with ``compare``: per metric both values, the difference and its bootstrap CI
    summary.md        the tables in Markdown (what the job prints)
    samples.jsonl     every request's prompt, output and score (and every scored row's NLL): the audit trail
    manifest.json     config, inputs (the exports and data artifact when they are artifacts), task items hash,
                      data file hashes, counts
"""

from __future__ import annotations

import json
import math
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from r1ray.artifacts import jsonl_rows
from r1ray.eval import metrics as M
from r1ray.eval.config import EvaluateConfig, ModelSpec
from r1ray.infer.batch import endpoint_spec, pool_spec, run_units, sample_seed
from r1ray.observe.log import get_logger
from r1ray.tasks.accuracy import (
    NO_THINK_MAX_TOKENS,
    answer_key,
    render_prompt,
    score_no_think,
    score_samples,
)

log = get_logger(__name__)

__all__ = ["EvalResult", "plan_problems", "run", "summary_markdown"]

_LN2 = math.log(2.0)


@dataclass
class EvalResult:
    artifact: str
    """``<storage.root>/eval/<name>``."""
    rows: list[dict[str, Any]]
    """The results table (``results.parquet``)."""
    comparisons: list[dict[str, Any]]
    """``compare.parquet`` rows (empty without ``compare``)."""
    summary: str
    """``summary.md``."""
    models: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Per model label: how it was reached (export path or endpoint), its prompt format, seconds."""
    seconds: float = 0.0

    def value(self, metric: str, *, model: str | None = None, suite: str | None = None, task: str = "all",
              level: int | None = None) -> float:
        """One value of the table (first model when ``model`` is None); KeyError when absent."""
        for r in self.rows:
            if (r["metric"] == metric and r["task"] == task and r["level"] == level
                    and (model is None or r["model"] == model) and (suite is None or r["suite"] == suite)):
                return r["value"]
        raise KeyError(f"no {metric} for model={model} suite={suite} task={task} level={level}")


# --------------------------------------------------------------------------------------------------
# Items (model-independent)
# --------------------------------------------------------------------------------------------------


def plan_problems(cfg: EvaluateConfig) -> list[Any]:
    """The task problems: ``items_per_level`` per level in ``tasks.difficulties`` from the tasks of the mix that
    have that level (a single file-backed task gives at most its size)."""
    from r1ray.tasks.registry import get_task, sample_problems

    ts = cfg.tasks
    mix = {k: float(w) for k, w in ts.tasks.items() if w > 0}
    tasks = {}
    for name in mix:
        try:
            tasks[name] = get_task(name, **ts.options.get(name, {}))
        except ValueError as e:
            raise ValueError(f"tasks.tasks: {e}") from None
    problems = []
    for level in ts.difficulties:
        here = {k: w for k, w in mix.items() if level in tasks[k].difficulties}
        if not here:
            log.warning("tasks: no task of %s has difficulty %d; level %d skipped", sorted(mix), level, level)
            continue
        n = ts.items_per_level
        if len(here) == 1 and hasattr(tasks[next(iter(here))], "size"):
            n = min(n, int(tasks[next(iter(here))].size(ts.split)))
        problems += sample_problems(here, n, seed=cfg.seed, split=ts.split, difficulty=level, options=ts.options)
    if not problems:
        raise ValueError(f"tasks.difficulties={ts.difficulties}: none of the tasks {sorted(mix)} has these levels "
                         f"({ {k: list(t.difficulties) for k, t in tasks.items()} })")
    return problems


def _item_id(p: Any) -> str:
    return f"{p.task}/d{p.difficulty}/{p.split}/{p.index}"


def _chunks(text: str, max_chars: int) -> list[str]:
    """``text`` cut at whitespace into pieces of at most ``max_chars`` (a longer word is cut inside)."""
    out, start = [], 0
    while start < len(text):
        end = min(len(text), start + max_chars)
        if end < len(text):
            cut = text.rfind(" ", start + 1, end)
            cut = max(cut, text.rfind("\n", start + 1, end))
            end = cut if cut > start else end
        piece = text[start:end]
        if piece.strip():
            out.append(piece)
        start = end
    return out


def file_documents(path: str, text_field: str) -> Iterator[tuple[str, str]]:
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"perplexity.files: {path} is not a file")
    if p.suffix in (".jsonl", ".json"):
        for where, doc in jsonl_rows(p):
            if not isinstance(doc, dict) or not isinstance(doc.get(text_field), str):
                raise ValueError(f"{where}: expected an object with a string field {text_field!r} "
                                 "(perplexity.text_field)")
            yield f"{p.name}:{where.rsplit(':', 1)[1]}", doc[text_field]
    else:
        yield p.name, p.read_text(encoding="utf-8")


@dataclass
class _PerplexityPlan:
    payloads: list[dict[str, Any]]
    sizes: list[int]
    ids: list[list[str]]
    data: Any = None  # DataArtifact
    files: dict[str, str] = field(default_factory=dict)  # path -> sha256
    texts: dict[str, str] = field(default_factory=dict)  # chunk id -> text (for bytes)


def plan_perplexity(cfg: EvaluateConfig, unit_size: int) -> _PerplexityPlan | None:
    pc = cfg.perplexity
    if not pc.enabled or not (pc.data or pc.files):
        return None
    limit = pc.max_rows or float("inf")
    if pc.data:
        import pyarrow.parquet as pq

        from r1ray.artifacts import filesystem
        from r1ray.data.shards import DataArtifact

        art = DataArtifact.load(pc.data)
        if not art.shard_uris(pc.split):
            raise ValueError(f"perplexity.split={pc.split!r}: {pc.data} has no rows in that split")
        plan = _PerplexityPlan([], [], [], data=art)
        per_unit = pc.batch_rows * 4
        row = 0
        for uri in art.shard_uris(pc.split):
            fs, path = filesystem(uri)
            with fs.open_input_file(path) as f:
                meta = pq.ParquetFile(f).metadata
            for g in range(meta.num_row_groups):
                n_rows = meta.row_group(g).num_rows
                for off in range(0, n_rows, per_unit):
                    take = int(min(per_unit, n_rows - off, limit - row))
                    if take <= 0:
                        break
                    plan.payloads.append({"kind": "rows", "uri": uri, "row_group": g, "offset": off, "take": take,
                                          "first_row": row, "tokenizer_dir": art.tokenizer_dir,
                                          "batch_rows": pc.batch_rows})
                    plan.sizes.append(take)
                    plan.ids.append([f"{pc.split}:{row + j}" for j in range(take)])
                    row += take
        return plan
    from r1ray.artifacts import sha256_file

    plan = _PerplexityPlan([], [], [])
    reqs: list[tuple[str, dict[str, Any]]] = []
    for path in pc.files:
        plan.files[path] = sha256_file(path)
        for doc_id, text in file_documents(path, pc.text_field):
            for c, piece in enumerate(_chunks(text, pc.chunk_chars)):
                if len(reqs) >= limit:
                    break
                cid = f"{doc_id}#{c}"
                plan.texts[cid] = piece
                reqs.append((cid, {"prompt": piece, "score": True}))
    if not reqs:
        raise ValueError(f"perplexity.files: no text in {pc.files}")
    for i in range(0, len(reqs), unit_size):
        chunk = reqs[i:i + unit_size]
        plan.payloads.append({"kind": "requests", "requests": [r for _, r in chunk]})
        plan.sizes.append(len(chunk))
        plan.ids.append([cid for cid, _ in chunk])
    return plan


def plan_reference(cfg: EvaluateConfig) -> list[dict[str, str]]:
    rc = cfg.reference
    if not rc.path:
        return []
    p = Path(rc.path)
    if not p.is_file():
        raise ValueError(f"reference.path: {rc.path} is not a file")
    items = []
    for where, d in jsonl_rows(p):
        if not isinstance(d, dict) or not isinstance(d.get(rc.prompt_field), str) \
                or not isinstance(d.get(rc.reference_field), str):
            raise ValueError(f"{where}: expected string fields {rc.prompt_field!r} and {rc.reference_field!r} "
                             "(reference.prompt_field / reference.reference_field)")
        items.append({"id": f"{p.name}:{where.rsplit(':', 1)[1]}", "prompt": d[rc.prompt_field],
                      "reference": d[rc.reference_field]})
        if rc.max_items and len(items) >= rc.max_items:
            break
    if not items:
        raise ValueError(f"reference.path: {rc.path} holds no lines")
    return items


# --------------------------------------------------------------------------------------------------
# A model under evaluation
# --------------------------------------------------------------------------------------------------


@dataclass
class _Target:
    spec: ModelSpec
    label: str
    backend: dict[str, Any]
    concurrency: int
    export: str | None = None
    tokenizer: Any = None
    stage: str | None = None
    prompt_format: str = "chat"

    def describe(self) -> dict[str, Any]:
        if self.export is not None:
            return {"export": self.export, "stage": self.stage, "prompt_format": self.prompt_format}
        ep = self.spec.endpoint
        return {"endpoint": ep.url, "endpoint_model": ep.model, "prompt_format": self.prompt_format}


def _label(spec: ModelSpec, export: str | None) -> str:
    if spec.name:
        return spec.name
    if spec.endpoint is not None:
        return spec.endpoint.model
    parts = str(export or spec.path).rstrip("/").split("/")
    if len(parts) >= 2 and parts[-1] == "final":
        return parts[-2]
    if len(parts) >= 3 and parts[-1] == "hf" and parts[-2].startswith("checkpoint_"):
        return f"{parts[-3]}@{int(parts[-2][11:19])}"
    return parts[-1]


def _export_stage(export: str) -> str | None:
    from r1ray.artifacts import MANIFEST, exists, join, read_manifest

    if not exists(join(export, MANIFEST)):
        return None
    try:
        return read_manifest(export).get("stage")
    except Exception:  # noqa: BLE001 - a foreign or damaged manifest: the stage is unknown
        return None


def _check_cpus(cfg: EvaluateConfig) -> None:
    import ray

    cpus = float(ray.cluster_resources().get("CPU", 0.0))
    need = cfg.engine.num_engines * cfg.engine.cpus_per_engine
    if need > cpus - 0.5:
        raise ValueError(
            f"engine: {cfg.engine.num_engines} engine(s) x {cfg.engine.cpus_per_engine} CPUs = {need:g} CPUs, but the "
            f"Ray cluster has {cpus:g}: leave Ray Data's tasks at least half a CPU (lower engine.num_engines or "
            "engine.cpus_per_engine, or start Ray with more logical CPUs: ray.num_cpus)")


@contextmanager
def _target(spec: ModelSpec, cfg: EvaluateConfig) -> Iterator[_Target]:
    if spec.endpoint is not None:
        fmt = "chat" if cfg.tasks.prompt_format == "auto" else cfg.tasks.prompt_format
        yield _Target(spec, _label(spec, None), endpoint_spec(spec.endpoint), concurrency=2, prompt_format=fmt)
        return
    from r1ray.infer.pool import EnginePool
    from r1ray.model.export import localize_model, resolve_export
    from r1ray.model.tokenizer import load_tokenizer

    export = resolve_export(spec.path)
    tok = load_tokenizer(localize_model(export))
    stage = _export_stage(export)
    fmt = cfg.tasks.prompt_format
    if fmt == "auto":
        if stage is not None:
            fmt = "question" if stage == "pretrain" else "chat"
        else:
            fmt = "chat" if getattr(tok, "chat_template", None) else "question"
        log.info("model %s (stage %s): tasks.prompt_format=auto -> %s", export, stage or "unknown", fmt)
    _check_cpus(cfg)
    e = cfg.engine
    name = f"r1ray-eval-{uuid.uuid4().hex[:8]}"
    pool = EnginePool.start(name, export, n=e.num_engines, cpus_per_engine=e.cpus_per_engine,
                            gpus_per_engine=e.gpus_per_engine, backend=e.backend, dtype=e.dtype, seed=cfg.seed)
    try:
        yield _Target(spec, _label(spec, export), pool_spec(name), concurrency=2 * e.num_engines, export=export,
                      tokenizer=tok, stage=stage, prompt_format=fmt)
    finally:
        pool.stop()


# --------------------------------------------------------------------------------------------------
# Suites
# --------------------------------------------------------------------------------------------------


def _units(reqs: list[dict[str, Any]], size: int) -> list[dict[str, Any]]:
    return [{"kind": "requests", "requests": reqs[i:i + size]} for i in range(0, len(reqs), size)]


def _generate(t: _Target, cfg: EvaluateConfig, reqs: list[dict[str, Any]], what: str) -> list[dict[str, Any]]:
    payloads = _units(reqs, cfg.engine.unit_size)
    out = run_units(t.backend, payloads, what=f"{what} [{t.label}]", sizes=[len(p["requests"]) for p in payloads],
                    concurrency=t.concurrency, progress_every_s=cfg.progress_every_s)
    return [r for u in out for r in u]


def _prompt(t: _Target, cfg: EvaluateConfig, p: Any) -> dict[str, Any]:
    if t.export is None and t.prompt_format == "chat":
        return {"messages": p.messages()}
    return {"prompt": render_prompt(p, t.prompt_format, t.tokenizer, prefill_think=cfg.tasks.prefill_think)}


def _tasks_suite(t: _Target, cfg: EvaluateConfig, problems: list[Any]) -> dict[str, Any]:
    ts = cfg.tasks
    prompts = [_prompt(t, cfg, p) for p in problems]
    reqs = [{**pr, "max_tokens": ts.max_tokens, "temperature": 0.0} for pr in prompts]
    for j in range(ts.samples):
        reqs += [{**pr, "max_tokens": ts.max_tokens, "temperature": ts.temperature, "top_p": ts.top_p,
                  "seed": sample_seed(cfg.seed, p.uid(), j)} for p, pr in zip(problems, prompts, strict=True)]
    no_think = ts.no_think and not (t.export is None and t.prompt_format == "chat")
    if no_think:  # greedy again with an empty reasoning forced: what the answer is worth without the thinking
        reqs += [{"prompt": render_prompt(p, t.prompt_format, t.tokenizer, no_think=True),
                  "max_tokens": min(ts.max_tokens, NO_THINK_MAX_TOKENS), "temperature": 0.0} for p in problems]
    outs = _generate(t, cfg, reqs, "tasks")
    n = len(problems)
    texts = [o["text"] for o in outs]
    direct_audit = []
    if no_think:
        direct, _ = score_no_think(texts[-n:], problems, timeout_s=ts.verify_timeout_s)
        direct_audit = [{"suite": "tasks", "item": _item_id(p), "task": p.task, "level": p.difficulty,
                         "sample": "no_think", "seed": None, "prompt": req["prompt"], "output": o["text"],
                         "finish_reason": o["finish_reason"], "score": sc, "gold": p.answer,
                         "answer": answer_key(o["text"])}
                        for p, o, req, sc in zip(problems, outs[-n:], reqs[-n:], direct, strict=True)]
        outs, texts, reqs = outs[:-n], texts[:-n], reqs[:-n]
    every_problem = problems * (1 + ts.samples)
    per_item, scores, failures = score_samples(texts, problems, ts.samples, ts.k, prefilled_think=ts.prefill_think,
                                               timeout_s=ts.verify_timeout_s)
    if no_think:  # the table lists it right after greedy accuracy
        per_item = {"accuracy": per_item.pop("accuracy"), "accuracy_no_think": direct, **per_item}
    audit = []
    for idx, (o, s, p, req) in enumerate(zip(outs, scores, every_problem, reqs, strict=True)):
        audit.append({"suite": "tasks", "item": _item_id(p), "task": p.task, "level": p.difficulty,
                      "sample": idx // n - 1, "seed": req.get("seed"), "prompt": req.get("prompt", req.get("messages")),
                      "output": o["text"], "finish_reason": o["finish_reason"], "score": s, "gold": p.answer,
                      "answer": answer_key(o["text"])})
    return {"per_item": per_item, "audit": audit + direct_audit, "verify_failures": failures}


def _perplexity_suite(t: _Target, cfg: EvaluateConfig, plan: _PerplexityPlan) -> dict[str, Any]:
    if plan.data is not None and t.tokenizer is not None:
        from r1ray.model.tokenizer import load_tokenizer

        if load_tokenizer(plan.data.tokenizer_dir).get_vocab() != t.tokenizer.get_vocab():
            raise ValueError(f"perplexity.data: the tokenizer of {plan.data.uri} is not the model's ({t.export}); "
                             "score files instead (perplexity.files), which the model tokenizes itself")
    out = run_units(t.backend, plan.payloads, what=f"perplexity [{t.label}]", sizes=plan.sizes,
                    concurrency=t.concurrency, progress_every_s=cfg.progress_every_s,
                    unit="rows" if plan.data is not None else "chunks")
    recs = []
    for ids, res in zip(plan.ids, out, strict=True):
        for item, r in zip(ids, res, strict=True):
            b = r.get("bytes")
            if b is None:
                b = len(plan.texts[item].encode("utf-8"))
            recs.append({"suite": "perplexity", "item": item, "nll": r["nll"], "tokens": r["tokens"], "bytes": b})
    bad = [r["item"] for r in recs if r["tokens"] == 0]
    if bad:
        raise ValueError(f"perplexity: {len(bad)} item(s) have no scored token (one-token texts?), e.g. {bad[:3]}")
    return {"records": recs}


def _reference_suite(t: _Target, cfg: EvaluateConfig, items: list[dict[str, str]]) -> dict[str, Any]:
    rc = cfg.reference
    reqs = [{"prompt": it["prompt"], "max_tokens": rc.max_tokens, "temperature": 0.0, "stop": list(rc.stop)}
            for it in items]
    outs = _generate(t, cfg, reqs, "reference")
    hyps = [o["text"].strip() for o in outs]
    refs = [it["reference"] for it in items]
    rouge = M.rouge(hyps, refs)
    per_item = {**rouge, "exact_match": [M.exact_match(h, r) for h, r in zip(hyps, refs, strict=True)]}
    audit = []
    for i, (it, o) in enumerate(zip(items, outs, strict=True)):
        audit.append({"suite": "reference", "item": it["id"], "prompt": it["prompt"], "output": o["text"],
                      "reference": it["reference"], "finish_reason": o["finish_reason"],
                      "bleu": M.sentence_bleu(hyps[i], refs[i]), **{k: v[i] for k, v in per_item.items()}})
    return {"per_item": per_item, "bleu": M.bleu(hyps, refs), "audit": audit}


# --------------------------------------------------------------------------------------------------
# Tables
# --------------------------------------------------------------------------------------------------


def _row(model: str, suite: str, metric: str, value: float, n: int, task: str = "all",
         level: int | None = None) -> dict[str, Any]:
    return {"model": model, "suite": suite, "task": task, "level": level, "metric": metric, "value": float(value),
            "n": int(n)}


def _groups(problems: list[Any]) -> list[tuple[str, int | None, list[int]]]:
    """(task, level, item indices): every task x level, every level over all tasks, and everything."""
    out: list[tuple[str, int | None, list[int]]] = []
    tasks = sorted({p.task for p in problems})
    levels = sorted({p.difficulty for p in problems})
    for level in levels:
        if len(tasks) > 1:
            for task in tasks:
                idx = [i for i, p in enumerate(problems) if p.task == task and p.difficulty == level]
                if idx:
                    out.append((task, level, idx))
        out.append(("all", level, [i for i, p in enumerate(problems) if p.difficulty == level]))
    out.append(("all", None, list(range(len(problems)))))
    return out


def _ppl_rows(label: str, recs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    nll, toks, nbytes = (sum(r[k] for r in recs) for k in ("nll", "tokens", "bytes"))
    return [_row(label, "perplexity", "perplexity", M.perplexity(nll, toks), toks),
            _row(label, "perplexity", "bits_per_token", M.bits_per_token(nll, toks), toks),
            _row(label, "perplexity", "bits_per_byte", M.bits_per_byte(nll, nbytes), nbytes)]


def _table(label: str, res: dict[str, Any], problems: list[Any]) -> list[dict[str, Any]]:
    rows = []
    if "perplexity" in res:
        rows += _ppl_rows(label, res["perplexity"]["records"])
    if "tasks" in res:
        per = res["tasks"]["per_item"]
        for task, level, idx in _groups(problems):
            for metric, vals in per.items():
                rows.append(_row(label, "tasks", metric, sum(vals[i] for i in idx) / len(idx), len(idx), task, level))
        rows.append(_row(label, "tasks", "verify_failures", res["tasks"]["verify_failures"], len(problems)))
    if "reference" in res:
        ref = res["reference"]
        n = len(ref["audit"])
        rows.append(_row(label, "reference", "bleu", ref["bleu"], n))
        for metric, vals in ref["per_item"].items():
            rows.append(_row(label, "reference", metric, sum(vals) / n, n))
    return rows


def _compare(cfg: EvaluateConfig, la: str, a: dict[str, Any], lb: str, b: dict[str, Any],
             problems: list[Any]) -> list[dict[str, Any]]:
    """``b - a`` per metric on the same items, with a paired bootstrap CI."""
    kw = dict(resamples=cfg.bootstrap_resamples, level=cfg.ci_level, seed=cfg.seed)
    out = []

    def add(suite: str, task: str, level: int | None, metric: str, xa: list[float], xb: list[float],
            w: list[float] | None = None) -> None:
        ci = M.paired_bootstrap(xa, xb, weights=w, **kw)
        wa = w or [1.0] * len(xa)
        ma = sum(x * v for x, v in zip(xa, wa, strict=True)) / sum(wa)
        out.append({"suite": suite, "task": task, "level": level, "metric": metric, "model_a": la, "model_b": lb,
                    "a": ma, "b": ma + ci.diff, "diff": ci.diff, "ci_low": ci.low, "ci_high": ci.high,
                    "ci_level": ci.level, "n": ci.n})

    if "perplexity" in a:
        ra, rb = a["perplexity"]["records"], b["perplexity"]["records"]
        add("perplexity", "all", None, "bits_per_token", [r["nll"] / r["tokens"] / _LN2 for r in ra],
            [r["nll"] / r["tokens"] / _LN2 for r in rb], [float(r["tokens"]) for r in ra])
    if "tasks" in a:
        pa, pb = a["tasks"]["per_item"], b["tasks"]["per_item"]
        for task, level, idx in _groups(problems):
            for metric in [m for m in pa if m in pb]:  # no_think exists only where r1ray renders the prompt
                add("tasks", task, level, metric, [pa[metric][i] for i in idx], [pb[metric][i] for i in idx])
    if "reference" in a:
        for metric, va in a["reference"]["per_item"].items():
            add("reference", "all", None, metric, va, b["reference"]["per_item"][metric])
    return out


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4f}"
    return str(v)


def summary_markdown(rows: list[dict[str, Any]], comparisons: list[dict[str, Any]], models: dict[str, Any]) -> str:
    """The results (and comparisons) as Markdown tables, one column per model."""
    labels = list(models)
    lines = ["# Evaluation", "", "| model | how | prompt format |", "|---|---|---|"]
    for label, d in models.items():
        how = d.get("export") or f"{d.get('endpoint')} ({d.get('endpoint_model')})"
        lines.append(f"| {label} | {how} | {d.get('prompt_format')} |")
    keys: list[tuple[str, str, Any, str]] = []
    vals: dict[tuple[str, str, Any, str, str], dict[str, Any]] = {}
    for r in rows:
        key = (r["suite"], r["task"], r["level"], r["metric"])
        if key not in keys:
            keys.append(key)
        vals[(*key, r["model"])] = r
    lines += ["", "| suite | task | level | metric | " + " | ".join(labels) + " | n |",
              "|---|---|---|---|" + "---|" * len(labels) + "---|"]
    for key in keys:
        cells = [_fmt(vals.get((*key, m), {}).get("value")) for m in labels]
        n = next((vals[(*key, m)]["n"] for m in labels if (*key, m) in vals), "")
        lines.append(f"| {key[0]} | {key[1]} | {_fmt(key[2]) if key[2] is not None else 'all'} | {key[3]} | "
                     + " | ".join(cells) + f" | {n} |")
    if comparisons:
        c0 = comparisons[0]
        lines += ["", f"## {c0['model_b']} - {c0['model_a']} (paired bootstrap, {c0['ci_level']:.0%} CI)", "",
                  "| suite | task | level | metric | a | b | b - a | CI |", "|---|---|---|---|---|---|---|---|"]
        for c in comparisons:
            lines.append(f"| {c['suite']} | {c['task']} | {'all' if c['level'] is None else c['level']} | "
                         f"{c['metric']} | {c['a']:.4f} | {c['b']:.4f} | {c['diff']:+.4f} | "
                         f"[{c['ci_low']:+.4f}, {c['ci_high']:+.4f}] |")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------------
# Outputs
# --------------------------------------------------------------------------------------------------


def _write(artifact: str, cfg: EvaluateConfig, rows: list[dict[str, Any]], comparisons: list[dict[str, Any]],
           summary: str, audit: list[dict[str, Any]], extra: dict[str, Any], inputs: list[str],
           started_at: str) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from r1ray.artifacts import MANIFEST, exists, filesystem, join, write_bytes_atomic, write_manifest

    fs, path = filesystem(artifact)
    if exists(join(artifact, MANIFEST)):
        fs.delete_file(f"{path}/{MANIFEST}")  # unpublish the previous evaluation of this name first
    fs.create_dir(path, recursive=True)
    schema = pa.schema([("model", pa.string()), ("suite", pa.string()), ("task", pa.string()),
                        ("level", pa.int64()), ("metric", pa.string()), ("value", pa.float64()), ("n", pa.int64())])
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), f"{path}/results.parquet", filesystem=fs)
    if comparisons:
        pq.write_table(pa.Table.from_pylist(comparisons), f"{path}/compare.parquet", filesystem=fs)
    elif exists(join(artifact, "compare.parquet")):
        fs.delete_file(f"{path}/compare.parquet")
    write_bytes_atomic(join(artifact, "summary.md"), summary.encode())
    lines = "".join(json.dumps(a, ensure_ascii=False, default=str) + "\n" for a in audit)
    write_bytes_atomic(join(artifact, "samples.jsonl"), lines.encode())
    write_manifest(artifact, stage="eval", config=cfg, inputs=inputs, started_at=started_at,
                   counts={"results": len(rows), "comparisons": len(comparisons), "samples": len(audit)}, **extra)


def _items_manifest(cfg: EvaluateConfig, problems: list[Any], ppl: _PerplexityPlan | None,
                    refs: list[dict[str, str]]) -> dict[str, Any]:
    import hashlib

    from r1ray.artifacts import sha256_file

    out: dict[str, Any] = {}
    if problems:
        uids = "\n".join(p.uid() for p in problems)
        out["tasks"] = {"items": len(problems), "items_sha256": hashlib.sha256(uids.encode()).hexdigest(),
                        "mix": cfg.tasks.tasks, "options": cfg.tasks.options, "levels": sorted({p.difficulty for p in problems}),
                        "split": cfg.tasks.split, "files": {str(v): sha256_file(str(v)) for o in cfg.tasks.options.values()
                                                             for k, v in o.items() if k.endswith("path") and v}}
    if ppl is not None:
        out["perplexity"] = ({"data": ppl.data.uri, "split": cfg.perplexity.split, "rows": sum(ppl.sizes)}
                             if ppl.data is not None else {"files": ppl.files, "chunks": sum(ppl.sizes)})
    if refs:
        out["reference"] = {"path": cfg.reference.path, "sha256": sha256_file(cfg.reference.path), "items": len(refs)}
    return out


# --------------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------------


def run(cfg: EvaluateConfig) -> EvalResult:
    """Evaluate ``cfg.model`` (and ``cfg.compare`` on the same items); write and return the results."""
    from r1ray.artifacts import MANIFEST, exists, join, now
    from r1ray.runtime import ray_session

    if cfg.model is None:
        raise ValueError("model is unset: set model=<export or run directory> or model.endpoint.{url,model}; "
                         "python jobs/evaluate.py with no model evaluates the default pretraining run's export")
    t0, started = time.perf_counter(), now()
    problems = plan_problems(cfg) if cfg.tasks.enabled else []
    refs = plan_reference(cfg)
    ppl = plan_perplexity(cfg, cfg.engine.unit_size)
    if cfg.perplexity.enabled and ppl is None:
        log.info("perplexity suite skipped: perplexity.data and perplexity.files are unset")
    if not (problems or refs or ppl):
        raise ValueError("nothing to evaluate: enable tasks, or set perplexity.data/files or reference.path")
    results: dict[str, dict[str, Any]] = {}
    models: dict[str, dict[str, Any]] = {}
    inputs: list[str] = []
    with ray_session(cfg.ray):
        for spec in [m for m in (cfg.model, cfg.compare) if m is not None]:
            tm = time.perf_counter()
            with _target(spec, cfg) as t:
                label = t.label if t.label not in results else f"{t.label} (compare)"
                log.info("evaluating %s (%s)", label, t.describe())
                res: dict[str, Any] = {}
                if ppl is not None:
                    res["perplexity"] = _perplexity_suite(t, cfg, ppl)
                if problems:
                    res["tasks"] = _tasks_suite(t, cfg, problems)
                if refs:
                    res["reference"] = _reference_suite(t, cfg, refs)
                results[label] = res
                models[label] = {**t.describe(), "seconds": round(time.perf_counter() - tm, 1)}
                if t.export is not None and exists(join(t.export, MANIFEST)) and t.export not in inputs:
                    inputs.append(t.export)
    if ppl is not None and ppl.data is not None:
        inputs.append(ppl.data.uri)
    rows = [r for label, res in results.items() for r in _table(label, res, problems)]
    labels = list(results)
    comparisons = _compare(cfg, labels[0], results[labels[0]], labels[1], results[labels[1]], problems) \
        if len(labels) == 2 else []
    summary = summary_markdown(rows, comparisons, models)
    audit = []
    for label, res in results.items():
        for suite in ("perplexity", "tasks", "reference"):
            if suite in res:
                audit += [{"model": label, **a} for a in res[suite].get("audit", res[suite].get("records", []))]
    artifact = cfg.storage.uri("eval", cfg.run_name)
    extra = {"models": models, "items": _items_manifest(cfg, problems, ppl, refs)}
    _write(artifact, cfg, rows, comparisons, summary, audit, extra, inputs, started)
    seconds = time.perf_counter() - t0
    log.info("evaluation written to %s in %.0fs", artifact, seconds)
    return EvalResult(artifact=artifact, rows=rows, comparisons=comparisons, summary=summary, models=models,
                      seconds=seconds)
