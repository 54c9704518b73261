"""Build the Hugging Face fast tokenizer (`tokenizer.json` + configs) from our sentencepiece model.

Written directly with the `tokenizers` library rather than through transformers' converters, because several of
those routes silently give a different tokenizer (see docs/tokenizer.md); parity with sentencepiece is tested
in tests/integration/test_tokenizer_parity.py. How each sentencepiece behaviour is reproduced:
  add_dummy_prefix + ' '->'▁'   normalizer Sequence[Prepend('▁'), Replace(' ', '▁')] (no Metaspace: it skips
                                the prefix when the text already starts with a space; sentencepiece does not)
  BPE merges by piece score     merges (left, right) for every split of a piece into two pieces, ranked by the
                                merged piece's score (sentencepiece merges the best-scoring adjacent pair)
  byte_fallback                 BPE(byte_fallback=True) + the <0xXX> pieces; decoder ByteFallback + Fuse
  decode drops the dummy '▁'    decoder Strip(' ', 1, 0) after '▁'->' '
  <s> at the start              TemplateProcessing "<s> $A" when the config says add_bos
"""

from __future__ import annotations

import json
from pathlib import Path

from data_prep.tokenizer import BASE_SPECIALS, TokenizerConfig, control_tokens

SPACE = "\u2581"

CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
    "'<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def _pieces(sp) -> list[tuple[str, float, str]]:
    """(piece, score, kind) for every id; kind is normal|control|unknown|byte|unused."""
    out = []
    for i in range(sp.get_piece_size()):
        kind = (
            "control"
            if sp.is_control(i)
            else "unknown"
            if sp.is_unknown(i)
            else "byte"
            if sp.is_byte(i)
            else "unused"
            if sp.is_unused(i)
            else "normal"
        )
        out.append((sp.id_to_piece(i), sp.get_score(i), kind))
    return out


def bpe_merges(pieces: list[tuple[str, float, str]]) -> list[tuple[str, str]]:
    """Every (left, right) whose concatenation is a normal piece, best merged-piece score first."""
    ids = {p: i for i, (p, _, kind) in enumerate(pieces) if kind == "normal"}
    ranked = []
    for piece, pid in ids.items():
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in ids and right in ids:
                # Score first (sentencepiece's order); for equal scores the lower id was learned first.
                ranked.append((-pieces[pid][1], pid, ids[left], ids[right], left, right))
    ranked.sort()
    return [(left, right) for *_, left, right in ranked]


def build_backend(sp, cfg: TokenizerConfig):
    """A `tokenizers.Tokenizer` that reproduces `sp` (a SentencePieceProcessor) id for id."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, processors

    pieces = _pieces(sp)
    unk = BASE_SPECIALS["unk"]
    if cfg.model_type == "bpe":
        vocab = {p: i for i, (p, _, _) in enumerate(pieces)}
        model = models.BPE(
            vocab=vocab, merges=bpe_merges(pieces), unk_token=unk, byte_fallback=True, fuse_unk=True
        )
    else:
        # Unigram: only normal pieces compete in the lattice (like sentencepiece); the rest get a score
        # that can never win so their literal text ("<0x41>", "<s>") is not matched as a piece.
        floor = min(s for _, s, k in pieces if k == "normal") - 1e4
        vocab = [(p, s if k == "normal" else floor) for p, s, k in pieces]
        model = models.Unigram(vocab, unk_id=sp.unk_id(), byte_fallback=True)
    tok = Tokenizer(model)
    tok.normalizer = normalizers.Sequence([normalizers.Prepend(SPACE), normalizers.Replace(" ", SPACE)])
    tok.pre_tokenizer = None
    tok.decoder = decoders.Sequence(
        [decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    specials = [*BASE_SPECIALS.values(), *control_tokens(cfg)]
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    bos, bos_id = BASE_SPECIALS["bos"], sp.bos_id()
    if cfg.add_bos:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1", special_tokens=[(bos, bos_id)]
        )
    else:
        tok.post_processor = processors.TemplateProcessing(single="$A:0", pair="$A:0 $B:1", special_tokens=[])
    return tok


def write_hf_tokenizer(sp_model: Path, out: Path, cfg: TokenizerConfig) -> dict[str, int]:
    """Write tokenizer.json, tokenizer_config.json, special_tokens_map.json; return the special ids."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(sp_model))
    tok = build_backend(sp, cfg)
    (out / "tokenizer.json").write_text(tok.to_str(pretty=False), encoding="utf-8")
    extra = control_tokens(cfg)
    names = {f"{k}_token": v for k, v in BASE_SPECIALS.items()}
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **names,
        "add_bos_token": cfg.add_bos,
        "add_eos_token": False,
        # transformers' default clean-up rewrites " ." to "." on decode; sentencepiece does not.
        "clean_up_tokenization_spaces": False,
        "split_special_tokens": False,
        "extra_special_tokens": extra,
        "model_max_length": 1_000_000,
        "chat_template": CHATML_TEMPLATE,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    (out / "special_tokens_map.json").write_text(
        json.dumps({**names, "additional_special_tokens": extra}, indent=2) + "\n", encoding="utf-8"
    )
    ids = {k: sp.piece_to_id(v) for k, v in BASE_SPECIALS.items()}
    ids.update({t: sp.piece_to_id(t) for t in extra})
    return ids


