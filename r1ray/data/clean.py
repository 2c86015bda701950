"""Cleaning: Unicode/control/whitespace normalisation, Gopher/C4-style quality heuristics, PII scrubbing.

Pure functions on strings (no Ray), so they are unit-tested directly and run inside Ray Data tasks.
Every function reports what it changed or why it dropped a document, so the manifest can count it.
"""

from __future__ import annotations

import re
import unicodedata
from collections import Counter

from r1ray.data.config import PIIConfig, QualityConfig

# Edit flags (a bit mask per document) counted in the manifest's `changed` section.
EDIT_UNICODE, EDIT_CONTROL, EDIT_WHITESPACE, EDIT_TRUNCATED = 1, 2, 4, 8
EDIT_NAMES = {EDIT_UNICODE: "unicode", EDIT_CONTROL: "control_chars", EDIT_WHITESPACE: "whitespace",
              EDIT_TRUNCATED: "truncated"}

# C0/C1 controls except tab and newline, zero-width and BOM characters, and lone surrogates (from JSON
# escapes such as "\\ud800", which no UTF-8 encoder accepts).
_CONTROL_RE = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u200b-\u200d\u2060\ufeff\ud800-\udfff]")
# Only what must change: a run of 2+ blanks, or one blank that is not a plain space.
_SPACES_RE = re.compile(r"[ \t\u00a0\u2000-\u200a\u3000]{2,}|[\t\u00a0\u2000-\u200a\u3000]")
_TRAILING_RE = re.compile(r"[ \t]+\n")
_MANY_NEWLINES_RE = re.compile(r"\n{3,}")


def normalize(text: str, *, unicode_form: str = "NFC", collapse_whitespace: bool = True) -> tuple[str, int]:
    """Return ``(clean_text, edit_flags)``: Unicode form, control characters, line endings, whitespace."""
    flags = 0
    if unicode_form != "none" and not text.isascii():  # ASCII is already in every normal form
        t = unicodedata.normalize(unicode_form, text)
        if t != text:
            flags |= EDIT_UNICODE
        text = t
    t = text.replace("\r\n", "\n").replace("\r", "\n") if "\r" in text else text
    if _CONTROL_RE.search(t):
        t = _CONTROL_RE.sub("", t)
    if t != text:
        flags |= EDIT_CONTROL
    text = t
    t = _SPACES_RE.sub(" ", text) if collapse_whitespace else text
    t = _TRAILING_RE.sub("\n", t)
    t = _MANY_NEWLINES_RE.sub("\n\n", t).strip()
    if t != text:
        flags |= EDIT_WHITESPACE
    return t, flags


