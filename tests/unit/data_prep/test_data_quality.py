"""Quality filters: each heuristic removes what it should and passes ordinary Korean prose."""

from data_prep.config import QualityConfig
from data_prep.steps.quality import quality_reason, terminal_line_frac, top_ngram_frac

PROSE = (
    "서울은 대한민국의 수도이며 가장 큰 도시입니다.\n"
    "한강이 도시를 가로질러 흐르고, 많은 사람들이 강변에서 산책을 즐깁니다.\n"
    "봄에는 벚꽃이 피고 가을에는 단풍이 아름답다"
)


def test_ordinary_korean_passes():
    assert quality_reason(PROSE, "ko", QualityConfig()) == ""


def test_each_filter():
    cfg = QualityConfig()
    assert quality_reason("짧은 글.", "ko", cfg) == "too_short"
    assert quality_reason("가" * 10 + "." + " x" * 200_000, "ko", cfg) == "too_long"
    english_in_ko = "This page was not translated yet and is still in English. " * 3
    assert quality_reason(english_in_ko, "ko", cfg) == "script_share"
    dup = "\n".join(["같은 줄이 반복됩니다."] * 5 + ["다른 줄입니다."])
    assert quality_reason(dup, "ko", cfg) == "dup_lines"
    assert quality_reason("ㅋ" * 300 + " 정말 웃기다.", "ko", cfg) == "repetition"
    words = [
        "파일 열기",
        "편집 메뉴",
        "보기 설정",
        "도구 모음",
        "창 배열",
        "도움말 색인",
        "서식 스타일",
        "표 삽입",
    ]
    no_ends = "\n".join(f"{w} {i}" for i, w in enumerate(words * 2))
    assert quality_reason(no_ends, "ko", cfg) == "no_sentence_ends"
    spam = PROSE + "\n카지노 바카라 토토사이트 먹튀 카지노 바카라 안내입니다."
    assert quality_reason(spam, "ko", cfg) == "spam_words"


def test_korean_sentence_endings_count_without_punctuation():
    assert terminal_line_frac("비가 온다\n정말 좋아요\n항목 목록") == 2 / 3
    assert top_ngram_frac("ㅋㅋㅋㅋ" * 50) > 0.9


def test_code_rules():
    cfg = QualityConfig()
    assert quality_reason("def f():\n    return 1\n" * 5, "code", cfg) == ""
    assert quality_reason("x=" + "1" * 2000, "code", cfg) == "code_long_line"
