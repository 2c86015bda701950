"""Cleaning: normalisation, gigantic documents, Gopher/C4 quality heuristics (PII: test_data_pii.py)."""

from __future__ import annotations

import pytest

from r1ray.data.clean import (
    EDIT_CONTROL,
    EDIT_UNICODE,
    EDIT_WHITESPACE,
    normalize,
    quality_reason,
    split_oversize,
)
from r1ray.data.config import QualityConfig

PROSE = (
    "The committee met on Tuesday to review the proposal for the new library building. Several members "
    "raised concerns about the budget, while others argued that the town needed a modern space for "
    "reading, study and community events. After a long discussion they agreed to ask the architects for "
    "a revised plan that would reduce costs without giving up the children's wing."
)


def test_normalize_unicode_control_whitespace_each_flagged():
    text, flags = normalize("Cafe\u0301  au\tlait\r\n\r\n\r\n\x00next\u200b line   \n")
    assert text == "Caf\u00e9 au lait\n\nnext line"
    assert flags == EDIT_UNICODE | EDIT_CONTROL | EDIT_WHITESPACE
    assert normalize("clean text")[1] == 0


def test_normalize_keeps_code_indentation_when_asked():
    code = "def f(x):\n    return x  \n\n\n\n# end"
    text, _ = normalize(code, collapse_whitespace=False)
    assert text == "def f(x):\n    return x\n\n# end"
    assert normalize(code)[0] == "def f(x):\n return x\n\n# end"


def test_lone_surrogates_are_removed():
    text, flags = normalize("ok \ud800 fine")
    assert text == "ok fine" and flags & EDIT_CONTROL
    text.encode("utf-8")


def test_split_oversize_bounds_and_keeps_content():
    doc = "\n".join(f"line {i} " + "word " * 30 for i in range(200))
    parts = split_oversize(doc, 1000)
    assert all(len(p) <= 1000 for p in parts) and len(parts) > 20
    assert "".join(parts).replace("\n", "").replace(" ", "") == doc.replace("\n", "").replace(" ", "")


@pytest.mark.parametrize(
    "text, reason",
    [
        ("too short to keep", "too_few_words"),
        ("a b c d e f g h i j k l m n o p q r s t u v w x y z " * 2, "mean_word_length"),
        (PROSE + " #tag" * 30, "symbol_ratio"),
        (" ".join(["12345 67890 3.14159 42"] * 20), "alpha_words"),
        ("\n".join(["the same line of text repeated here"] * 10 + [PROSE]), "duplicate_lines"),
        ("\n".join([f"a sentence that trails off number {i}..." for i in range(10)]), "symbol_ratio"),
        (PROSE + " " + "buy cheap now " * 40, "top_2gram"),
    ],
)
def test_quality_heuristics_name_the_failing_rule(text, reason):
    assert quality_reason(text, QualityConfig()) == reason


def test_quality_passes_ordinary_prose_and_thresholds_are_configurable():
    assert quality_reason(PROSE, QualityConfig()) is None
    assert quality_reason(PROSE, QualityConfig(min_words=500)) == "too_few_words"
    ellipsis = "\n".join([f"a sentence that trails off at number{i}…" for i in range(10)])
    assert quality_reason(ellipsis, QualityConfig(max_symbol_ratio=1.0)) == "ellipsis_lines"


def test_duplicate_ngram_rule():
    block = "alpha beta gamma delta epsilon zeta eta theta iota kappa"
    text = PROSE + " " + " ".join([block] * 4)
    q = QualityConfig(max_top_ngram_fraction={})
    assert quality_reason(text, q) == "duplicate_5gram"


# ---- C4 line rules

C4_PAGE = (
    "Home | About | Contact\n"
    "The committee met on Tuesday to review the proposal for the library.[1] Members raised concerns.\n"
    "Please enable JavaScript in your browser to view this page properly.\n"
    "Several members argued that the town needed a modern space for reading and study.\n"
    "This site uses cookies to improve your experience, see our cookie policy.\n"
    "Short line.\n"
    "After a long discussion they agreed to ask the architects for a revised plan[citation needed].\n"
    "Read more"
)


def test_c4_line_rules_remove_exactly_the_failing_lines():
    from r1ray.data.clean import c4_lines
    from r1ray.data.config import C4Config

    out, reason, removed = c4_lines(C4_PAGE, C4Config())
    assert reason is None and removed == 5
    assert out == (
        "The committee met on Tuesday to review the proposal for the library. Members raised concerns.\n"
        "Several members argued that the town needed a modern space for reading and study.\n"
        "After a long discussion they agreed to ask the architects for a revised plan."
    )
    # Each rule can be turned off on its own.
    out, _, removed = c4_lines(C4_PAGE, C4Config(remove_javascript_lines=False))
    assert removed == 4 and "JavaScript" in out


@pytest.mark.parametrize("text, reason", [
    (PROSE + " Lorem ipsum dolor sit amet.", "c4_lorem_ipsum"),
    (PROSE + " function f() { return 1; }", "c4_curly_bracket"),
    (PROSE + " What a frobnicating mess.", "c4_bad_words"),
    ("One sentence that has more than five words.\nAnother sentence that is long enough here.",
     "c4_too_few_sentences"),
])
def test_c4_page_rules_drop_with_their_reason(text, reason):
    from r1ray.data.clean import c4_lines
    from r1ray.data.config import C4Config

    assert c4_lines(text, C4Config(bad_words=["frobnicating"]))[1] == reason
    assert c4_lines(PROSE, C4Config(bad_words=["frobnicating"]))[1] is None


# ---- language identification (py3langid's bundled model)

def test_language_identification_with_the_bundled_model():
    pytest.importorskip("py3langid")
    from r1ray.data.clean import identify_language, supported_languages

    assert identify_language(PROSE)[0] == "en" and identify_language(PROSE)[1] > 0.9
    fr = "Le comité s'est réuni mardi pour examiner la proposition de nouvelle bibliothèque municipale."
    de = "Der Ausschuss trat am Dienstag zusammen, um den Vorschlag für die neue Bibliothek zu prüfen."
    assert identify_language(fr)[0] == "fr" and identify_language(de)[0] == "de"
    assert {"en", "fr", "de", "zh"} <= set(supported_languages())


def test_language_codes_are_checked_in_the_config():
    from r1ray.data.config import SourceConfig

    with pytest.raises(ValueError, match="lower-case ISO 639-1"):
        SourceConfig(name="w", path="x", languages=["English"])
    with pytest.raises(ValueError, match="lower-case ISO 639-1"):
        SourceConfig(name="w", path="x", languages=[])
    assert SourceConfig(name="w", path="x", languages=["en", "fr"]).min_language_prob == 0.5