# Strings where HF conversions are known to drift from sentencepiece. Literal special-token strings ("<s>",
# "<|im_start|>") are deliberately absent: HF maps them to their ids (chat templates need that) while the
# sentencepiece path that encodes the corpus never does (raw text must not inject control tokens).
EDGE_CASES = [
    "", " ", "  ", "   ", "\t", "\n", "\n\n", "\r\n", " \n ", "a", " a", "  a", "a ", "a  ", "  lead and trail  ",
    "multiple   spaces\tand\t\ttabs\n\nand newlines\n", "    indented code\n        more\n",
    "def f(x):\n\treturn x  # comment\n", "한국어 문장입니다.", " 앞에 공백", "한국어  두 칸\t탭",
    "日本語のテキスト。", "漢字と仮名", "mixed 한국어 English 日本語 123", "0123456789", "3.14159 1,000,000",
    "emoji 😀👍🏽 and flags 🇰🇷", "👨‍👩‍👧", "non-BMP 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 𠜎𠜱 \U0001f600", "\u3000ideographic space",
    "no\u00a0break", "zero\u200bwidth", "combining e\u0301", "▁literal metaspace ▁", " ▁ ", "<0x41> looks like a byte",
    "\x00nul\x01ctl", "ㅋㅋㅋ ㅎㅎ", "ᄀᄁᄂ conjoining jamo", "﻿BOM", "tab\tat\tend\t",
]  # fmt: skip


def parity(tok_dir: Path, texts: list[str]) -> dict:
    """Compare sentencepiece with `AutoTokenizer.from_pretrained(tok_dir)`: ids, decode, BOS framing."""
    import sentencepiece as spm
    from transformers import AutoTokenizer

    sp = spm.SentencePieceProcessor(model_file=str(Path(tok_dir) / "tokenizer.model"))
    hf = AutoTokenizer.from_pretrained(str(tok_dir))
    add_bos = json.loads((Path(tok_dir) / "tokenizer_config.json").read_text())["add_bos_token"]
    bad_ids, bad_decode, bad_bos, examples = 0, 0, 0, []
    for text in texts:
        ref = sp.encode(text)
        got = hf.encode(text, add_special_tokens=False)
        framed = hf(text)["input_ids"]
        if got != ref:
            bad_ids += 1
            examples.append({"text": text[:200], "sentencepiece": ref[:40], "hf": got[:40]})
        if hf.decode(ref) != sp.decode(ref):
            bad_decode += 1
            examples.append(
                {"text": text[:200], "decode_sp": sp.decode(ref)[:200], "decode_hf": hf.decode(ref)[:200]}
            )
        bad_bos += framed != ([sp.bos_id()] if add_bos else []) + ref
    return {
        "strings": len(texts),
        "id_mismatches": bad_ids,
        "decode_mismatches": bad_decode,
        "bos_mismatches": bad_bos,
        "examples": examples[:5],
        "hf_class": type(hf).__name__,
    }
