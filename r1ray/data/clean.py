"""Cleaning: Unicode/control/whitespace normalisation, Gopher/C4-style quality heuristics, PII scrubbing.

Pure functions on strings (no Ray), so they are unit-tested directly and run inside Ray Data tasks.
Every function reports what it changed or why it dropped a document, so the manifest can count it.
"""

from __future__ import annotations

import ipaddress
import math
import re
import unicodedata
from collections import Counter
from collections.abc import Callable
from typing import Any

from r1ray.data.config import C4Config, PIIConfig, QualityConfig

# Edit flags (a bit mask per document) counted in the manifest's `changed` section.
EDIT_UNICODE, EDIT_CONTROL, EDIT_WHITESPACE, EDIT_TRUNCATED, EDIT_C4_LINES = 1, 2, 4, 8, 16
EDIT_NAMES = {EDIT_UNICODE: "unicode", EDIT_CONTROL: "control_chars", EDIT_WHITESPACE: "whitespace",
              EDIT_TRUNCATED: "truncated", EDIT_C4_LINES: "c4_lines"}

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
    # (``in`` finds the rare cases at memory speed; the patterns open with a repeat, which ``re`` tries at every
    # space of indented code.)
    if " \n" in t or "\t\n" in t:
        t = _TRAILING_RE.sub("\n", t)
    if "\n\n\n" in t:
        t = _MANY_NEWLINES_RE.sub("\n\n", t)
    t = t.strip()
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
# Language identification (py3langid: langid.py's naive Bayes over byte n-grams, 97 languages; the model
# ships inside the package, so nothing is downloaded; ~3 ms per 10k characters)
# ---------------------------------------------------------------------------------------------------

LANGID_MAX_CHARS = 10_000  # the first characters decide: enough for a stable answer, bounded time per document
_LANGID: list = []  # the identifier, loaded on first use in each process (about 2 s)


def _identifier() -> Any:
    if not _LANGID:
        try:
            from py3langid.langid import MODEL_FILE, LanguageIdentifier
        except ImportError as e:
            raise ImportError("sources[].languages needs py3langid: pip install py3langid") from e
        _LANGID.append(LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True))
    return _LANGID[0]


def supported_languages() -> list[str]:
    """The ISO 639-1 codes the identifier knows."""
    return sorted(set(_identifier().nb_classes))


def identify_language(text: str) -> tuple[str, float]:
    """``(language code, probability)`` of ``text``'s first ``LANGID_MAX_CHARS`` characters."""
    lang, prob = _identifier().classify(text[:LANGID_MAX_CHARS])
    return str(lang), float(prob)


# ---------------------------------------------------------------------------------------------------
# C4 line rules (Raffel et al. 2020, section 2.2, as datatrove's C4QualityFilter applies them)
# ---------------------------------------------------------------------------------------------------

_TERMINAL = (".", "!", "?", '"', "\u201d", "'", "\u2019")
_CITATION_RE = re.compile(r"\[\d+\]|\[edit\]|\[citation needed\]", re.IGNORECASE)
_POLICY = ("terms of use", "privacy policy", "cookie policy", "uses cookies", "use of cookies", "use cookies")
_SENTENCE_END_RE = re.compile(r"[.!?]+(?:[\"'\u201d\u2019)\]]*)(?=\s|$)")


def c4_lines(text: str, c4: C4Config) -> tuple[str, str | None, int]:
    """Apply C4's rules: returns ``(text with the failing lines removed, drop reason or None, lines removed)``.

    Page-level rules (lorem ipsum, ``{``, bad words) look at the whole text first; then each line is kept
    only if it ends in terminal punctuation, has enough words, no over-long word, no "javascript" and no
    policy notice; the page is dropped when fewer than ``min_sentences`` sentences remain.
    """
    lower = text.lower()
    if c4.drop_lorem_ipsum and "lorem ipsum" in lower:
        return text, "c4_lorem_ipsum", 0
    if c4.drop_curly_bracket and "{" in text:
        return text, "c4_curly_bracket", 0
    if c4.bad_words:
        words = set(re.findall(r"\w+", lower))
        if any(w.lower() in words for w in c4.bad_words):
            return text, "c4_bad_words", 0
    kept, removed = [], 0
    for line in text.split("\n"):
        if c4.remove_citations:
            line = _CITATION_RE.sub("", line)
        s = line.strip()
        low = s.lower()
        words = s.split()
        if not s:
            kept.append(line)  # paragraph breaks are not lines of content
            continue
        if ((c4.terminal_punctuation and not s.endswith(_TERMINAL))
                or len(words) < c4.min_words_per_line
                or any(len(w) > c4.max_word_length for w in words)
                or (c4.remove_javascript_lines and "javascript" in low)
                or (c4.remove_policy_lines and any(p in low for p in _POLICY))):
            removed += 1
            continue
        kept.append(line)
    out = "\n".join(kept).strip()
    out = re.sub(r"\n{3,}", "\n\n", out)
    if len(_SENTENCE_END_RE.findall(out)) < c4.min_sentences:
        return out, "c4_too_few_sentences", removed
    return out, None, removed


