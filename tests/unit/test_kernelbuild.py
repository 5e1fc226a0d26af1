"""`fastrestart kernel build` without a kernel: series, config post-check, cache keys, source specs."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
from fastrestart.artifacts import kernelbuild as kb
from fastrestart.errors import UsageError

GIT_ENV = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@t", "HOME": "/nonexistent", "GIT_CONFIG_NOSYSTEM": "1"}


def _git(cwd: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True,
                          env={**GIT_ENV, "PATH": "/usr/bin:/bin"}).stdout


@pytest.fixture
def series(tmp_path: Path) -> dict[str, Path]:
    """A tiny git tree, a good two-patch series made from it, and a patch whose context is wrong."""
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "hello.c").write_text("int main(void)\n{\n\treturn 0;\n}\n")
    _git(tree, "init", "-q", "-b", "main")
    _git(tree, "add", ".")
    _git(tree, "commit", "-q", "-m", "base")
    (tree / "hello.c").write_text("int main(void)\n{\n\treturn 1;\n}\n")
    _git(tree, "commit", "-q", "-am", "return 1")
    (tree / "README").write_text("hello\n")
    _git(tree, "add", "README")
    _git(tree, "commit", "-q", "-m", "add README")
    good = tmp_path / "good"
    _git(tree, "format-patch", "-q", "-o", str(good), "HEAD~2")
    _git(tree, "reset", "-q", "--hard", "HEAD~2")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "0001-bad.patch").write_text(
        "From: t <t@t>\nSubject: [PATCH] bad\n\n---\n"
        "diff --git a/hello.c b/hello.c\n--- a/hello.c\n+++ b/hello.c\n"
        "@@ -1,4 +1,4 @@\n int main(void)\n {\n-\treturn 42;\n+\treturn 43;\n }\n")
    plain = tmp_path / "plain"
    shutil.copytree(tree, plain, ignore=shutil.ignore_patterns(".git"))
    return {"tree": tree, "plain": plain, "good": good, "bad": bad, "tmp": tmp_path}


@pytest.mark.parametrize("kind", ["plain", "tree"])
def test_good_series_applies(series, kind):
    tree = series[kind]
    patches = kb.series_patches(series["good"], series["tmp"] / "split")
    assert [p.name for p in patches] == ["0001-return-1.patch", "0002-add-README.patch"]
    kb.apply_series(tree, patches, series["tmp"] / "log")
    assert "return 1" in (tree / "hello.c").read_text()
    assert (tree / "README").read_text() == "hello\n"
    if kind == "tree":  # git am keeps the commits
        assert "add README" in _git(tree, "log", "--oneline")


@pytest.mark.parametrize("kind, tool", [("plain", "patch -p1"), ("tree", "git am")])
def test_bad_patch_is_named(series, kind, tool):
    patches = kb.series_patches(series["bad"], series["tmp"] / "split")
    with pytest.raises(UsageError) as caught:
        kb.apply_series(series[kind], patches)
    message = str(caught.value)
    assert "0001-bad.patch ([PATCH] bad) does not apply" in message and tool in message
    assert "hello.c" in message  # the first lines of the tool's own output
    if kind == "tree":  # the failed am was aborted: the tree is usable again
        assert not (series["tree"] / ".git" / "rebase-apply").exists()


def test_mbox_series_is_split_and_applied(series):
    mbox = series["tmp"] / "series.mbox"
    mbox.write_text("".join(p.read_text() for p in sorted(series["good"].glob("*.patch"))))
    patches = kb.series_patches(mbox, series["tmp"] / "split")
    assert [p.name for p in patches] == ["series.mbox.0001.patch", "series.mbox.0002.patch"]
    assert kb.patch_subject(patches[1]) == "[PATCH 2/2] add README"
    kb.apply_series(series["plain"], patches)
    assert (series["plain"] / "README").exists()


def test_a_plain_diff_is_a_series_of_one(series):
    diff = series["tmp"] / "fix.diff"
    diff.write_text("--- a/hello.c\n+++ b/hello.c\n@@ -1,4 +1,4 @@\n int main(void)\n {\n-\treturn 0;\n"
                    "+\treturn 7;\n }\n")
    assert kb.series_patches(diff, series["tmp"] / "split") == [diff]
    kb.apply_series(series["plain"], [diff])
    assert "return 7" in (series["plain"] / "hello.c").read_text()


def test_series_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(UsageError, match=r"no \*\.patch"):
        kb.series_patches(tmp_path / "empty", tmp_path / "split")
    with pytest.raises(UsageError, match="neither a directory"):
        kb.series_patches(tmp_path / "nope", tmp_path / "split")


FRAGMENT = """\
# comment
CONFIG_DEV_DAX=y
CONFIG_DEV_DAX_PMEM=y
CONFIG_VFIO_PCI=m
CONFIG_LOG_BUF_SHIFT=18
CONFIG_CMDLINE="kho=on"
# CONFIG_DEFERRED_STRUCT_PAGE_INIT is not set
# CONFIG_DEBUG_INFO is not set
"""
FINAL = """\
CONFIG_DEV_DAX=y
# CONFIG_DEV_DAX_PMEM is not set
CONFIG_VFIO_PCI=y
CONFIG_LOG_BUF_SHIFT=18
CONFIG_CMDLINE="kho=on"
CONFIG_DEFERRED_STRUCT_PAGE_INIT=y
"""


def test_post_check_names_every_option_that_did_not_stick(tmp_path):
    fragment, config = tmp_path / "rig.config", tmp_path / ".config"
    fragment.write_text(FRAGMENT)
    config.write_text(FINAL)
    mismatches = {m.option: m for m in kb.check_config(config, [fragment])}
    # DEBUG_INFO is absent from the .config, which counts as not set: as requested.
    assert sorted(mismatches) == ["CONFIG_DEFERRED_STRUCT_PAGE_INIT", "CONFIG_DEV_DAX_PMEM", "CONFIG_VFIO_PCI"]
    assert str(mismatches["CONFIG_DEV_DAX_PMEM"]) == (
        "CONFIG_DEV_DAX_PMEM: rig.config asks for y, the .config has not set")
    assert str(mismatches["CONFIG_DEFERRED_STRUCT_PAGE_INIT"]).endswith("asks for not set, the .config has y")
    assert mismatches["CONFIG_VFIO_PCI"].wanted == "m" and mismatches["CONFIG_VFIO_PCI"].got == "y"


def test_post_check_last_fragment_wins(tmp_path):
    first, second, config = tmp_path / "a.config", tmp_path / "b.config", tmp_path / ".config"
    first.write_text("CONFIG_KEXEC=y\n")
    second.write_text("# CONFIG_KEXEC is not set\n")
    config.write_text("# CONFIG_KEXEC is not set\n")
    assert kb.check_config(config, [first, second]) == []
    assert [m.fragment for m in kb.check_config(config, [second, first])] == ["a.config"]


def test_repo_fragments_parse():
    fragments = sorted((Path(__file__).resolve().parents[2] / "kernels" / "fragments").glob("*.config"))
    assert fragments
    luo = kb.parse_config((fragments[0].parent / "luo.config").read_text())
    assert luo["CONFIG_DEFERRED_STRUCT_PAGE_INIT"] == "n"  # KHO needs it off
    assert luo["CONFIG_LIVEUPDATE_MEMFD"] == "y"


def test_cache_key_follows_contents(tmp_path):
    fragment, patch = tmp_path / "f.config", tmp_path / "0001-x.patch"
    fragment.write_text("CONFIG_KEXEC=y\n")
    patch.write_text("diff\n")
    identity = {"kind": "debian-source", "version": "7.2.13-1", "sha256": "ab"}
    key = kb.build_key(identity, [patch], [fragment], "gcc 12")
    assert key == kb.build_key(dict(identity), [patch], [fragment], "gcc 12")
    fragment.write_text("CONFIG_KEXEC=m\n")
    assert kb.build_key(identity, [patch], [fragment], "gcc 12") != key
    fragment.write_text("CONFIG_KEXEC=y\n")
    patch.write_text("diff!\n")
    assert kb.build_key(identity, [patch], [fragment], "gcc 12") != key
    patch.write_text("diff\n")
    assert kb.build_key(identity, [patch], [fragment], "gcc 13") != key
    assert kb.build_key({**identity, "version": "7.2.14-1"}, [patch], [fragment], "gcc 12") != key
    assert kb.build_key(identity, [patch], [fragment], "gcc 12") == key


@pytest.mark.parametrize("spec, message", [
    ("7.2", "needs a kind and a value"),
    ("debian-source:", "needs a kind and a value"),
    ("debian-source:seven", "not a kernel series like 7.2"),
    ("tarball:/x", "Unknown kernel source kind 'tarball'"),
    ("path:/nonexistent/linux", "is not a kernel source tree"),
    ("git:/nonexistent/linux@v7.2", "does not exist"),
])
def test_source_spec_errors_are_clear(spec, message):
    with pytest.raises(UsageError, match=message) as caught:
        kb.parse_source(spec)
    assert "debian-source:VERSION" in str(caught.value)  # every error says what is accepted


def test_source_spec_parsing(tmp_path):
    assert kb.parse_source("debian-source:7.2") == kb.Source("debian-source", "7.2")
    assert kb.parse_source(f"git:{tmp_path}@v7.2") == kb.Source("git", str(tmp_path), "v7.2")
    assert kb.parse_source(f"git:{tmp_path}") == kb.Source("git", str(tmp_path), "HEAD")
    assert kb.parse_source(f"git:{tmp_path}@HEAD@{{1}}").rev == "HEAD@{1}"


def test_missing_tools_name_the_packages(monkeypatch, tmp_path):
    monkeypatch.setattr(kb.shutil, "which", lambda tool: None)
    monkeypatch.setattr(kb, "BUILD_HEADERS", {str(tmp_path / "gelf.h"): "libelf-dev"})
    (tmp_path / "Makefile").touch()
    (tmp_path / "scripts" / "kconfig").mkdir(parents=True)
    with pytest.raises(UsageError) as caught:
        kb.build_kernel(f"path:{tmp_path}")
    message = str(caught.value)
    assert "apt-get install -y" in message
    for package in ("flex", "bison", "libelf-dev", "make", "gcc", "rsync"):
        assert package in message


def test_second_build_is_cached(monkeypatch, tmp_path):
    """Same inputs -> the cached install, at once (no tool runs)."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(kb, "missing_tools", lambda kind, series=False: [])
    monkeypatch.setattr(kb, "compiler_identity", lambda: "gcc (test) 1")
    tree = tmp_path / "linux"
    (tree / "scripts" / "kconfig").mkdir(parents=True)
    (tree / "Makefile").write_text("all:\n")
    fragment = tmp_path / "f.config"
    fragment.write_text("CONFIG_KEXEC=y\n")
    source = kb.parse_source(f"path:{tree}")
    key = kb.build_key(kb.source_identity(source), [], [fragment], "gcc (test) 1")
    directory = tmp_path / "cache" / "fastrestart" / "builds" / key
    (directory / "install").mkdir(parents=True)
    (directory / "build.json").write_text(json.dumps({"release": "7.2.0-frtest"}))
    messages = []
    built = kb.build_kernel(f"path:{tree}", fragments=[fragment], progress=messages.append)
    assert built.cached and built.spec == f"build:{key}" and built.release == "7.2.0-frtest"
    assert any(m.startswith("cached") for m in messages)
    (tree / "Makefile").write_text("all: changed\n")  # a changed tree is another build
    assert kb.build_key(kb.source_identity(source), [], [fragment], "gcc (test) 1") != key
