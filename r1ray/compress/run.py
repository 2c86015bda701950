"""The compression run: ``run(CompressConfig) -> CompressResult``; ``jobs/compress.py`` calls it.

1. resolve the model (an export or a run directory's newest export);
2. prune it (optional), then fine-tune the pruned model through the SFT stage (optional, ``prune.recovery``);
3. quantize it (torchao INT8 by default) into a candidate directory staged at
   ``<run_dir>/candidate-<id>`` (on the job's storage, so engine actors on any node can read it; serving never
   looks there), with the GGUF files in ``gguf/`` (written from the unquantized model) checked in llama.cpp;
4. evaluate the base and the candidate with the evaluation job on the same items (``r1ray.compress.gate``);
5. measure size and CPU decode speed of each;
6. pass: write ``report.md``/``report.json`` into the candidate and publish it atomically as
   ``<run_dir>/final`` (manifest last: what ``jobs/serve.py run_name=<run_name>`` serves);
   refuse: write the report to ``<run_dir>/rejected/<time>/``, leave ``final`` as it was, and return
   ``passed=False`` (the job exits 1 with the reasons).
"""

from __future__ import annotations

import shutil
import tempfile
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from r1ray.compress.config import CompressConfig
from r1ray.observe.log import get_logger

log = get_logger(__name__)

__all__ = ["CompressResult", "report_markdown", "run", "summary"]

REPORT_MD, REPORT_JSON = "report.md", "report.json"


@dataclass
class CompressResult:
    passed: bool
    reasons: list[str]
    """Why the gate refused (empty on pass)."""
    run_dir: str
    export_path: str | None
    """``<run_dir>/final`` on pass, None on refusal."""
    report_dir: str
    """Where ``report.md``/``report.json`` were written (the export on pass, ``rejected/<time>`` on refusal)."""
    report: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0


# --------------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------------


