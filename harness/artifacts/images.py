"""Guest images, built from Debian packages and our own recipes in ``guests/``, cached by content.

- L1 initramfs: busybox, the modules the host needs, our static L1 tools and ``guests/l1/init``.
  Kept small on purpose: kexec's purgatory hashes every loaded byte, which is slow under TCG.
- L1 userspace disk: QEMU of a chosen Debian suite plus kexec-tools, ndctl and e2fsprogs, as an
  ext4 image mounted read-only in L1.
- L2 initramfs: busybox, the guest workloads, ``guests/l2/init`` and, when NVMe is assigned,
  fio (Debian's, with its libraries).
- Boot disk: per run, the kernels and initramfs images L1 needs to kexec and to start L2.
"""

from __future__ import annotations

import json
import lzma
import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from fastrestart import DATA
from fastrestart.artifacts import progress
from fastrestart.artifacts.debian import SUITES, AptRoot, extract
from fastrestart.artifacts.kernels import Kernel
from fastrestart.errors import UsageError
from fastrestart.paths import artifact_lock, cache_dir, content_key

BUSYBOX = Path("/bin/busybox")
RECIPE_VERSION = 4  # bump to invalidate every cached image after a recipe change

L1_MODULES = [
    "kvm_amd", "kvm_intel", "vfio_pci", "vfio_iommu_type1", "nd_e820", "nd_pmem", "dax_pmem",
    "device_dax", "ext4", "crc32c_generic", "virtio_blk", "virtio_net", "virtio_pci",
]
L2_MODULES = ["nvme", "uio_pci_generic", "vfio_pci", "vfio_iommu_type1", "virtio_blk"]
L1_PACKAGES = ["qemu-system-x86", "kexec-tools", "ndctl", "daxctl", "e2fsprogs"]
L2_WORKLOADS = ["memcheck", "edutest", "blkcheck"]
L1_TOOLS = ["l1tool"]
FIO_SUITE = "trixie"
FIO_PREFIX = Path("opt/fio")  # in L2: the binary, its libraries and the loader that runs it
# What fio costs L2 while it boots: the initramfs image and its unpacked copy (57 MiB each) and the
# kernel. Below L2_MIN_MIB_WITH_FIO, L2 cannot unpack its root ("VFS: Unable to mount root fs").
L2_MIN_MIB_WITH_FIO = 192


def _require(tool: str, package: str) -> None:
    if not shutil.which(tool) and not Path(tool).exists():
        raise UsageError(f"'{tool}' is missing on this machine. Install it with "
                         f"`apt-get install {package}` (README's set-up command does this).")


# -- modules -------------------------------------------------------------------------------

def _module_index(kernel: Kernel) -> tuple[dict[str, str], dict[str, list[str]]]:
    """name -> relative path, and path -> dependency paths, from modules.dep."""
    paths: dict[str, str] = {}
    deps: dict[str, list[str]] = {}
    for line in (kernel.modules_dir / "modules.dep").read_text().splitlines():
        target, _, rest = line.partition(":")
        name = re.sub(r"\.ko(\.\w+)?$", "", Path(target).name).replace("-", "_")
        paths[name] = target
        deps[target] = rest.split()
    return paths, deps


def _softdeps(kernel: Kernel) -> dict[str, list[str]]:
    softdep = kernel.modules_dir / "modules.softdep"
    result: dict[str, list[str]] = {}
    if softdep.exists():
        for line in softdep.read_text().splitlines():
            match = re.match(r"softdep (\S+) pre: (.*?)(?: post:.*)?$", line)
            if match:
                result[match[1].replace("-", "_")] = match[2].split()
    return result


