"""`fastrestart kernel build`: an L1 kernel from source, a patch series and config fragments (docs/design.md §3.5).

The flow reads as the steps it runs: fetch → unpack → patch → config → check → build → install.

- Sources: ``debian-source:7.2`` (Debian sid's ``linux-source-7.2``, through the private apt
  configuration), ``path:DIR`` (a local tree, copied so it is never modified) and ``git:DIR@REV``
  (a shared clone of that revision, so the user's repository is not touched either).
- A series is a directory of ``*.patch`` files (applied in sorted order) or an mbox. It is applied
  with ``git am`` in a git tree, else ``patch -p1``; a patch that does not apply is named.
- The config is ``defconfig`` + ``kvm_guest.config``, then the fragments merged with the kernel's own
  ``scripts/kconfig/merge_config.sh`` and ``make olddefconfig``. Every option a fragment asks for is
  then checked in the final ``.config``: merge_config silently drops options whose dependencies are
  missing (docs/design.md §9, §10: DEV_DAX_PMEM was lost that way).
- The result is cached under ``cache_dir()/builds/<key>/install`` (what ``kernels.resolve("build:KEY")``
  reads), keyed by the source identity, the series, the fragments and the compiler.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from fastrestart.artifacts.debian import AptRoot, extract
from fastrestart.artifacts.progress import note
from fastrestart.errors import FastRestartError, UsageError
from fastrestart.paths import artifact_lock, cache_dir, content_key

Progress = Callable[[str], None]

SOURCE_HELP = ("Kernel sources: debian-source:VERSION (Debian sid's linux-source-VERSION, e.g. "
               "debian-source:7.2), path:DIR (a local kernel tree) or git:DIR@REV (a revision of a git "
               "repository; REV defaults to HEAD).")
KEY_VERSION = "kernelbuild-1"
"""Bumped when the build recipe changes in a way that makes old cached builds wrong."""
PROGRESS_EVERY_S = 60.0
LOG_TAIL_LINES = 40

# Tool -> the Debian package that provides it. Headers are checked by path.
BUILD_TOOLS = {"make": "make", "gcc": "gcc", "flex": "flex", "bison": "bison", "bc": "bc", "perl": "perl",
               "cpio": "cpio", "xz": "xz-utils", "depmod": "kmod", "tar": "tar"}
BUILD_HEADERS = {"/usr/include/gelf.h": "libelf-dev", "/usr/include/openssl/opensslv.h": "libssl-dev"}
SOURCE_TOOLS = {"debian-source": {"dpkg-deb": "dpkg"}, "path": {"rsync": "rsync"}, "git": {"git": "git"}}


class BuildFailed(FastRestartError):
    """A step of the kernel build broke; the message names the step and the log."""

    exit_code = 3


class ConfigCheckFailed(UsageError):
    """Options a fragment asked for did not end up in the final .config."""


# --- sources -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Source:
    """A parsed ``--source`` spec."""

    kind: str  # debian-source | path | git
    location: str  # the Debian version, or a directory
    rev: str | None = None

    def __str__(self) -> str:
        return f"{self.kind}:{self.location}" + (f"@{self.rev}" if self.rev else "")


def parse_source(spec: str) -> Source:
    """``debian-source:7.2``, ``path:DIR`` or ``git:DIR@REV`` -> Source; UsageError when malformed."""
    kind, sep, value = spec.partition(":")
    if not sep or not value:
        raise UsageError(f"Kernel source '{spec}' needs a kind and a value. {SOURCE_HELP}")
    if kind == "debian-source":
        if not re.fullmatch(r"\d+\.\d+", value):
            raise UsageError(f"'{value}' is not a kernel series like 7.2 (the X.Y in linux-source-X.Y). "
                             f"{SOURCE_HELP}")
        return Source(kind, value)
    if kind == "path":
        directory = Path(value).expanduser().resolve()
        if not (directory / "Makefile").is_file() or not (directory / "scripts" / "kconfig").is_dir():
            raise UsageError(f"{directory} is not a kernel source tree (no Makefile and scripts/kconfig). "
                             f"{SOURCE_HELP}")
        return Source(kind, str(directory))
    if kind == "git":
        # Directories and revisions may both hold '@' (HEAD@{1}): the directory is the shortest
        # prefix that exists; without any '@' the whole value is the directory, at HEAD.
        cuts = [i for i, char in enumerate(value) if char == "@"]
        directory, rev = next(((value[:i], value[i + 1:]) for i in cuts
                               if Path(value[:i]).expanduser().is_dir()), (value, "HEAD"))
        if not rev:
            raise UsageError(f"'{spec}' ends in '@' without a revision. {SOURCE_HELP}")
        directory = str(Path(directory).expanduser().resolve())
        if not Path(directory).is_dir():
            first = value.split("@")[0]
            raise UsageError(f"{first} does not exist. {SOURCE_HELP}")
        return Source(kind, directory, rev)
    raise UsageError(f"Unknown kernel source kind '{kind}' in '{spec}'. {SOURCE_HELP}")


def _debian_package(source: Source) -> tuple[AptRoot, str, dict[str, str]]:
    """The apt root, package name and control fields of a debian-source (lists updated at most daily)."""
    package = f"linux-source-{source.location}"
    with artifact_lock():  # the private apt state is shared with kernel and userspace fetches
        apt = AptRoot("sid")
        apt.update()
        if not apt.exists(package):
            offered = next((d for d in apt.depends("linux-source") if d.startswith("linux-source-")), "none")
            raise UsageError(f"Debian sid has no {package} (it offers {offered}). {SOURCE_HELP}")
        return apt, package, apt.show(package)


def _tree_digest(directory: Path) -> str:
    """A cheap fingerprint of a plain tree: every file's path, size and mtime (no content reads)."""
    digest = hashlib.sha256()
    for root, dirs, files in os.walk(directory):
        dirs[:] = sorted(d for d in dirs if d != ".git")
        for name in sorted(files):
            path = Path(root) / name
            try:
                stat = path.lstat()
            except OSError:
                continue
            digest.update(f"{path.relative_to(directory)}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def _git(directory: str | Path, *args: str, timeout: float = 600) -> str:
    proc = subprocess.run(["git", "-C", str(directory), *args], capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise UsageError(f"git {' '.join(args)} failed in {directory}: {proc.stderr.strip()[:800]}")
    return proc.stdout.strip()


def source_identity(source: Source) -> dict[str, str]:
    """What the source *is*, for the cache key: a package version and digest, a commit, or a tree
    fingerprint. Cheap: nothing is downloaded or copied."""
    if source.kind == "debian-source":
        _, package, fields = _debian_package(source)
        return {"kind": source.kind, "package": package, "version": fields.get("Version", ""),
                "sha256": fields.get("SHA256", "")}
    if source.kind == "git":
        commit = _git(source.location, "rev-parse", "--verify", f"{source.rev}^{{commit}}")
        return {"kind": source.kind, "commit": commit}
    return {"kind": source.kind, "path": source.location, "tree": _tree_digest(Path(source.location))}


# --- series --------------------------------------------------------------------------------------


def series_patches(series: Path, split_dir: Path) -> list[Path]:
    """The patches of a series, in order: a directory's ``*.patch`` files sorted by name, or the
    messages of an mbox split (by ``git mailsplit``) into ``split_dir`` so each can be named."""
    series = Path(series)
    if series.is_dir():
        patches = sorted(series.glob("*.patch"))
        if not patches:
            raise UsageError(f"Series directory {series} holds no *.patch files.")
        return patches
    if not series.is_file():
        raise UsageError(f"Series {series} is neither a directory of *.patch files nor an mbox file.")
    if not series.read_bytes().startswith(b"From "):
        return [series]  # one plain diff, not a mailbox
    split_dir.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(["git", "mailsplit", "-o" + str(split_dir), str(series)], capture_output=True,
                          text=True, timeout=120)
    # Name each message after its mbox, so an error points back at what the user passed.
    patches = [part.rename(split_dir / f"{series.name}.{part.name}.patch") for part in sorted(split_dir.iterdir())]
    if proc.returncode != 0 or not patches:
        raise UsageError(f"{series} is not an mbox of patches (git mailsplit found no message): "
                         f"{proc.stderr.strip()[:400]}")
    return patches


def patch_subject(patch: Path) -> str:
    """The Subject: of a mail-formatted patch, or '' for a plain diff."""
    with patch.open(errors="replace") as handle:
        for line in handle:
            if line.startswith("Subject:"):
                return line.removeprefix("Subject:").strip()
            if not line.strip() or line.startswith("diff "):
                break
    return ""


def apply_series(tree: Path, patches: list[Path], log: Path | None = None) -> None:
    """Apply patches in order: ``git am`` in a git tree (commits kept), ``patch -p1`` otherwise.

    Raises UsageError naming the first patch that does not apply, with the start of the tool's output.
    """
    use_git = (tree / ".git").exists()
    # git am needs an identity; give it one so a bare CI container works too.
    env = {**os.environ, "GIT_COMMITTER_NAME": "fastrestart", "GIT_COMMITTER_EMAIL": "fastrestart@localhost",
           "GIT_AUTHOR_NAME": os.environ.get("GIT_AUTHOR_NAME", "fastrestart"),
           "GIT_AUTHOR_EMAIL": os.environ.get("GIT_AUTHOR_EMAIL", "fastrestart@localhost")}
    for number, patch in enumerate(patches, 1):
        if use_git:
            command = ["git", "am", "--keep-cr", str(patch)]
        else:
            command = ["patch", "-p1", "--forward", "--batch", "-i", str(patch)]
        proc = subprocess.run(command, cwd=tree, capture_output=True, text=True, env=env, timeout=300)
        if log:
            with log.open("a") as handle:
                handle.write(f"$ {' '.join(command)}\n{proc.stdout}{proc.stderr}")
        if proc.returncode != 0:
            if use_git:
                subprocess.run(["git", "am", "--abort"], cwd=tree, capture_output=True, timeout=120)
            head = "\n  ".join((proc.stdout + proc.stderr).strip().splitlines()[:8])
            tool = "git am" if use_git else "patch -p1"
            subject = patch_subject(patch)
            raise UsageError(f"Patch {number}/{len(patches)} {patch}{f' ({subject})' if subject else ''} "
                             f"does not apply ({tool}):\n  {head}")


# --- config --------------------------------------------------------------------------------------

_SET = re.compile(r"^(CONFIG_\w+)=(.*)$")
_UNSET = re.compile(r"^# (CONFIG_\w+) is not set$")


def parse_config(text: str) -> dict[str, str]:
    """CONFIG_X -> value as written ('y', 'm', '"str"', '0x10'), and 'n' for ``# CONFIG_X is not set``."""
    options: dict[str, str] = {}
    for line in text.splitlines():
        line = line.strip()
        if match := _SET.match(line):
            options[match[1]] = match[2].strip()
        elif match := _UNSET.match(line):
            options[match[1]] = "n"
    return options


@dataclass(frozen=True)
class Mismatch:
    """An option a fragment asked for and the value the final .config has instead."""

    option: str
    wanted: str
    got: str
    fragment: str

    def __str__(self) -> str:
        def show(value: str) -> str:
            return "not set" if value == "n" else value

        return f"{self.option}: {self.fragment} asks for {show(self.wanted)}, the .config has {show(self.got)}"


def check_config(config: Path, fragments: list[Path]) -> list[Mismatch]:
    """Every option of every fragment (the last fragment wins, as in merge_config.sh) that did not
    end up as requested in ``config``. An option absent from the .config counts as not set."""
    wanted: dict[str, tuple[str, str]] = {}
    for fragment in fragments:
        for option, value in parse_config(Path(fragment).read_text(errors="replace")).items():
            wanted[option] = (value, Path(fragment).name)
    final = parse_config(config.read_text(errors="replace"))
    mismatches = []
    for option, (value, fragment) in wanted.items():
        got = final.get(option, "n")
        if got != value:
            mismatches.append(Mismatch(option, value, got, fragment))
    return mismatches


# --- tools, keys, locks --------------------------------------------------------------------------


def missing_tools(kind: str, series: bool = False) -> list[str]:
    """The Debian packages to install before a build of this kind of source can run."""
    tools = {**BUILD_TOOLS, **SOURCE_TOOLS.get(kind, {})}
    if series:
        tools.update({"patch": "patch", "git": "git"})
    packages = [package for tool, package in tools.items() if not shutil.which(tool)]
    packages += [package for header, package in BUILD_HEADERS.items() if not Path(header).exists()]
    return sorted(set(packages))


def compiler_identity() -> str:
    proc = subprocess.run(["gcc", "--version"], capture_output=True, text=True, timeout=60)
    return proc.stdout.strip()


def build_key(identity: dict, patches: list[Path], fragments: list[Path], compiler: str) -> str:
    """The cache key: source identity, series contents (in order), fragment contents (in order)
    and the compiler. Names count too, so that a renamed patch is a different series."""
    return content_key(KEY_VERSION, sorted(identity.items()), compiler, len(patches),
                       files=(*patches, *(Path(f) for f in fragments)))


@contextlib.contextmanager
def _key_lock(directory: Path, progress: Progress) -> Iterator[None]:
    """One build per key at a time; other keys (and every other cache user) are not blocked."""
    directory.mkdir(parents=True, exist_ok=True)
    with (directory / "lock").open("a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            progress(f"waiting: another process is building this key (log: {directory / 'build.log'})")
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


# --- the build -----------------------------------------------------------------------------------


@dataclass
class BuildResult:
    """A finished (or cached) build."""

    key: str
    release: str
    install: Path
    cached: bool
    meta: dict = field(default_factory=dict)

    @property
    def spec(self) -> str:
        return f"build:{self.key}"


class _Builder:
    """Runs the steps of one build, each command appended to build.log."""

    def __init__(self, directory: Path, progress: Progress, jobs: int):
        self.directory = directory
        self.log = directory / "build.log"
        self.tree = directory / "src"
        self.progress = progress
        self.jobs = jobs

    def run(self, step: str, command: list[str], cwd: Path | None = None, timeout: float = 1800,
            count_compiles: bool = False) -> None:
        """Run one command, streaming its output into the log; BuildFailed names the step."""
        started = time.monotonic()
        compiled, last_report = 0, started
        with self.log.open("a", buffering=1) as log:  # line-buffered: users `tail -f` it
            log.write(f"\n### {step}: $ {' '.join(command)}\n")
            log.flush()
            # Its own process group, so that every compiler it started can be stopped with it.
            proc = subprocess.Popen(command, cwd=cwd or self.tree, stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, text=True,
                                    errors="replace", start_new_session=True)
            assert proc.stdout is not None
            try:
                for line in proc.stdout:
                    log.write(line)
                    if count_compiles and line.lstrip().startswith("CC "):
                        compiled += 1
                    now = time.monotonic()
                    if count_compiles and now - last_report >= PROGRESS_EVERY_S:
                        last_report = now
                        self.progress(f"{step}: {compiled} files compiled, {(now - started) / 60:.1f} min")
                    if now - started > timeout:
                        raise BuildFailed(f"kernel build step '{step}' passed its {timeout:.0f} s deadline. "
                                          f"Full log: {self.log}")
                proc.wait()
            except BaseException:  # deadline, Ctrl-C, SIGTERM: leave no compiler running behind us
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                raise
        if proc.returncode != 0:
            tail = self.log.read_text(errors="replace").splitlines()[-LOG_TAIL_LINES:]
            raise BuildFailed(f"kernel build step '{step}' failed (exit {proc.returncode}): "
                              f"{' '.join(command)}\n  " + "\n  ".join(tail) + f"\nFull log: {self.log}")
        if count_compiles:
            self.progress(f"{step}: done, {compiled} files compiled in {(time.monotonic() - started) / 60:.1f} min")

    def make(self, step: str, *targets: str, timeout: float = 600, count_compiles: bool = False) -> None:
        # nice 19: builds share the machine with running VMs, whose timing matters more.
        self.run(step, ["nice", "-n", "19", "make", f"-j{self.jobs}", *targets], timeout=timeout,
                 count_compiles=count_compiles)

    def output(self, *command: str) -> str:
        return subprocess.run(list(command), cwd=self.tree, capture_output=True, text=True, check=True,
                              timeout=120).stdout.strip()

    # Steps, in order.

    def fetch_and_unpack(self, source: Source) -> None:
        shutil.rmtree(self.tree, ignore_errors=True)
        if source.kind == "debian-source":
            with artifact_lock():
                apt, package, _ = _debian_package(source)
                self.progress(f"fetch: {package} from Debian sid")
                debs = apt.download([package])
            unpacked = self.directory / "deb"
            shutil.rmtree(unpacked, ignore_errors=True)
            extract(debs, unpacked)
            tarballs = sorted((unpacked / "usr" / "src").glob(f"linux-source-{source.location}.tar.*"))
            if not tarballs:
                raise BuildFailed(f"{package} holds no usr/src/linux-source-{source.location}.tar.*; "
                                  f"its layout changed (unpacked in {unpacked}).")
            self.progress(f"unpack: {tarballs[0].name}")
            self.tree.mkdir(parents=True)
            self.run("unpack", ["tar", "-xf", str(tarballs[0]), "--strip-components=1", "-C", str(self.tree)],
                     cwd=self.directory)
            shutil.rmtree(unpacked)
        elif source.kind == "git":
            self.progress(f"unpack: clone of {source.location} at {source.rev}")
            # --shared borrows the objects: fast, and the user's repository gets no worktree entry.
            self.run("unpack", ["git", "clone", "--quiet", "--shared", "--no-checkout", source.location,
                                str(self.tree)], cwd=self.directory)
            commit = _git(source.location, "rev-parse", "--verify", f"{source.rev}^{{commit}}")
            self.run("unpack", ["git", "checkout", "--quiet", "--detach", commit])
        else:
            self.progress(f"unpack: copy of {source.location}")
            self.run("unpack", ["rsync", "-a", "--exclude=.git", source.location + "/", str(self.tree) + "/"],
                     cwd=self.directory)

    def configure(self, fragments: list[Path], key: str) -> None:
        self.progress("config: " + " + ".join(["defconfig", "kvm_guest.config", *(f.name for f in fragments)]))
        self.make("config", "defconfig")
        self.make("config", "kvm_guest.config")
        # Tell builds apart in `uname -r` (base vs patched, same version); a fragment may override it.
        local = self.directory / "localversion.config"
        local.write_text(f'CONFIG_LOCALVERSION="-fr{key[:8]}"\n')
        self.run("config", ["scripts/kconfig/merge_config.sh", "-m", ".config", str(local),
                            *(str(f) for f in fragments)])
        self.make("config", "olddefconfig")
        mismatches = check_config(self.tree / ".config", fragments)
        if mismatches:
            lines = "\n  ".join(str(m) for m in mismatches)
            raise ConfigCheckFailed(
                f"{len(mismatches)} option(s) did not end up as the fragments ask (merge_config drops options "
                f"whose dependencies are missing or that this kernel does not have):\n  {lines}\n"
                f"Fix the fragment (add the missing dependency, or the option's new name). "
                f"Final config: {self.tree / '.config'}; log: {self.log}")

    def compile(self) -> None:
        self.progress(f"build: bzImage modules with -j{self.jobs} at nice 19 (log: {self.log})")
        self.make("build", "bzImage", "modules", timeout=4 * 3600, count_compiles=True)

    def install(self, target: Path) -> str:
        release = self.output("make", "-s", "kernelrelease")
        self.progress(f"install: {release} into {target}")
        shutil.rmtree(target, ignore_errors=True)
        target.mkdir(parents=True)
        modules = parse_config((self.tree / ".config").read_text()).get("CONFIG_MODULES") == "y"
        if modules:
            self.make("install", "modules_install", f"INSTALL_MOD_PATH={target}", "INSTALL_MOD_STRIP=1")
        moddir = target / "lib" / "modules" / release
        moddir.mkdir(parents=True, exist_ok=True)
        # The rig's initramfs builder reads modules.dep and modules.builtin even when nothing is modular.
        for name in ("modules.builtin", "modules.builtin.modinfo", "modules.order"):
            if (self.tree / name).exists() and not (moddir / name).exists():
                shutil.copy2(self.tree / name, moddir / name)
        (moddir / "modules.builtin").touch()
        self.run("install", ["depmod", "-b", str(target), "-F", str(self.tree / "System.map"), release])
        for link in ("build", "source"):  # modules_install points these at the scratch tree
            if (moddir / link).is_symlink():
                (moddir / link).unlink()
        shutil.copy2(self.tree / "arch" / "x86" / "boot" / "bzImage", target / "bzImage")
        shutil.copy2(self.tree / ".config", target / ".config")
        shutil.copy2(self.tree / "System.map", target / "System.map")
        return release


def build_kernel(source_spec: str, *, series: Path | None = None, fragments: list[Path] | tuple[Path, ...] = (),
                 jobs: int | None = None, keep_tree: bool = False,
                 progress: Progress | None = None) -> BuildResult:
    """Build (or find cached) the kernel for these inputs; see the module docstring for the steps.
    ``progress`` is told each step (by default, a line on stderr: see progress.note)."""
    progress = progress or (lambda message: note(f"kernel build: {message}"))
    source = parse_source(source_spec)
    fragments = [Path(f).resolve() for f in fragments]
    for fragment in fragments:
        if not fragment.is_file():
            raise UsageError(f"Config fragment {fragment} does not exist.")
    missing = missing_tools(source.kind, series=series is not None)
    if missing:
        raise UsageError(
            "Building a kernel needs tools this machine lacks. Install them with: apt-get install -y "
            f"{' '.join(missing)} (the full set a build uses: build-essential flex bison bc libelf-dev "
            "libssl-dev cpio xz-utils kmod rsync git patch).")
    jobs = jobs or os.cpu_count() or 1
    if jobs < 1:
        raise UsageError("--jobs must be at least 1.")
    started = time.monotonic()
    identity = source_identity(source)
    with tempfile.TemporaryDirectory(prefix="fr-series-") as scratch:
        patches = series_patches(series, Path(scratch)) if series else []
        key = build_key(identity, patches, fragments, compiler_identity())
        directory = cache_dir() / "builds" / key
        install = directory / "install"
        with _key_lock(directory, progress):
            cached = _cached(key)
            if cached:
                progress(f"cached: {install}")
                return cached
            builder = _Builder(directory, progress, jobs)
            builder.log.write_text(f"fastrestart kernel build {source} key {key}\n")
            progress(f"building a kernel from {source}: key {key}; log {builder.log}")
            builder.fetch_and_unpack(source)
            if patches:
                progress(f"patch: {len(patches)} patch(es) from {series}")
                apply_series(builder.tree, patches, builder.log)
            builder.configure(fragments, key)
            builder.compile()
            staging = directory / "install.tmp"
            release = builder.install(staging)
            shutil.rmtree(install, ignore_errors=True)
            staging.rename(install)  # resolve("build:KEY") only ever sees a complete tree
            meta = {"key": key, "release": release, "source": str(source), "identity": identity,
                    "series": [p.name for p in patches], "fragments": [str(f) for f in fragments],
                    "jobs": jobs, "wall_s": round(time.monotonic() - started, 1),
                    "image_bytes": (install / "bzImage").stat().st_size,
                    "built": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
            (directory / "build.json").write_text(json.dumps(meta, indent=1))
            if not keep_tree:
                progress("cleanup: removing the build tree (--keep-tree keeps it)")
                shutil.rmtree(builder.tree, ignore_errors=True)
            return BuildResult(key, release, install, False, meta)


def _cached(key: str) -> BuildResult | None:
    directory = cache_dir() / "builds" / key
    if not (directory / "build.json").exists() or not (directory / "install").is_dir():
        return None
    meta = json.loads((directory / "build.json").read_text())
    return BuildResult(key, meta["release"], directory / "install", True, meta)


def cached_build(source_spec: str, *, series: Path | None = None,
                 fragments: list[Path] | tuple[Path, ...] = ()) -> BuildResult | None:
    """The cached build for these inputs, or None; never builds (tests use it to skip cleanly)."""
    source = parse_source(source_spec)
    with tempfile.TemporaryDirectory(prefix="fr-series-") as scratch:
        patches = series_patches(series, Path(scratch)) if series else []
        key = build_key(source_identity(source), patches, [Path(f).resolve() for f in fragments],
                        compiler_identity())
    return _cached(key)
