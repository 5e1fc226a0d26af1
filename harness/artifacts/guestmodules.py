"""Out-of-tree kernel modules for the guests, built from ``guests/modules`` for one exact kernel.

A module must be built with the kernel's own headers and compiler. For a Debian kernel both
come from the kernel's suite: the headers packages and the compiler they name are unpacked
into a build root (cached per kernel release), and ``make M=`` runs inside it (``unshare
--root``, with its own /proc), so a trixie or sid kernel builds on a bookworm host. Kernels
of other sources have no headers here; for them ``build`` raises ``Unavailable`` with the
reason.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from fastrestart import DATA
from fastrestart.artifacts import kernels, progress
from fastrestart.artifacts.debian import AptRoot, extract
from fastrestart.errors import UsageError
from fastrestart.paths import artifact_lock, cache_dir, content_key

SOURCE_DIR = DATA / "guests" / "modules"
# What kbuild runs besides the compiler. Essential packages: no package declares them.
BUILD_TOOLS = ["make", "libc6-dev", "bash", "dash", "coreutils", "sed", "grep", "mawk", "findutils",
               "diffutils"]
BUILD_TIMEOUT_S = 600


class Unavailable(Exception):
    """This module cannot be built for this kernel; the message says why."""


def build(name: str, kernel: kernels.Kernel) -> Path:
    """``guests/modules/<name>.c`` built for ``kernel``: the path of the cached ``<name>.ko``."""
    if not kernel.spec.startswith("debian:"):
        raise Unavailable(f"no headers for kernel {kernel.spec}: guest modules are built only for "
                          "debian: kernels")
    return build_for_release(name, kernel.release)


def build_for_release(name: str, release: str) -> Path:
    """``guests/modules/<name>.c`` built for the Debian kernel ``release`` (e.g. 6.12.118+deb13-amd64)."""
    source = SOURCE_DIR / f"{name}.c"
    if not source.is_file():
        raise UsageError(f"There is no guest module '{name}' (no {source}).")
    key = content_key(release, files=tuple(sorted(SOURCE_DIR.iterdir())))
    out = cache_dir() / "modules" / release / f"{name}-{key}" / f"{name}.ko"
    with artifact_lock():
        if not out.exists():
            _make(_build_root(release), release, name, out)
    return out


def _build_root(release: str) -> Path:
    """A chroot with this kernel's headers, kbuild and compiler (the headers' own dependencies)."""
    root = cache_dir() / "modules" / release / "root"
    if (root / ".complete").exists():
        return root
    package = f"linux-headers-{release}"
    try:
        apt = kernels.find_package(package)
    except UsageError as error:
        raise Unavailable(f"no Debian suite has {package}") from error
    # Backports carry kernels only; their toolchain is the base suite's.
    toolchain = AptRoot("bookworm") if apt.suite == "bookworm-backports" else apt
    depends = [dep for dep in apt.depends(package)
               if not dep.startswith(("linux-image-", "linux-base"))]
    try:
        debs = apt.download([package]) + toolchain.download_closure(
            depends + BUILD_TOOLS, purpose="the guest module build root")
    except UsageError as error:
        raise Unavailable(f"cannot fetch the headers and compiler of {release}: {error}") from error
    if root.exists():
        shutil.rmtree(root)
    with progress.build(f"the guest module build root of {release} ({len(debs)} packages)", verb="unpacking",
                        done="unpacked"):
        extract(debs, root)
    # The links that maintainer scripts (update-alternatives) would have made.
    for link, target in (("usr/bin/awk", "mawk"), ("usr/bin/cc", "gcc")):
        if not (root / link).exists():
            (root / link).symlink_to(target)
    (root / ".complete").touch()
    return root


def _make(root: Path, release: str, name: str, out: Path) -> None:
    headers = Path("/usr/src") / f"linux-headers-{release}"
    if not (root / headers.relative_to("/")).is_dir():
        raise Unavailable(f"{headers} is missing from the build root {root}")
    (root / "tmp").mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root / "tmp") as tmp:
        work = Path(tmp)
        shutil.copytree(SOURCE_DIR, work, dirs_exist_ok=True)
        inside = Path("/") / work.relative_to(root)
        command = [*_enter(root), "make", "-s", "-C", str(headers), f"M={inside}", "modules"]
        env = {"PATH": "/usr/bin:/bin", "HOME": "/tmp", "LC_ALL": "C"}
        with progress.build(f"{name}.ko for {release}"):
            try:
                proc = subprocess.run(command, capture_output=True, text=True, env=env, timeout=BUILD_TIMEOUT_S)
            except subprocess.TimeoutExpired as error:
                raise Unavailable(f"building {name}.ko for {release} took over {BUILD_TIMEOUT_S} s") from error
            built = work / f"{name}.ko"
            if proc.returncode != 0 or not built.exists():
                raise Unavailable(f"building {name}.ko for {release} failed (exit {proc.returncode}): "
                                  f"{(proc.stdout + proc.stderr).strip()[-1500:]}")
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(built, out.with_suffix(".tmp"))
        out.with_suffix(".tmp").rename(out)


def _enter(root: Path) -> list[str]:
    """Run inside ``root``, with a /proc of its own (objtool reads it) that goes away with the
    command; not root: in a user namespace that maps us to root."""
    (root / "proc").mkdir(exist_ok=True)
    unshare = shutil.which("unshare") or "/usr/bin/unshare"  # on the host: the command's PATH is the root's
    user = [] if os.geteuid() == 0 else ["--map-root-user"]
    # --kill-child: a timeout that kills unshare takes the whole build with it.
    return [unshare, *user, "--mount", "--pid", "--fork", "--kill-child", "--mount-proc=/proc", f"--root={root}"]
