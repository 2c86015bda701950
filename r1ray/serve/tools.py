"""Tool calls in the Hermes / Qwen2.5 format: the prompt that declares the tools, the grammar that forces a call,
and the parser that turns a reply's ``<tool_call>`` blocks into OpenAI ``tool_calls``.

The format (vLLM's ``hermes`` tool parser reads the same): the system turn lists each tool's JSON signature
inside ``<tools></tools>``; the assistant calls one with ::

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

and a ``tool`` message comes back as a user turn holding ``<tool_response>…</tool_response>``. ``tool_choice``
``required`` or a named function constrains the answer to one such block (xgrammar: the call's ``arguments`` are
valid for the tool's ``parameters`` schema); ``auto`` lets the model choose and parses whatever blocks it wrote;
``none`` neither declares nor parses tools. Pure Python: no torch, no Ray.
"""

from __future__ import annotations

import json
import re
import uuid
from typing import Any

from r1ray.infer.text import stop_holdback
from r1ray.infer.types import Guidance
from r1ray.model.tokenizer import END_THINK, IM_END, IM_START, THINK

TOOL_OPEN, TOOL_CLOSE = "<tool_call>", "</tool_call>"

_PREAMBLE = (
    "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n{tools}\n</tools>\n\n"
    "For each function call, return a json object with function name and arguments within "
    "<tool_call></tool_call> XML tags:\n<tool_call>\n"
    '{{"name": <function-name>, "arguments": <args-json-object>}}\n</tool_call>'
)


def _call_text(name: str, arguments: Any) -> str:
    return f"{TOOL_OPEN}\n" + json.dumps({"name": name, "arguments": arguments}, ensure_ascii=False) + f"\n{TOOL_CLOSE}"


def render_prompt(messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None,
                  add_generation_prompt: bool = True) -> str:
    """ChatML (r1ray's chat template) with tools declared in the system turn, assistant ``tool_calls`` rendered as
    ``<tool_call>`` blocks and consecutive ``tool`` messages as one user turn of ``<tool_response>`` blocks.
    Without tools or tool messages it equals ``r1ray.model.tokenizer.render_chat``."""
    out: list[str] = []
    msgs = list(messages)
    if tools:
        system = ""
        if msgs and msgs[0]["role"] in ("system", "developer"):
            system = msgs.pop(0)["content"] + "\n\n"
        listing = "\n".join(json.dumps(t, ensure_ascii=False) for t in tools)
        out.append(f"{IM_START}system\n{system}{_PREAMBLE.format(tools=listing)}{IM_END}\n")
    for i, m in enumerate(msgs):
        role = m["role"]
        if role == "tool":
            if i == 0 or msgs[i - 1]["role"] != "tool":
                out.append(f"{IM_START}user")
            out.append(f"\n<tool_response>\n{m['content']}\n</tool_response>")
            if i + 1 == len(msgs) or msgs[i + 1]["role"] != "tool":
                out.append(f"{IM_END}\n")
            continue
        out.append(f"{IM_START}{role}\n")
        if role == "assistant" and m.get("reasoning_content"):
            out.append(f"{THINK}\n{m['reasoning_content']}\n{END_THINK}\n")
        text = m["content"]
        for call in m.get("tool_calls") or []:
            text += ("\n" if text else "") + _call_text(call["name"], call["arguments"])
        out.append(f"{text}{IM_END}\n")
    if add_generation_prompt:
        out.append(f"{IM_START}assistant\n")
    return "".join(out)


def forced_guidance(tools: list[dict[str, Any]], name: str | None = None) -> Guidance:
    """The constraint of ``tool_choice`` ``required`` (any of ``tools``) or a named function (``name``): the answer
    is exactly one ``<tool_call>`` block whose arguments satisfy that tool's parameters."""
    chosen = [t["function"] for t in tools if name is None or t["function"]["name"] == name]
    spec = [{"name": f["name"], "parameters": f.get("parameters") or {"type": "object"}} for f in chosen]
    return Guidance("tool_call", json.dumps(spec))


_BLOCK = re.compile(re.escape(TOOL_OPEN) + r"\s*(.*?)\s*" + re.escape(TOOL_CLOSE), re.S)


def _parse_block(body: str) -> dict[str, Any] | None:
    try:
        obj = json.loads(body, strict=False)  # a string may hold raw control characters (xgrammar allows them)
    except json.JSONDecodeError:
        return None
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    args = obj.get("arguments", obj.get("parameters", {}))
    return {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
            "function": {"name": obj["name"], "arguments": json.dumps(args, ensure_ascii=False)}}


def parse_tool_calls(text: str | None) -> tuple[str | None, list[dict[str, Any]]]:
    """``(content, tool_calls)`` of a reply's answer: each well-formed ``<tool_call>`` block becomes a call (a block
    that is not JSON with a ``name`` stays in the content, as vLLM's hermes parser leaves it); the content is the
    text outside the blocks, or None when only whitespace is left."""
    if not text or TOOL_OPEN not in text:
        return text, []
    calls, kept, pos = [], [], 0
    for m in _BLOCK.finditer(text):
        call = _parse_block(m.group(1))
        if call is None:
            continue
        kept.append(text[pos:m.start()])
        pos = m.end()
        calls.append(call)
    kept.append(text[pos:])
    content = "".join(kept).strip()
    return (content or None) if calls else text, calls


class ToolCallStream:
    """Streamed ``parse_tool_calls``: ``feed(content_delta, final) -> [("content", text) | ("tool_call", call)]``.

    Content is sent as it comes except text that could be the start of ``<tool_call>``; a block is held until its
    ``</tool_call>`` and then sent as one call (id, name and the whole arguments string in one delta, which the
    openai SDK assembles like vLLM's incremental deltas); a block that does not parse, or is never closed, is
    sent as content."""

    def __init__(self) -> None:
        self.buf = ""
        self.calls = 0

    def feed(self, delta: str, final: bool = False) -> list[tuple[str, Any]]:
        self.buf += delta
        out: list[tuple[str, Any]] = []
        while True:
            i = self.buf.find(TOOL_OPEN)
            if i < 0:
                keep = 0 if final else stop_holdback(self.buf, [TOOL_OPEN])
                text = self.buf[:len(self.buf) - keep]
                if text:
                    out.append(("content", text))
                self.buf = self.buf[len(self.buf) - keep:]
                return out
            if i > 0:
                out.append(("content", self.buf[:i]))
                self.buf = self.buf[i:]
            j = self.buf.find(TOOL_CLOSE)
            if j < 0:
                if final:
                    out.append(("content", self.buf))
                    self.buf = ""
                return out
            block, self.buf = self.buf[:j + len(TOOL_CLOSE)], self.buf[j + len(TOOL_CLOSE):]
            m = _BLOCK.fullmatch(block)
            call = _parse_block(m.group(1)) if m else None
            if call is None:
                out.append(("content", block))
            else:
                out.append(("tool_call", {"index": self.calls, **call}))  # the delta's index: its place in the reply
                self.calls += 1
            self.buf = self.buf.lstrip("\n") if call is not None else self.buf
