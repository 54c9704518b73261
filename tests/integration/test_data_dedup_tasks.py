"""`kmoe data build` with executor.tasks 1 and 8 on texts written here: the same kept documents in the same global
order, the same removal decisions and the same accounting; near-copies planted in other text tasks than their
originals (one Korean particle changed per sentence, punctuation swapped, a line moved) are removed the same way;
every dedup stage but the clustering runs as 8 tasks."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest
from byte_tokenizer import ByteTokenizer

from data_prep.config import DataConfig
from data_prep.pipeline import build
from data_prep.sources.files import list_units
from data_prep.sources.reader import task_units
from kmoe.configtree import from_dict

BASES = [
    [
        "서울의 지하철은 아침 일찍부터 밤늦게까지 운행되어 출퇴근하는 시민들이 매일 편리하게 이용합니다.",
        "환승역에서는 안내 방송과 표지판을 따라가면 처음 온 여행객도 길을 쉽게 찾을 수 있습니다.",
        "교통카드를 한 장 가지고 있으면 버스와 지하철을 갈아탈 때 요금이 자동으로 할인됩니다.",
        "주말에는 한강 공원으로 가는 노선에 자전거를 가지고 타는 사람들도 자주 보입니다.",
    ],
    [
        "김장철이 되면 온 가족이 마당에 모여 배추를 절이고 양념을 버무리며 하루를 보냅니다.",
        "할머니께서는 젓갈과 고춧가루의 비율을 눈대중으로 맞추시는데 맛이 언제나 한결같습니다.",
        "완성된 김치는 항아리에 담아 땅에 묻거나 김치냉장고에 넣어 겨울 내내 꺼내 먹습니다.",
        "이웃과 나누어 먹는 풍습도 남아 있어서 골목마다 김치 통을 든 사람들이 오갑니다.",
    ],
    [
        "제주도의 오름은 작은 화산이 만든 언덕으로 섬 전체에 삼백 개가 넘게 흩어져 있습니다.",
        "가을이 되면 억새가 오름의 능선을 덮어서 바람이 불 때마다 은빛 물결처럼 출렁입니다.",
        "정상에 오르면 멀리 한라산과 푸른 바다가 한눈에 들어와 사진을 찍는 사람이 많습니다.",
        "오르는 길이 가파르지 않아서 어린아이와 함께 온 가족도 부담 없이 산책을 즐깁니다.",
    ],
    [
        "도서관에서는 매달 둘째 주 토요일마다 어린이를 위한 그림책 읽기 모임이 열립니다.",
        "사서 선생님이 책을 소리 내어 읽어 주면 아이들은 그림을 보며 이야기에 빠져듭니다.",
        "모임이 끝나면 아이들이 직접 고른 책을 대출 카드로 빌려서 집으로 가져갈 수 있습니다.",
        "부모들은 그 시간 동안 옆 열람실에서 신문을 읽거나 조용히 차를 마시며 기다립니다.",
    ],
]
PARTICLE_SWAPS = [
    ("은 ", "이 "),
    ("를 ", "을 "),
    ("에서는 ", "에서 "),
    ("이 ", "은 "),
    ("와 ", "과 "),
    ("에 ", "로 "),
]
FILLERS = [
    "The museum opens its new wing next spring, with rooms for maps, clocks and old printing presses.",
    "Fresh bread from the corner bakery sells out before noon, so regulars queue outside at seven.",
    "The river path is closed for repairs this week; cyclists are asked to use the road along the park.",
    "Volunteers planted two hundred trees on the hill behind the school during the autumn holiday.",
    "A new ferry links the two islands twice a day, and the crossing takes a little under an hour.",
    "The night market sells grilled corn, noodle soup and hand-made toys until well after midnight.",
    "Our choir rehearses on Thursday evenings and welcomes singers of every age and every voice.",
    "The old lighthouse is now a small museum about the ships that sailed along this rocky coast.",
]


def _particle_copy(lines: list[str]) -> str:
    """One particle changed in every sentence."""
    out = []
    for line in lines:
        for a, b in PARTICLE_SWAPS:
            if a in line:
                line = line.replace(a, b, 1)
                break
        out.append(line)
    return "\n".join(out)


def _punctuation_copy(lines: list[str]) -> str:
    return "\n".join(line.replace("니다.", "니다!") for line in lines)


def _moved_line_copy(lines: list[str]) -> str:
    return "\n".join([*lines[1:], lines[0]])


COPIES = {"particle": _particle_copy, "punctuation": _punctuation_copy, "moved_line": _moved_line_copy}
N_FILES = 12


def write_inputs(root: Path) -> dict[str, str]:
    """12 files; base document k sits in file k, its planted copies in files far from it. Returns
    {copy id: original id}."""
    files: list[list[str]] = [[] for _ in range(N_FILES)]
    for k, lines in enumerate(BASES):
        files[k].append("\n".join(lines))
        for j, make in enumerate(COPIES.values()):
            files[k + 4 + 2 * j].append(make(lines))
    files[11].append("\n".join(BASES[0]))  # an exact copy, in the last task
    for i, text in enumerate(FILLERS):
        files[(i * 5) % N_FILES].append(text)
    root.mkdir(parents=True)
    planted = {}
    originals = {"\n".join(lines): k for k, lines in enumerate(BASES)}
    for i, docs in enumerate(files):
        path = root / f"f{i:02d}.jsonl"
        path.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in docs))
        for n, t in enumerate(docs, 1):
            for k, lines in enumerate(BASES):
                if t != "\n".join(lines) and any(t == make(lines) for make in COPIES.values()):
                    planted[f"docs:f{i:02d}.jsonl:{n}"] = f"docs:f{k:02d}.jsonl:1"
            if t in originals and i != originals[t]:
                planted[f"docs:f{i:02d}.jsonl:{n}"] = f"docs:f{originals[t]:02d}.jsonl:1"
    return planted


def config(root: Path, tasks: int) -> DataConfig:
    return from_dict(
        DataConfig,
        {
            "sources": [{"name": "docs", "type": "jsonl", "path": str(root)}],
            "mix": {"weights": {"ko": 0.6, "en": 0.4}},
            "executor": {"tasks": tasks, "workers": 1},
        },
    )


def _records(out: Path, part: str) -> list[dict]:
    return [
        json.loads(line)
        for f in sorted((out / "corpus" / part).rglob("*.jsonl.gz"))
        for line in gzip.open(f, "rt", encoding="utf-8")
    ]


@pytest.fixture(scope="module")
def builds(tmp_path_factory):
    root = tmp_path_factory.mktemp("dedup_tasks")
    planted = write_inputs(root / "in")
    for tasks in (1, 8):
        build(config(root / "in", tasks), root / f"out{tasks}", tokenizer=ByteTokenizer())
    return root, planted


def test_planted_copies_sit_in_other_text_tasks(builds):
    root, planted = builds
    cfg = config(root / "in", 8)
    units = list_units(cfg.sources, [root / "in"])
    task_of = {Path(u.path).name: t for t in range(8) for u in task_units(units, t, 8)}
    assert len(planted) == 4 * len(COPIES) + 1
    for copy, orig in planted.items():
        assert task_of[copy.split(":")[1]] != task_of[orig.split(":")[1]], (copy, orig)


def test_kept_set_order_decisions_and_accounting_do_not_depend_on_task_count(builds):
    root, planted = builds
    out1, out8 = root / "out1", root / "out8"
    kept1, kept8 = _records(out1, "kept"), _records(out8, "kept")
    assert [r["id"] for r in kept1] == [r["id"] for r in kept8]  # same documents, same global order
    dec = lambda out: sorted(  # noqa: E731
        (r["id"], r["step"], r["reason"], r.get("detail", "")) for r in _records(out, "removed")
    )
    assert dec(out1) == dec(out8)
    stats1, stats8 = (json.loads((o / "stats.json").read_text()) for o in (out1, out8))
    assert stats1 == stats8
    assert stats8["by_source"]["sources"]["docs"]["removed"] == {"dedup": len(planted)}
    dedup = stats8["steps"]["dedup"]
    assert dedup["in"] == dedup["kept"] + len(planted) and dedup["by_source"]["docs"]["in"] == dedup["in"]


def test_planted_near_copies_are_removed_keeping_the_original(builds):
    root, planted = builds
    for tasks in (1, 8):
        removed = {r["id"]: r for r in _records(root / f"out{tasks}", "removed") if r["step"] == "dedup"}
        assert set(removed) == set(planted)
        for copy, orig in planted.items():
            assert removed[copy]["detail"].endswith(orig) or removed[copy]["detail"] == f"duplicate of {orig}"
        reasons = sorted(r["reason"] for r in removed.values())
        assert reasons == ["exact_duplicate"] + ["near_duplicate"] * 4 * len(COPIES)


def test_dedup_stages_run_as_many_tasks(builds):
    root, _ = builds
    logs = root / "out8" / "work" / "logs"
    for stage in ("dedup-signatures", "dedup-exact", "dedup-buckets", "dedup"):
        assert len(list((logs / stage / "logs").glob("task_*.log"))) == 8, stage
        assert len(list((logs / stage / "completions").iterdir())) == 8, stage
    assert len(list((logs / "dedup-clusters" / "completions").iterdir())) == 1


def _hangul_share(text: str) -> float:
    return sum("\uac00" <= c <= "\ud7a3" for c in text) / max(len(text), 1)


def _sentence_particle_copy(text: str) -> str:
    """One particle changed in every sentence of real text (sentences end at '. ')."""
    pieces = text.split(". ")
    return ". ".join(_particle_copy([p]) for p in pieces)


def _jaccard(a: str, b: str) -> float:
    from data_prep.steps.minhash import MinHasher

    h = MinHasher(5, 96, 24, 1)
    sa, sb = set(h.shingles(a).tolist()), set(h.shingles(b).tolist())
    return len(sa & sb) / len(sa | sb)


def _plant_demo_copies(files: dict[str, Path], out: Path) -> dict[str, str]:
    """Near-copies of 4 multi-line Korean documents from each of two demo sources (`files`: name -> its fetched
    JSONL), as a source of their own: the last input file, so in the last of 8 text tasks. Returns
    {copy id: original id}."""
    planted, lines = {}, []
    for name, path in files.items():
        with gzip.open(path, "rt", encoding="utf-8") as f:
            texts = [(n, json.loads(line)["text"]) for n, line in enumerate(f, 1)]
        good = [
            (n, t) for n, t in texts if 400 < len(t) < 1500 and t.count("\n") >= 3 and _hangul_share(t) > 0.4
        ]
        taken = 0
        for n, text in good:
            rows = text.split("\n")
            copies = [_sentence_particle_copy(text), _punctuation_copy(rows), _moved_line_copy(rows)]
            # Near-copies by the build's definition: character 5-gram Jaccard >= 0.8, far enough above the 0.7
            # threshold that the 96-value estimate (std ~0.04) cannot fall below it. A document of many short
            # sentences loses more than that to a changed ending in each.
            if any(c == text or _jaccard(c, text) < 0.8 for c in copies):
                continue
            for copy in copies:
                lines.append(json.dumps({"text": copy}, ensure_ascii=False))
                planted[f"planted-ko:planted.jsonl:{len(lines)}"] = f"{name}:{Path(path).name}:{n}"
            taken += 1
            if taken == 4:
                break
    out.mkdir(parents=True)
    (out / "planted.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return planted


@pytest.mark.full
def test_demo_corpus_with_planted_copies_at_1_and_8_tasks(repo_root, tmp_path):
    from data_prep.config import SourceConfig, load_data_config
    from data_prep.pipeline import resolve_sources

    repo = Path(repo_root)
    outs = {}
    for tasks in (1, 8):
        cfg = load_data_config(
            repo / "configs" / "data" / "demo.yaml",
            [f"cache_dir={repo / '.cache' / 'data'}", f"executor.tasks={tasks}", "executor.workers=2"],
        )
        roots = resolve_sources(cfg)  # fetched now, or found in the cache
        names = [s.name for s in cfg.sources]
        files = {n: Path(roots[names.index(n)]) for n in ("ddtp-ko", "lo-help-ko")}
        planted = _plant_demo_copies(files, tmp_path / f"planted{tasks}")
        cfg.sources.append(
            SourceConfig(name="planted-ko", type="jsonl", path=str(tmp_path / f"planted{tasks}"))
        )
        outs[tasks] = tmp_path / f"out{tasks}"
        build(cfg, outs[tasks], tokenizer=ByteTokenizer())
    assert len(planted) == 24
    units = list_units(cfg.sources, [Path(p) for p in resolve_sources(cfg)])
    task_of = {u.source_index: t for t in range(8) for u in task_units(units, t, 8)}
    assert task_of[len(cfg.sources) - 1] not in {task_of[names.index(n)] for n in files}
    removed = {}
    for tasks, out in outs.items():
        recs = {r["id"]: r for r in _records(out, "removed")}
        removed[tasks] = {i: (recs[i]["step"], recs[i]["reason"], recs[i].get("detail")) for i in planted}
        assert all(v[:2] == ("dedup", "near_duplicate") for v in removed[tasks].values()), removed[tasks]
    assert removed[1] == removed[8]
    assert [r["id"] for r in _records(outs[1], "kept")] == [r["id"] for r in _records(outs[8], "kept")]
    dec = lambda out: sorted((r["id"], r["reason"], r.get("detail", "")) for r in _records(out, "removed"))  # noqa: E731
    assert dec(outs[1]) == dec(outs[8])
    assert json.loads((outs[1] / "stats.json").read_text()) == json.loads(
        (outs[8] / "stats.json").read_text()
    )
    logs = outs[8] / "work" / "logs"
    for stage in ("dedup-signatures", "dedup-exact", "dedup-buckets", "dedup"):
        assert len(list((logs / stage / "logs").glob("task_*.log"))) == 8, stage