def _fmt(v: Any, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def report_markdown(report: dict[str, Any]) -> str:
    """The report table (one row per model/file) and the gate's verdict, in Markdown."""
    bs = report["batch_sizes"]
    head = ["model", "format", "size (MB)", "x smaller", *[f"decode tok/s b{b}" for b in bs], "x faster b1",
            "p50 latency (s)", "accuracy (%)", "perplexity"]
    lines = ["# Compression report", "", f"base: `{report['base_model']}`", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    base = report["rows"][0]
    for r in report["rows"]:
        size = r["size_bytes"]
        smaller = base["size_bytes"] / size if size else None
        speed = r.get("decode_tokens_per_s") or {}
        b1 = speed.get("1")
        faster = b1 / base["decode_tokens_per_s"]["1"] if b1 and base["decode_tokens_per_s"].get("1") else None
        acc = r.get("accuracy")
        cells = [r["name"], r["format"], _fmt(size / 1e6, ".2f"), _fmt(smaller, ".2f"),
                 *[_fmt(speed.get(str(b)), ".1f") for b in bs], _fmt(faster, ".2f"),
                 _fmt(r.get("p50_latency_s"), ".3f"), _fmt(None if acc is None else 100 * acc, ".2f"),
                 _fmt(r.get("perplexity"), ".4g")]
        lines.append("| " + " | ".join(cells) + " |")
    g = report["gate"]
    lines += ["", f"accuracy metric: `{g['metric']}`; decode on CPU with {report['torch_threads']} torch threads, "
              f"{report['new_tokens']} new tokens after {report['prompt_tokens']} prompt tokens (prefill excluded); "
              "GGUF rows: llama.cpp at batch 1.", "",
              f"**gate: {'PASSED' if g['passed'] else 'REFUSED'}** (accuracy {g['accuracy_drop_points']:+.2f} points "
              f"drop, limit {g['max_accuracy_drop_points']:g}; perplexity {g['perplexity_increase_pct']:+.2f}%, "
              f"limit {g['max_perplexity_increase_pct']:g}%)"]
    lines += [f"- {r}" for r in g["reasons"]]
    for c in report.get("gguf", []):
        if "skipped" in c:
            lines.append(f"- GGUF {c['qtype']}: llama.cpp check skipped: {c['skipped']}")
        else:
            lines.append(f"- GGUF {c['qtype']}: llama.cpp tokenizer match {c['tokenizer_match']:.2f}, greedy match "
                         f"{c['greedy_match']:.2f} on {len(report['gguf_prompts'])} prompts, logits relative error "
                         f"{c['logits_rel_err']:.2g}")
    if report.get("prune"):
        p = report["prune"]
        lines.append(f"- pruned: heads {p['heads_before']} -> {p['heads_after']}, KV heads {p['kv_heads_before']} -> "
                     f"{p['kv_heads_after']}, MLP {p['intermediate_before']} -> {p['intermediate_after']} per layer")
    if report.get("eval_artifact"):
        lines.append(f"- evaluation: `{report['eval_artifact']}` (summary.md holds the bootstrap intervals)")
    return "\n".join(lines) + "\n"


def summary(result: CompressResult) -> str:
    """What the job prints: the table, where it went, and what to run next."""
    md = report_markdown(result.report) if result.report else ""
    if result.passed:
        name = Path(result.run_dir).name
        tail = (f"published: {result.export_path}\nserve it:  python jobs/serve.py run_name={name}\n"
                f"report:    {result.report_dir}/{REPORT_MD}")
    else:
        tail = ("REFUSED by the quality gate, nothing published:\n" + "\n".join(f"  - {r}" for r in result.reasons)
                + f"\nreport:    {result.report_dir}/{REPORT_MD}")
    return md + "\n" + tail


# --------------------------------------------------------------------------------------------------
# Steps
# --------------------------------------------------------------------------------------------------


def _calibration_texts(cfg: CompressConfig, model_dir: str) -> list[str]:
    """Calibration documents for activation-scored pruning: the perplexity files' documents, else worked
    solutions of the task mix's train split (never the eval items)."""
    n = cfg.prune.calibration_texts
    pc = cfg.eval.perplexity
    if pc.files:
        from r1ray.eval.run import file_documents

        texts = []
        for path in pc.files:
            for _, text in file_documents(path, pc.text_field):
                texts.append(text)
                if len(texts) >= n:
                    return texts
        return texts
    from r1ray.model.tokenizer import load_tokenizer
    from r1ray.tasks.registry import sample_problems
    from r1ray.train.stages.sft_data import task_conversation

    ts = cfg.eval.tasks
    tok = load_tokenizer(model_dir)
    problems = sample_problems(ts.tasks, n, seed=cfg.seed, split="train", difficulty=ts.difficulties[0],
                               options=ts.options)
    if getattr(tok, "chat_template", None):
        return [tok.apply_chat_template(task_conversation(p), tokenize=False) for p in problems]
    return [f"Question: {p.question}\n{p.completion}" for p in problems]


def _merge(base: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in new.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _recovery_config(cfg: CompressConfig, init_from: str) -> Any:
    from r1ray.train.stages.sft import SFTConfig

    base = {"seed": cfg.seed, "storage": cfg.storage.model_dump(mode="json"), "ray": cfg.ray.model_dump(mode="json"),
            "logging": cfg.logging.model_dump(mode="json"), "run_name": f"{cfg.run_name}-recovery",
            "model": {"init_from": init_from}}
    try:
        return SFTConfig.model_validate(_merge(base, cfg.prune.recovery.sft))
    except ValueError as e:
        raise ValueError(f"prune.recovery.sft is not a valid SFT config: {e}") from None


def _recover(cfg: CompressConfig, pruned: str) -> str:
    from r1ray.model.export import localize_model
    from r1ray.train.stages.sft import run as sft

    result = sft(_recovery_config(cfg, pruned))
    if result.export_path is None:
        raise RuntimeError(f"the recovery fine-tune ended {result.status} without an export ({result.run_dir})")
    log.info("recovery fine-tune done: %s (%s steps)", result.export_path, result.steps)
    return localize_model(result.export_path)


def _check_gguf(cfg: CompressConfig, fp_dir: str, out_dir: Path) -> list[dict[str, Any]]:
    from r1ray.compress.gguf import export_gguf, llama_cpp_available, verify_gguf

    checks = []
    ok, why = llama_cpp_available()
    if cfg.gguf.verify == "always" and not ok:
        raise RuntimeError(f"gguf.verify=always but {why}")
    for qtype in cfg.gguf.types:
        path = export_gguf(fp_dir, out_dir / f"model-{qtype}.gguf", qtype)
        entry: dict[str, Any] = {"qtype": qtype, "path": f"gguf/{path.name}", "size_bytes": path.stat().st_size}
        if cfg.gguf.verify == "never" or not ok:
            entry["skipped"] = "gguf.verify=never" if cfg.gguf.verify == "never" else why
            log.warning("GGUF %s not checked in llama.cpp: %s", qtype, entry["skipped"])
        else:
            c = verify_gguf(path, fp_dir, cfg.gguf.prompts, max_tokens=cfg.gguf.max_tokens, qtype=qtype,
                            n_threads=cfg.report.torch_threads)
            entry.update(tokenizer_match=c.tokenizer_match, greedy_match=c.greedy_match,
                         logits_rel_err=c.logits_rel_err, decode_tokens_per_s=c.decode_tokens_per_s,
                         mismatches=c.mismatches)
        checks.append(entry)
    return checks


def _gguf_reasons(cfg: CompressConfig, checks: list[dict[str, Any]]) -> list[str]:
    out = []
    for c in checks:
        if "skipped" in c:
            continue
        need = cfg.gguf.min_match.get(c["qtype"], 1.0)
        if c["tokenizer_match"] < 1.0:
            out.append(f"GGUF {c['qtype']}: llama.cpp tokenized {100 * (1 - c['tokenizer_match']):.0f}% of the "
                       "prompts differently from the Hugging Face tokenizer")
        if c["greedy_match"] < need:
            out.append(f"GGUF {c['qtype']}: llama.cpp's greedy tokens matched the HF model on "
                       f"{100 * c['greedy_match']:.0f}% of the prompts, below gguf.min_match.{c['qtype']}={need:g}")
    return out


def _speed_rows(cfg: CompressConfig, models: list[tuple[str, str, str]]) -> list[dict[str, Any]]:
    """Size and decode speed of each (name, format, directory), loaded one at a time."""
    import torch

    from r1ray.compress.measure import measure_model, weights_bytes
    from r1ray.model.build import load_model

    rc = cfg.report
    rows = []
    for name, fmt, path in models:
        model = load_model(path, dtype=torch.float32 if cfg.device == "cpu" else None).eval()
        if cfg.device == "cuda":
            model = model.to("cuda")
        sp = measure_model(model, batch_sizes=rc.batch_sizes, new_tokens=rc.new_tokens,
                           prompt_tokens=rc.prompt_tokens, repeats=rc.repeats, seed=cfg.seed)
        rows.append({"name": name, "format": fmt, "path": path, "size_bytes": weights_bytes(path),
                     "decode_tokens_per_s": {str(b): v for b, v in sp.decode_tokens_per_s.items()},
                     "p50_latency_s": sp.p50_latency_s})
        log.info("%s: %.2f MB, decode %s tok/s, p50 %.3fs", name, rows[-1]["size_bytes"] / 1e6,
                 {b: round(v, 1) for b, v in sp.decode_tokens_per_s.items()}, sp.p50_latency_s)
        del model
    return rows


# --------------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------------


def _is_local(uri: str) -> bool:
    from r1ray.artifacts import is_uri

    return not is_uri(uri)


def _stage(local_dir: Path, stage_uri: str) -> str:
    """``local_dir`` at ``stage_uri`` on the job's storage (a move on local storage, an upload otherwise)."""
    import pyarrow.fs as pafs

    from r1ray.artifacts import filesystem

    fs, path = filesystem(stage_uri)
    if isinstance(fs, pafs.LocalFileSystem):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(local_dir), path)
    else:
        pafs.copy_files(str(local_dir), path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)
    return stage_uri


def _delete(uri: str) -> None:
    from r1ray.artifacts import filesystem

    fs, path = filesystem(uri)
    try:
        fs.delete_dir(path)
    except (FileNotFoundError, OSError):
        pass


def _write_report(uri_dir: str, report: dict[str, Any]) -> None:
    from r1ray.artifacts import canonical_json, join, write_bytes_atomic

    write_bytes_atomic(join(uri_dir, REPORT_JSON), canonical_json(report))
    write_bytes_atomic(join(uri_dir, REPORT_MD), report_markdown(report).encode())


# --------------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------------


def run(cfg: CompressConfig) -> CompressResult:
    """Compress ``cfg.model``, evaluate, and publish only on a passed gate (see the module doc)."""
    import torch

    from r1ray.artifacts import MANIFEST, exists, join
    from r1ray.compress.gate import decide, evaluate_pair
    from r1ray.model.export import localize_model, resolve_export

    if cfg.model is None:
        raise ValueError("model is unset: set model=<export or run directory>; python jobs/compress.py with no "
                         "model compresses the default SFT run's export")
    pc = cfg.eval.perplexity
    if not (pc.enabled and (pc.files or pc.data)):
        raise ValueError("the gate reads perplexity: set eval.perplexity.files (jsonl/text) or eval.perplexity.data "
                         "(a data artifact); python jobs/compress.py fills data with the default data artifact")
    if cfg.prune.recovery.enabled:
        _recovery_config(cfg, "placeholder")  # a bad SFT override fails here, before any compute
    if cfg.report.torch_threads:
        torch.set_num_threads(cfg.report.torch_threads)
    t0 = time.perf_counter()
    base_uri = resolve_export(cfg.model)
    base = localize_model(base_uri)
    run_dir = cfg.storage.uri("runs", cfg.run_name)
    stage_uri = join(run_dir, f"candidate-{uuid.uuid4().hex[:8]}")
    work = Path(tempfile.mkdtemp(prefix="r1ray-compress-"))
    report: dict[str, Any] = {"base_model": base_uri, "batch_sizes": cfg.report.batch_sizes,
                              "new_tokens": cfg.report.new_tokens, "prompt_tokens": cfg.report.prompt_tokens,
                              "torch_threads": torch.get_num_threads(), "gguf_prompts": cfg.gguf.prompts}
    cleanup: list[str] = []  # staged directories on the job's storage, removed at the end
    try:
        fp_dir = base
        speed_models = [("base", "fp32 safetensors", base)]
        if cfg.prune.enabled:
            from r1ray.compress.prune import prune_dir

            texts = _calibration_texts(cfg, base) if cfg.prune.score == "activation" else None
            pruned = work / "pruned"
            plan = prune_dir(base, pruned, cfg.prune, texts)
            report["prune"] = plan.summary()
            fp_dir = str(pruned)
            if cfg.prune.recovery.enabled:
                pruned_uri = _stage(pruned, join(run_dir, f"pruned-{uuid.uuid4().hex[:8]}"))
                cleanup.append(pruned_uri)
                fp_dir = _recover(cfg, pruned_uri)
                report["recovery"] = {"export": fp_dir}
        candidate = work / "candidate"
        if cfg.quantize.method != "none":
            from r1ray.compress.quantize import quantize_dir

            quantize_dir(fp_dir, candidate, method=cfg.quantize.method, output_head=cfg.quantize.output_head,
                         device=cfg.device)
            if cfg.prune.enabled:
                speed_models.append(("pruned", "fp32 safetensors", fp_dir))
            fmt = {"int8": "INT8 dynamic (torch x86)", "int8_torchao": "INT8 weight-only (torchao)",
                   "fp8": "FP8 weight-only (torchao)"}[cfg.quantize.method]
        else:
            shutil.copytree(fp_dir, candidate, ignore=shutil.ignore_patterns(MANIFEST, REPORT_MD, REPORT_JSON))
            fmt = "fp32 safetensors" + (" (pruned)" if cfg.prune.enabled else "")
        gguf_checks = _check_gguf(cfg, fp_dir, candidate / "gguf") if cfg.gguf.types else []
        report["gguf"] = gguf_checks
        speed_models.append(("compressed", fmt, str(candidate)))
        rows = _speed_rows(cfg, speed_models)

        cleanup.append(_stage(candidate, stage_uri))
        b, c, ev = evaluate_pair(base_uri, stage_uri, cfg)
        verdict = decide(b, c, cfg.gate)
        verdict.reasons += _gguf_reasons(cfg, gguf_checks)
        verdict.passed = not verdict.reasons
        for r in rows:
            s = {"base": b, "compressed": c}.get(r["name"])
            r["path"] = stage_uri if r["name"] == "compressed" else r["path"]
            r.update(accuracy=s.accuracy if s else None, perplexity=s.perplexity if s else None)
        for g in gguf_checks:
            rows.append({"name": f"gguf {g['qtype']}", "format": f"GGUF {g['qtype'].upper()} (llama.cpp)",
                         "size_bytes": g["size_bytes"],
                         "decode_tokens_per_s": {"1": g["decode_tokens_per_s"]} if "decode_tokens_per_s" in g else {},
                         "p50_latency_s": None, "accuracy": None, "perplexity": None})
        report.update(rows=rows, eval_artifact=ev.artifact, gate={
            **{k: v for k, v in asdict(verdict).items() if k not in ("base", "compressed", "extra")},
            "metric": cfg.gate.accuracy_metric, "max_accuracy_drop_points": cfg.gate.max_accuracy_drop_points,
            "max_perplexity_increase_pct": cfg.gate.max_perplexity_increase_pct})
        if verdict.passed:
            from r1ray.train.core.checkpoint import publish_final

            _write_report(stage_uri, report)
            inputs = [base_uri] if exists(join(base_uri, MANIFEST)) else []
            final = publish_final(run_dir, stage_uri, stage="compress", config=cfg, inputs=inputs,
                                  gate=report["gate"], source_model=base_uri)
            result = CompressResult(True, [], run_dir, final, final, report)
        else:
            rejected = join(run_dir, "rejected", time.strftime("%Y%m%dT%H%M%S") + f"-{uuid.uuid4().hex[:4]}")
            _write_report(rejected, report)
            log.error("quality gate refused the compressed model: %s", "; ".join(verdict.reasons))
            result = CompressResult(False, verdict.reasons, run_dir, None, rejected, report)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        for uri in cleanup:
            _delete(uri)
    result.seconds = time.perf_counter() - t0
    (log.info if result.passed else log.error)("compression %s in %.0fs; report %s/%s",
                                               "published" if result.passed else "refused", result.seconds,
                                               result.report_dir, REPORT_MD)
    return result