def module_closure(kernel: Kernel, wanted: list[str]) -> tuple[list[str], list[str]]:
    """Module files needed to load ``wanted`` (with dependencies), and the wanted modules found."""
    paths, deps = _module_index(kernel)
    softdeps = _softdeps(kernel)
    found, files, queue = [], set(), list(wanted)
    while queue:
        name = queue.pop().replace("-", "_")
        if name not in paths:
            continue  # built in, or absent from this kernel: modprobe is not needed
        if name in wanted:
            found.append(name)
        queue.extend(softdeps.get(name, []))
        stack = [paths[name]]
        while stack:
            path = stack.pop()
            if path not in files:
                files.add(path)
                stack.extend(deps.get(path, []))
    return sorted(files), [m for m in wanted if m in found]


def _install_modules(kernel: Kernel, wanted: list[str], root: Path, extra: tuple[Path, ...] = ()) -> list[str]:
    """``extra``: our own modules built for this kernel (``guestmodules``), installed under extra/."""
    files, loadable = module_closure(kernel, wanted)
    dest = root / "lib" / "modules" / kernel.release
    for module in extra:
        (dest / "extra").mkdir(parents=True, exist_ok=True)
        shutil.copyfile(module, dest / "extra" / module.name)
    for rel in files:
        source = kernel.modules_dir / rel
        target = dest / re.sub(r"\.(xz|zst|gz)$", "", rel)
        target.parent.mkdir(parents=True, exist_ok=True)
        if rel.endswith(".xz"):
            target.write_bytes(lzma.decompress(source.read_bytes()))  # busybox insmod reads plain .ko
        elif rel.endswith(".zst"):
            subprocess.run(["zstd", "-q", "-d", "-f", str(source), "-o", str(target)], check=True)
        else:
            shutil.copyfile(source, target)
    dest.mkdir(parents=True, exist_ok=True)  # a kernel with every wanted module built in copies none
    for name in ("modules.builtin", "modules.builtin.modinfo", "modules.order"):
        if (kernel.modules_dir / name).exists():
            shutil.copyfile(kernel.modules_dir / name, dest / name)
    subprocess.run(["depmod", "-b", str(root), kernel.release], check=True, timeout=120)
    return loadable


# -- initramfs -----------------------------------------------------------------------------

def _busybox_root(root: Path) -> None:
    _require(str(BUSYBOX), "busybox-static")
    for directory in ("bin", "sbin", "usr/bin", "usr/sbin", "usr/local/bin", "etc/fastrestart",
                      "proc", "sys", "dev", "run", "tmp", "root", "mnt", "sysroot"):
        (root / directory).mkdir(parents=True, exist_ok=True)
    shutil.copyfile(BUSYBOX, root / "bin" / "busybox")
    (root / "bin" / "busybox").chmod(0o755)
    applets = subprocess.run([str(BUSYBOX), "--list"], capture_output=True, text=True,
                             check=True).stdout.split()
    for applet in applets:
        link = root / "bin" / applet
        if not link.exists():
            link.symlink_to("busybox")
    (root / "etc" / "profile").write_text(
        "export PATH=/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin\nexport PS1='# '\nstty -echo 2>/dev/null\n")


def _cpio(root: Path, out: Path) -> None:
    _require("cpio", "cpio")
    tmp = out.with_suffix(".tmp")
    with tmp.open("wb") as sink:
        files = subprocess.run(["find", "."], cwd=root, capture_output=True, check=True).stdout
        subprocess.run(["cpio", "-o", "-H", "newc", "-R", "0:0", "--quiet"], cwd=root, input=files,
                       stdout=sink, check=True)
    tmp.rename(out)


