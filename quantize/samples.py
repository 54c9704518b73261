"""Short texts written for this project (no third-party text): tests and the demo calibrate and evaluate on them
until the corpus stage provides held-out shards. Each language has its own paragraphs so perplexity per language
can be reported."""

from __future__ import annotations

SAMPLE_TEXTS: dict[str, list[str]] = {
    "ko": [
        "오늘 아침에는 비가 조금 내렸지만 오후에는 하늘이 맑아졌다. 우리는 공원에 가서 산책을 했다.",
        "이 도서관은 월요일부터 금요일까지 아침 아홉 시에 문을 열고 저녁 여섯 시에 닫습니다.",
        "한국어 문장을 잘 이해하는 언어 모델을 만들려면 깨끗한 데이터와 좋은 토크나이저가 필요하다.",
        "김치찌개를 끓일 때는 잘 익은 김치와 돼지고기, 두부, 대파를 준비하면 맛있게 만들 수 있다.",
        "학생들은 시험이 끝난 뒤에 친구들과 함께 영화를 보러 극장에 갔다. 영화는 아주 재미있었다.",
        "서울에서 부산까지 기차를 타면 두 시간 반 정도 걸린다. 창밖으로 산과 강이 보였다.",
        "전문가 혼합 모델은 토큰마다 몇 개의 전문가만 계산하기 때문에 같은 비용으로 더 큰 모델을 쓸 수 있다.",
        "할머니께서는 매일 아침 마당에 있는 꽃에 물을 주시고 강아지에게 밥을 주신다.",
    ],
    "en": [
        "The library opens at nine in the morning and closes at six in the evening from Monday to Friday.",
        "A mixture of experts model computes only a few experts per token, so a larger model costs the same.",
        "We walked along the river after lunch and watched the boats move slowly under the old bridge.",
        "Quantization stores each weight in fewer bits, which makes the model smaller and often faster to serve.",
        "She wrote a short letter to her brother and asked him to visit during the summer holidays.",
        "The train from the city to the coast takes about two hours, and the view is beautiful in spring.",
    ],
    "ja": [
        "今日は朝から雨が降っていましたが、午後には晴れて、公園で散歩をしました。",
        "この図書館は月曜日から金曜日まで、朝九時に開いて夕方六時に閉まります。",
        "日本語の文章をよく理解するモデルを作るには、きれいなデータが必要です。",
        "駅の近くに新しいパン屋ができて、毎朝たくさんの人が並んでいます。",
        "専門家混合モデルは、各トークンに対して少数の専門家だけを計算します。",
    ],
    "code": [
        "def add(a, b):\n    return a + b\n\n\nprint(add(2, 3))\n",
        "for i in range(10):\n    if i % 2 == 0:\n        print(i)\n",
        "class Counter:\n    def __init__(self):\n        self.n = 0\n\n    def step(self):\n        self.n += 1\n",
        "import json\n\nwith open('data.json') as f:\n    data = json.load(f)\nprint(len(data))\n",
        "def mean(xs):\n    return sum(xs) / len(xs) if xs else 0.0\n",
    ],
}

KOREAN_PROMPT = "오늘 아침에는 비가 조금"
