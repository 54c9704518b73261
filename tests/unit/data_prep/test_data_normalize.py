"""NFC (never NFKC), whitespace and control characters; code keeps its layout."""

import unicodedata

import pytest

from data_prep.config import DataConfig, NormalizeConfig
from data_prep.steps.normalize import normalize_text
from kmoe.configtree import ConfigError, from_dict


def test_nfc_composes_hangul_and_keeps_compatibility_jamo():
    decomposed = unicodedata.normalize("NFD", "한국어")
    assert decomposed != "한국어"
    out = normalize_text(decomposed + " ㅋㅋㅋ ㄱㄴㄷ", NormalizeConfig())
    assert out == "한국어 ㅋㅋㅋ ㄱㄴㄷ"
    assert "\u314b" in out and "\u110f" not in out  # NFKC would turn U+314B into conjoining U+110F


def test_nfkc_is_refused_by_the_config():
    with pytest.raises(ConfigError, match="normalize.form"):
        from_dict(DataConfig, {"sources": [], "normalize": {"form": "NFKC"}})


def test_whitespace_controls_and_blank_lines():
    text = "\ufeff첫 줄  입니다\t \r\n\r\n\r\n\r\n둘째\x07 줄\u200b\n"
    assert normalize_text(text, NormalizeConfig()) == "첫 줄 입니다\n\n\n둘째 줄"


def test_code_keeps_indentation():
    code = "def f(x):\r\n    if x:  \n        return  x\n"
    assert normalize_text(code, NormalizeConfig(), is_code=True) == "def f(x):\n    if x:\n        return  x"


def test_idempotent():
    text = "가나다  라\n\n\n\n\n마바사 "
    once = normalize_text(text, NormalizeConfig())
    assert normalize_text(once, NormalizeConfig()) == once
