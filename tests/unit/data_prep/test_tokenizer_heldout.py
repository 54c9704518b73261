"""Out-of-domain Korean held-out text and the report's group rows (pure parts; the fetch runs in make demo)."""

from data_prep.tokenizer_heldout import PACKAGES, paragraphs
from data_prep.tokenizer_report import group_rows


def test_paragraphs_keep_korean_normalised_like_the_corpus():
    page = "Close all\n\n이 명령은   열려 있는 모든 그림을 닫습니다.  \n\n짧다\n\nThis command closes all images."
    assert list(paragraphs(page)) == ["이 명령은 열려 있는 모든 그림을 닫습니다."]


def test_no_heldout_package_feeds_the_demo_corpus():
    from data_prep.sources.demo import DEB_SOURCES

    assert not set(PACKAGES) & {pkg for pkg, _, _ in DEB_SOURCES.values()}


def test_group_rows_sum_tokens_over_members():
    def row(chars, ours, default):
        return {"chars": chars, "ours": {"tokens": ours}, "sp_default": {"tokens": default},
                "tokens_per_char_vs_default": ours / default - 1}  # fmt: skip

    langs = {"ko": row(10, 5, 5), "ko-ood.a": row(100, 45, 50), "ko-ood.b": row(100, 40, 50)}
    g = group_rows(langs)
    assert list(g) == ["ko-ood"] and g["ko-ood"]["members"] == ["ko-ood.a", "ko-ood.b"]
    assert g["ko-ood"]["tokens_per_char_vs_default"] == 85 / 100 - 1
    assert g["ko-ood"]["worst_member"] == "ko-ood.a" and g["ko-ood"]["ours_tokens_per_char"] == 85 / 200
