"""How evaluation talks to a model: units of requests streamed through Ray Data to a pool of engine actors
(an export) or to an OpenAI-compatible endpoint, with progress and an ETA in the log.

A *unit* is one Ray Data row: a list of requests (generate: a prompt and its sampling; score: the logprobs of
a prompt) or a reference to packed rows of a data artifact (one Parquet row group, read by the task itself,
so token ids never pass through the driver). Each Ray Data task sends its unit to the model and returns the
results; the driver consumes them as they stream in. For an export the unit is one ``EnginePool`` unit
(generated alone as one batch: results do not depend on the number of engines or on what else runs). For an
endpoint each request is one HTTP call (``/v1/completions`` or ``/v1/chat/completions``), ``concurrency`` of them
in flight per task, and the server batches as it likes.

Scoring a prompt is the same computation on both: the engine's prompt logprobs (``echo: true, max_tokens: 0,
logprobs: 1`` over HTTP), summed over every token after the first.
"""

from __future__ import annotations

import json
import os
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache
from typing import Any

from r1ray.observe.log import get_logger

log = get_logger(__name__)

__all__ = ["EndpointError", "Progress", "endpoint_spec", "pool_spec", "run_units"]

TASK_CPUS = 0.1
"""CPUs each Ray Data task reserves: it only waits on the engines or the server."""


class EndpointError(RuntimeError):
    """The endpoint refused a request (4xx other than 429) or stayed unavailable past the retries."""


# --------------------------------------------------------------------------------------------------
# Specs (what a Ray Data task needs to reach the model; small and picklable)
# --------------------------------------------------------------------------------------------------


def pool_spec(pool_name: str) -> dict[str, Any]:
    return {"kind": "pool", "name": pool_name}


def endpoint_spec(cfg: Any) -> dict[str, Any]:
    """From an ``EndpointConfig``: the key is read from its environment variable here, on the driver."""
    key = None
    if cfg.api_key_env:
        key = os.environ.get(cfg.api_key_env)
        if not key:
            raise ValueError(f"model.endpoint.api_key_env={cfg.api_key_env!r} but that environment variable is "
                             "unset or empty: export it, or unset api_key_env for a server without auth")
    return {"kind": "endpoint", "url": cfg.url, "model": cfg.model, "api_key": key, "concurrency": cfg.concurrency,
            "timeout_s": cfg.timeout_s, "retries": cfg.retries}


# --------------------------------------------------------------------------------------------------
# Inside a Ray Data task
# --------------------------------------------------------------------------------------------------


def _params(req: dict[str, Any]):
    from r1ray.infer.types import SamplingParams

    if req.get("score"):
        return SamplingParams(max_tokens=0, temperature=0.0, prompt_logprobs=True)
    return SamplingParams(max_tokens=int(req["max_tokens"]), temperature=float(req["temperature"]),
                          top_p=float(req.get("top_p", 1.0)), seed=req.get("seed"), stop=tuple(req.get("stop") or ()))


def _from_completion(req: dict[str, Any], c: Any) -> dict[str, Any]:
    if req.get("score"):
        lps = [e.logprob for e in (c.prompt_logprobs or [])[1:] if e.logprob is not None]
        return {"nll": -float(sum(lps)), "tokens": len(lps)}
    if c.finish_reason == "error":
        raise RuntimeError(f"the engine failed a sequence of prompt {req.get('prompt', '')[:80]!r}")
    return {"text": c.text, "finish_reason": c.finish_reason, "completion_tokens": len(c.token_ids)}


def _pool_units(spec: dict[str, Any], units: list[list[dict[str, Any]]]) -> list[list[dict[str, Any]]]:
    from r1ray.infer.pool import EnginePool

    pool = EnginePool.connect(spec["name"])
    for u in units:
        if any(r.get("messages") is not None for r in u):
            raise ValueError("an export is prompted with text (chat prompts are rendered with its tokenizer)")
    outs = pool.generate_units([[r["prompt"] for r in u] for u in units], [[_params(r) for r in u] for u in units])
    return [[_from_completion(r, c) for r, c in zip(u, o, strict=True)] for u, o in zip(units, outs, strict=True)]