def split_oversize(text: str, max_chars: int) -> list[str]:
    """Cut ``text`` into pieces of at most ``max_chars``, preferring newline, then space, boundaries."""
    parts = []
    while len(text) > max_chars:
        cut = text.rfind("\n", max_chars // 2, max_chars)
        if cut <= 0:
            cut = text.rfind(" ", max_chars // 2, max_chars)
        if cut <= 0:
            cut = max_chars
        parts.append(text[:cut].strip())
        text = text[cut:].strip()
    if text:
        parts.append(text)
    return [p for p in parts if p]


# ---------------------------------------------------------------------------------------------------
# Quality heuristics (Gopher, Rae et al. 2021, appendix A; C4 line rules)
# ---------------------------------------------------------------------------------------------------

_WORD_RE = re.compile(r"\S+")


def _top_ngram_fraction(words: list[str], n: int, total_chars: int) -> float:
    if len(words) < n or total_chars == 0:
        return 0.0
    grams = Counter(tuple(words[i : i + n]) for i in range(len(words) - n + 1))
    gram, count = grams.most_common(1)[0]
    if count <= 1:
        return 0.0
    return count * sum(len(w) for w in gram) / total_chars


def _duplicate_ngram_fraction(words: list[str], n: int, total_chars: int) -> float:
    """Share of characters in words covered by an n-gram that occurs more than once."""
    if len(words) < n or total_chars == 0:
        return 0.0
    grams = [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]
    counts = Counter(grams)
    covered = bytearray(len(words))
    for i, g in enumerate(grams):
        if counts[g] > 1:
            covered[i : i + n] = b"\x01" * n
    return sum(len(w) for w, c in zip(words, covered, strict=True) if c) / total_chars


def quality_reason(text: str, q: QualityConfig) -> str | None:
    """The first heuristic ``text`` fails (a short reason name), or None when it passes them all."""
    words = _WORD_RE.findall(text)
    n = len(words)
    if n < q.min_words:
        return "too_few_words"
    if n == 0:
        return None
    chars = sum(len(w) for w in words)
    mean = chars / n
    if mean < q.min_mean_word_length or mean > q.max_mean_word_length:
        return "mean_word_length"
    symbols = text.count("#") + text.count("...") + text.count("\u2026")
    if symbols / n > q.max_symbol_ratio:
        return "symbol_ratio"
    if sum(1 for w in words if any(c.isalpha() for c in w)) / n < q.min_alpha_word_fraction:
        return "alpha_words"
    lines = [ln.strip() for ln in text.split("\n") if ln.strip()]
    if lines:
        if (len(lines) - len(set(lines))) / len(lines) > q.max_duplicate_line_fraction:
            return "duplicate_lines"
        if sum(1 for ln in lines if ln.endswith(("...", "\u2026"))) / len(lines) > q.max_ellipsis_line_fraction:
            return "ellipsis_lines"
    lower = [w.lower() for w in words]
    for k, limit in sorted(q.max_top_ngram_fraction.items()):
        if _top_ngram_fraction(lower, k, chars) > limit:
            return f"top_{k}gram"
    for k, limit in sorted(q.max_duplicate_ngram_fraction.items()):
        if _duplicate_ngram_fraction(lower, k, chars) > limit:
            return f"duplicate_{k}gram"
    return None


# ---------------------------------------------------------------------------------------------------
# PII
# ---------------------------------------------------------------------------------------------------

PII_KINDS = ("email", "phone", "ip", "card")
PLACEHOLDERS = {"email": "<EMAIL>", "phone": "<PHONE>", "ip": "<IP_ADDRESS>", "card": "<CARD_NUMBER>"}

_EMAIL_RE = re.compile(r"\b[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}\b")
_IPV4_RE = re.compile(r"(?<![\w.])(?:(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)\.){3}(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)(?![\w.])")
_IPV6_RE = re.compile(r"(?<![\w:])(?:[0-9A-Fa-f]{1,4}:){7}[0-9A-Fa-f]{1,4}(?![\w:])")
# 13-19 digits, optionally grouped by single spaces or dashes; kept only when Luhn-valid.
_CARD_RE = re.compile(r"(?<![\d-])\d(?:[ -]?\d){12,18}(?![\d-])")
# Phone numbers need separators or a leading +: "+1 415 555 0132", "(415) 555-0132", "415-555-0132".
_PHONE_RE = re.compile(
    r"(?<![\w+])(?<!\d[ .-])(?:\+\d{1,3}[ .-]?)?(?:\(\d{2,4}\)[ .-]?|\d{2,4}[ .-])\d{3,4}[ .-]\d{3,4}"
    r"(?![\w]|[ .-]\d)"
)


def _luhn_ok(digits: str) -> bool:
    total, alt = 0, False
    for ch in reversed(digits):
        d = ord(ch) - 48
        if alt:
            d *= 2
            if d > 9:
                d -= 9
        total += d
        alt = not alt
    return total % 10 == 0


def scrub_pii(text: str, cfg: PIIConfig) -> tuple[str, dict[str, int]]:
    """Replace PII spans with typed placeholders; returns the text and how many of each kind were replaced."""
    counts = dict.fromkeys(PII_KINDS, 0)
    if not cfg.enabled:
        return text, counts
    kinds = set(cfg.kinds)
    if "email" in kinds and "@" in text:
        text, counts["email"] = _EMAIL_RE.subn(PLACEHOLDERS["email"], text)
    if "card" in kinds:
        def card(m: re.Match) -> str:
            digits = re.sub(r"\D", "", m.group(0))
            if 13 <= len(digits) <= 19 and _luhn_ok(digits):
                counts["card"] += 1
                return PLACEHOLDERS["card"]
            return m.group(0)

        text = _CARD_RE.sub(card, text)
    if "ip" in kinds:
        text, n4 = _IPV4_RE.subn(PLACEHOLDERS["ip"], text)
        n6 = 0
        if ":" in text:
            text, n6 = _IPV6_RE.subn(PLACEHOLDERS["ip"], text)
        counts["ip"] = n4 + n6
    if "phone" in kinds:
        text, counts["phone"] = _PHONE_RE.subn(PLACEHOLDERS["phone"], text)
    return text, counts
