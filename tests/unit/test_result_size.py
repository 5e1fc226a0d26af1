"""Results that stay small: boot.img lives outside the run directory unless asked for
(RigConfig.keep_images), and results.results_dir_size measures what a run directory holds."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from fastrestart.campaign.results import results_dir_size
from fastrestart.vm.rig import Rig, RigConfig


def test_results_dir_size_counts_every_file_at_any_depth(tmp_path: Path):
    run = tmp_path / "run"
    (run / "logs" / "deep").mkdir(parents=True)
    (run / "result.json").write_bytes(b"x" * 100)
    (run / "logs" / "l1-console.log").write_bytes(b"y" * 2000)
    (run / "logs" / "deep" / "empty").write_bytes(b"")
    assert results_dir_size(run) == 2100


def test_results_dir_size_counts_sparse_files_in_full_and_skips_symlinks(tmp_path: Path):
    run = tmp_path / "run"
    run.mkdir()
    with (run / "sparse.img").open("wb") as handle:
        handle.truncate(5 << 20)
    outside = tmp_path / "big"
    outside.write_bytes(b"z" * 4096)
    (run / "link").symlink_to(outside)
    (run / "dirlink").symlink_to(tmp_path)  # not followed: no loop, nothing counted twice
    assert results_dir_size(run) == 5 << 20


def test_results_dir_size_of_a_missing_directory_is_zero(tmp_path: Path):
    assert results_dir_size(tmp_path / "nothing") == 0


needs_mkfs = pytest.mark.skipif(not shutil.which("mkfs.ext4"), reason="mkfs.ext4 is not on PATH (e2fsprogs)")


class _Artifacts:
    """The part of rig.Artifacts that the boot disk reads."""

    def __init__(self, directory: Path):
        directory.mkdir(parents=True, exist_ok=True)
        self.files = {}
        for name in ("from/vmlinuz", "from/initrd", "l2/vmlinuz", "l2/initrd"):
            source = directory / name.replace("/", "-")
            source.write_bytes(name.encode() * 100)
            self.files[name] = source

    def boot_files(self) -> dict[str, Path]:
        return self.files


def _rig(run_dir: Path, keep_images: bool, cache: Path) -> Rig:
    """A Rig with no VM: just what boot_disk() and close() touch."""
    rig = Rig.__new__(Rig)
    rig.config = RigConfig(devices=[], keep_images=keep_images)
    rig.run_dir, rig.log_dir = run_dir, run_dir / "logs"
    rig.log_dir.mkdir(parents=True)
    rig.artifacts = _Artifacts(cache / "artifacts")
    rig.l1 = rig.l2 = None
    rig.l2_consoles, rig.devices, rig.ports = [], [], {}
    rig.scratch = None
    return rig


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return tmp_path / "cache"


@needs_mkfs
def test_boot_img_is_built_outside_the_results_and_removed_by_close(tmp_path: Path, cache: Path):
    run = tmp_path / "results" / "run"
    rig = _rig(run, keep_images=False, cache=cache)
    image = rig.boot_disk()
    assert image.name == "boot.img" and image.is_file()
    assert run not in image.parents and (cache / "fastrestart" / "scratch") in image.parents
    assert results_dir_size(run) < 1 << 20
    rig.close()
    assert not image.exists() and not image.parent.exists()
    assert (run / "logs" / "ports.json").exists()  # close() still leaves the logs
    rig.close()  # twice is harmless


@needs_mkfs
def test_keep_images_keeps_boot_img_in_the_run_directory(tmp_path: Path, cache: Path):
    run = tmp_path / "results" / "run"
    rig = _rig(run, keep_images=True, cache=cache)
    image = rig.boot_disk()
    assert image == run / "boot.img"
    rig.close()
    assert image.is_file()
    assert results_dir_size(run) >= image.stat().st_size
    assert not (cache / "fastrestart" / "scratch").exists() or not any((cache / "fastrestart" / "scratch").iterdir())


def test_remove_scratch_never_touches_the_run_directory(tmp_path: Path, cache: Path):
    run = tmp_path / "run"
    rig = _rig(run, keep_images=True, cache=cache)
    assert rig.image_dir() == run
    rig.remove_scratch()
    assert run.is_dir()
    rig.config.keep_images = False
    scratch = rig.image_dir()
    assert scratch != run and scratch.is_dir() and rig.image_dir() == scratch  # one per rig
    rig.remove_scratch()
    assert not scratch.exists() and run.is_dir()
