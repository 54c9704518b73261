"""PII precision on technical text: the labelled snippets (tests/fixtures/pii_labelled.txt) are scored with
the pipeline's detector; section/version numbers, remotes and code are left alone and every value is found."""

from pathlib import Path

import pytest

from data_prep.pii_detect import KINDS, scrub
from data_prep.pii_eval import evaluate, load_labelled, parse_snippet

LABELS = Path(__file__).resolve().parents[2] / "fixtures" / "pii_labelled.txt"


def test_labelled_set_precision_and_recall_are_perfect_per_kind():
    snippets = load_labelled(LABELS)
    res = evaluate(snippets, context=True)
    assert res["errors"] == []
    for kind in KINDS:
        assert res["kinds"][kind]["tp"] > 0, f"no labelled {kind} value: the set must cover every kind"


def test_format_only_detector_fails_on_the_technical_snippets():
    # The set is hard enough to tell the detectors apart: without context rules, technical text is damaged.
    res = evaluate(load_labelled(LABELS), context=False)
    wrong = {e["fp"] for e in res["errors"] if "fp" in e}
    assert {"ip", "email", "card"} <= wrong
    assert all(res["kinds"][k]["recall"] == 1.0 for k in KINDS)


@pytest.mark.parametrize(
    "text",
    [
        "12.2.3.1. 新しい言語の追加方法",
        "git clone git@github.com:kmoe-dev/kmoe.git",
        "자세한 내용은 12.10.2.1절을 참고하십시오.",
        "ssh://git@gitlab.example.com:2222/group/repo.git",
        "y = x@self.weight",
    ],
)
def test_issue_examples_are_left_alone(text):
    assert scrub(text, KINDS) == (text, {})


def test_parse_snippet_positions():
    sn = parse_snippet("t", "a ⟦ip:211.234.56.78⟧ b ⟦email:x@example.kr⟧")
    assert sn.text == "a 211.234.56.78 b x@example.kr"
    assert [sn.text[s:e] for s, e, _ in sn.gold] == ["211.234.56.78", "x@example.kr"]
