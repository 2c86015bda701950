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


def split_reasoning(text: str) -> tuple[str | None, str]:
    """``(reasoning_content, content)`` of a whole reply that starts with ``<think>...</think>``.

    A reply that does not start with ``<think>`` has no reasoning. An unclosed ``<think>`` (the reply hit
    max_tokens while thinking): all of it is reasoning and the content is empty.
    """
    body = text.lstrip()
    if not body.startswith(THINK):
        return None, text
    rest = body[len(THINK) :]
    end = rest.find(END_THINK)
    if end < 0:
        return rest.strip("\n"), ""
    return rest[:end].strip("\n"), rest[end + len(END_THINK) :].lstrip()


class ReasoningStream:
    """Incremental ``split_reasoning`` for streamed deltas: ``feed(delta) -> [(field, text), ...]``.

    ``field`` is ``"reasoning_content"`` or ``"content"``. Text is held back while it could still be the start
    of a tag, so the concatenated stream of each field equals ``split_reasoning`` of the whole reply.
    """

    def __init__(self) -> None:
        self.state = "start"  # start -> think -> content, or start -> content
        self.buf = ""
        self._lstrip = False  # drop leading newlines (reasoning) / whitespace (content) of the next text

    def _emit(self, field: str, text: str, out: list[tuple[str, str]]) -> None:
        if self._lstrip:
            text = text.lstrip("\n") if field == "reasoning_content" else text.lstrip()
            if text:
                self._lstrip = False
        if text:
            out.append((field, text))

    def feed(self, delta: str, final: bool = False) -> list[tuple[str, str]]:
        self.buf += delta
        out: list[tuple[str, str]] = []
        while True:
            if self.state == "start":
                body = self.buf.lstrip()
                if body.startswith(THINK):
                    self.buf = body[len(THINK) :]
                    self.state, self._lstrip = "think", True
                    continue
                if body and not THINK.startswith(body):
                    self.state = "content"
                    continue
                if final:
                    self._emit("content", self.buf, out)
                    self.buf = ""
                return out
            if self.state == "think":
                i = self.buf.find(END_THINK)
                if i >= 0:
                    self._emit("reasoning_content", self.buf[:i].rstrip("\n"), out)
                    self.buf = self.buf[i + len(END_THINK) :]
                    self.state, self._lstrip = "content", True
                    continue
                if final:
                    self._emit("reasoning_content", self.buf.rstrip("\n"), out)
                    self.buf = ""
                    return out
                keep = len(self.buf) - stop_holdback(self.buf, [END_THINK])
                keep = len(self.buf[:keep].rstrip("\n"))  # trailing newlines belong before </think>
                self._emit("reasoning_content", self.buf[:keep], out)
                self.buf = self.buf[keep:]
                return out
            self._emit("content", self.buf, out)
            self.buf = ""
            return out