# ---------------------------------------------------------------------------------------------------
# PII
# ---------------------------------------------------------------------------------------------------
# Hand-written patterns, not presidio/scrubadub (both run an NLP model or a per-line plugin chain, orders
# of magnitude slower per document and a download at run time) nor detect-secrets (line-by-line plugins
# whose high-entropy detectors fire on every hash in code). Each kind below is tuned for precision on
# numeric and code text: numbers, hashes and slices are the substance of math and code corpora.

PII_KINDS = ("email", "phone", "ip", "card", "secret")
PLACEHOLDERS = {"email": "<EMAIL>", "phone": "<PHONE>", "ip": "<IP_ADDRESS>", "card": "<CARD_NUMBER>",
                "secret": "<SECRET>"}

_EMAIL_RE = re.compile(r"\b[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}\b")
# Speed: Python's ``re`` skips ahead quickly only to a pattern's first literal or character class; a pattern
# that opens with a look-behind or an optional group is tried at every character (IPv4, phones and e-mail were
# 60 % of the stage's scrubbing time on code). So the scanning patterns below open with "@" or a class, and the
# look-behinds of the patterns above them (the definitions, kept as the reference) are checked in Python on
# each candidate: the same matches, 5-20x faster on code (tests/unit/test_data_pii.py checks both agree).
_EMAIL_DOMAIN_RE = re.compile(r"@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}\b")
_EMAIL_LOCAL = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._%+-")
_WORD_CHAR_RE = re.compile(r"\w")
# A dotted quad right after "version", "release", "section", "chapter", "RFC" or "§" is a number, not an address.
_IPV4_NOT_AFTER_RE = re.compile(r"(?i)(?:version|release|section|chapter|rfc|\u00a7)\w*[^\w\n]{0,3}$")
_IPV4_RE = re.compile(r"(?<![\w.])(?:(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)\.){3}(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)(?![\w.])")
_IPV4_SCAN_RE = re.compile(r"\d\d{0,2}\.\d{1,3}\.\d{1,3}\.\d{1,3}(?![\w.])")
_IPV4_OCTET_RE = re.compile(r"25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d")
_NOT_BEFORE_IPV4_RE = re.compile(r"[\w.]")
# IPv6 candidates (full, compressed ``::``, IPv4-embedded, with a ``%zone``), validated by ``ipaddress``.
# (The patterns here start with a character class and check what precedes a match in Python: a leading
# look-behind keeps the regex engine from skipping ahead to candidate characters, 2-6x slower on code.)
_IPV6_RE = re.compile(
    r"[0-9A-Fa-f:](?:(?<=:)|[0-9A-Fa-f]{0,3}:)(?:[0-9A-Fa-f]{0,4}:){1,6}"
    r"(?:(?:\d{1,3}\.){3}\d{1,3}|[0-9A-Fa-f]{1,4}|(?<=::))(?:%[A-Za-z0-9_.\-]+)?(?![\w:]|\.\d)"
)
# Phone numbers need separators or a leading +: "+1 415 555 0132", "(415) 555-0132", "415-555-0132".
_PHONE_RE = re.compile(
    r"(?<![\w+])(?<!\d[ .-])(?:\+\d{1,3}[ .-]?)?(?:\(\d{2,4}\)[ .-]?|\d{2,4}[ .-])\d{3,4}[ .-]\d{3,4}"
    r"(?![\w]|[ .-]\d)"
)
_PHONE_SCAN_RE = re.compile(
    r"[+(\d](?:(?<=\+)\d{1,3}[ .-]?(?:\(\d{2,4}\)[ .-]?|\d{2,4}[ .-])|(?<=\()\d{2,4}\)[ .-]?|(?<=\d)\d{1,3}[ .-])"
    r"\d{3,4}[ .-]\d{3,4}(?![\w]|[ .-]\d)"
)
_NOT_BEFORE_PHONE_RE = re.compile(r"[\w+]|\d[ .-]")