def _post(spec: dict[str, Any], route: str, body: dict[str, Any]) -> dict[str, Any]:
    """POST ``body`` to ``url + route``; retries 429/503 and connection errors with backoff."""
    data = json.dumps(body).encode()
    headers = {"Content-Type": "application/json"}
    if spec.get("api_key"):
        headers["Authorization"] = f"Bearer {spec['api_key']}"
    url = spec["url"] + route
    last = ""
    for attempt in range(int(spec["retries"]) + 1):
        req = urllib.request.Request(url, data=data, headers=headers, method="POST")
        wait = min(30.0, 0.5 * 2**attempt)
        try:
            with urllib.request.urlopen(req, timeout=float(spec["timeout_s"])) as r:  # noqa: S310 - user's endpoint
                return json.loads(r.read())
        except urllib.error.HTTPError as e:
            text = e.read().decode("utf-8", "replace")
            try:
                msg = json.loads(text)["error"]["message"]
            except (ValueError, KeyError, TypeError):
                msg = text[:500]
            if e.code not in (429, 503):
                raise EndpointError(f"{url} answered {e.code}: {msg}") from None
            last = f"HTTP {e.code}: {msg}"
            retry_after = e.headers.get("Retry-After")
            if retry_after and retry_after.replace(".", "", 1).isdigit():
                wait = max(wait, float(retry_after))
        except (urllib.error.URLError, TimeoutError, ConnectionError) as e:
            last = f"{type(e).__name__}: {e}"
        time.sleep(wait)
    raise EndpointError(f"{url}: no answer after {int(spec['retries']) + 1} tries (last: {last})")


def _endpoint_request(spec: dict[str, Any], req: dict[str, Any]) -> dict[str, Any]:
    from r1ray.model.tokenizer import END_THINK, THINK

    if req.get("score"):
        body = {"model": spec["model"], "prompt": req["prompt"], "max_tokens": 0, "echo": True, "logprobs": 1,
                "temperature": 0.0}
        choice = _post(spec, "/completions", body)["choices"][0]
        lps = [x for x in (choice.get("logprobs") or {}).get("token_logprobs", [])[1:] if x is not None]
        return {"nll": -float(sum(lps)), "tokens": len(lps)}
    sampling = {"max_tokens": req["max_tokens"], "temperature": req["temperature"], "top_p": req.get("top_p", 1.0)}
    if req.get("seed") is not None:
        sampling["seed"] = req["seed"]
    if req.get("stop"):
        sampling["stop"] = list(req["stop"])
    if req.get("messages") is not None:
        r = _post(spec, "/chat/completions", {"model": spec["model"], "messages": req["messages"], **sampling})
        choice = r["choices"][0]
        msg = choice["message"]
        reasoning, content = msg.get("reasoning_content"), msg.get("content") or ""
        # The server split the reply at the think tags; join it back so verifiers see the reply as written.
        text = content if reasoning is None else f"{THINK}{reasoning}{END_THINK}{content}"
    else:
        r = _post(spec, "/completions", {"model": spec["model"], "prompt": req["prompt"], **sampling})
        choice = r["choices"][0]
        text = choice["text"]
    usage = r.get("usage") or {}
    return {"text": text, "finish_reason": choice.get("finish_reason"),
            "completion_tokens": int(usage.get("completion_tokens") or 0)}


def _endpoint_units(spec: dict[str, Any], units: list[list[dict[str, Any]]]) -> list[list[dict[str, Any]]]:
    flat = [r for u in units for r in u]
    with ThreadPoolExecutor(max_workers=int(spec["concurrency"])) as ex:
        results = list(ex.map(lambda r: _endpoint_request(spec, r), flat))
    out, i = [], 0
    for u in units:
        out.append(results[i:i + len(u)])
        i += len(u)
    return out


@lru_cache(maxsize=4)
def _tokenizer(path: str) -> Any:
    from r1ray.model.tokenizer import load_tokenizer

    return load_tokenizer(path)


def _read_rows(payload: dict[str, Any]) -> list[list[int]]:
    import pyarrow.parquet as pq

    from r1ray.artifacts import filesystem

    fs, path = filesystem(payload["uri"])
    with fs.open_input_file(path) as f:
        table = pq.ParquetFile(f).read_row_group(int(payload["row_group"]), columns=["input_ids"])
    off = int(payload.get("offset", 0))
    return table.column("input_ids").slice(off, int(payload["take"])).to_pylist()


