"""Restart modes: how L2's state is saved and loaded around the L1 restart.

Each mode says what it needs (probed from QEMU and the kernel, so a missing feature is an
UNSUPPORTED verdict, never a crash) and implements only its own part of the flow: ``save``,
``restore`` and ``resume``. The order of the steps is the flow's business (flow.py).
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

from .errors import Unsupported
from .guest import L2, STATE_DIR
from .probes import VFIO_CPR_SINCE, QemuCaps

if TYPE_CHECKING:
    from .flow import Flow

STATE_FILE = f"{STATE_DIR}/l2.state"


class Mode:
    """A restart strategy."""

    name = ""
    restarts_host = True  # does L1 kexec?
    guest_visible = False  # does the guest see something happen (e.g. a device unplug)?
    min_qemu: tuple[int, int] = (4, 0)
    migration_mode: str | None = None  # the QAPI MigMode value this mode uses, if any

    def check(self, caps: QemuCaps, devices: list[str], backend: str, shared_ram: bool) -> None:
        """Raise Unsupported with the reason when this mode cannot run here."""
        if caps.version_tuple < self.min_qemu:
            raise Unsupported(f"mode {self.name} needs QEMU >= {'.'.join(map(str, self.min_qemu))}; "
                              f"L1 QEMU is {caps.version}")
        if self.migration_mode and self.migration_mode not in caps.modes:
            raise Unsupported(f"QEMU {caps.version}'s QAPI schema has no {self.migration_mode} migration mode")
        if self.migration_mode and devices and not caps.vfio_supports(self.migration_mode):
            since = ".".join(map(str, VFIO_CPR_SINCE[self.migration_mode]))
            raise Unsupported(f"vfio-pci supports {self.migration_mode} from QEMU {since}; L1 QEMU is {caps.version}")
        if backend == "fsdax" and devices:
            raise Unsupported("L2 RAM on fsdax cannot be used with assigned devices: Linux refuses long-term "
                              "pins of fsdax pages (VFIO_MAP_DMA fails with EOPNOTSUPP); use --ram-backend devdax")

    def l2_options(self, devices: list[str]) -> dict:
        return {"allow_s3": False, "aux_ram_share": False}

    # -- the mode-specific parts of the flow ---------------------------------------------------
    def save(self, flow: Flow) -> dict:
        raise NotImplementedError

    def restore(self, flow: Flow) -> dict:
        raise NotImplementedError

    def resume(self, flow: Flow) -> dict:
        flow.l2.qmp.cmd("cont", step="resume")
        return {"resumed_with": "cont"}

    # -- shared helpers --------------------------------------------------------------------
    def migration_uri(self, caps: QemuCaps, incoming: bool) -> str:
        if caps.has_file_uri:
            return f"file:{STATE_FILE}"
        # QEMU < 8.2 has no file: transport; QEMU's exec runs /bin/sh from the L1 userspace.
        return f"exec:cat {STATE_FILE}" if incoming else f"exec:cat > {STATE_FILE}"

    def set_migration_options(self, l2: L2, flow: Flow, step: str) -> None:
        if flow.rig.config.shared_ram:
            l2.qmp.cmd("migrate-set-capabilities", step=step,
                       capabilities=[{"capability": "x-ignore-shared", "state": True}])
        if self.migration_mode:
            l2.qmp.cmd("migrate-set-parameters", step=step, mode=self.migration_mode)

    def save_to_file(self, flow: Flow) -> dict:
        l2 = flow.l2
        if l2.qmp.cmd("query-status", step="save")["status"] == "running":
            l2.qmp.cmd("stop", step="save")
        self.set_migration_options(l2, flow, "save")
        l2.qmp.cmd("migrate", step="save", uri=self.migration_uri(flow.caps, incoming=False))
        info = l2.qmp.wait_migration(timeout=600, step="save")
        flow.quit_l2(l2, step="save")
        size = int(flow.rig.sh.check(f"stat -c %s {STATE_FILE}", step="save").strip())
        return {"state_file": STATE_FILE, "state_bytes": size, "ram_mib": flow.rig.config.l2_mem_mib,
                "migration": {k: info.get(k) for k in ("status", "total-time", "downtime")},
                "ram_transferred": info.get("ram", {}).get("transferred")}

    def restore_from_file(self, flow: Flow, plug_vfio: bool = True) -> dict:
        l2 = flow.start_l2(incoming=["defer"], plug_vfio=plug_vfio)
        self.set_migration_options(l2, flow, "restore")
        l2.qmp.cmd("migrate-incoming", step="restore", uri=self.migration_uri(flow.caps, incoming=True))
        info = l2.qmp.wait_migration(timeout=600, step="restore")
        status = l2.qmp.cmd("query-status", step="restore")
        return {"runstate": status["status"], "migration": info.get("status")}


class IgnoreShared(Mode):
    """x-ignore-shared: RAM stays in the DAX file, only device state goes to the state file."""

    name = "ignore-shared"

    def check(self, caps, devices, backend, shared_ram):
        super().check(caps, devices, backend, shared_ram)
        if "x-ignore-shared" not in caps.capabilities:
            raise Unsupported(f"QEMU {caps.version} has no x-ignore-shared migration capability")
        if devices:
            raise Unsupported(f"vfio-pci blocks migration in mode ignore-shared (devices: {', '.join(devices)}); "
                              "use cpr-reboot, hotplug or --devices none")

    def save(self, flow):
        return self.save_to_file(flow)

    def restore(self, flow):
        return self.restore_from_file(flow)


class CprReboot(Mode):
    """cpr-reboot: like ignore-shared, but vfio may stay attached if the guest is suspended to RAM."""

    name = "cpr-reboot"
    min_qemu = (8, 2)
    migration_mode = "cpr-reboot"

    def l2_options(self, devices):
        return {"allow_s3": bool(devices), "aux_ram_share": False}

    def save(self, flow):
        facts = {}
        if flow.rig.devices:
            facts["suspend"] = flow.suspend_l2()
        facts.update(self.save_to_file(flow))
        return facts

    def restore(self, flow):
        return self.restore_from_file(flow)

    def resume(self, flow):
        status = flow.l2.qmp.cmd("query-status", step="resume")["status"]
        if status == "suspended":
            flow.l2.qmp.cmd("system_wakeup", step="resume")
            flow.l2.qmp.wait_event("WAKEUP", timeout=30, step="resume")
            # The guest's suspend command returns once it runs again.
            flow.l2.console.expect("FR-WOKE", timeout=60, step="resume")
            return {"resumed_with": "system_wakeup", "was": status}
        flow.l2.qmp.cmd("cont", step="resume")
        return {"resumed_with": "cont", "was": status}


class Hotplug(Mode):
    """The baseline for QEMUs without vfio CPR: unplug the devices, save, restore, plug them back."""

    name = "hotplug"
    guest_visible = True

    def check(self, caps, devices, backend, shared_ram):
        super().check(caps, devices, backend, shared_ram)
        if "x-ignore-shared" not in caps.capabilities:
            raise Unsupported(f"QEMU {caps.version} has no x-ignore-shared migration capability")

    def save(self, flow):
        # The devices leave the guest: their workloads are verified now and start again after.
        flow.workloads.stop_devices(flow.l2, "before unplug", step="save")
        unplugged = flow.unplug_vfio()
        facts = self.save_to_file(flow)
        facts["unplugged"] = unplugged
        return facts

    def restore(self, flow):
        return self.restore_from_file(flow, plug_vfio=False)

    def resume(self, flow):
        facts = super().resume(flow)
        facts["replugged"] = flow.replug_vfio()
        flow.workloads.restart_devices(flow.l2, step="resume")
        facts["guest_visible"] = "the guest saw its devices unplugged and plugged back"
        return facts


class CprTransfer(Mode):
    """cpr-transfer: a new QEMU takes over the fds (RAM, vfio) over a UNIX channel; no host reboot."""

    name = "cpr-transfer"
    restarts_host = False
    min_qemu = (10, 0)
    migration_mode = "cpr-transfer"

    def check(self, caps, devices, backend, shared_ram):
        super().check(caps, devices, backend, shared_ram)
        if not shared_ram:
            raise Unsupported("cpr-transfer keeps RAM by passing its fd: it needs shared RAM")

    def l2_options(self, devices):
        return {"allow_s3": False, "aux_ram_share": True}

    @staticmethod
    def channels() -> tuple[dict, dict]:
        def unix(kind: str) -> dict:
            return {"channel-type": kind, "addr": {"transport": "socket", "type": "unix",
                                                    "path": f"/run/cpr-{kind}.sock"}}
        return unix("main"), unix("cpr")

    def save(self, flow):
        old = flow.l2
        main, cpr = self.channels()
        flow.rig.sh.check("rm -f /sysroot/run/cpr-*.sock", step="save")
        # The new QEMU blocks on the cpr channel before it creates its chardevs: it is reached
        # only once the old one has handed over.
        new = flow.start_l2(incoming=[json.dumps(main), json.dumps(cpr)], connect=False)
        flow.rig.sh.check("i=0; while [ ! -S /sysroot/run/cpr-cpr.sock ] && [ $i -lt 600 ]; do "
                          "sleep 0.1; i=$((i+1)); done; test -S /sysroot/run/cpr-cpr.sock", timeout=90, step="save")
        old.qmp.cmd("migrate-set-parameters", step="save", mode=self.migration_mode)
        old.qmp.cmd("migrate", step="save", channels=[main, cpr])
        info = old.qmp.wait_migration(timeout=300, step="save")
        flow.retire_l2(old, new)
        return {"old_pid": old.pid, "new_pid": new.pid,
                "migration": {k: info.get(k) for k in ("status", "total-time", "downtime")},
                "ram_transferred": info.get("ram", {}).get("transferred")}

    def restore(self, flow):
        flow.rig.connect_l2(flow.l2)
        info = flow.l2.qmp.wait_migration(timeout=120, step="restore")
        return {"migration": info.get("status"),
                "runstate": flow.l2.qmp.cmd("query-status", step="restore")["status"]}

    def resume(self, flow):
        status = flow.l2.qmp.cmd("query-status", step="resume")["status"]
        if status != "running":
            flow.l2.qmp.cmd("cont", step="resume")
            return {"resumed_with": "cont", "was": status}
        return {"resumed_with": "autostart", "was": status}


MODES: dict[str, Mode] = {m.name: m for m in (IgnoreShared(), CprReboot(), Hotplug(), CprTransfer())}
AUTO_ORDER = ["cpr-reboot", "ignore-shared", "hotplug"]
"""What ``auto`` tries, most capable first. cpr-transfer is not in it: it does not restart the
host kernel, which is the point of a fast restart; ask for it by name."""


def choose(name: str, caps: QemuCaps, devices: list[str], backend: str, shared_ram: bool) -> Mode:
    """The mode to run, or Unsupported with every reason."""
    if name != "auto":
        mode = MODES[name]
        mode.check(caps, devices, backend, shared_ram)
        return mode
    reasons = []
    for candidate in AUTO_ORDER:
        try:
            MODES[candidate].check(caps, devices, backend, shared_ram)
            return MODES[candidate]
        except Unsupported as exc:
            reasons.append(f"{candidate}: {exc.reason}")
    raise Unsupported("no restart mode works here: " + "; ".join(reasons))