# Card numbers: 13-19 digits, either in the groups printed on cards ("4111 1111 1111 1111", "3782-822463-10005")
# or ungrouped right after a card keyword ("card no: 4111111111111111"); never part of a decimal, a hex
# string, a longer number or a run of digit groups; then the issuer's prefix and length, then Luhn.
_CARD_GROUPED_RE = re.compile(
    r"\d\d{3}(?:(?P<s>[ -])\d{4}(?P=s)\d{4}(?P=s)\d{1,4}(?:(?P=s)\d{3})?"  # 4-4-4-4 (or 4-4-4-1..4, 4-4-4-4-3)
    r"|(?P<t>[ -])\d{6}(?P=t)\d{4,5})"                                       # Amex 4-6-5, Diners 4-6-4
    r"(?![\w]|[.,]\d|[ -]\d)"
)
_CARD_PLAIN_RE = re.compile(r"\d\d{12,18}(?![\w]|[.,]\d|[-/]\d)")
_CARD_NOT_AFTER = frozenset("._,+-/$#") | frozenset("0123456789")  # a decimal, a longer number, hex, a path
_CARD_CONTEXT_RE = re.compile(
    r"(?i)(?:card|credit|debit|visa|master ?card|amex|american express|discover|diners|jcb|unionpay|maestro"
    r"|\bcc\b|\bccn\b|\bpan\b|payment)[^\n\d]{0,24}$"
)
# (IIN prefix range low, high, prefix digits, allowed lengths) per brand (ISO/IEC 7812 issuer ranges).
_CARD_BRANDS = (
    ("visa", 4, 4, 1, (13, 16, 19)),
    ("mastercard", 51, 55, 2, (16,)),
    ("mastercard", 2221, 2720, 4, (16,)),
    ("amex", 34, 34, 2, (15,)),
    ("amex", 37, 37, 2, (15,)),
    ("diners", 300, 305, 3, (14, 16, 19)),
    ("diners", 36, 36, 2, (14, 16, 19)),
    ("diners", 38, 39, 2, (14, 16, 19)),
    ("discover", 6011, 6011, 4, (16, 19)),
    ("discover", 644, 649, 3, (16, 19)),
    ("discover", 65, 65, 2, (16, 19)),
    ("jcb", 3528, 3589, 4, (16, 17, 18, 19)),
    ("unionpay", 62, 62, 2, (16, 17, 18, 19)),
    ("maestro", 5018, 5018, 4, (12, 13, 14, 15, 16, 17, 18, 19)),
    ("maestro", 5020, 5020, 4, (12, 13, 14, 15, 16, 17, 18, 19)),
    ("maestro", 5038, 5038, 4, (12, 13, 14, 15, 16, 17, 18, 19)),
    ("maestro", 6304, 6304, 4, (12, 13, 14, 15, 16, 17, 18, 19)),
    ("maestro", 6759, 6759, 4, (12, 13, 14, 15, 16, 17, 18, 19)),
)

