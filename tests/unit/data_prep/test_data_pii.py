"""Korean PII: validated matches are replaced and counted per kind; look-alikes are left alone."""

from data_prep.config import PiiConfig
from data_prep.pii_detect import luhn, scrub, valid_brn, valid_rrn
from data_prep.records import Doc
from data_prep.steps.base import StepCounts
from data_prep.steps.pii import PiiStep

ALL = ["rrn", "phone", "brn", "card", "email", "ip"]


def make_rrn(front: str, gender: str, serial: str) -> str:
    """A checksum-valid RRN for a date (the test's own generator, independent of valid_rrn)."""
    digits = [int(c) for c in front + gender + serial]
    weights = (2, 3, 4, 5, 6, 7, 8, 9, 2, 3, 4, 5)
    check = (11 - sum(d * w for d, w in zip(digits, weights)) % 11) % 10
    return f"{front}-{gender}{serial}{check}"


def test_rrn_checksum_and_date():
    good = make_rrn("900101", "1", "23456")
    assert valid_rrn(*good.split("-"))
    front, back = good.split("-")
    bad_check = back[:-1] + str((int(back[-1]) + 1) % 10)
    assert not valid_rrn(front, bad_check)
    feb30 = make_rrn("900230", "1", "23456")  # checksum right, date impossible
    assert not valid_rrn(*feb30.split("-"))
    text, counts = scrub(f"주민번호 {good} 와 잘못된 {front}-{bad_check}", ALL)
    assert text == f"주민번호 <|rrn|> 와 잘못된 {front}-{bad_check}" and counts == {"rrn": 1}


def test_phone_numbers():
    text, counts = scrub(
        "연락처: 010-1234-5678, 사무실 02-123-4567, 지방 031 987 6543, +82 10 2222 3333.", ALL
    )
    assert text == "연락처: <|phone|>, 사무실 <|phone|>, 지방 <|phone|>, <|phone|>."
    assert counts == {"phone": 4}


def test_business_registration_number_checksum():
    # 220-81-62517 is a BRN with a valid checksum (weights 1,3,7,1,3,7,1,3,5).
    assert valid_brn("220", "81", "62517")
    assert not valid_brn("220", "81", "62518")
    text, counts = scrub("사업자등록번호 220-81-62517, 오타 220-81-62518", ALL)
    assert text == "사업자등록번호 <|brn|>, 오타 220-81-62518" and counts == {"brn": 1}


def test_cards_use_luhn_and_ignore_decimals():
    assert luhn("4111111111111111") and not luhn("4111111111111112")
    text, counts = scrub("카드 4111-1111-1111-1111 / 4111 1111 1111 1112 / pi 3.14159265358979323", ALL)
    assert text == "카드 <|card|> / 4111 1111 1111 1112 / pi 3.14159265358979323" and counts == {"card": 1}


def test_email_and_ip():
    text, counts = scrub("메일 hong.gildong@example.co.kr 서버 211.234.56.78 버전 999.1.2.3", ALL)
    assert text == "메일 <|email|> 서버 <|ip|> 버전 999.1.2.3"
    assert counts == {"email": 1, "ip": 1}


def test_look_alikes_are_left_alone():
    keep = (
        "섹션 8.2.2.1 참조, LibreOffice 7.4.1.2, 사설망 192.168.0.1, 루프백 127.0.0.1, "
        "값 0.0224614952, 우편번호 Boston, MA 02111-1307, 수치 -0.0617539772"
    )
    assert scrub(keep, ALL) == (keep, {})


def test_step_counts_per_kind_and_respects_code_setting():
    counts = StepCounts()
    step = PiiStep("/tmp/unused", PiiConfig())
    doc = Doc("x", "s", (0, 0, 0), text="a@b.com 010-1111-2222 c@d.org", lang="ko")
    assert step.apply(doc, counts).text == "<|email|> <|phone|> <|email|>"
    assert (
        counts.notes["pii:email"] == 2
        and counts.notes["pii:phone"] == 1
        and counts.notes["docs_with_pii"] == 1
    )
    keep = PiiStep("/tmp/unused", PiiConfig(apply_to_code=False))
    code = Doc("y", "s", (0, 0, 0), text="ADDR = '121.134.56.78'", lang="code")
    assert keep.apply(code, StepCounts()).text == "ADDR = '121.134.56.78'"