def _initramfs(layer: str, kernel: Kernel, modules: list[str], tools: list[str], init: Path,
               scripts: tuple[Path, ...] = (), trees: tuple[Path, ...] = (),
               extra_modules: tuple[Path, ...] = ()) -> Path:
    """``trees``: finished directory trees (each in its own content-keyed cache dir) copied in.
    ``extra_modules``: out-of-tree ``.ko`` files (each in a content-keyed cache dir), loadable by modprobe."""
    sources = tuple(DATA / "guests" / "workloads" / f"{name}.c" for name in tools)
    sources += (DATA / "guests" / "workloads" / "workload.h",) if tools else ()
    key = content_key(RECIPE_VERSION, layer, kernel.release, str(kernel.image), modules,
                      BUSYBOX.stat().st_size if BUSYBOX.exists() else 0, [str(t) for t in trees],
                      [str(m) for m in extra_modules], files=(init, *sources, *scripts))
    out = cache_dir() / "initramfs" / f"{layer}-{kernel.release}-{key}.cpio"
    with artifact_lock():
        if not out.exists():
            with progress.build(f"the {layer.upper()} initramfs for {kernel.release}"):
                _build_initramfs(out, kernel, modules, tools, init, scripts, trees, extra_modules)
    return out


def _build_initramfs(out: Path, kernel: Kernel, modules: list[str], tools: list[str], init: Path,
                     scripts: tuple[Path, ...] = (), trees: tuple[Path, ...] = (),
                     extra_modules: tuple[Path, ...] = ()) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        root = Path(tmp) / "root"
        _busybox_root(root)
        loadable = _install_modules(kernel, modules, root, extra_modules)
        (root / "etc" / "fastrestart" / "modules").write_text("\n".join(loadable) + "\n")
        if tools:
            from fastrestart.artifacts import workloads  # the C workloads are compiled on demand

            for name in tools:
                workloads.build(name, root / "usr" / "local" / "bin")
        for script in scripts:
            shutil.copyfile(script, root / "usr" / "local" / "bin" / script.name)
            (root / "usr" / "local" / "bin" / script.name).chmod(0o755)
        for tree in trees:
            shutil.copytree(tree, root, symlinks=True, dirs_exist_ok=True)
        shutil.copyfile(init, root / "init")
        (root / "init").chmod(0o755)
        _cpio(root, out)


def l1_initramfs(kernel: Kernel) -> Path:
    """The L1 host's initramfs for this kernel."""
    return _initramfs("l1", kernel, L1_MODULES, L1_TOOLS, DATA / "guests" / "l1" / "init")


def l2_initramfs(kernel: Kernel, with_fio: bool = False, extra_modules: tuple[Path, ...] = ()) -> Path:
    """The L2 guest's initramfs for this kernel, with the workloads (and fio, for an NVMe check:
    57 MiB of L2's RAM, twice while it boots). ``extra_modules`` are loaded on demand (modprobe),
    not at boot."""
    return _initramfs("l2", kernel, L2_MODULES, L2_WORKLOADS, DATA / "guests" / "l2" / "init",
                      scripts=(DATA / "guests" / "l2" / "fr-suspend",), trees=(fio_tree(),) if with_fio else (),
                      extra_modules=extra_modules)


# -- fio -----------------------------------------------------------------------------------

def fio_tree() -> Path:
    """Debian's fio and exactly the shared libraries it loads, as a tree to copy into L2's root.

    Debian links every ioengine into fio (ceph, gluster, rdma, pmem, nfs, nbd), so the libraries
    come to about 57 MiB. Only the ELF NEEDED closure of the binary is kept, under /opt/fio,
    with the loader that runs it; ``/usr/local/bin/fio`` is the wrapper that L2's shell calls.
    Cached by the closure's package versions.
    """
    apt = AptRoot(FIO_SUITE)
    apt.update()
    debs = apt.download_closure(["fio"], purpose="fio in L2")
    key = content_key(RECIPE_VERSION, [d.name for d in debs])
    tree = cache_dir() / "fio" / key / "tree"
    with artifact_lock():
        if not tree.exists():
            with progress.build("fio's tree for L2 (the binary and the libraries it loads)"):
                _build_fio_tree(debs, tree)
    return tree