# Secrets: the formats of the common providers (as in gitleaks' rules), private key blocks, JWTs, and
# ``api_key = "..."``-style assignments whose value looks random (Shannon entropy, letters and digits).
_PRIVATE_KEY_BEGIN_RE = re.compile(r"-----BEGIN[A-Z0-9 ]*PRIVATE KEY(?: BLOCK)?-----[ \t]*\r?\n")
_PRIVATE_KEY_BODY_RE = re.compile(r"(?:(?:Proc-Type|DEK-Info|Comment):[^\n]*|[ \t]*[A-Za-z0-9+/=]+[ \t]*)(?:\r?\n|$)")
_PRIVATE_KEY_END_RE = re.compile(r"-----END[A-Z0-9 ]*PRIVATE KEY(?: BLOCK)?-----")
_SECRET_TOKEN_RE = re.compile(
    r"(?:A(?:KIA|SIA|BIA|CCA|3T[A-Z0-9])[A-Z0-9]{16}"  # AWS access key id
    r"|gh[pousr]_[A-Za-z0-9]{36,255}|github_pat_[A-Za-z0-9_]{22,255}"  # GitHub tokens
    r"|sk-(?:proj-|ant-(?:api\d\d-)?|svcacct-)?[A-Za-z0-9_\-]{20,}"  # OpenAI, Anthropic
    r"|[sr]k_(?:live|test)_[A-Za-z0-9]{16,}"  # Stripe
    r"|xox[abposr]-[A-Za-z0-9-]{10,}"  # Slack
    r"|AIza[0-9A-Za-z_\-]{35}"  # Google API key
    r"|eyJ[A-Za-z0-9_-]{8,}\.eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,})"  # JWT (base64 of '{"' twice)
    r"(?![A-Za-z0-9_-])"
)
# Every ``_SECRET_TOKEN_RE`` match starts with one of these: a text holding none is not scanned.
_SECRET_TOKEN_PREFIXES = ("AKIA", "ASIA", "ABIA", "ACCA", "A3T", "ghp_", "gho_", "ghu_", "ghs_", "ghr_", "github_pat_",
                          "sk-", "sk_live_", "sk_test_", "rk_live_", "rk_test_", "xox", "AIza", "eyJ")
_TOKEN_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-")
_KEY_CHARS = r"A-Za-z0-9+/=_\-.~"
_SECRET_ASSIGN_RE = re.compile(
    r"(?P<name>[aAsStTpPcC](?i:(?<=a)pi[_\-]?key|(?<=a)pikey|(?<=s)ecret|(?<=t)oken|(?<=p)assw(?:or)?d"
    r"|(?<=a)ccess[_\-]?key|(?<=a)uth[_\-]?key|(?<=p)rivate[_\-]?key|(?<=c)redentials?)"
    r"[\w.\-]*[\"']?\s*(?::=|=>|[:=])\s*)"
    rf"(?:(?P<q>[\"'`])(?P<qv>[{_KEY_CHARS}]{{20,256}})(?P=q)|(?P<v>[{_KEY_CHARS}]{{20,256}})(?![{_KEY_CHARS}(\[]))"
)
_SECRET_MIN_ENTROPY = 3.5  # bits per character: random base64/hex keys are 3.7-6, words and names below
_DOTTED_NAME_RE = re.compile(r"[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)+")
_WORD_SEGMENT_RE = re.compile(r"(?<![A-Za-z0-9])[a-z]{3,}(?![A-Za-z0-9])")


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


def card_brand(digits: str) -> str | None:
    """The brand whose issuer prefix and length ``digits`` match (Luhn not checked), or None."""
    n = len(digits)
    for brand, lo, hi, k, lengths in _CARD_BRANDS:
        if n in lengths and lo <= int(digits[:k]) <= hi:
            return brand
    return None


def is_card_number(digits: str) -> bool:
    """Issuer prefix and length of a known brand, and a valid Luhn check digit."""
    return card_brand(digits) is not None and _luhn_ok(digits)


def shannon_entropy(s: str) -> float:
    """Bits per character of ``s``'s character distribution."""
    if not s:
        return 0.0
    n = len(s)
    return -sum(c / n * math.log2(c / n) for c in Counter(s).values())


def _looks_random(value: str, quoted: bool) -> bool:
    """A value that reads like a generated key: letters and digits, high entropy, not words joined by
    separators (``self.backend.list_tags``, ``mock_access_key/20220524/us-east-1``) nor a code name
    (``PKCS7PrivateKeyTypes`` has one digit; an unquoted key of 20+ random characters has several)."""
    digits = sum(c.isdigit() for c in value)
    if not quoted and _DOTTED_NAME_RE.fullmatch(value):
        return False  # ``ed25519.Ed25519PrivateKey``: a name in code, not a value
    return (digits >= (1 if quoted else 2) and any(c.isalpha() for c in value)
            and len(_WORD_SEGMENT_RE.findall(value)) < 2 and shannon_entropy(value) >= _SECRET_MIN_ENTROPY)


