"""Fixtures shared by the integration tests that train the toy model."""

from pathlib import Path

import pytest
from toy_shards import write_toy_shards

TOY_CONFIG = str(Path(__file__).resolve().parents[2] / "configs/train/toy.yaml")


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    """Byte-level ko/en/ja/code toy shards (120 documents per language) for `configs/train/toy.yaml`."""
    return write_toy_shards(tmp_path_factory.mktemp("toy"), n_docs=120)