def _run_payload(spec: dict[str, Any], payload: dict[str, Any]) -> list[dict[str, Any]]:
    send = _pool_units if spec["kind"] == "pool" else _endpoint_units
    if payload["kind"] == "requests":
        return send(spec, [payload["requests"]])[0]
    # packed rows of a data artifact: score each row's tokens after the first, batch_rows rows per engine batch
    rows = _read_rows(payload)
    b = int(payload["batch_rows"])
    units = [[{"prompt": list(r), "score": True} for r in rows[i:i + b]] for i in range(0, len(rows), b)]
    results = [x for u in send(spec, units) for x in u]
    tok = _tokenizer(payload["tokenizer_dir"])
    for j, (row, res) in enumerate(zip(rows, results, strict=True)):
        res["row"] = int(payload["first_row"]) + j
        res["bytes"] = len(tok.decode(row[1:], skip_special_tokens=False).encode("utf-8"))
    return results


def _run_row(row: dict[str, Any], spec: dict[str, Any]) -> dict[str, Any]:
    results = _run_payload(spec, json.loads(row["payload"]))
    return {"unit": row["unit"], "result": json.dumps(results)}


# --------------------------------------------------------------------------------------------------
# The driver
# --------------------------------------------------------------------------------------------------


class Progress:
    """Logs ``what: done/total (pct), rate, ETA`` at most every ``every_s`` seconds and at the end."""

    def __init__(self, what: str, total: int, every_s: float, unit: str = "requests",
                 logger: Callable[[str], None] | None = None):
        self.what, self.total, self.every_s, self.unit = what, total, every_s, unit
        self.done = 0
        self.t0 = self.last = time.perf_counter()
        self.log = logger or log.info

    def update(self, n: int) -> None:
        self.done += n
        now = time.perf_counter()
        if now - self.last >= self.every_s or self.done >= self.total:
            self.last = now
            self.log(self.line(now))

    def line(self, now: float | None = None) -> str:
        elapsed = (now or time.perf_counter()) - self.t0
        rate = self.done / elapsed if elapsed > 0 else 0.0
        left = self.total - self.done
        eta = f"ETA {left / rate:.0f}s" if rate > 0 and left > 0 else ("done" if left <= 0 else "ETA ?")
        pct = 100.0 * self.done / self.total if self.total else 100.0
        return (f"{self.what}: {self.done}/{self.total} {self.unit} ({pct:.0f}%), {rate:.2f} {self.unit}/s, "
                f"{elapsed:.0f}s elapsed, {eta}")


def run_units(spec: dict[str, Any], payloads: Sequence[dict[str, Any]], *, what: str, sizes: Sequence[int],
              concurrency: int, progress_every_s: float, unit: str = "requests") -> list[list[dict[str, Any]]]:
    """Each payload's results, in order, computed by Ray Data tasks (``concurrency`` at a time), streaming:
    results are consumed as units finish, and progress with an ETA is logged. ``sizes[i]`` is how many items
    payload i counts for in the progress line."""
    import ray

    if not payloads:
        return []
    items = [{"unit": i, "payload": json.dumps(p)} for i, p in enumerate(payloads)]
    # One block per unit, so each task carries one unit and results stream at unit granularity.
    ds = ray.data.from_items(items, override_num_blocks=len(items))
    ds = ds.map(_run_row, fn_kwargs={"spec": spec}, num_cpus=TASK_CPUS, concurrency=max(1, int(concurrency)))
    out: list[list[dict[str, Any]] | None] = [None] * len(items)
    prog = Progress(what, int(sum(sizes)), progress_every_s, unit=unit)
    for row in ds.iter_rows():
        i = int(row["unit"])
        out[i] = json.loads(row["result"])
        prog.update(int(sizes[i]))
    missing = [i for i, r in enumerate(out) if r is None]
    if missing:
        raise RuntimeError(f"{what}: Ray Data returned no result for units {missing[:10]}")
    return out  # type: ignore[return-value]


def sample_seed(seed: int, uid: str, sample: int) -> int:
    """Seed of sample ``sample`` of the problem with uid ``uid``: the same for every model and every run."""

    from r1ray.seeds import hashed_seed

    return hashed_seed("eval", seed, uid, sample)
