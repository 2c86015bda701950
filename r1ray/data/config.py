"""The data stage's config (import-light: pydantic only, so a typo fails in well under 2 s).

``python jobs/prepare_data.py`` with no arguments prepares the default corpus (the Python standard
library's own source plus generated R1-style reasoning samples) into ``<storage.root>/data/default``.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from r1ray.config import JobConfig, R1Config, StorageConfig

__all__ = [
    "SourceConfig",
    "CleanConfig",
    "QualityConfig",
    "C4Config",
    "PIIConfig",
    "DedupConfig",
    "DecontamConfig",
    "TokenizerConfig",
    "PackConfig",
    "PrepareDataConfig",
    "DEFAULT_SOURCES",
]

SourceFormat = Literal["auto", "jsonl", "parquet", "text", "hf_disk", "python_stdlib", "reasoning"]


class SourceConfig(R1Config):
    """One input corpus. Every row it yields carries ``name`` as its source tag."""

    name: str
    """Source tag carried on every row and used for per-source counts (unique among sources)."""
    path: str = ""
    """A file, a folder (read recursively), or a glob; local path or object-store URI (``s3://...``).
    Unused by the ``python_stdlib`` and ``reasoning`` formats."""
    format: SourceFormat = "auto"
    """``jsonl`` (also ``.gz``/``.zst``), ``parquet``, ``text`` (plain files), ``hf_disk`` (a Hugging Face
    ``datasets`` folder written by ``save_to_disk``), ``python_stdlib`` (this Python's own library source,
    offline everywhere), ``reasoning`` (generated arithmetic problems with worked ``<think>`` solutions).
    ``auto`` picks from the file extension."""
    text_field: str = "text"
    """Column/key holding the document text (jsonl, parquet, hf_disk)."""
    id_field: str | None = None
    """Column/key holding the source's own document id (jsonl, parquet, hf_disk), reported beside the
    position in the ``duplicates/`` audit dataset; rows without it report no id."""
    text_unit: Literal["file", "line"] = "file"
    """For ``text`` sources: one document per file, or one per non-empty line."""
    weight: float | None = Field(default=None, gt=0)
    """Target share of training tokens for domain mixing (weights are normalised over sources). Unset on
    every source: the natural mix. Set on one source: set on all."""
    max_bytes: int | None = Field(default=None, ge=1)
    """Read at most this many input bytes from this source (files in sorted order, whole files)."""
    num_docs: int = Field(default=20_000, ge=1)
    """``reasoning`` only: how many samples to generate (deterministic from ``seed``)."""
    chat_fraction: float = Field(default=0.0, ge=0, le=1)
    """``reasoning`` only: the share of documents rendered as chat conversations (the model's chat template, the
    user turn and format instruction that SFT and GRPO prompt with) instead of ``Question: ...`` text, drawn per
    document; the way current pretraining mixes hold instruction-formatted data."""
    quality_filters: bool = True
    """Apply the Gopher/C4-style quality heuristics to this source (turn off for code and generated text)."""
    collapse_whitespace: bool = True
    """Collapse runs of spaces/tabs inside lines (turn off for code, where indentation is meaning)."""
    languages: list[str] | None = None
    """Keep only documents identified as one of these languages (ISO 639-1 codes such as ``en``, ``fr``; by
    py3langid, whose 97-language model ships inside the package: nothing is downloaded) with probability
    ``>= min_language_prob``; the others are filtered (reason ``language``). Unset: no identification."""
    min_language_prob: float = Field(default=0.5, ge=0, le=1)
    """Lowest identification probability a document of an accepted language needs."""
    c4_rules: bool = False
    """Apply C4's line-level rules (``clean.c4``) to this source, before the quality heuristics: for web
    pages; they would cut code, lists and hard-wrapped book lines."""

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not v or not all(c.isalnum() or c in "-_." for c in v):
            raise ValueError(f"source name must be non-empty letters/digits/-_. (got {v!r})")
        return v

    @model_validator(mode="after")
    def _path_needed(self) -> SourceConfig:
        if self.format not in ("python_stdlib", "reasoning") and not self.path:
            raise ValueError(f"source {self.name!r} needs a path (format {self.format!r} reads files)")
        if self.languages is not None and (not self.languages or not all(
                len(c) in (2, 3) and c.isalpha() and c.islower() for c in self.languages)):
            raise ValueError(f"source {self.name!r}: languages must be lower-case ISO 639-1 codes such as "
                             f"['en', 'fr'] (got {self.languages!r})")
        if self.id_field is not None and self.format in ("text", "python_stdlib", "reasoning"):
            raise ValueError(f"source {self.name!r}: id_field is for jsonl, parquet and hf_disk rows; format "
                             f"{self.format!r} has no fields (unset id_field)")
        return self


class QualityConfig(R1Config):
    """Gopher/C4-style quality heuristics (applied to sources with ``quality_filters: true``)."""

    min_words: int = Field(default=20, ge=0)
    """Drop documents with fewer words."""
    min_mean_word_length: float = Field(default=3.0, ge=0)
    """Drop documents whose mean word length is below this (Gopher: 3)."""
    max_mean_word_length: float = Field(default=10.0, gt=0)
    """Drop documents whose mean word length is above this (Gopher: 10)."""
    max_symbol_ratio: float = Field(default=0.1, ge=0)
    """Drop documents with more ``#``/``...``/``…`` than this per word (Gopher: 0.1)."""
    min_alpha_word_fraction: float = Field(default=0.8, ge=0, le=1)
    """Drop documents where fewer words than this contain a letter (Gopher: 0.8)."""
    max_duplicate_line_fraction: float = Field(default=0.3, ge=0, le=1)
    """Drop documents where more than this share of lines are repeats of an earlier line (Gopher: 0.3)."""
    max_ellipsis_line_fraction: float = Field(default=0.3, ge=0, le=1)
    """Drop documents where more than this share of lines end with an ellipsis (Gopher: 0.3)."""
    max_top_ngram_fraction: dict[int, float] = Field(default_factory=lambda: {2: 0.2, 3: 0.18, 4: 0.16})
    """n -> most characters the single most frequent word n-gram may cover (Gopher: 0.20/0.18/0.16)."""
    max_duplicate_ngram_fraction: dict[int, float] = Field(default_factory=lambda: {5: 0.15, 10: 0.10})
    """n -> most characters covered by word n-grams that occur more than once (Gopher: 5: 0.15 ... 10: 0.10)."""


class C4Config(R1Config):
    """C4's line-level rules (Raffel et al. 2020, section 2.2; as datatrove's ``C4QualityFilter``), applied to
    the sources with ``c4_rules: true``. Tuned for web pages: they remove code, lists, tables and hard-wrapped
    lines, so no source has them by default."""

    terminal_punctuation: bool = True
    """Keep only lines ending in a terminal punctuation mark (``. ! ? "`` and closing quotes)."""
    min_words_per_line: int = Field(default=5, ge=0)
    """Remove lines with fewer words (C4: 5)."""
    max_word_length: int = Field(default=1000, ge=1)
    """Remove lines holding a word longer than this (characters)."""
    remove_javascript_lines: bool = True
    """Remove lines mentioning "javascript" (the "enable JavaScript" notices of scraped pages)."""
    remove_policy_lines: bool = True
    """Remove lines mentioning terms of use, privacy or cookie policies, or cookie use."""
    remove_citations: bool = True
    """Strip Wikipedia-style citation markers: ``[1]``, ``[12]``, ``[edit]``, ``[citation needed]``."""
    min_sentences: int = Field(default=3, ge=0)
    """Drop documents with fewer sentences left after the line rules (reason ``c4_too_few_sentences``)."""
    drop_lorem_ipsum: bool = True
    """Drop documents containing "lorem ipsum" (placeholder pages; reason ``c4_lorem_ipsum``)."""
    drop_curly_bracket: bool = True
    """Drop documents containing ``{`` (code in prose pages; reason ``c4_curly_bracket``)."""
    bad_words: list[str] = Field(default_factory=list)
    """Drop documents containing any of these words (case-insensitive, whole words; reason ``c4_bad_words``).
    C4 used the LDNOOBW list; none is bundled here, give yours."""


class PIIConfig(R1Config):
    """PII scrubbing: spans replaced by typed placeholders such as ``<EMAIL>``."""

    enabled: bool = True
    """Scrub PII at all."""
    kinds: tuple[Literal["email", "phone", "ip", "card", "secret"], ...] = ("email", "phone", "ip", "card", "secret")
    """Which kinds to replace: ``card`` needs a brand's issuer prefix and length, a valid Luhn digit and the
    printed grouping (or a card word just before ungrouped digits); ``secret`` is API keys and tokens of the
    common providers, private key blocks, JWTs and ``api_key = "..."`` assignments of random-looking values."""


class CleanConfig(R1Config):
    """Normalisation, length limits and filters applied to every document."""

    unicode_form: Literal["NFC", "NFKC", "none"] = "NFC"
    """Unicode normalisation form."""
    min_chars: int = Field(default=1, ge=1)
    """Drop (as filtered, reason ``too_short``) documents shorter than this after cleaning."""
    max_chars: int = Field(default=200_000, ge=100)
    """Documents longer than this (characters) are handled by ``oversize``."""
    oversize: Literal["split", "truncate", "reject"] = "split"
    """Gigantic documents: split into ``max_chars`` pieces (each piece a document), truncate, or reject."""
    max_line_bytes: int = Field(default=64 << 20, ge=1024)
    """jsonl/text lines longer than this (bytes) are rejected unread, so one bad line cannot exhaust memory."""
    quality: QualityConfig = QualityConfig()
    """Quality heuristics."""
    c4: C4Config = C4Config()
    """C4's line-level rules, for the sources with ``c4_rules: true``."""
    pii: PIIConfig = PIIConfig()
    """PII scrubbing."""


class DedupConfig(R1Config):
    """Exact and MinHash-LSH near-duplicate removal across the whole corpus (first document kept)."""

    exact: bool = True
    """Drop documents whose normalised content (NFKC, lower case, whitespace collapsed) hashes equal."""
    near: bool = True
    """Drop near-duplicates found with MinHash LSH."""
    shingle_size: int = Field(default=5, ge=1)
    """Word n-gram size of the shingles."""
    num_perm: int = Field(default=128, ge=8)
    """MinHash permutations (signature length); must equal bands x rows."""
    bands: int = Field(default=32, ge=1)
    """LSH bands. With ``rows`` it sets the S-curve: a pair at Jaccard J becomes a candidate with probability
    1 - (1 - J^rows)^bands; 32 x 4 finds pairs at J = 0.8 with probability ~1.0 (16 x 8: 0.95), and the extra
    dissimilar candidates are dropped on their signature estimate before any verification (docs/data.md)."""
    rows: int = Field(default=4, ge=1)
    """Rows per LSH band."""
    threshold: float = Field(default=0.8, gt=0, le=1)
    """Jaccard similarity of word-shingle sets a candidate pair needs to count as duplicate."""
    verify: bool = True
    """Accept candidate pairs on their true shingle Jaccard (the pair's staged texts are shingled again on
    the driver; only pairs whose signature estimate is within 4 standard errors of the threshold). False:
    accept on the signatures' estimate, which loses or adds pairs near the threshold to estimator noise."""
    seed: int = 1
    """Seed of the MinHash permutations (fixed so the same corpus always dedups the same way)."""
    cluster_above: int = Field(default=2_000_000, ge=0)
    """Past this many documents (after exact dedup), near-duplicates are matched by Ray tasks across the
    cluster (band keys shuffled by hash, pairs scored where they land) instead of on the driver, which then
    holds no band keys or signatures (768 bytes a document at 32 x 4); the decisions are the same. 0: always."""

    @model_validator(mode="after")
    def _check(self) -> DedupConfig:
        if self.bands * self.rows != self.num_perm:
            raise ValueError(
                f"dedup.bands x dedup.rows must equal dedup.num_perm ({self.bands} x {self.rows} != "
                f"{self.num_perm}); e.g. num_perm={self.bands * self.rows}"
            )
        return self


class DecontamConfig(R1Config):
    """Drop documents that share a long word n-gram with evaluation files."""

    eval_files: list[str] = Field(default_factory=list)
    """Evaluation files (jsonl with ``eval_text_fields``, or plain text) whose n-grams must not leak."""
    eval_text_fields: list[str] = Field(default_factory=lambda: ["text", "question", "problem", "answer"])
    """jsonl keys whose values are read from the evaluation files."""
    ngram: int = Field(default=13, ge=3)
    """n of the shared word n-gram (13 as in GPT-3's decontamination)."""


class TokenizerConfig(R1Config):
    """Train a byte-level BPE on a sample of the cleaned corpus, or load one."""

    path: str | None = None
    """Load this tokenizer directory instead of training (it must hold tokenizer.json and an EOS token)."""
    vocab_size: int = Field(default=2048, ge=300)
    """Vocabulary size of the trained BPE (its special tokens included); the 4 reasoning tokens are added
    on top, so the tokenizer holds ``vocab_size + 4`` ids."""
    sample_chars: int = Field(default=2_000_000, ge=1000)
    """Characters of kept documents (spread over the corpus deterministically) to train on."""
    split_digits: bool = True
    """Split numbers into single digits before BPE (as Llama, DeepSeek and Qwen do), so no token holds two digits
    and arithmetic is done digit by digit; false: BPE merges digits like any other characters (numbers below ~1000
    become single tokens on the default corpus, and each sum a lookup in a table of thousands of facts)."""


class PackConfig(R1Config):
    """Packing into fixed-length sequences and Parquet shards."""

    seq_len: int = Field(default=256, ge=8)
    """Tokens per packed row (documents joined with EOS, then cut)."""
    validation_fraction: float = Field(default=0.02, ge=0, lt=1)
    """Share of each source's kept text that goes to the validation split: whole documents, chosen in the
    order of a hash of their id and the seed, until the source's share of characters is reached."""
    test_fraction: float = Field(default=0.0, ge=0, lt=1)
    """Share of each source's kept text held out as the ``test`` split (never trained on, never used for
    validation), chosen like validation from an independent hash of the document id."""
    max_shard_bytes: int = Field(default=32 << 20, ge=1024)
    """Upper bound of one shard's raw token bytes (rows x seq_len x 4)."""


DEFAULT_SOURCES = [
    SourceConfig(
        name="python_stdlib", format="python_stdlib", max_bytes=1_500_000, quality_filters=False,
        collapse_whitespace=False,
    ),
    SourceConfig(name="reasoning", format="reasoning", num_docs=24_000, chat_fraction=0.5, quality_filters=False),
]


class PrepareDataConfig(JobConfig):
    """Prepare a corpus: read sources, clean, dedup, scrub PII, decontaminate, tokenize and pack into
    Parquet shards with a manifest, streaming on Ray Data."""

    seed: int = 0
    """Seed of every random choice (generated samples, train/validation split, mixing)."""
    run_name: str = "default"
    """Artifact name: the output goes to ``<storage.root>/data/<run_name>`` unless ``output`` is set."""
    output: str | None = None
    """Explicit artifact directory (local path or URI); overrides ``run_name``."""
    overwrite: bool = True
    """Replace an existing artifact at the output (its manifest is removed first, so it is never half-valid)."""
    sources: list[SourceConfig] = Field(default_factory=lambda: list(DEFAULT_SOURCES))
    """Input corpora, read in this order (the order decides which duplicate is kept: the first)."""
    clean: CleanConfig = CleanConfig()
    """Cleaning, quality heuristics and PII."""
    dedup: DedupConfig = DedupConfig()
    """Exact and near-duplicate removal."""
    decontam: DecontamConfig = DecontamConfig()
    """Evaluation-set decontamination."""
    tokenizer: TokenizerConfig = TokenizerConfig()
    """Tokenizer training or loading."""
    pack: PackConfig = PackConfig()
    """Sequence packing and shards."""
    batch_size: int = Field(default=512, ge=1)
    """Documents per Ray Data batch in the cleaning and tokenizing tasks."""
    read_chunk_bytes: int = Field(default=4 << 20, ge=4096)
    """An uncompressed local jsonl or line-text file bigger than this is read as several tasks of about this
    many bytes, cut at line ends, so one big file is cleaned on every CPU (compressed and remote files are
    read whole, one task per file)."""
    keep_work_dir: bool = False
    """Keep ``<output>/_work`` (the cleaned, staged text) after the run, for inspection."""

    @model_validator(mode="after")
    def _check(self) -> PrepareDataConfig:
        problems = []
        if not self.sources:
            problems.append("sources: at least one source is needed")
        names = [s.name for s in self.sources]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            problems.append(f"sources: names must be unique, repeated: {dup}")
        weighted = [s.weight is not None for s in self.sources]
        if any(weighted) and not all(weighted):
            missing = [s.name for s in self.sources if s.weight is None]
            problems.append(f"sources[].weight: set on some sources but not on {missing}; set it on all or none")
        if self.pack.validation_fraction + self.pack.test_fraction >= 1:
            problems.append(f"pack.validation_fraction + pack.test_fraction must be < 1 (got "
                            f"{self.pack.validation_fraction} + {self.pack.test_fraction}): nothing would be trained on")
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def artifact_uri(self) -> str:
        """Where the artifact goes: ``output`` or ``<storage.root>/data/<run_name>``."""
        if self.output:
            return self.output if "://" in self.output else StorageConfig(root=self.output).uri()
        return self.storage.uri("data", self.run_name)
