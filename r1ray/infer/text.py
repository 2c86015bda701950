"""Text-level pieces of serving: stop strings with streaming hold-back, and the ``<think>`` splitter.

Pure Python, no torch: the engine and the HTTP layer both use them, and unit tests check them directly.
"""

from __future__ import annotations

from r1ray.model.tokenizer import END_THINK, THINK


def stop_holdback(text: str, stops: list[str]) -> int:
    """Characters at the end of ``text`` that could be the start of a stop string (not yet safe to emit)."""
    hold = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:k]):
                hold = max(hold, k)
                break
    return hold


def find_stop(text: str, stops: list[str], start: int = 0) -> int:
    """Index of the earliest stop string in ``text`` at or after ``start`` (minus its length), or -1."""
    best = -1
    for s in stops:
        i = text.find(s, max(0, start - len(s) + 1))
        if i >= 0 and (best < 0 or i < best):
            best = i
    return best


def prompt_opens_think(prompt: str) -> bool:
    """True when a rendered chat prompt ends inside an open ``<think>`` (a template that prefills it, as
    DeepSeek-R1's and Qwen3's do): the reply then starts in the reasoning and may hold only ``</think>``."""
    i = prompt.rfind(THINK)
    return i >= 0 and i > prompt.rfind(END_THINK) and not prompt[i + len(THINK) :].strip()


def count_reasoning_tokens(ids: list[int], think_id: int | None, end_think_id: int | None, *, prefilled: bool,
                           finish_reason: str | None) -> int:
    """Tokens of a reply's reasoning (its tags included), by the rules of ``split_reasoning``: the reply thinks when
    the prompt opened ``<think>`` or its first token is ``<think>``; the reasoning ends at ``</think>``; one never
    closed counts only when max_tokens cut it (otherwise the whole reply is the answer)."""
    if not ids or think_id is None or end_think_id is None or (not prefilled and ids[0] != think_id):
        return 0
    if end_think_id in ids:
        return ids.index(end_think_id) + 1
    return len(ids) if finish_reason == "length" else 0


def split_reasoning(text: str, finish_reason: str | None = "stop", *, prefilled: bool = False,
                    ) -> tuple[str | None, str | None]:
    """``(reasoning_content, content)`` of a whole reply; the rules (vLLM's ``deepseek_r1``/``qwen3`` reasoning
    parsers are the reference, docs/serve.md states them):

    - The reply is in the reasoning when it starts (after whitespace) with ``<think>``, or when the prompt
      prefilled ``<think>`` (``prefilled``). A reply that starts with ``</think>`` closes an empty (or a
      prefilled) reasoning. Otherwise it has no reasoning: ``(None, text)``, whatever tags appear later.
    - Reasoning is the text between the tags, verbatim (the newline after ``<think>`` is kept); content is the
      text after ``</think>``, verbatim, or None when nothing follows.
    - A reasoning never closed: cut by max_tokens (``finish_reason == "length"``), all of it is reasoning and
      content is None (vLLM's rule for truncated thinking). Ended any other way (EOS, a stop string), the
      model never separated an answer from its thinking, so all of it is the answer: ``(None, text)``.
    """
    body = text
    if not prefilled:
        head = text.lstrip()
        if head.startswith(THINK):
            body = head[len(THINK) :]
        elif head.startswith(END_THINK):
            body = head
        else:
            return None, text
    end = body.find(END_THINK)
    if end >= 0:
        return body[:end], body[end + len(END_THINK) :] or None
    if finish_reason == "length":
        return body, None
    return None, body


class ReasoningStream:
    """Incremental ``split_reasoning`` for streamed deltas: ``feed(delta, finish_reason) -> [(field, text)]``.

    ``field`` is ``"reasoning_content"`` or ``"content"``. Text is held back only while it could still be
    the start of a tag. The concatenated stream of each field equals ``split_reasoning`` of the whole reply,
    with one exception a stream cannot avoid: a reasoning that is never closed and ends other than by
    max_tokens went out as ``reasoning_content`` deltas while it could still close; the last call then
    returns the whole of it again as ``content`` (the answer, as the whole-reply split has it).
    """

    def __init__(self, *, prefilled: bool = False) -> None:
        self.state = "think" if prefilled else "start"  # start -> think -> content, or start -> content
        self.buf = ""
        self.reasoning = ""  # reasoning sent so far (the answer, if the reasoning never closes)

    def feed(self, delta: str, finish_reason: str | None = None) -> list[tuple[str, str]]:
        """Split ``delta``; ``finish_reason`` (not None) marks the last delta of the reply."""
        final = finish_reason is not None
        self.buf += delta
        out: list[tuple[str, str]] = []
        while True:
            if self.state == "start":
                head = self.buf.lstrip()
                for tag, state in ((THINK, "think"), (END_THINK, "content")):
                    if head.startswith(tag):
                        self.buf, self.state = head[len(tag) :], state
                        break
                else:
                    if head and not THINK.startswith(head) and not END_THINK.startswith(head):
                        self.state = "content"
                    elif final:
                        self.state = "content"
                    else:
                        return out
                continue
            if self.state == "think":
                i = self.buf.find(END_THINK)
                if i >= 0:
                    self._reason(self.buf[:i], out)
                    self.buf, self.state = self.buf[i + len(END_THINK) :], "content"
                    continue
                keep = len(self.buf) if final else len(self.buf) - stop_holdback(self.buf, [END_THINK])
                self._reason(self.buf[:keep], out)
                self.buf = self.buf[keep:]
                if final and finish_reason != "length" and self.reasoning:
                    out.append(("content", self.reasoning))
                return out
            if self.buf:
                out.append(("content", self.buf))
            self.buf = ""
            return out

    def _reason(self, text: str, out: list[tuple[str, str]]) -> None:
        if text:
            self.reasoning += text
            out.append(("reasoning_content", text))
