"""The run options that take one of a fixed set of values, declared once.

The command line's ``choices=``, the matrix loader and ``Cell.validate`` all read them here, so a
typo is refused before anything is probed, with the list of what is allowed.
"""

from __future__ import annotations

from fastrestart.errors import UsageError
from fastrestart.restart.faults import FAULTS
from fastrestart.restart.modes import MODES
from fastrestart.vm.devices import DEVICE_CLASSES
from fastrestart.vm.rig import EDU_IRQ_MODES, parse_size_mib

L1_QEMU_SUITES = {"bookworm": "QEMU 7.2", "trixie": "QEMU 10.0", "sid": "QEMU 11.x"}
"""Debian suites whose QEMU can run in L1."""

CHOICES: dict[str, tuple[str, ...]] = {
    "mode": ("auto", *MODES),
    "inject": tuple(FAULTS),
    "l1_qemu": tuple(L1_QEMU_SUITES),
    "l0_qemu": ("auto", "system", *L1_QEMU_SUITES),
    "accel": ("auto", "kvm", "tcg"),
    "ram_backend": ("auto", "devdax", "fsdax"),
    "edu_irq": EDU_IRQ_MODES,
}
"""Each enumerated run option and its values."""

DEVICES = tuple(DEVICE_CLASSES)


def validate(values: dict, where: str = "") -> None:
    """Refuse values no run can have: an unknown choice, a device, a size, fewer than one cycle.

    ``values`` uses the option names (``l1_qemu``, ``cycles``, ...); missing or None values are not
    checked. The UsageError names the option and lists what it accepts.
    """
    prefix = f"{where}: " if where else ""
    for option, allowed in CHOICES.items():
        value = values.get(option)
        if value is not None and value not in allowed:
            raise UsageError(f"{prefix}unknown {option.replace('_', '-')} {value!r}; "
                             f"choose one of: {', '.join(allowed)}.")
    devices = values.get("devices")
    if devices is not None:
        names = [d for d in (devices.split(",") if isinstance(devices, str) else devices) if d and d != "none"]
        unknown = [d for d in names if d not in DEVICES]
        if unknown:
            raise UsageError(f"{prefix}unknown device(s) {', '.join(unknown)}; devices: {', '.join(DEVICES)} "
                             "(or none).")
    for option in ("cycles", "mem_check", "mem_check_mib"):
        value = values.get(option)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise UsageError(f"{prefix}{option.replace('_', '-')} must be a whole number of at least 1, "
                             f"got {value!r}: a run without a restart proves nothing.")
    if values.get("l2_mem") is not None:
        parse_size_mib(str(values["l2_mem"]))
