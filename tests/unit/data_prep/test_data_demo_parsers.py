"""Parsers of the demo sources (run on short texts written here; the real fetch runs in the demo test)."""

from data_prep.sources.demo import ddtp_entries
from data_prep.sources.markup import groff_to_text, html_to_text

DDTP = """Package: hello
Description-md5: 0123456789abcdef0123456789abcdef
Description-ko: 인사하는 프로그램
 이 프로그램은 인사말을 출력합니다.
 .
 두 번째 문단입니다.

Package: world
Description-md5: fedcba9876543210fedcba9876543210
Description-ko: 세계 지도
 지도를 보여 줍니다.
"""


def test_ddtp_entries():
    assert list(ddtp_entries(DDTP)) == [
        "인사하는 프로그램\n이 프로그램은 인사말을 출력합니다.\n\n두 번째 문단입니다.",
        "세계 지도\n지도를 보여 줍니다.",
    ]


def test_html_to_text_drops_scripts_and_navigation():
    html = (
        "<html><head><title>t</title><script>var x = 1;</script></head><body><header>메뉴</header>"
        "<h1>제목</h1><p>첫 문단 &amp; 기호.</p><p>둘째   문단.</p><footer>저작권</footer></body></html>"
    )
    assert html_to_text(html) == "제목\n\n첫 문단 & 기호.\n\n둘째 문단."


def test_groff_to_text_keeps_prose():
    src = '.\\" comment\n.TH LS 1\n.SH 名前\nls \\- ディレクトリの内容を\n一覧表示する\n.SH 書式\n.B ls\n[\\fIオプション\\fR]\n'
    text = groff_to_text(src)
    assert "comment" not in text and ".TH" not in text
    assert "名前" in text and "ls - ディレクトリの内容を 一覧表示する" in text and "[オプション]" in text


def test_mallard_credits_are_not_text():
    page = (
        '<page xmlns="http://projectmallard.org/1.0/"><info><credit type="author"><name>홍길동</name>'
        "<email>hong@example.org</email></credit><desc>요약</desc></info><title>새 사용자 추가</title>"
        "<p>컴퓨터에 사용자 계정을 추가할 수 있습니다.</p></page>"
    )
    assert html_to_text(page) == "새 사용자 추가\n\n컴퓨터에 사용자 계정을 추가할 수 있습니다."
