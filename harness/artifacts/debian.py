"""Debian packages through a private apt configuration.

The system's apt sources are never read for packages nor edited: every suite gets its own
sources list, lists directory, archive cache and an empty dpkg status (so that dependency
closures are computed against nothing installed). Only the mirror URL is borrowed from the
system's configuration, or from ``FASTRESTART_DEBIAN_MIRROR``.
"""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import time
from pathlib import Path

from fastrestart.artifacts import progress
from fastrestart.errors import UsageError
from fastrestart.paths import cache_dir

KEYRING = Path("/usr/share/keyrings/debian-archive-keyring.gpg")

# Each name users can give, and the apt suites that make it up (first one is the target).
SUITES: dict[str, list[str]] = {
    "bookworm": ["bookworm", "bookworm-updates"],
    "bookworm-backports": ["bookworm-backports"],  # kernels only: never a closure
    "trixie": ["trixie", "trixie-updates"],
    "sid": ["sid"],
}
SECURITY = {"bookworm": "bookworm-security", "trixie": "trixie-security"}
LISTS_MAX_AGE_S = 24 * 3600


def system_mirror() -> tuple[str, str | None]:
    """The Debian mirror (and security mirror) the system's apt already uses."""
    env = os.environ.get("FASTRESTART_DEBIAN_MIRROR")
    if env:
        return env.rstrip("/"), os.environ.get("FASTRESTART_DEBIAN_SECURITY_MIRROR")
    texts = []
    for path in [Path("/etc/apt/sources.list"), *sorted(Path("/etc/apt/sources.list.d").glob("*"))]:
        if path.suffix in (".list", ".sources") and path.is_file():
            texts.append(path.read_text(errors="replace"))
    uris = re.findall(r"(?:URIs:\s*|^deb\s+(?:\[[^\]]*\]\s+)?)(\S+)", "\n".join(texts), re.M)
    main = next((u for u in uris if u.rstrip("/").endswith("/debian")), None)
    security = next((u for u in uris if u.rstrip("/").endswith("/debian-security")), None)
    if not main:
        raise UsageError(
            "No Debian mirror found in /etc/apt/sources.list{,.d}. Set FASTRESTART_DEBIAN_MIRROR to a "
            "Debian mirror URL (the one ending in /debian) and try again.")
    return main.rstrip("/"), security.rstrip("/") if security else None


