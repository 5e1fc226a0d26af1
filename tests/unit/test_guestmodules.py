"""Our own L2 kernel module (guests/modules/edu_uio.c): built for the exact L2 kernel, and how the
rig chooses edu's interrupts from what it can build."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from fastrestart.artifacts import guestmodules
from fastrestart.artifacts.kernels import Kernel, resolve
from fastrestart.errors import UsageError
from fastrestart.restart import checks
from fastrestart.vm import rig

PATH_KERNEL = Kernel("path:/nowhere", "6.12.0-custom", Path("/nowhere/bzImage"), Path("/nowhere"), None)


def test_edu_uio_builds_for_the_default_l2_kernel():
    """Real: Debian's headers and compiler for that kernel, in a chroot (about 20 s once, then cached)."""
    kernel = resolve("debian:trixie")
    module = guestmodules.build("edu_uio", kernel)
    info = subprocess.run(["modinfo", str(module)], capture_output=True, text=True, check=True).stdout
    assert f"vermagic:       {kernel.release} " in info
    assert "pci:v00001234d000011E8" in info  # edu binds to it by id, and by edutest's driver_override
    assert "depends:        uio" in info
    assert guestmodules.build("edu_uio", kernel) == module  # content-keyed cache


def test_no_module_for_a_kernel_without_headers():
    with pytest.raises(guestmodules.Unavailable, match="path:/nowhere"):
        guestmodules.build("edu_uio", PATH_KERNEL)
    with pytest.raises(UsageError, match="no guest module 'nope'"):
        guestmodules.build_for_release("nope", "6.12.0")


@pytest.mark.parametrize(("config", "expected"), [
    ({"devices": ["nvme"]}, ("intx", "")),  # no edu: nothing to choose
    ({"edu_irq": "intx"}, ("intx", "")),
    ({"l2_iommu": True}, ("msi", "")),  # vfio-pci in L2 does MSI itself
])
def test_edu_interrupts_need_no_module(config, expected):
    irq, why, modules = rig._edu_interrupts(rig.RigConfig(**config), PATH_KERNEL)
    assert (irq, why) == expected and modules == ()


def test_auto_falls_back_to_intx_and_says_why():
    irq, why, modules = rig._edu_interrupts(rig.RigConfig(), PATH_KERNEL)
    assert irq == "intx" and modules == ()
    assert "edu_uio (MSI) unavailable" in why and "path:/nowhere" in why


def test_msi_asked_for_but_impossible_is_a_usage_error():
    with pytest.raises(UsageError, match=r"--edu-irq msi.*--edu-irq intx"):
        rig._edu_interrupts(rig.RigConfig(edu_irq="msi"), PATH_KERNEL)


def test_unknown_edu_irq_mode_is_refused():
    with pytest.raises(UsageError, match="msix"):
        rig.RigConfig(edu_irq="msix")


def test_the_fallback_reason_is_in_the_interrupts_evidence():
    edu = {"irq": "intx", "irq_expected": 4, "irq_received": 4, "msi_unavailable": "edu_uio (MSI) unavailable: x"}
    result = checks.interrupts_verdict(edu, None, [], {})
    assert result["verdict"] == "PASS"
    assert result["evidence"]["edu"]["msi_unavailable"].endswith(": x")
