"""The run options, declared once: ``Cell``'s fields.

Each field says its default, its help, its choices and where it applies. Everything else reads
them from here: the command line (``add_arguments`` for run, soak, rig check and shell), the matrix
keys and the `fastrestart run` arguments a matrix cell becomes (campaign.pipelines), the avocado
test case's parameters (``Cell.from_values``), and ``validate``, which refuses a typo before
anything is probed, listing what is allowed.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Iterator
from dataclasses import MISSING, Field, asdict, dataclass, field, fields

from fastrestart.errors import UsageError
from fastrestart.restart.faults import FAULTS
from fastrestart.restart.modes import MODES
from fastrestart.vm.devices import DEVICE_CLASSES
from fastrestart.vm.rig import EDU_IRQ_MODES, parse_size_mib

L1_QEMU_SUITES = {"bookworm": "QEMU 7.2", "trixie": "QEMU 10.0", "sid": "QEMU 11.x"}
"""Debian suites whose QEMU can run in L1."""

DEVICES = tuple(DEVICE_CLASSES)

RIG, FLOW, FAULT = "rig", "flow", "fault"
"""Where an option applies: every command that stands a rig up (run, soak, rig check, shell); the
commands that run the restart flow (run, soak); `run` alone (a fault, injected on purpose)."""


def option(default: object, help: str, *, scope: str = RIG, choices: tuple[str, ...] | None = None,
           key: str | None = None) -> Field:
    """A Cell field that is a run option. ``key`` names it in matrices and on the command line
    (``--key-with-dashes``) when that differs from the field's name."""
    return field(default=default, metadata={"help": help, "scope": scope, "choices": choices, "key": key})


@dataclass
class Cell:
    """One restart run's parameters (a row of a matrix)."""

    kernel: str = option("debian:trixie", "L1 kernel spec (debian:SUITE, debian:VERSION, path:DIR, build:KEY)")
    to_kernel: str | None = option(None, "kernel to kexec into (default: the same kernel)")
    l1_qemu: str = option("trixie", "QEMU in L1: " + ", ".join(f"{k} ({v})" for k, v in L1_QEMU_SUITES.items()),
                          choices=tuple(L1_QEMU_SUITES))
    mode: str = option("auto", "the restart mode (default auto)", scope=FLOW, choices=("auto", *MODES))
    devices: tuple[str, ...] = option(("edu", "nvme"), f"assigned devices, comma separated ({', '.join(DEVICES)}), "
                                      "or none")
    l2_mem: str = option("256M", "L2 RAM, e.g. 256M or 2G")
    inject: str | None = option(None, "a fault that its check must catch: " + "; ".join(
        f"{f.name} ({f.check})" for f in FAULTS.values()), scope=FAULT, choices=tuple(FAULTS))
    cycles: int = option(1, "restarts in a row on one rig", scope=FLOW)
    ram_backend: str = option("auto", "where L2's RAM lives in L1's PMEM (default auto: devdax with devices, "
                              "else fsdax)", choices=("auto", "devdax", "fsdax"))
    l2_kernel: str = option("debian:trixie", "L2 guest kernel spec")
    l0_qemu: str | None = option(None, "QEMU on L0 (default auto: the system's if >= 9.0, else trixie's)",
                                 choices=("auto", "system", *L1_QEMU_SUITES))
    accel: str | None = option(None, "accelerator for L1 (default: detect)", choices=("auto", "kvm", "tcg"))
    shared_ram: bool = option(True, "copy RAM into the state file (for comparison)", scope=FLOW)
    mem_check_mib: int | None = option(None, "MiB of L2 RAM the memory check fills (default: most of it)",
                                       scope=FLOW, key="mem_check")
    l2_iommu: bool = option(False, "give L2 an intel-iommu: edu then runs on vfio-pci in L2")
    edu_irq: str = option("auto", "edu's interrupts in L2 (default auto: MSI through our edu_uio module, built for "
                          "the L2 kernel; INTx through uio_pci_generic if it cannot be built)", choices=EDU_IRQ_MODES)
    keep_images: bool = option(False, "keep L1's boot disk (kernels, initrds; about 100 MB) in the result directory")
    name: str | None = None  # the matrix cell's name, not a run option

    def validate(self) -> None:
        """Refuse, before anything is probed, what no run can be (see ``validate``)."""
        validate(asdict(self))

    def label(self) -> str:
        if self.name:
            return self.name
        kernel = self.kernel.split(":")[-1] + (f"-to-{self.to_kernel.split(':')[-1]}" if self.to_kernel else "")
        parts = [kernel, f"q{self.l1_qemu}", self.mode, "+".join(self.devices) or "nodev", self.l2_mem]
        if self.l2_iommu:
            parts.append("l2iommu")
        if self.edu_irq != "auto":
            parts.append(self.edu_irq)
        if self.inject:
            parts.append(self.inject)
        return "-".join(parts)

    @classmethod
    def from_values(cls, get: Callable[[str, object], object], **extra: object) -> Cell:
        """A Cell from values looked up by option key (a matrix cell, avocado's params), each
        converted to the field's type; keys ``get`` does not know keep their default."""
        values = {}
        for spec in run_options():
            value = get(spec.key, spec.default)
            values[spec.name] = spec.default if value is None and spec.default is None else spec.convert(value)
        return cls(**values, **extra)

    @classmethod
    def from_matrix(cls, cell: dict) -> Cell:
        """The Cell a matrix cell (keys as in the matrix file) describes."""
        return cls.from_values(lambda key, default: cell.get(key, default), name=cell.get("name"))