def _build_fio_tree(debs: list[Path], tree: Path) -> None:
    _require("readelf", "binutils")
    tree.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=tree.parent) as tmp:
        unpacked = Path(tmp) / "debs"
        extract(debs, unpacked)
        staging = Path(tmp) / "tree"
        lib_dir = staging / FIO_PREFIX / "lib"
        lib_dir.mkdir(parents=True)
        shutil.copyfile(unpacked / "usr/bin/fio", staging / FIO_PREFIX / "fio")
        (staging / FIO_PREFIX / "fio").chmod(0o755)
        for name, path in elf_closure(unpacked / "usr/bin/fio", unpacked).items():
            shutil.copyfile(path, lib_dir / name)
        shutil.copyfile(unpacked / "usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2", lib_dir / "ld.so")
        (lib_dir / "ld.so").chmod(0o755)
        wrapper = staging / "usr" / "local" / "bin" / "fio"
        wrapper.parent.mkdir(parents=True)
        wrapper.write_text(f"#!/bin/sh\nexec /{FIO_PREFIX}/lib/ld.so --library-path /{FIO_PREFIX}/lib "
                           f"/{FIO_PREFIX}/fio \"$@\"\n")
        wrapper.chmod(0o755)
        staging.rename(tree)


def elf_closure(binary: Path, root: Path) -> dict[str, Path]:
    """soname -> file under ``root`` for every library ``binary`` needs, transitively."""
    search = [root / d for d in ("usr/lib/x86_64-linux-gnu", "lib/x86_64-linux-gnu")]
    search += [p for d in search if d.is_dir() for p in d.iterdir() if p.is_dir()]  # e.g. .../ceph
    found: dict[str, Path] = {}
    pending = [binary]
    while pending:
        dynamic = subprocess.run(["readelf", "-d", str(pending.pop())], capture_output=True, text=True,
                                 check=True).stdout
        for soname in re.findall(r"\(NEEDED\)\s+Shared library: \[(.+?)\]", dynamic):
            if soname in found:
                continue
            path = next((d / soname for d in search if (d / soname).exists()), None)
            if path is None:
                raise UsageError(f"{binary.name} needs {soname}, which no package of its closure ships")
            found[soname] = path.resolve()
            pending.append(found[soname])
    return found


# -- L1 userspace --------------------------------------------------------------------------

@dataclass(frozen=True)
class Userspace:
    """L1's userspace disk: a Debian suite's QEMU and host tools."""

    suite: str
    image: Path
    qemu_version: str
    tree: Path

    def qemu_env(self) -> dict[str, str]:
        """Debian builds some accelerators and devices as modules, found through this variable."""
        return {"QEMU_MODULE_DIR": str(self.tree / "usr/lib/x86_64-linux-gnu/qemu")}

    def qemu_command(self) -> list[str]:
        """Run this tree's QEMU on L0 through the tree's own loader and libraries."""
        libs = ":".join(str(self.tree / d) for d in ("usr/lib/x86_64-linux-gnu", "lib/x86_64-linux-gnu"))
        return [str(self.tree / "lib/x86_64-linux-gnu/ld-linux-x86-64.so.2"), "--library-path", libs,
                str(self.tree / "usr/bin/qemu-system-x86_64"), "-L", str(self.tree / "usr/share/qemu"),
                "-L", str(self.tree / "usr/share/seabios")]


def _deb_version(debs: list[Path], package: str) -> str:
    deb = next(d for d in debs if d.name.startswith(f"{package}_"))
    return subprocess.run(["dpkg-deb", "-f", str(deb), "Version"], capture_output=True, text=True,
                          check=True).stdout.strip()


def qemu_upstream_version(debian_version: str) -> str:
    """'1:10.0.6+ds-0+deb13u2' -> '10.0.6'."""
    match = re.match(r"(?:\d+:)?(\d+\.\d+(?:\.\d+)?)", debian_version)
    return match[1] if match else debian_version


_USERSPACES: dict[str, Userspace] = {}


