"""Small real fixtures for tests of data_prep: a byte-level tokenizer (ids = UTF-8 bytes + specials).

It is a complete tokenizer (lossless encode/decode), just a tiny one; tests use it so the shard writer is
checked without training a sentencepiece model.
"""

from __future__ import annotations

import hashlib


class ByteTokenizer:
    """ids 0..255 are bytes; 256 = bos, 257 = eos, 258 = pad."""

    vocab_size = 259
    bos_id, eos_id, pad_id = 256, 257, 258

    @property
    def digest(self) -> str:
        return hashlib.sha256(b"kmoe-byte-tokenizer-v1").hexdigest()

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def encode_document(self, text: str) -> list[int]:
        return [self.bos_id, *self.encode(text), self.eos_id]

    def decode(self, ids: list[int]) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")