def _private_key_spans(text: str) -> list[tuple[int, int]]:
    """BEGIN ... PRIVATE KEY blocks: the header, the base64 body lines and the END line when present (a cut
    block is scrubbed to the end of its body); a header with no body (code naming the marker) is left."""
    spans, pos = [], 0
    while (m := _PRIVATE_KEY_BEGIN_RE.search(text, pos)) is not None:
        end, body = m.end(), 0
        while end < len(text) and (b := _PRIVATE_KEY_BODY_RE.match(text, end)) is not None and b.end() > end:
            if _PRIVATE_KEY_END_RE.match(text, end):
                break
            body += len(b.group(0).strip())
            end = b.end()
        if (e := _PRIVATE_KEY_END_RE.match(text, end)) is not None:
            end = e.end()
        if body >= 32:
            spans.append((m.start(), end))
        pos = max(end, m.end())
    return spans


def _scrub_secrets(text: str) -> tuple[str, int]:
    n = 0
    if "PRIVATE KEY" in text:
        spans = _private_key_spans(text)
        for start, end in reversed(spans):
            text = text[:start] + PLACEHOLDERS["secret"] + text[end:]
        n += len(spans)

    def token(m: re.Match) -> str:
        nonlocal n
        if m.start() > 0 and text[m.start() - 1] in _TOKEN_CHARS:
            return m.group(0)  # the tail of a longer word, not a token
        n += 1
        return PLACEHOLDERS["secret"]

    if any(h in text for h in _SECRET_TOKEN_PREFIXES):
        text = _SECRET_TOKEN_RE.sub(token, text)

    def assign(m: re.Match) -> str:
        nonlocal n
        quoted = m.group("qv") is not None
        value = m.group("qv") if quoted else m.group("v")
        if value == PLACEHOLDERS["secret"] or not _looks_random(value, quoted):
            return m.group(0)
        n += 1
        q = m.group("q") or ""
        return f"{m.group('name')}{q}{PLACEHOLDERS['secret']}{q}"

    return _SECRET_ASSIGN_RE.sub(assign, text), n


def _scrub_cards(text: str) -> tuple[str, int]:
    n = 0

    def after_number(m: re.Match) -> bool:
        s = m.start()
        return s > 0 and (text[s - 1] in _CARD_NOT_AFTER or text[s - 1].isalpha()
                          or (s > 1 and text[s - 1] in " -" and text[s - 2].isdigit()))

    def grouped(m: re.Match) -> str:
        nonlocal n
        if not after_number(m) and is_card_number(re.sub(r"\D", "", m.group(0))):
            n += 1
            return PLACEHOLDERS["card"]
        return m.group(0)

    def plain(m: re.Match) -> str:
        nonlocal n
        # Ungrouped digits are everywhere in numeric text; a card needs a card word just before it.
        if not after_number(m) and is_card_number(m.group(0)) and _CARD_CONTEXT_RE.search(text, max(0, m.start() - 48), m.start()):
            n += 1
            return PLACEHOLDERS["card"]
        return m.group(0)

    text = _CARD_GROUPED_RE.sub(grouped, text)
    return _CARD_PLAIN_RE.sub(plain, text), n


def _sub_counted(pattern: re.Pattern, text: str, accept: Callable[[re.Match], bool], kind: str) -> tuple[str, int]:
    """``pattern.sub`` with ``kind``'s placeholder where ``accept(match)``; returns the text and the count."""
    n = 0

    def one(m: re.Match) -> str:
        nonlocal n
        if not accept(m):
            return m.group(0)
        n += 1
        return PLACEHOLDERS[kind]

    return pattern.sub(one, text), n


def _scrub_ipv4(text: str) -> tuple[str, int]:
    """``_IPV4_RE``'s matches (not after "version" and the like), found with ``_IPV4_SCAN_RE``."""

    def accept(m: re.Match) -> bool:
        s = m.start()
        return not ((s and _NOT_BEFORE_IPV4_RE.match(text, s - 1))
                    or not all(_IPV4_OCTET_RE.fullmatch(o) for o in m.group(0).split("."))
                    or _IPV4_NOT_AFTER_RE.search(text, max(0, s - 24), s))

    return _sub_counted(_IPV4_SCAN_RE, text, accept, "ip")


