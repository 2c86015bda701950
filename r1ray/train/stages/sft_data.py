"""SFT data: chat conversations -> token ids with an assistant-only target mask -> padded or packed batches.

A conversation is a list of messages ``{"role", "content", optional "reasoning_content"}``, from a user's jsonl
(one ``{"messages": [...]}`` per line; ``load_jsonl``) or from a task's worked solution (``task_conversation``:
the task's prompt turn, then the R1-format completion ``<think>...</think><answer>...</answer>`` as the
assistant turn).

Assistant mask. The tokenizer's own chat template renders the conversation; the assistant spans are found by
rendering prefixes: turn ``i`` (an assistant turn) covers the characters from the end of
``render(messages[:i], add_generation_prompt=True)`` to the end of ``render(messages[:i+1])``, i.e. exactly what
the template writes for that turn after the generation prompt (its reasoning, content and end-of-turn token).
The full text is tokenized once with offsets, and a token is a target iff its first character lies in an
assistant span. This works with any template that renders prefixes as prefixes (ChatML, Llama 3, Qwen); one
that does not (e.g. a template that drops earlier reasoning) is refused with an error rather than mis-masked.
(transformers' ``return_assistant_tokens_mask`` needs ``{% generation %}`` markers, which few templates have.)

Batches. Each example becomes ``input = ids[:-1]``, ``target = masked ids[1:]`` (``IGNORE`` where not an
assistant token), so no target ever crosses from one conversation into the next:

- ``pad``: one row per conversation, right-padded to the longest of the micro-batch (``attention_mask`` 0 on
  padding, targets ``IGNORE``);
- ``pack``: the micro-batch's conversations concatenated into one row with ``position_ids`` restarting at 0 for
  each, and no attention mask: transformers then builds a block-diagonal causal mask from the position ids
  (``masking_utils.find_packed_sequence_indices``), so attention and positions never cross a boundary.

Packing measured faster on CPU for short conversations (docs/sft.md), so it is the default (``data.layout``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from r1ray.artifacts import jsonl_rows

__all__ = [
    "IGNORE",
    "LAYOUTS",
    "Example",
    "assistant_spans",
    "check_messages",
    "collate",
    "load_jsonl",
    "pack_batch",
    "pad_batch",
    "task_conversation",
    "tokenize_conversation",
]

IGNORE = -100
"""Target id of every non-assistant token (``ignore_index`` of the loss)."""
LAYOUTS = ("pad", "pack")
ROLES = ("system", "user", "assistant", "tool")


@dataclass(frozen=True)
class Example:
    """One tokenized conversation: ``ids`` and ``target`` (True on assistant tokens), both of length n."""

    ids: np.ndarray
    target: np.ndarray
    truncated: bool = False

    @property
    def n_targets(self) -> int:
        """Assistant tokens predicted by this example (targets of positions 1..n-1)."""
        return int(self.target[1:].sum())


# ------------------------------------------------------------------------------------------ conversations


def check_messages(messages: Any, where: str) -> list[dict[str, Any]]:
    """``messages`` as a list of message dicts, or ValueError naming ``where`` and what is wrong."""
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"{where}: 'messages' must be a non-empty list of {{role, content}} objects")
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise ValueError(f"{where}: messages[{i}] must be an object, got {type(m).__name__}")
        if m.get("role") not in ROLES:
            raise ValueError(f"{where}: messages[{i}].role must be one of {ROLES}, got {m.get('role')!r}")
        if not isinstance(m.get("content"), str):
            raise ValueError(f"{where}: messages[{i}].content must be a string, got {type(m.get('content')).__name__}")
        rc = m.get("reasoning_content")
        if rc is not None and not isinstance(rc, str):
            raise ValueError(f"{where}: messages[{i}].reasoning_content must be a string, got {type(rc).__name__}")
    if not any(m["role"] == "assistant" and (m["content"] or m.get("reasoning_content")) for m in messages):
        raise ValueError(f"{where}: no non-empty assistant message: nothing to train on")
    return messages


def load_jsonl(path: str | Path) -> list[list[dict[str, Any]]]:
    """Every conversation of a jsonl file of ``{"messages": [...]}`` rows (blank lines skipped). A malformed
    row is a ValueError naming ``<path>:<line>`` and the problem."""
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"data.path={str(path)!r} is not a file (expected a jsonl of {{\"messages\": [...]}} rows)")
    out = []
    for where, row in jsonl_rows(p):
        if not isinstance(row, dict) or "messages" not in row:
            raise ValueError(f"{where}: expected an object with a 'messages' list")
        out.append(check_messages(row["messages"], where))
    if not out:
        raise ValueError(f"{p}: no conversations (the file is empty)")
    return out


def task_conversation(problem: Any) -> list[dict[str, Any]]:
    """A task problem's SFT conversation: its prompt turn(s), then its worked R1-format completion."""
    return [*problem.messages(), {"role": "assistant", "content": problem.completion}]