def l1_userspace(suite: str) -> Userspace:
    """Fetch and build the L1 userspace disk for a suite (cached by the package versions)."""
    if suite not in SUITES or suite == "bookworm-backports":
        raise UsageError(f"Unknown L1 QEMU suite '{suite}'. Use one of: bookworm (QEMU 7.2), "
                         "trixie (QEMU 10.0), sid (QEMU 11.x).")
    _require("mkfs.ext4", "e2fsprogs")
    # One apt closure query per suite and process (probe, L0's QEMU and the artifacts all ask).
    known = _USERSPACES.get(suite)
    if known is not None and known.image.exists():
        return known
    with artifact_lock():
        _USERSPACES[suite] = _l1_userspace(suite)
    return _USERSPACES[suite]


def _l1_userspace(suite: str) -> Userspace:
    apt = AptRoot(suite)
    apt.update()
    debs = apt.download_closure(L1_PACKAGES, purpose=f"the L1 userspace ({suite})")
    key = content_key(RECIPE_VERSION, sorted(d.name for d in debs))
    directory = cache_dir() / "userspace" / f"{suite}-{key}"
    meta_path = directory / "userspace.json"
    if meta_path.exists():
        meta = json.loads(meta_path.read_text())
        return Userspace(suite, directory / "userspace.img", meta["qemu"], directory / "tree")
    with progress.build(f"the L1 userspace image ({suite}, {len(debs)} packages)"):
        shutil.rmtree(directory, ignore_errors=True)
        tree = directory / "tree"
        extract(debs, tree)
        for junk in ("usr/share/doc", "usr/share/man", "usr/share/locale", "usr/share/info"):
            shutil.rmtree(tree / junk, ignore_errors=True)
        for mount_point in ("tmp", "run", "dev", "proc", "sys", "boot", "mnt/state", "mnt/ram", "var/tmp"):
            (tree / mount_point).mkdir(parents=True, exist_ok=True)
        # QEMU's exec: migration runs /bin/sh; the package closure has no shell of its own.
        shutil.copyfile(BUSYBOX, tree / "usr" / "bin" / "busybox")
        (tree / "usr" / "bin" / "busybox").chmod(0o755)
        for bin_dir in ("usr/bin", "bin"):  # bin is a real directory in trees before merged-usr
            for applet in ("sh", "cat"):
                link = tree / bin_dir / applet
                if (tree / bin_dir).is_dir() and not link.exists() and not link.is_symlink():
                    link.symlink_to("/usr/bin/busybox")
        size = sum(f.stat().st_size for f in tree.rglob("*") if f.is_file() and not f.is_symlink())
        image = directory / "userspace.img"
        _mkfs(tree, image, size)
        qemu = qemu_upstream_version(_deb_version(debs, "qemu-system-x86"))
        meta_path.write_text(json.dumps({"suite": suite, "qemu": qemu, "debs": [d.name for d in debs]},
                                        indent=1))
    return Userspace(suite, image, qemu, tree)


def _mkfs(tree: Path, image: Path, payload_bytes: int) -> None:
    size_mib = int(payload_bytes * 1.25 / 2**20) + 64
    tmp = image.with_suffix(".tmp")
    tmp.unlink(missing_ok=True)
    proc = subprocess.run(["mkfs.ext4", "-q", "-F", "-b", "4096", "-E", "root_owner=0:0", "-d", str(tree),
                           str(tmp), f"{size_mib}M"], capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        raise UsageError(f"mkfs.ext4 -d failed for {image}: {proc.stderr.strip()}")
    tmp.rename(image)


def boot_disk(run_dir: Path, files: dict[str, Path]) -> Path:
    """An ext4 image holding ``files`` (name -> source), mounted at /boot in L1."""
    staging = run_dir / "boot-disk"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    total = 0
    for name, source in files.items():
        target = staging / name
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(source, target)
        except OSError:
            shutil.copyfile(source, target)
        total += source.stat().st_size
    image = run_dir / "boot.img"
    _mkfs(staging, image, total)
    shutil.rmtree(staging)
    return image
