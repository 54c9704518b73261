"""`make demo`'s bookkeeping: stages append lines to summary.tsv, the summary prints them as a table."""

from kmoe.cli import main


def test_stages_append_lines_and_the_summary_is_a_table(tmp_path, capsys):
    d = ["--dir", str(tmp_path)]
    assert main(["demo", "begin", "demo-x", "first stage", *d]) == 0
    assert main(["demo", "note", "demo-x", "--figure", "42 widgets", *d]) == 0
    assert main(["demo", "note", "demo-model", *d]) == 0  # a stage whose outputs are missing: says why
    out = capsys.readouterr().out
    assert "=== demo-x: first stage ===" in out and "--- demo-x done in" in out
    lines = (tmp_path / "summary.tsv").read_text().splitlines()
    assert [ln.split("\t")[0] for ln in lines] == ["demo-x", "demo-model"]
    assert lines[0].split("\t")[2] == "42 widgets" and lines[1].split("\t")[1] == ""
    assert "figure unavailable" in lines[1]
    assert main(["demo", "summary", *d]) == 0
    table = capsys.readouterr().out.strip().splitlines()
    assert table[1].split() == ["stage", "time", "key", "figure"]
    assert table[2].startswith("demo-x ") and table[2].endswith("42 widgets") and " 0:0" in table[2]
    assert table[-1].startswith("total")
    assert main(["demo", "summary", "--reset", *d]) == 0 and not (tmp_path / "summary.tsv").exists()
    assert main(["demo", "summary", *d]) == 2  # nothing to print is an error, not an empty table