# ------------------------------------------------------------------------------------------ tokenization


def _render(tokenizer: Any, messages: list[dict[str, Any]], generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def assistant_spans(tokenizer: Any, messages: list[dict[str, Any]]) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the ``[start, end)`` character span of each assistant turn in it."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(f"tokenizer {getattr(tokenizer, 'name_or_path', '')!r} has no chat template; SFT renders "
                         "conversations with the tokenizer's own template (r1ray tokenizers have one)")
    text = _render(tokenizer, messages, False)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        head = _render(tokenizer, messages[:i], True) if i else _render(tokenizer, [], True)
        turn = _render(tokenizer, messages[: i + 1], False)
        if not (text.startswith(turn) and turn.startswith(head)):
            raise ValueError(
                "the chat template does not render a conversation's prefixes as prefixes of the whole (message "
                f"{i}); the assistant tokens cannot be located. Use a template that renders each turn "
                "independently (ChatML, Llama 3, Qwen)")
        if len(turn) > len(head):
            spans.append((len(head), len(turn)))
    return text, spans


def tokenize_conversation(tokenizer: Any, messages: list[dict[str, Any]], max_length: int | None = None) -> Example:
    """Token ids of the rendered conversation and its assistant mask, cut to ``max_length`` tokens."""
    text, spans = assistant_spans(tokenizer, messages)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = np.asarray(enc["input_ids"], dtype=np.int64)
    starts = np.asarray([s for s, _ in enc["offset_mapping"]], dtype=np.int64)
    target = np.zeros(len(ids), dtype=bool)
    for a, b in spans:
        target |= (starts >= a) & (starts < b)
    truncated = max_length is not None and len(ids) > max_length
    if truncated:
        ids, target = ids[:max_length], target[:max_length]
    return Example(ids=ids, target=target, truncated=truncated)


# ------------------------------------------------------------------------------------------ batches


def _shifted(ex: Example) -> tuple[np.ndarray, np.ndarray]:
    inp = ex.ids[:-1]
    tgt = np.where(ex.target[1:], ex.ids[1:], IGNORE)
    return inp, tgt


def pad_batch(examples: Sequence[Example], pad_id: int) -> dict[str, np.ndarray]:
    """One right-padded row per example: ``input_ids``, ``attention_mask``, ``targets`` ([B, T] int64)."""
    pairs = [_shifted(e) for e in examples]
    width = max(1, max(len(i) for i, _ in pairs))
    ids = np.full((len(pairs), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(pairs), width), dtype=np.int64)
    tgt = np.full((len(pairs), width), IGNORE, dtype=np.int64)
    for r, (i, t) in enumerate(pairs):
        ids[r, : len(i)], mask[r, : len(i)], tgt[r, : len(t)] = i, 1, t
    return {"input_ids": ids, "attention_mask": mask, "targets": tgt}


def pack_batch(examples: Sequence[Example]) -> dict[str, np.ndarray]:
    """Every example in one row: ``input_ids``, ``position_ids`` (restarting at 0 per example), ``targets``
    ([1, sum of lengths - 1 each] int64)."""
    pairs = [_shifted(e) for e in examples]
    ids = np.concatenate([i for i, _ in pairs])[None]
    tgt = np.concatenate([t for _, t in pairs])[None]
    pos = np.concatenate([np.arange(len(i), dtype=np.int64) for i, _ in pairs])[None]
    return {"input_ids": ids, "position_ids": pos, "targets": tgt}


def collate(examples: Sequence[Example], layout: str, pad_id: int) -> dict[str, Any]:
    """A micro-batch in ``layout`` plus its counts: ``n_tokens`` (real input tokens, for throughput),
    ``n_targets`` (assistant target tokens: the loss normaliser), ``n_truncated``."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if not examples:
        raise ValueError("collate: no examples")
    batch: dict[str, Any] = pad_batch(examples, pad_id) if layout == "pad" else pack_batch(examples)
    batch["n_tokens"] = int(sum(len(e.ids) - 1 for e in examples))
    batch["n_targets"] = int(sum(e.n_targets for e in examples))
    batch["n_truncated"] = int(sum(e.truncated for e in examples))
    return batch
