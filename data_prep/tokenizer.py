"""Korean-first sentencepiece tokenizer: config, training (on data_prep/tokenizer_sample.py's weighted sample
of the kept corpus), loading, digest.

Layout of a tokenizer directory (what `train_tokenizer` writes and `load_tokenizer` reads):
  tokenizer.model          the sentencepiece model (the reference implementation)
  tokenizer.json, tokenizer_config.json, special_tokens_map.json   the HF fast tokenizer (tokenizer_hf.py)
  kmoe_tokenizer.json      {"special_ids", "digest", "config", "add_bos", "sample"}
Ids 0-3 are <unk> <s> </s> <pad>, then the chat/reserved control tokens, then the 256 byte pieces.
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from data_prep.tokenizer_sample import read_kept_corpus, required_characters, sample_corpus
from kmoe.configtree import ConfigError, to_dict
from kmoe.hashing import sha256_file, sha256_json

log = logging.getLogger(__name__)

SP_MODEL = "tokenizer.model"
META = "kmoe_tokenizer.json"
BASE_SPECIALS = {"unk": "<unk>", "bos": "<s>", "eos": "</s>", "pad": "<pad>"}
DEFAULT_CHAT_TOKENS = ["<|im_start|>", "<|im_end|>", "<|tool_call|>", "<|tool_response|>"]


@dataclass
class TokenizerConfig:
    """What `kmoe tokenizer train` reads (configs/tokenizer/*.yaml)."""

    vocab_size: int = 8192
    model_type: Literal["bpe", "unigram"] = "bpe"
    # Share of the training sample per language; Korean is upweighted so English does not take the vocabulary.
    language_weights: dict[str, float] = field(
        default_factory=lambda: {"ko": 0.25, "en": 0.45, "ja": 0.12, "code": 0.18}
    )
    sample_chars: int = 8_000_000  # size of the training sample
    max_upsample: float = 3.0  # a scarce language is repeated at most this many times to reach its share
    character_coverage: float = 0.9995  # high enough to keep Hangul syllables and common kanji whole
    max_piece_length: int = 16
    split_digits: bool = True
    # Let a piece span scripts: Korean endings fuse with punctuation ("습니다.") and particles with Latin
    # words ("API를"); sentencepiece's default (true) forbids both. Measured in docs/tokenizer.md.
    split_by_unicode_script: bool = False
    split_by_whitespace: bool = True  # false allows multi-word pieces ("▁수▁있습니다", "▁of▁the"), see docs
    # Cut natural-language training text at sentence ends, so a multi-word piece never spans two sentences.
    sentence_split: bool = False
    # "ks_x_1001": the 2,350 Hangul syllables of KS X 1001 (the common modern set) are always whole pieces, even
    # when the corpus lacks them: Korean never seen in training does not fall back to 3 byte tokens a syllable.
    required_hangul: Literal["none", "ks_x_1001"] = "none"
    # Documents whose id hashes into this share never enter the training sample (`kmoe tokenizer report
    # --heldout` measures on them).
    heldout_frac: float = 0.0
    byte_fallback: bool = True
    add_bos: bool = True  # every training document starts with <s> (and ends with </s>, the EOD token)
    chat_tokens: list[str] = field(default_factory=lambda: list(DEFAULT_CHAT_TOKENS))
    num_reserved: int = 8  # <|reserved_i|> control tokens kept free for later templates
    chunk_chars: int = 2000  # training sentences: documents cut at line ends into pieces this long
    seed: int = 1234
    num_threads: int = 2  # recorded in the model, so part of its digest


def validate_config(cfg: TokenizerConfig) -> None:
    reserved = reserved_ids(cfg)
    if cfg.vocab_size < reserved + 64:
        raise ConfigError(
            f"tokenizer.vocab_size: {cfg.vocab_size} is too small ({reserved} ids go to specials and bytes)"
        )
    if not cfg.language_weights or any(w < 0 for w in cfg.language_weights.values()):
        raise ConfigError("tokenizer.language_weights: give each language a weight >= 0")
    if sum(cfg.language_weights.values()) <= 0:
        raise ConfigError("tokenizer.language_weights: at least one weight must be > 0")
    if not 0.9 <= cfg.character_coverage <= 1.0:
        raise ConfigError(f"tokenizer.character_coverage: {cfg.character_coverage} not in [0.9, 1.0]")
    if not 0.0 <= cfg.heldout_frac < 0.5:
        raise ConfigError(f"tokenizer.heldout_frac: {cfg.heldout_frac} not in [0, 0.5)")
    if cfg.sample_chars <= 0 or cfg.chunk_chars <= 0 or cfg.max_upsample < 1:
        raise ConfigError("tokenizer: sample_chars, chunk_chars must be > 0 and max_upsample >= 1")
    clash = set(cfg.chat_tokens) & set(BASE_SPECIALS.values())
    if clash or len(set(cfg.chat_tokens)) != len(cfg.chat_tokens):
        raise ConfigError(f"tokenizer.chat_tokens: duplicates or clashes with base specials: {sorted(clash)}")


def control_tokens(cfg: TokenizerConfig) -> list[str]:
    return [*cfg.chat_tokens, *(f"<|reserved_{i}|>" for i in range(cfg.num_reserved))]


def reserved_ids(cfg: TokenizerConfig) -> int:
    """Ids that are not learned pieces: base specials, control tokens and (with byte_fallback) 256 bytes."""
    return len(BASE_SPECIALS) + len(control_tokens(cfg)) + (256 if cfg.byte_fallback else 0)


def required_chars(cfg: TokenizerConfig) -> str:
    """Characters every model of this config holds as pieces, whatever the corpus (sentencepiece's
    `required_chars`)."""
    if cfg.required_hangul == "ks_x_1001":
        # EUC-KR encodes exactly the KS X 1001 syllables in two bytes (the rest take an 8-byte jamo sequence).
        return "".join(chr(c) for c in range(0xAC00, 0xD7A4) if len(chr(c).encode("euc_kr")) == 2)
    return ""


def check_vocab_fits(sentences: list[str], cfg: TokenizerConfig) -> None:
    """Refuse, with the numbers, a vocabulary smaller than the pieces the sample requires (sentencepiece would
    fail the same way, after reading the sample, with a less direct message)."""
    chars = required_characters(sentences, cfg.character_coverage, required_chars(cfg))
    need = chars + reserved_ids(cfg)
    if cfg.vocab_size < need:
        raise ConfigError(
            f"tokenizer.vocab_size: {cfg.vocab_size} is smaller than the {need} pieces this corpus requires "
            f"({chars} characters to reach character_coverage {cfg.character_coverage}, plus "
            f"{reserved_ids(cfg)} specials and byte pieces); raise vocab_size or lower character_coverage"
        )


# ----------------------------------------------------------------------------- training
def sp_trainer_options(cfg: TokenizerConfig) -> dict:
    """Sentencepiece settings for Korean-first, lossless tokenization."""
    return {
        "model_type": cfg.model_type,
        "vocab_size": cfg.vocab_size,
        "character_coverage": cfg.character_coverage,
        "byte_fallback": cfg.byte_fallback,
        "split_digits": cfg.split_digits,
        "split_by_unicode_script": cfg.split_by_unicode_script,
        "split_by_whitespace": cfg.split_by_whitespace,
        # Our data pipeline applies NFC itself; NFKC would fold compatibility jamo and full-width forms.
        "normalization_rule_name": "identity",
        "remove_extra_whitespaces": False,  # indentation and runs of spaces are content (code)
        "allow_whitespace_only_pieces": True,
        "add_dummy_prefix": True,
        "max_sentencepiece_length": cfg.max_piece_length,
        "max_sentence_length": cfg.chunk_chars * 4 + 16,  # bytes; chunk_document already bounds chars
        "unk_id": 0,
        "bos_id": 1,
        "eos_id": 2,
        "pad_id": 3,
        "unk_piece": BASE_SPECIALS["unk"],
        "bos_piece": BASE_SPECIALS["bos"],
        "eos_piece": BASE_SPECIALS["eos"],
        "pad_piece": BASE_SPECIALS["pad"],
        "control_symbols": control_tokens(cfg),
        "input_sentence_size": 0,  # we sample ourselves, deterministically
        "shuffle_input_sentence": False,
        "num_threads": cfg.num_threads,
        "minloglevel": 2,
        **({"required_chars": required_chars(cfg)} if cfg.required_hangul != "none" else {}),
    }


def train_sentencepiece(sentences: list[str], options: dict, seed: int) -> bytes:
    import sentencepiece as spm

    spm.set_random_generator_seed(seed)
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(sentence_iterator=iter(sentences), model_writer=model, **options)
    except RuntimeError as e:
        raise ValueError(f"sentencepiece training failed ({e}); check tokenizer.vocab_size") from None
    return model.getvalue()


def train_tokenizer(corpus_dir: Path, cfg: TokenizerConfig, out_dir: Path) -> Path:
    """Train on a weighted sample of `corpus_dir/kept`, write sentencepiece + HF files to `out_dir`."""
    from data_prep.tokenizer_hf import write_hf_tokenizer

    validate_config(cfg)
    texts = read_kept_corpus(Path(corpus_dir), cfg.heldout_frac)
    sentences, stats = sample_corpus(texts, cfg.language_weights, cfg.sample_chars, cfg)
    log.info("tokenizer sample: %s", stats)
    check_vocab_fits(sentences, cfg)
    model = train_sentencepiece(sentences, sp_trainer_options(cfg), cfg.seed)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / SP_MODEL).write_bytes(model)
    special_ids = write_hf_tokenizer(out / SP_MODEL, out, cfg)
    meta = {
        "special_ids": special_ids,
        "add_bos": cfg.add_bos,
        "digest": tokenizer_digest(out),
        "config": to_dict(cfg),
        "sample": stats,
        # Where the report retrains its baseline, relative to the tokenizer dir so that the same build into
        # another folder writes identical bytes. Not part of the digest.
        "corpus_dir": os.path.relpath(Path(corpus_dir).resolve(), Path(out_dir).resolve()),
    }
    (out / META).write_text(json.dumps(meta, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    log.info("tokenizer %s: vocab %d, digest %s", out, cfg.vocab_size, meta["digest"])
    return out


# tokenizer_config.json is hashed too: it decides BOS, decode clean-up and the chat template in HF.
DIGEST_FILES = (SP_MODEL, "tokenizer.json", "tokenizer_config.json")


def tokenizer_digest(tok_dir: Path) -> str:
    """sha256 identifying a tokenizer: sha256_json of {file: sha256} over DIGEST_FILES."""
    return sha256_json({name: sha256_file(Path(tok_dir) / name) for name in DIGEST_FILES})


# ----------------------------------------------------------------------------- loading
@dataclasses.dataclass
class Tokenizer:
    """The sentencepiece model of a tokenizer dir; `encode` adds no BOS/EOS (see `encode_document`)."""

    path: Path
    sp: object
    special_ids: dict[str, int]
    add_bos: bool
    digest: str

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    @property
    def bos_id(self) -> int:
        return self.special_ids["bos"]

    @property
    def eos_id(self) -> int:
        return self.special_ids["eos"]

    @property
    def pad_id(self) -> int:
        return self.special_ids["pad"]

    def encode(self, text: str) -> list[int]:
        if not isinstance(text, str):
            raise ValueError(f"encode expects a str, got {type(text).__name__}")
        return self.sp.encode(text)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return self.sp.encode(list(texts))

    def encode_document(self, text: str) -> list[int]:
        """How training sees a document: [<s>] + ids + [</s>] (the EOD token); HF adds the same <s>."""
        return ([self.bos_id] if self.add_bos else []) + self.encode(text) + [self.eos_id]

    def decode(self, ids: list[int]) -> str:
        return self.sp.decode(list(ids))


def load_tokenizer(tok_dir: str | Path, verify: bool = True) -> Tokenizer:
    """Load a tokenizer dir; with `verify`, a digest that does not match the files is an error."""
    import sentencepiece as spm

    tok_dir = Path(tok_dir)
    for name in (*DIGEST_FILES, META):
        if not (tok_dir / name).is_file():
            raise FileNotFoundError(f"{tok_dir}: missing {name} (train one with `kmoe tokenizer train`)")
    meta = json.loads((tok_dir / META).read_text(encoding="utf-8"))
    if verify and (actual := tokenizer_digest(tok_dir)) != meta.get("digest"):
        raise ValueError(
            f"{tok_dir}: tokenizer files changed: digest {actual} != recorded {meta.get('digest')}"
        )
    sp = spm.SentencePieceProcessor(model_file=str(tok_dir / SP_MODEL))
    return Tokenizer(tok_dir, sp, meta["special_ids"], bool(meta.get("add_bos", True)), meta["digest"])
