"""py3langid with per-language thresholds; code by source, never by LID."""

from data_prep.config import LangIdConfig
from data_prep.records import Doc
from data_prep.steps.base import Drop, StepCounts
from data_prep.steps.langid import LangIdStep

TEXTS = {
    "ko": "오늘은 날씨가 맑고 따뜻해서 친구들과 함께 한강 공원에 가서 자전거를 탔습니다.",
    "en": "The weather was clear and warm today, so we rode bicycles in the park by the river.",
    "ja": "今日は天気が良くて暖かかったので、友達と一緒に川沿いの公園で自転車に乗りました。",
}


def _doc(text: str, lang: str = "") -> Doc:
    return Doc("x", "s", (0, 0, 0), text=text, lang=lang)


def test_identifies_ko_en_ja():
    step = LangIdStep("/tmp/unused", LangIdConfig())
    for lang, text in TEXTS.items():
        out = step.apply(_doc(text), StepCounts())
        assert isinstance(out, Doc) and out.lang == lang


def test_thresholds_and_unwanted_languages():
    strict = LangIdStep("/tmp/unused", LangIdConfig(thresholds={"ko": 0.6, "en": 1.01, "ja": 0.6}))
    res = strict.apply(_doc(TEXTS["en"]), StepCounts())
    assert isinstance(res, Drop) and res.reason == "low_confidence:en"
    only_ko = LangIdStep("/tmp/unused", LangIdConfig(languages=["ko"], thresholds={"ko": 0.5}))
    res = only_ko.apply(_doc(TEXTS["ja"]), StepCounts())
    assert isinstance(res, Drop) and res.reason == "lang:ja"


def test_code_passes_and_declared_language_is_checked():
    step = LangIdStep("/tmp/unused", LangIdConfig())
    counts = StepCounts()
    code = step.apply(_doc("import os\nprint(os.getcwd())", lang="code"), counts)
    assert isinstance(code, Doc) and code.lang == "code" and counts.notes["code_by_source"] == 1
    res = step.apply(_doc(TEXTS["en"], lang="ko"), counts)
    assert isinstance(res, Drop) and res.reason == "lang_mismatch:en"
