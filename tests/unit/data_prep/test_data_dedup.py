"""Exact and MinHash-LSH near dedup on character shingles, first-seen wins."""

from data_prep.config import DedupConfig
from data_prep.records import Doc
from data_prep.steps.base import Drop, StepCounts
from data_prep.steps.dedup import DedupStep, dedup_decisions
from data_prep.steps.minhash import MinHasher, jaccard_estimate

BASE = (
    "한국어 자연어 처리에서는 조사와 어미가 단어에 붙기 때문에 띄어쓰기 단위의 비교가 잘 맞지 않습니다. "
    "그래서 문서 중복을 찾을 때에는 글자 단위의 조각을 사용하는 것이 더 정확합니다. "
    "이 문서는 중복 제거 단계의 시험을 위해 작성되었습니다."
)
# Particles changed (를->가, 에서는->에서), one word swapped: every whitespace token around them differs.
NEAR = BASE.replace("처리에서는", "처리에서").replace("비교가", "비교는").replace("정확합니다", "정확하다")
OTHER = "오늘 저녁에는 가족과 함께 김치찌개를 끓여 먹고 산책을 다녀왔습니다. 내일은 비가 온다고 합니다."


def test_signature_is_deterministic_and_tracks_similarity():
    h = MinHasher(5, 128, 16, seed=1)
    assert (h.signature(BASE) == MinHasher(5, 128, 16, seed=1).signature(BASE)).all()
    assert jaccard_estimate(h.signature(BASE), h.signature(NEAR)) > 0.7
    assert jaccard_estimate(h.signature(BASE), h.signature(OTHER)) < 0.1


def test_decisions_remove_exact_and_near_duplicates_keeping_the_first():
    docs = [Doc(f"d{i}", "s", (0, 0, i), text=t, lang="ko") for i, t in enumerate([BASE, OTHER, BASE, NEAR])]
    got = {r["id"]: r for r in dedup_decisions(docs, DedupConfig())}
    assert sorted(got) == ["d2", "d3"]
    assert got["d2"]["reason"] == "exact_duplicate" and got["d2"]["detail"] == "duplicate of d0"
    assert got["d3"]["reason"] == "near_duplicate" and got["d3"]["detail"].endswith("keeps d0")
    # The survivor is the first in input order, not the first seen: reversed order keeps the near copy.
    rev = [Doc(d.id, "s", (0, 0, 9 - i), text=d.text, lang="ko") for i, d in enumerate(docs)]
    assert sorted(r["id"] for r in dedup_decisions(rev, DedupConfig())) == ["d0", "d2"]


def test_word_ngram_shingles_would_miss_this_near_duplicate():
    # Whitespace-word 5-gram shingles (the usual English setting): each changed particle breaks five of them.
    def word_shingles(t):
        w = t.split()
        return {tuple(w[i : i + 5]) for i in range(len(w) - 4)}

    a, b = word_shingles(BASE), word_shingles(NEAR)
    words = len(a & b) / len(a | b)
    h = MinHasher(5, 96, 12, seed=1)
    chars = jaccard_estimate(h.signature(BASE), h.signature(NEAR))
    assert words < 0.5 < DedupConfig().threshold < chars


def _decisions_split(texts: list[str], tasks: int, cfg: DedupConfig) -> list[tuple]:
    """Decisions when document k sits in task k * tasks // len(texts) (contiguous, as the text stage splits)."""
    import numpy as np

    from data_prep.dedup_core import (
        BAND_DTYPE,
        EXACT_DTYPE,
        bucket_edges,
        decide,
        exact_edges,
        rows_with_refs,
        text_hash,
    )

    task = [k * tasks // len(texts) for k in range(len(texts))]
    refs = np.array([(0, k, 0, task[k], task[:k].count(task[k])) for k in range(len(texts))], dtype=np.int64)
    h = MinHasher(cfg.ngram, cfg.num_perm, cfg.bands, cfg.seed)
    sigs = {(int(r[3]), int(r[4])): h.signature(t) for r, t in zip(refs, texts)}
    rows = rows_with_refs(EXACT_DTYPE, refs)
    hashes = np.array([text_hash(t) for t in texts], dtype=np.uint64)
    rows["h0"], rows["h1"] = hashes[:, 0], hashes[:, 1]
    keys = h.band_hashes(np.stack([sigs[(int(r[3]), int(r[4]))] for r in refs]))
    near = []
    for b in range(cfg.bands):
        band = rows_with_refs(BAND_DTYPE, refs)
        band["key"] = keys[:, b]
        near.append(bucket_edges(band, lambda t, i: sigs[(t, i)], cfg.threshold))
    out = decide(exact_edges(rows), np.concatenate(near))
    return [(d.ref[:3], d.reason, d.survivor[:3], d.partner[:3], d.cluster_size) for d in out]


def test_decisions_do_not_depend_on_how_documents_are_split_into_tasks():
    chain = [BASE, NEAR, NEAR.replace("작성되었습니다", "작성했습니다"), OTHER, BASE, OTHER + " 끝.", NEAR]
    cfg = DedupConfig()
    one = _decisions_split(chain, 1, cfg)
    assert one == _decisions_split(chain, 3, cfg) == _decisions_split(chain, 7, cfg)
    reasons = {ref[1]: reason for ref, reason, *_ in one}
    assert reasons == {1: "near_duplicate", 2: "near_duplicate", 4: "exact_duplicate", 5: "near_duplicate",
                       6: "exact_duplicate"}  # fmt: skip
    # Near: the cluster's first document; exact: the first copy (itself removed as near for doc 6's copy).
    assert {ref[1]: survivor[1] for ref, _, survivor, _, _ in one} == {1: 0, 2: 0, 4: 0, 5: 3, 6: 1}


def test_dedup_step_in_one_process_needs_all_documents_first():
    import pytest

    step = DedupStep("/tmp/unused", DedupConfig())
    with pytest.raises(RuntimeError, match="prepare"):
        step.apply(Doc("d0", "s", (0, 0, 0), text=BASE), StepCounts())
    docs = [Doc(f"d{i}", "s", (0, 0, i), text=t, lang="ko") for i, t in enumerate([BASE, OTHER, BASE, NEAR])]
    step.prepare(docs)
    kept = [d.id for d in docs if not isinstance(step.apply(d, StepCounts()), Drop)]
    assert kept == ["d0", "d1"]
