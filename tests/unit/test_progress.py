"""Progress of downloads and builds (fastrestart.artifacts.progress): quiet off a terminal, bars on one."""

from __future__ import annotations

import io
import re

import pytest
from fastrestart.artifacts import progress
from fastrestart.artifacts.debian import AptRoot


def last_line(text: str) -> str:
    """What a terminal shows on the last line written: escapes gone, the text after the last \\r."""
    return [line for line in re.split(r"[\r\n]", re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", text)) if line.strip()][-1]


class Terminal(io.StringIO):
    """A stream that says it is a terminal."""

    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize(("count", "text"), [
    (0, "0 B"), (950, "950 B"), (999, "999 B"), (1000, "1.0 kB"), (4500, "4.5 kB"), (48_400, "48 kB"),
    (999_600, "1.0 MB"), (9_960_000, "10 MB"), (91_234_567, "91 MB"), (270e6, "270 MB"), (1.2e9, "1.2 GB"),
    (-5, "0 B"),
])
def test_bytes_are_decimal_units_as_apt_prints_them(count, text):
    assert progress.format_bytes(count) == text


@pytest.mark.parametrize(("text", "count"), [
    ("48.4 kB", 48_400), ("3224 kB", 3_224_000), ("3,224 kB", 3_224_000), ("91 MB", 91_000_000),
    ("0 B", 0), ("1.5 GB", 1_500_000_000), ("12 parrots", None), ("", None),
])
def test_sizes_apt_prints_parse_back(text, count):
    assert progress.parse_bytes(text) == count


def test_rates_and_durations():
    assert progress.format_rate(91e6, 20) == "4.5 MB/s"
    assert progress.format_rate(100, 0).endswith("/s")  # no division by zero
    assert progress.format_duration(0.42) == "0.4 s"
    assert progress.format_duration(20.4) == "20 s"
    assert progress.format_duration(125) == "2 min 05 s"
    assert progress.format_duration(3720) == "1 h 02 min"


def _archive(tmp_path):
    archives = tmp_path / "archives"
    (archives / "partial").mkdir(parents=True)
    (archives / "old_1.0_all.deb").write_bytes(b"x" * 5000)  # already there: not part of this download
    return archives


def test_off_a_terminal_a_download_is_two_plain_lines_with_the_bytes_apt_wrote(tmp_path):
    archives = _archive(tmp_path)
    stream = io.StringIO()
    with progress.download("2 packages for the test", watch=(archives, archives / "partial"), total=3_000_000,
                           stream=stream):
        (archives / "partial" / "b_1_all.deb").write_bytes(b"b" * 1_000_000)
        (archives / "a_1_all.deb").write_bytes(b"a" * 2_000_000)
    text = stream.getvalue()
    assert "\r" not in text and "\x1b" not in text
    start, end = text.splitlines()
    assert start == "fetching 2 packages for the test (3.0 MB)"
    assert end.startswith("fetched 2 packages for the test: 3.0 MB in ") and end.endswith("/s)")


def test_off_a_terminal_a_build_is_two_plain_lines(tmp_path):
    stream = io.StringIO()
    with progress.build("the L1 initramfs for 6.12", stream=stream):
        pass
    with progress.build("kernel 6.12", verb="unpacking", done="unpacked", stream=stream):
        pass
    lines = stream.getvalue().splitlines()
    assert "\r" not in stream.getvalue()
    assert lines[0] == "building the L1 initramfs for 6.12"
    assert lines[1].startswith("built the L1 initramfs for 6.12 in ")
    assert lines[2] == "unpacking kernel 6.12" and lines[3].startswith("unpacked kernel 6.12 in ")


def test_work_that_fails_says_nothing_was_done(tmp_path):
    stream = io.StringIO()
    with pytest.raises(RuntimeError), progress.build("edu_uio.ko", stream=stream):
        raise RuntimeError("gcc broke")
    with pytest.raises(RuntimeError), progress.download("x", watch=(tmp_path,), stream=stream):
        raise RuntimeError("mirror gone")
    assert stream.getvalue().splitlines() == ["building edu_uio.ko", "fetching x"]


def test_stderr_that_is_no_terminal_gets_no_bar(capsys, tmp_path):
    with progress.download("lists", watch=(tmp_path,)) as fetch:
        fetch.report(48_400)
    err = capsys.readouterr().err
    assert "\r" not in err and err.splitlines()[0] == "fetching lists"
    assert err.splitlines()[1].startswith("fetched lists: 48 kB in ")


def test_on_a_terminal_a_bar_runs_then_one_line_stays(tmp_path, monkeypatch):
    monkeypatch.setenv("TERM", "xterm")
    monkeypatch.setattr(progress, "POLL_S", 0.01)
    archives = _archive(tmp_path)
    stream = Terminal()
    with progress.download("1 package for the test", watch=(archives, archives / "partial"), total=1000,
                           item=lambda name: name.split("_")[0], stream=stream) as fetch:
        (archives / "partial" / "pkg_1_all.deb").write_bytes(b"p" * 1000)
        assert fetch.written() == (1000, "pkg")
    text = stream.getvalue()
    assert "\r" in text and "fetching 1 package for the test" in text  # the bar
    assert text.endswith("\n") and last_line(text).startswith("fetched 1 package for the test: 1.0 kB in ")
    stream = Terminal()
    with progress.build("edu_uio.ko", stream=stream):
        pass
    assert "\r" in stream.getvalue() and last_line(stream.getvalue()).startswith("built edu_uio.ko in ")


def test_a_dumb_terminal_gets_plain_lines(monkeypatch):
    monkeypatch.setenv("TERM", "dumb")
    assert not progress.interactive(Terminal())
    monkeypatch.setenv("TERM", "xterm")
    assert progress.interactive(Terminal()) and not progress.interactive(io.StringIO())


def test_a_file_moved_out_of_partial_counts_once(tmp_path):
    archives = _archive(tmp_path)
    fetch = progress.Download((archives, archives / "partial"))
    (archives / "partial" / "a_1_all.deb").write_bytes(b"a" * 700)
    assert fetch.written()[0] == 700
    (archives / "partial" / "a_1_all.deb").rename(archives / "a_1_all.deb")
    assert fetch.fetched() == 700
    fetch.report(650)  # the downloader's own count wins
    assert fetch.fetched() == 650


# -- apt: what is fetched is what apt's --print-uris says it lacks ---------------------------------

QEMU_URI = ("'http://deb.example/pool/main/q/qemu/qemu-system-x86_10.0_amd64.deb' qemu-system-x86_10.0_amd64.deb "
            "3000000 SHA256:ab\n")
LIBC_URI = "'http://deb.example/pool/main/g/glibc/libc6_2.41_amd64.deb' libc6_2.41_amd64.deb 120000 SHA256:cd\n"
PRINT_URIS = "Reading package lists...\n" + QEMU_URI + LIBC_URI


def _fake_apt(apt, monkeypatch, plan):
    calls = []

    def fake(tool, *args, **kw):
        calls.append(args)
        if "--print-uris" in args:
            return plan
        if "-s" in args:
            return "Inst libc6 (2.41 Debian:13 [amd64])\nInst qemu-system-x86 (10.0 Debian:13 [amd64])\n"
        return ""

    monkeypatch.setattr(apt, "_apt", fake)
    apt.archives.mkdir(parents=True)
    for name in ("libc6_2.41_amd64.deb", "qemu-system-x86_10.0_amd64.deb"):
        (apt.archives / name).touch()
    return calls


def test_a_closure_download_shows_what_apt_will_fetch(tmp_path, monkeypatch, capsys):
    apt = AptRoot("trixie", root=tmp_path)
    calls = _fake_apt(apt, monkeypatch, PRINT_URIS)
    apt.download_closure(["qemu-system-x86"], purpose="the L1 userspace (trixie)")
    assert ("--download-only", "-y", "install", "qemu-system-x86") in calls
    assert capsys.readouterr().err.splitlines()[0] == "fetching 2 packages for the L1 userspace (trixie) (3.1 MB)"


def test_a_warm_closure_prints_nothing_and_fetches_nothing(tmp_path, monkeypatch, capsys):
    apt = AptRoot("trixie", root=tmp_path)
    calls = _fake_apt(apt, monkeypatch, "Reading package lists...\n")
    assert len(apt.download_closure(["qemu-system-x86"])) == 2
    assert not [c for c in calls if "--download-only" in c]
    assert capsys.readouterr().err == ""


def test_a_single_package_is_named(tmp_path, monkeypatch, capsys):
    apt = AptRoot("trixie", root=tmp_path)
    _fake_apt(apt, monkeypatch, QEMU_URI)
    apt.download(["qemu-system-x86"])
    assert capsys.readouterr().err.splitlines()[0] == "fetching qemu-system-x86 (3.0 MB)"


def test_without_a_directory_to_watch_the_downloader_says_what_it_fetched(tmp_path):
    stream = io.StringIO()
    with progress.download("lists", watch=(), stream=stream):
        pass
    with progress.download("lists", watch=(), stream=stream) as fetch:
        fetch.report(11_000_000)
    lines = stream.getvalue().splitlines()
    assert lines[1].startswith("fetched lists in ") and ":" not in lines[1]
    assert lines[3].startswith("fetched lists: 11 MB in ") and lines[3].endswith("/s)")


def test_apt_update_reports_the_bytes_apt_says_it_fetched(tmp_path, monkeypatch, capsys):
    from fastrestart.artifacts import debian

    monkeypatch.setattr(debian, "system_mirror", lambda: ("http://deb.example/debian", None))
    apt = AptRoot("trixie", root=tmp_path)
    monkeypatch.setattr(apt, "_apt", lambda *args, **kw: ("Get:2 http://deb.example/debian sid/main amd64 Packages "
                                                         "[10.8 MB]\nFetched 11.0 MB in 2s (7131 kB/s)\n"))
    apt.update()
    apt.update()  # fresh lists: nothing to fetch, nothing said
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 2 and lines[0] == "fetching the Debian trixie package lists"
    assert lines[1].startswith("fetched the Debian trixie package lists: 11 MB in ")


def test_on_a_terminal_a_note_replaces_a_status_line_left_without_its_newline(monkeypatch):
    monkeypatch.setenv("TERM", "xterm")
    stream = Terminal()
    stream.write("[   0.1s] trixie: prepare")  # the CLI's step line on a terminal
    progress.note("fetched the Debian trixie package lists: 10 MB in 2.1 s (4.8 MB/s)", stream)
    assert last_line(stream.getvalue()) == "fetched the Debian trixie package lists: 10 MB in 2.1 s (4.8 MB/s)"