def _scrub_phones(text: str) -> tuple[str, int]:
    """``_PHONE_RE``'s matches, found with ``_PHONE_SCAN_RE`` and its look-behinds checked here."""

    def accept(m: re.Match) -> bool:
        s = m.start()
        return not ((s and _NOT_BEFORE_PHONE_RE.match(text, s - 1, s))
                    or (s > 1 and _NOT_BEFORE_PHONE_RE.fullmatch(text, s - 2, s)))

    return _sub_counted(_PHONE_SCAN_RE, text, accept, "phone")


def _scrub_emails(text: str) -> tuple[str, int]:
    """``_EMAIL_RE``'s matches: each "@domain" found with ``_EMAIL_DOMAIN_RE``, then the local part is the
    run of address characters before the "@", from its first word boundary (the ``\\b`` of ``_EMAIL_RE``),
    never reaching back into the previous match."""
    out, last, n = [], 0, 0
    for m in _EMAIL_DOMAIN_RE.finditer(text):
        at = m.start()
        r = at
        while r > last and text[r - 1] in _EMAIL_LOCAL:
            r -= 1
        p = next((q for q in range(r, at) if _word_boundary(text, q)), None)
        if p is None:
            continue
        out.append(text[last:p])
        out.append(PLACEHOLDERS["email"])
        last = m.end()
        n += 1
    if not n:
        return text, 0
    out.append(text[last:])
    return "".join(out), n


def _word_boundary(text: str, i: int) -> bool:
    """``\\b`` at index ``i`` (0 < i < len(text) or at an end next to a word character)."""
    before = i > 0 and _WORD_CHAR_RE.match(text, i - 1) is not None
    after = i < len(text) and _WORD_CHAR_RE.match(text, i) is not None
    return before != after


def _scrub_ipv6(text: str) -> tuple[str, int]:
    n = 0

    def one(m: re.Match) -> str:
        nonlocal n
        s, start = m.group(0), m.start()
        # Not after a word character, ":" or "." (C++ ``a::b``), nor after ``x[`` (a slice ``x[1::2]``).
        before = text[start - 1] if start else " "
        if before.isalnum() or before in "_:." or (before == "[" and start > 1 and (
                text[start - 2].isalnum() or text[start - 2] in "_])")):
            return s
        addr = s.split("%", 1)[0]
        # A digit is required: hex-only words around "::" are C++/Rust paths (``dead::beef``), not addresses;
        # a lone "::" or "::2" is a slice (``x[:, ::2]``); "::1" (loopback) is the exception.
        if not any(c.isdigit() for c in addr) or (len([g for g in addr.split(":") if g]) < 2 and addr != "::1"):
            return s
        # x[:, 1::2] and [::1]:8080 both end in "]": only the bracketed URL form counts there.
        end = m.end()
        if end < len(text) and text[end] == "]" and not (m.start() > 0 and text[m.start() - 1] == "["):
            return s
        try:
            ipaddress.IPv6Address(s)
        except ValueError:
            return s
        n += 1
        return PLACEHOLDERS["ip"]

    return _IPV6_RE.sub(one, text), n


def scrub_pii(text: str, cfg: PIIConfig) -> tuple[str, dict[str, int]]:
    """Replace PII spans with typed placeholders; returns the text and how many of each kind were replaced."""
    counts = dict.fromkeys(PII_KINDS, 0)
    if not cfg.enabled:
        return text, counts
    kinds = set(cfg.kinds)
    # Secrets first: a key or token may hold digit runs or an "@" that the other kinds would cut apart.
    if "secret" in kinds:
        text, counts["secret"] = _scrub_secrets(text)
    if "email" in kinds and "@" in text:
        text, counts["email"] = _scrub_emails(text)
    if "card" in kinds:
        text, counts["card"] = _scrub_cards(text)
    if "ip" in kinds:
        n6 = 0
        if ":" in text:  # IPv6 first: "::ffff:192.0.2.1" is one address, not a prefix and an IPv4
            text, n6 = _scrub_ipv6(text)
        text, n4 = _scrub_ipv4(text)
        counts["ip"] = n4 + n6
    if "phone" in kinds:
        text, counts["phone"] = _scrub_phones(text)
    return text, counts
