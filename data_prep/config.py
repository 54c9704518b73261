"""Typed config of `kmoe data build` (configs/data/*.yaml), loaded with kmoe.configtree."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from kmoe.configtree import ConfigError, load

LANGS = ("ko", "en", "ja", "code")
SOURCE_TYPES = ("jsonl", "parquet", "text", "hf", "demo")


@dataclass
class SourceConfig:
    name: str
    type: Literal["jsonl", "parquet", "text", "hf", "demo"]
    path: str = ""  # file, directory or glob root; for `demo` the fetcher name (see sources/demo.py)
    glob: str = "**/*"  # files under `path` when it is a directory
    text_field: str = "text"
    lang: Literal["auto", "ko", "en", "ja", "code"] = "auto"  # `code`: decided by source, never by LID
    max_mb: float = 0.0  # demo sources: cap on fetched text per source (0 = no cap)


@dataclass
class DecodeConfig:
    max_doc_bytes: int = 2_000_000  # larger records are removed before any expensive step
    legacy_encodings: list[str] = field(default_factory=lambda: ["cp949", "euc-kr"])
    max_invalid_frac: float = 0.01  # share of undecodable bytes tolerated (then dropped) in UTF-8 text
    max_nul_frac: float = 0.05  # more NUL bytes than this share means binary, not text


@dataclass
class NormalizeConfig:
    # NFKC is refused on purpose: it maps Hangul compatibility jamo (U+3131..) to conjoining jamo.
    form: Literal["NFC"] = "NFC"
    max_blank_lines: int = 2


@dataclass
class LangIdConfig:
    languages: list[str] = field(default_factory=lambda: ["ko", "en", "ja"])
    thresholds: dict[str, float] = field(default_factory=lambda: {"ko": 0.6, "en": 0.6, "ja": 0.6})
    max_chars: int = 2000  # classify the first N characters


@dataclass
class QualityConfig:
    min_chars: int = 50
    max_chars: int = 200_000
    min_script_share: dict[str, float] = field(default_factory=lambda: {"ko": 0.3, "ja": 0.3, "en": 0.6})
    max_dup_line_frac: float = 0.3
    max_top_ngram_frac: float = 0.2  # share of characters covered by the most frequent character 4-gram
    min_terminal_line_frac: float = 0.05  # lines ending in punctuation or a Korean sentence ending
    max_spam_per_kchar: float = 2.0  # spam-list hits per 1,000 characters
    spam_words: list[str] = field(
        default_factory=lambda: [
            "카지노",
            "바카라",
            "토토사이트",
            "먹튀",
            "무료야동",
            "대출문의",
            "casino",
            "viagra",
        ]
    )
    code_max_line_chars: int = 1000  # code: minified or generated files have very long lines


@dataclass
class PiiConfig:
    kinds: list[str] = field(default_factory=lambda: ["rrn", "phone", "brn", "card", "email", "ip"])
    apply_to_code: bool = True


@dataclass
class DedupConfig:
    exact: bool = True
    near: bool = True
    ngram: int = 5  # character shingles: Korean words carry particles, so whitespace words miss near-dups
    num_perm: int = 96
    # 24 bands of 4 rows: a pair at Jaccard 0.7 shares a band with probability 0.9986 (12 bands of 8 rows:
    # 0.51), so the `threshold` check on the full signature, not LSH chance, decides; the extra candidates
    # (0.18 of pairs at Jaccard 0.3) cost only that check.
    bands: int = 24
    threshold: float = 0.7  # estimated Jaccard at or above which an LSH candidate counts as a near-duplicate
    seed: int = 1


@dataclass
class MixConfig:
    weights: dict[str, float] = field(default_factory=lambda: {"ko": 0.4, "en": 0.3, "ja": 0.2, "code": 0.1})
    max_tokens: dict[str, int] = field(
        default_factory=dict
    )  # token budget per language (docs past it removed)


@dataclass
class TokenizerSection:
    path: str = ""  # an existing tokenizer directory
    # TokenizerConfig fields: train one into OUT/tokenizer. `config: FILE` reads them from a configs/tokenizer/
    # YAML first (the other keys override it); the file is read when the data config loads, so its settings
    # are part of the data config (and of its hash).
    train: dict[str, Any] | None = None


@dataclass
class SlurmConfig:
    partition: str = "cpu"
    time: str = "04:00:00"
    cpus_per_task: int = 1
    mem_per_cpu_gb: int = 2
    venv_path: str = ".venv/bin/activate"


@dataclass
class ExecutorConfig:
    kind: Literal["local", "slurm"] = "local"
    tasks: int = 2  # shards of the text stage; inputs are split by file
    workers: int = 2  # local processes at once
    slurm: SlurmConfig = field(default_factory=SlurmConfig)


@dataclass
class DataConfig:
    sources: list[SourceConfig]
    cache_dir: str = ".cache/data"
    shard_docs: int = 20_000  # documents per kept-corpus shard file
    decode: DecodeConfig = field(default_factory=DecodeConfig)
    normalize: NormalizeConfig = field(default_factory=NormalizeConfig)
    langid: LangIdConfig = field(default_factory=LangIdConfig)
    quality: QualityConfig = field(default_factory=QualityConfig)
    pii: PiiConfig = field(default_factory=PiiConfig)
    dedup: DedupConfig = field(default_factory=DedupConfig)
    mix: MixConfig = field(default_factory=MixConfig)
    tokenizer: TokenizerSection = field(default_factory=TokenizerSection)
    executor: ExecutorConfig = field(default_factory=ExecutorConfig)


def validate(cfg: DataConfig, base: Path | None = None) -> None:
    """Cross-field checks, before any work; errors name the key."""
    if not cfg.sources:
        raise ConfigError("sources: at least one source is required")
    names = [s.name for s in cfg.sources]
    for i, s in enumerate(cfg.sources):
        if names.count(s.name) > 1:
            raise ConfigError(f"sources[{i}].name: '{s.name}' is used twice")
        if not s.path:
            raise ConfigError(f"sources[{i}].path: required for a {s.type} source")
        if s.type == "demo":
            from data_prep.sources.demo import FETCHERS

            if s.path not in FETCHERS:
                raise ConfigError(
                    f"sources[{i}].path: demo source '{s.path}' unknown; one of {', '.join(FETCHERS)}"
                )
        elif not Path(s.path).exists():
            raise ConfigError(f"sources[{i}].path: {s.path} does not exist")
    for lang in cfg.langid.languages:
        if lang not in LANGS or lang == "code":
            raise ConfigError(f"langid.languages: '{lang}' is not one of ko, en, ja")
        if lang not in cfg.langid.thresholds:
            raise ConfigError(f"langid.thresholds.{lang}: missing threshold for a configured language")
    for lang, w in cfg.mix.weights.items():
        if lang not in LANGS:
            raise ConfigError(f"mix.weights.{lang}: unknown language (use {', '.join(LANGS)})")
        if w < 0:
            raise ConfigError(f"mix.weights.{lang}: weight must be >= 0, got {w}")
    for lang in cfg.mix.max_tokens:
        if lang not in LANGS:
            raise ConfigError(f"mix.max_tokens.{lang}: unknown language")
    d = cfg.dedup
    if d.num_perm % d.bands:
        raise ConfigError(f"dedup.bands: {d.bands} must divide dedup.num_perm {d.num_perm}")
    if not 0 < d.threshold <= 1:
        raise ConfigError(f"dedup.threshold: {d.threshold} must be in (0, 1]")
    if cfg.tokenizer.path and cfg.tokenizer.train is not None:
        raise ConfigError("tokenizer: give either tokenizer.path or tokenizer.train, not both")
    if cfg.tokenizer.path and not Path(cfg.tokenizer.path).is_dir():
        raise ConfigError(f"tokenizer.path: {cfg.tokenizer.path} is not a directory")
    if cfg.executor.tasks < 1 or cfg.executor.workers < 1:
        raise ConfigError("executor.tasks and executor.workers must be >= 1")


def _inline_tokenizer_config(cfg: DataConfig) -> None:
    train = cfg.tokenizer.train
    if not train or "config" not in train:
        return
    file = Path(str(train["config"]))
    if not file.is_file() and not file.is_absolute():
        file = Path(__file__).resolve().parents[1] / file  # configs/tokenizer/... of this checkout
    if not file.is_file():
        raise ConfigError(f"tokenizer.train.config: {train['config']} is not a file")
    base = yaml.safe_load(file.read_text(encoding="utf-8")) or {}
    if not isinstance(base, dict):
        raise ConfigError(f"tokenizer.train.config: {file} does not hold a mapping of TokenizerConfig fields")
    cfg.tokenizer.train = {**base, **{k: v for k, v in train.items() if k != "config"}}


def load_data_config(path: str | Path, overrides: list[str] | None = None) -> DataConfig:
    cfg = load(DataConfig, path, overrides)
    try:
        _inline_tokenizer_config(cfg)
        validate(cfg)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
    return cfg