class AptRoot:
    """A private apt state for one suite name (see ``SUITES``)."""

    def __init__(self, suite: str, root: Path | None = None):
        if suite not in SUITES:
            raise UsageError(
                f"Unknown Debian suite '{suite}'. Known suites: {', '.join(SUITES)}.")
        self.suite = suite
        self.root = root or cache_dir() / "apt" / suite
        self.sources = self.root / "sources.list"
        self.status = self.root / "status"
        self.lists = self.root / "lists"
        self.archives = self.root / "archives"

    def _options(self) -> list[str]:
        return [
            "-o", f"Dir::Etc::sourcelist={self.sources}",
            "-o", "Dir::Etc::sourceparts=/dev/null",
            "-o", f"Dir::State::Lists={self.lists}",
            "-o", f"Dir::State::status={self.status}",
            "-o", f"Dir::Cache={self.root / 'cache'}",
            "-o", f"Dir::Cache::archives={self.archives}",
            "-o", "APT::Install-Recommends=false",
            "-o", "APT::Sandbox::User=root",
            "-o", "Debug::NoLocking=true",
        ]

    def _write_config(self) -> None:
        mirror, security = system_mirror()
        lines = [f"deb [signed-by={KEYRING}] {mirror} {' '.join(SUITES[self.suite])} main"]
        if self.suite in SECURITY and security:
            lines.append(f"deb [signed-by={KEYRING}] {security} {SECURITY[self.suite]} main")
        for directory in (self.lists / "partial", self.archives / "partial", self.root / "cache"):
            directory.mkdir(parents=True, exist_ok=True)
        text = "\n".join(lines) + "\n"
        if not self.sources.exists() or self.sources.read_text() != text:
            self.sources.write_text(text)
        self.status.touch()

    def _apt(self, tool: str, *args: str, timeout: float = 600) -> str:
        cmd = [tool, "-q", *self._options(), *args]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                              cwd=self.archives)
        if proc.returncode != 0:
            raise UsageError(
                f"apt failed for suite '{self.suite}': {' '.join(args)}\n{proc.stderr.strip()[-1500:]}\n"
                "Check that the Debian mirror is reachable, or use a warm cache.")
        return proc.stdout

    def update(self, force: bool = False) -> None:
        """Fetch the package lists, at most once a day (a warm cache works offline)."""
        self._write_config()
        stamp = self.root / "updated"
        if not force and stamp.exists() and time.time() - stamp.stat().st_mtime < LISTS_MAX_AGE_S:
            return
        try:
            # apt re-encodes the lists as they land, so their size is not what it fetched: its own count is.
            with progress.download(f"the Debian {self.suite} package lists", watch=()) as fetch:
                out = self._apt("apt-get", "update")
                said = re.search(r"^Fetched (\S+ \S+) in", out, re.M)
                fetch.report(progress.parse_bytes(said[1]) if said else None)
        except UsageError:
            if any(self.lists.glob("*Packages*")):
                progress.note(f"could not update the Debian {self.suite} package lists; using the cached ones")
                return  # offline, but the old lists still resolve names
            raise
        stamp.touch()

    def show(self, package: str) -> dict[str, str]:
        """The candidate's control fields, as apt-cache show prints them."""
        text = self._apt("apt-cache", "show", "--no-all-versions", package)
        fields: dict[str, str] = {}
        for line in text.splitlines():
            if ":" in line and not line.startswith(" "):
                key, _, value = line.partition(":")
                fields.setdefault(key, value.strip())
        return fields

    def depends(self, package: str) -> list[str]:
        """Direct dependencies (the first alternative of each)."""
        depends = self.show(package).get("Depends", "")
        return [re.split(r"[\s(|]", item.strip())[0] for item in depends.split(",") if item.strip()]

    def exists(self, package: str) -> bool:
        proc = subprocess.run(["apt-cache", "-q", *self._options(), "show", package],
                              capture_output=True, text=True, timeout=120)
        return proc.returncode == 0 and "Package:" in proc.stdout

    def download(self, packages: list[str], purpose: str = "") -> list[Path]:
        """Download exactly these packages (no dependencies); ``purpose`` names them in the progress."""
        plan = self._plan("download", *packages)
        with self._fetching(plan, purpose) if plan else contextlib.nullcontext():
            self._apt("apt-get", "download", *packages)
        return [self._deb_for(p) for p in packages]

    def _plan(self, *args: str) -> list[tuple[str, int]]:
        """(file name, bytes) of each file this apt-get command would fetch: apt's --print-uris,
        which lists only what the archive cache lacks. Resolves like the command; fetches nothing."""
        out = self._apt("apt-get", "--print-uris", *args)
        return [(name, int(size)) for name, size in re.findall(r"^'[^']+' (\S+) (\d+)", out, re.M)]

    def _fetching(self, plan: list[tuple[str, int]], purpose: str):
        """The progress of fetching ``plan`` into the archive cache (see progress.download)."""
        names = [name.split("_")[0] for name, _ in plan]
        if len(names) == 1:
            what = names[0]
        else:
            what = f"{len(names)} packages ({', '.join(names[:3])}{', ...' if len(names) > 3 else ''})"
        if purpose:
            what = f"{len(names)} package{'s' if len(names) > 1 else ''} for {purpose}"
        return progress.download(what, total=sum(size for _, size in plan),
                                 watch=(self.archives, self.archives / "partial"),
                                 item=(lambda file: file.split("_")[0]) if len(names) > 1 else None)

    def closure(self, packages: list[str]) -> list[str]:
        """The .deb file names of these packages and everything they depend on, as for an empty system."""
        out = self._apt("apt-get", "install", "-s", "-y", *packages)
        return sorted(f"{name}_{version.replace(':', '%3a')}_{arch}.deb"
                      for name, version, arch in re.findall(r"^Inst (\S+) \((\S+) .*?\[(\S+)\]\)", out, re.M))

    def download_closure(self, packages: list[str], purpose: str = "") -> list[Path]:
        """Download these packages and everything they depend on; only those, not the whole cache
        (which also holds kernels, other closures and superseded versions). ``purpose`` names them
        in the progress."""
        plan = self._plan("-y", "install", *packages)
        if plan:  # else the cache holds all of it, and apt would fetch nothing
            with self._fetching(plan, purpose):
                self._apt("apt-get", "--download-only", "-y", "install", *packages, timeout=1200)
        debs = [self.archives / name for name in self.closure(packages)]
        missing = [deb.name for deb in debs if not deb.exists()]
        if missing or not debs:
            raise UsageError(f"apt downloaded the closure of {' '.join(packages)} but {self.archives} lacks "
                             f"{', '.join(missing) or 'all of it'}")
        return debs

    def _deb_for(self, package: str) -> Path:
        matches = sorted(self.archives.glob(f"{package.replace('+', '%2b')}_*.deb")) or sorted(
            self.archives.glob(f"{package}_*.deb"))
        if not matches:
            raise UsageError(f"apt reported success but no .deb for {package} is in {self.archives}")
        return matches[-1]


def extract(debs: list[Path], dest: Path) -> None:
    """Unpack .debs into a tree without running any maintainer script."""
    dest.mkdir(parents=True, exist_ok=True)
    for deb in debs:
        subprocess.run(["dpkg-deb", "-x", str(deb), str(dest)], check=True, timeout=300)
    # Merged-usr links, which the base-files maintainer script would otherwise make.
    for name in ("bin", "sbin", "lib", "lib64"):
        link, target = dest / name, dest / "usr" / name
        if target.is_dir() and not link.exists() and not link.is_symlink():
            link.symlink_to(f"usr/{name}")
