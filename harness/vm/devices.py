"""Devices as data. Each object renders its own QEMU arguments, so a device set is a list and
adding a device is a few lines (the opposite of one giant command-line builder)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


class Device:
    """Something that adds arguments to a QEMU command line."""

    def args(self) -> list[str]:
        raise NotImplementedError


def _props(driver: str, **props: object) -> str:
    parts = [driver]
    for key, value in props.items():
        if value is None:
            continue
        if isinstance(value, bool):
            value = "on" if value else "off"
        parts.append(f"{key.replace('_', '-')}={value}")
    return ",".join(parts)


@dataclass
class IntelIommu(Device):
    """The emulated vIOMMU. ``intremap`` needs kernel-irqchip=split; ``caching_mode`` is what
    lets vfio-pci shadow the guest's mappings; ``aw_bits`` is pinned because newer QEMUs default
    to 48 bits, which some hosts reject."""

    intremap: bool = True
    caching_mode: bool = True
    aw_bits: int = 39

    def args(self) -> list[str]:
        return ["-device", _props("intel-iommu", intremap=self.intremap, caching_mode=self.caching_mode,
                                  aw_bits=self.aw_bits)]


@dataclass
class PassthroughDevice(Device):
    """A device L0 emulates and L1 hands to L2 through vfio-pci.

    ``slot`` fixes its address in L1 (0000:00:SLOT.0) so the flow can name it.
    """

    name: str
    vendor_device: str
    slot: int

    @property
    def l1_bdf(self) -> str:
        return f"0000:00:{self.slot:02x}.0"


@dataclass
class Edu(PassthroughDevice):
    """QEMU's edu: a DMA engine with MSI and INTx, the test device of choice for passthrough."""

    name: str = "edu"
    vendor_device: str = "1234:11e8"
    slot: int = 4

    def args(self) -> list[str]:
        return ["-device", _props("edu", addr=f"{self.slot:#x}")]


@dataclass
class Nvme(PassthroughDevice):
    """An NVMe controller backed by a scratch file on L0."""

    backing: Path | None = None
    name: str = "nvme"
    vendor_device: str = "1b36:0010"
    slot: int = 5
    size_mib: int = 256

    def args(self) -> list[str]:
        drive = f"nvme-{self.slot}"
        return ["-drive", f"file={self.backing},if=none,id={drive},format=raw,cache=unsafe",
                "-device", _props("nvme", serial=f"fr-nvme-{self.slot}", drive=drive, addr=f"{self.slot:#x}")]


@dataclass
class VirtioDisk(Device):
    """A disk found in the guest by its serial (not by probe order)."""

    path: Path
    serial: str
    readonly: bool = True

    def args(self) -> list[str]:
        drive = f"disk-{self.serial}"
        return ["-drive", f"file={self.path},if=none,id={drive},format=raw,readonly={'on' if self.readonly else 'off'}",
                "-device", _props("virtio-blk-pci", drive=drive, serial=self.serial)]


@dataclass
class UserNet(Device):
    """User networking whose only purpose is forwarding 127.0.0.1 ports to guest services."""

    forwards: dict[int, int]  # host port (on 127.0.0.1) -> guest port

    def args(self) -> list[str]:
        fwd = "".join(f",hostfwd=tcp:127.0.0.1:{h}-:{g}" for h, g in self.forwards.items())
        return ["-netdev", f"user,id=net0,restrict=off{fwd}", "-device", "virtio-net-pci,netdev=net0"]


DEVICE_CLASSES: dict[str, type[PassthroughDevice]] = {"edu": Edu, "nvme": Nvme}
"""The registry of assignable devices, by the name users give in --devices."""