@dataclass(frozen=True)
class RunOption:
    """One Cell field seen as a run option."""

    name: str
    key: str
    default: object
    help: str
    scope: str
    choices: tuple[str, ...] | None

    @property
    def flag(self) -> str:
        """The command-line flag: a switch that is on by default is turned off with --no-KEY."""
        key = self.key.replace("_", "-")
        return f"--no-{key}" if self.default is True else f"--{key}"

    def convert(self, value: object) -> object:
        """A value from a matrix or the command line, as the Cell holds it."""
        if self.name == "devices":
            names_given = isinstance(value, list | tuple) and all(isinstance(d, str) for d in value)
            if not (isinstance(value, str) or names_given):
                raise UsageError(f"devices must be a list of names or 'a,b', got {value!r}")
            names = value.split(",") if isinstance(value, str) else value
            return tuple(d for d in names if d and d != "none")
        if isinstance(self.default, bool):
            if not isinstance(value, bool):
                raise UsageError(f"{self.key} must be true or false, got {value!r}")
            return value
        if self.name in ("cycles", "mem_check_mib"):
            return value if value is None else _whole(value, self.key)
        return value


def run_options(*scopes: str) -> Iterator[RunOption]:
    """The run options, in declaration order (all of them, or those of ``scopes``)."""
    for item in fields(Cell):
        if "scope" not in item.metadata or (scopes and item.metadata["scope"] not in scopes):
            continue
        default = item.default if item.default is not MISSING else item.default_factory()
        yield RunOption(item.name, item.metadata["key"] or item.name, default, item.metadata["help"],
                        item.metadata["scope"], item.metadata["choices"])


CHOICES: dict[str, tuple[str, ...]] = {o.name: o.choices for o in run_options() if o.choices}
"""Each enumerated run option and its values."""


def _whole(value: object, key: str) -> int:
    """A whole number >= 1 from a matrix or the command line ("3" or 3; not 1.5, True or 0)."""
    text = str(value).strip()
    if isinstance(value, bool) or not (isinstance(value, int) or (isinstance(value, str) and text.isdigit())) \
            or int(text) < 1:
        raise UsageError(f"{key.replace('_', '-')} must be a whole number of at least 1, got {value!r}: "
                         "a run without a restart proves nothing.")
    return int(text)


def validate(values: dict, where: str = "") -> None:
    """Refuse values no run can have: an unknown choice, a device, a size, fewer than one cycle.

    ``values`` uses the fields' names or the matrix keys (``mem_check``); missing or None values
    are not checked. The UsageError names the option and lists what it accepts.
    """
    prefix = f"{where}: " if where else ""
    try:
        for spec in run_options():
            value = values.get(spec.name, values.get(spec.key))
            if value is None:
                continue
            value = spec.convert(value)
            if spec.choices and value not in spec.choices:
                raise UsageError(f"unknown {spec.key.replace('_', '-')} {value!r}; choose one of: "
                                 f"{', '.join(spec.choices)}.")
            if spec.name == "devices" and set(value) - set(DEVICES):
                raise UsageError(f"unknown device(s) {', '.join(sorted(set(value) - set(DEVICES)))}; devices: "
                                 f"{', '.join(DEVICES)} (or none).")
            if spec.name == "l2_mem":
                parse_size_mib(str(value))
    except UsageError as exc:
        raise UsageError(f"{prefix}{exc}") from None


# -- the command line ------------------------------------------------------------------------------

def add_arguments(parser: argparse.ArgumentParser, *scopes: str, defaults: dict | None = None) -> None:
    """The run options of ``scopes`` as arguments of one subcommand (``defaults`` overrides some)."""
    for spec in run_options(*scopes):
        default = (defaults or {}).get(spec.name, spec.default)
        if isinstance(spec.default, bool):
            parser.add_argument(spec.flag, dest=spec.name, action="store_false" if spec.default else "store_true",
                                help=spec.help)
        elif spec.name in ("cycles", "mem_check_mib"):
            parser.add_argument(spec.flag, dest=spec.name, type=at_least_one, default=default,
                                help=spec.help + (f" (default {default})" if default is not None else ""))
        elif spec.name == "devices":
            parser.add_argument(spec.flag, dest=spec.name, default=",".join(default), help=spec.help)
        else:
            parser.add_argument(spec.flag, dest=spec.name, default=default, choices=spec.choices, help=spec.help)


def cell_from_args(args: argparse.Namespace, **extra: object) -> Cell:
    """The Cell a subcommand's parsed arguments describe (options it does not take keep their default)."""
    return Cell.from_values(lambda key, default: getattr(args, _name_of(key), default), **extra)


def _name_of(key: str) -> str:
    return next(spec.name for spec in run_options() if spec.key == key)


def at_least_one(text: str) -> int:
    """argparse type: a whole number >= 1 (a run without a restart proves nothing)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value
