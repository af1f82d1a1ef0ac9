import sys

import pytest

from tests.benchmarks import load_benchmark

harness = load_benchmark("harness")

DOC = "# Results\n\nintro\n\n## A\n\nold a\n\n## B\n\nkeep b  \n| x |\n\n## C\n\nkeep c"


def test_replace_middle_section_keeps_others_byte_identical(tmp_path):
    path = tmp_path / "R.md"
    path.write_text(DOC)
    harness.replace_section(path, "## B\n\nnew b\n")
    out = path.read_text()
    assert out.startswith("# Results\n\nintro\n\n## A\n\nold a\n\n## B\n\nnew b\n\n## C")
    assert out.endswith("## C\n\nkeep c")
    assert "keep b" not in out


def test_replace_last_and_append(tmp_path):
    path = tmp_path / "R.md"
    path.write_text(DOC)
    harness.replace_section(path, "## C\n\nnew c")
    assert path.read_text() == DOC.replace("keep c", "new c\n")
    harness.replace_section(path, "## D\n\nd\n")
    assert path.read_text() == DOC.replace("keep c", "new c\n") + "\n## D\n\nd\n"


def test_prefix_heading_is_not_matched(tmp_path):
    path = tmp_path / "R.md"
    path.write_text("## OPL: speed\n\nx\n")
    harness.replace_section(path, "## OPL\n\ny\n")
    assert path.read_text() == "## OPL: speed\n\nx\n\n## OPL\n\ny\n"


def test_section_header_and_table():
    text = harness.section("## T", harness.markdown_table(["a", "b"], [[1, "x|y"]]), ["cmd", "a b"])
    assert text.startswith("## T\n\nCommand: `cmd 'a b'`")
    assert "load average" in text and "| 1 | x\\|y |" in text
    with pytest.raises(ValueError, match="## "):
        harness.section("T", "")


def test_peak_rss_sees_an_allocation_and_child_rss():
    with harness.PeakRSS() as peak:
        block = bytearray(64 * 2**20)
        block[::4096] = b"\x01" * len(block[::4096])
    assert peak.bytes >= 60 * 2**20, (peak.bytes, peak.method)
    rc, rss = harness.child_peak_rss(
        [sys.executable, "-c", "b = bytearray(80 * 2**20); b[::4096] = b'1' * len(b[::4096])"]
    )
    assert rc == 0 and 80 * 2**20 <= rss < 400 * 2**20


def test_paired_interval_and_verdict():
    mean, low, high = harness.paired_interval([1.0, 2.0, 3.0])
    # mean 2, sd 1, t(0.975, 2) = 4.302653: half width 4.302653 / sqrt(3)
    assert mean == pytest.approx(2.0)
    assert high - mean == pytest.approx(4.302653 / 3**0.5, rel=1e-6)
    assert low == pytest.approx(2 * mean - high)
    assert harness.verdict(0.1, 0.5) == "helps"
    assert harness.verdict(0.1, 0.5, lower_is_better=True) == "hurts"
    assert harness.verdict(-0.5, -0.1, lower_is_better=True) == "helps"
    assert harness.verdict(-0.1, 0.1) == "no detectable difference"
    with pytest.raises(ValueError, match="at least 2"):
        harness.paired_interval([1.0])
