"""Kernel artifacts by name: ``debian:SUITE``, ``debian:VERSION``, ``path:DIR``, ``build:KEY``.

A kernel is a bootable image, a modules tree and (when known) its ``.config``. Debian kernels
are fetched through the private apt configuration, unpacked, ``depmod``-ed and cached by
release under the artifact cache, so a warm cache works offline.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from fastrestart.artifacts import progress
from fastrestart.artifacts.debian import SUITES, AptRoot, extract
from fastrestart.errors import UsageError
from fastrestart.paths import artifact_lock, cache_dir

SPEC_HELP = ("Kernel specs: debian:SUITE (one of " + ", ".join(SUITES) + "), debian:VERSION "
             "(e.g. debian:6.12.57+deb13), path:DIR (a bzImage or vmlinuz plus lib/modules/<release>), "
             "or build:KEY (a kernel built by `fastrestart kernel build`).")


@dataclass(frozen=True)
class Kernel:
    """A kernel ready to boot: image, modules root (holding lib/modules/RELEASE) and config."""

    spec: str
    release: str
    image: Path
    modules_root: Path
    config: Path | None

    @property
    def modules_dir(self) -> Path:
        return self.modules_root / "lib" / "modules" / self.release

    def config_options(self) -> dict[str, str]:
        """CONFIG_X -> value ('y', 'm', a string); unset options are absent."""
        if not self.config or not self.config.exists():
            return {}
        options = {}
        for line in self.config.read_text(errors="replace").splitlines():
            match = re.match(r"(CONFIG_\w+)=(.*)", line)
            if match:
                options[match[1]] = match[2].strip('"')
        return options


_RESOLVED: dict[str, Kernel] = {}


def resolve(spec: str, *, fetch: bool = True) -> Kernel:
    """Turn a kernel spec into a cached, bootable kernel (downloading it if needed)."""
    kind, _, value = spec.partition(":")
    if not value:
        raise UsageError(f"Kernel spec '{spec}' has no value. {SPEC_HELP}")
    if kind == "debian":
        # One apt query per spec and process: a run resolves the same kernel several times (probe,
        # artifacts, L2), and each query costs seconds on a busy 2-core machine.
        known = _RESOLVED.get(spec)
        if known is not None and known.image.exists():
            return known
        with artifact_lock():
            kernel = _debian(spec, value, fetch=fetch)
        if fetch:
            _RESOLVED[spec] = kernel
        return kernel
    if kind == "path":
        return from_tree(spec, Path(value).expanduser())
    if kind == "build":
        tree = cache_dir() / "builds" / value / "install"
        if not tree.is_dir():
            raise UsageError(f"No cached kernel build '{value}' (looked in {tree}). Run "
                             "`fastrestart kernel build ...` first; it prints the build key.")
        return from_tree(spec, tree)
    raise UsageError(f"Unknown kernel source '{kind}' in '{spec}'. {SPEC_HELP}")


def from_tree(spec: str, tree: Path) -> Kernel:
    """A local build: an image plus lib/modules/<release>."""
    if not tree.is_dir():
        raise UsageError(f"Kernel directory {tree} does not exist. {SPEC_HELP}")
    images = [tree / n for n in ("bzImage", "vmlinuz", "arch/x86/boot/bzImage")] + sorted(
        tree.glob("boot/vmlinuz-*")) + sorted(tree.glob("vmlinuz-*"))
    image = next((p for p in images if p.is_file()), None)
    releases = sorted(p.name for p in (tree / "lib" / "modules").glob("*") if p.is_dir())
    if image is None or not releases:
        raise UsageError(
            f"{tree} is not a kernel tree: it needs a bzImage or vmlinuz and a lib/modules/<release> "
            "directory (e.g. from `make bzImage modules && make INSTALL_MOD_PATH=DIR modules_install`).")
    release = releases[-1]
    configs = [tree / ".config", tree / "config", *tree.glob(f"boot/config-{release}")]
    config = next((p for p in configs if p.is_file()), None)
    return Kernel(spec, release, image, tree, config)


def _debian(spec: str, value: str, *, fetch: bool) -> Kernel:
    index = cache_dir() / "kernels" / "index.json"
    known = json.loads(index.read_text()) if index.exists() else {}
    if value in SUITES:
        suite, package = value, None
    elif re.match(r"^\d+\.\d+", value):
        suite, package = None, f"linux-image-{value}-amd64"
    else:
        raise UsageError(f"'{value}' is neither a Debian suite nor a kernel version. {SPEC_HELP}")
    if not fetch and value in known:
        return _load(spec, known[value])
    try:
        release_dir = _fetch(suite, package)
    except UsageError:
        if value in known and _ready(Path(known[value])):
            return _load(spec, known[value])  # offline with a warm cache
        raise
    known[value] = str(release_dir)
    index.write_text(json.dumps(known, indent=1))
    return _load(spec, str(release_dir))


def _ready(directory: Path) -> bool:
    return (directory / "kernel.json").exists()


def _load(spec: str, directory: str) -> Kernel:
    meta = json.loads((Path(directory) / "kernel.json").read_text())
    root = Path(directory) / "root"
    config = root / meta["config"] if meta.get("config") else None
    return Kernel(spec, meta["release"], root / meta["image"], root, config)


def find_package(package: str) -> AptRoot:
    """The newest suite that has this package (kernels and their headers live in several)."""
    for suite in ("sid", "trixie", "bookworm-backports", "bookworm"):
        apt = AptRoot(suite)
        apt.update()
        if apt.exists(package):
            return apt
    raise UsageError(f"No Debian suite has {package}. Versions look like 6.12.57+deb13 or 6.1.158-1 "
                     f"(see `apt-cache policy linux-image-amd64`). {SPEC_HELP}")


def _fetch(suite: str | None, package: str | None) -> Path:
    if suite:
        apt = AptRoot(suite)
        apt.update()
        package = next((d for d in apt.depends("linux-image-amd64") if d.startswith("linux-image-")), None)
        if not package:
            raise UsageError(f"linux-image-amd64 in {suite} does not name a kernel image package.")
    else:
        apt = find_package(package)
    release = package.removeprefix("linux-image-")
    directory = cache_dir() / "kernels" / release
    if _ready(directory):
        return directory
    # Newer suites split the image into binary, modules and base packages.
    parts = [package] + [d for d in apt.depends(package)
                         if re.match(r"linux-(binary|modules|base)-", d) and release in d]
    debs = apt.download(parts)
    shutil.rmtree(directory, ignore_errors=True)
    root = directory / "root"
    with progress.build(f"kernel {release}", verb="unpacking", done="unpacked"):
        extract(debs, root)
    # Older packages use /boot; newer ones keep everything beside the modules.
    images = [root / "boot" / f"vmlinuz-{release}", root / "usr/lib/modules" / release / "vmlinuz"]
    image = next((p for p in images if p.is_file()), None)
    if image is None:
        raise UsageError(f"{package} unpacked without a vmlinuz for {release}; cannot use it.")
    subprocess.run(["depmod", "-b", str(root), release], check=True, timeout=300)
    configs = [root / "boot" / f"config-{release}", root / "usr/lib/modules" / release / "config"]
    config = next((p for p in configs if p.is_file()), configs[0])
    meta = {"release": release, "package": package, "suite": apt.suite,
            "image": str(image.relative_to(root)),
            "config": str(config.relative_to(root)) if config.exists() else None}
    (directory / "kernel.json").write_text(json.dumps(meta, indent=1))
    return directory
