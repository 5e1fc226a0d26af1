"""Restart modes: how L2's state is saved and loaded around the L1 restart.

Each mode says what it needs (probed from QEMU and the kernel, so a missing feature is an
UNSUPPORTED verdict, never a crash) and implements only its own part of the flow: ``save``,
``restore`` and ``resume``. The order of the steps is the flow's business (flow.py).
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

from fastrestart.artifacts.workloads import parse_l1tool
from fastrestart.errors import CheckFailed, StepError, Unsupported
from fastrestart.restart.probes import LUO_KERNEL_OPTIONS, LUO_PASSTHROUGH_OPTIONS, VFIO_CPR_SINCE, QemuCaps
from fastrestart.vm.guest import L2, STATE_DIR

if TYPE_CHECKING:
    from fastrestart.artifacts.kernels import Kernel
    from fastrestart.restart.flow import Flow

STATE_FILE = f"{STATE_DIR}/l2.state"


class Mode:
    """A restart strategy."""

    name = ""
    restarts_host = True  # does L1 kexec?
    guest_visible = False  # does the guest see something happen (e.g. a device unplug)?
    min_qemu: tuple[int, int] = (4, 0)
    migration_mode: str | None = None  # the QAPI MigMode value this mode uses, if any
    ram_backend: str | None = None  # where L2's RAM lives, when the mode decides (luo: a LUO-kept memfd)
    kernel_cmdline: tuple[str, ...] = ()  # L1 kernel parameters the mode needs, on every boot
    kexec_flags: tuple[str, ...] = ()  # extra `kexec -l` flags

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

    def check_kernel(self, kernel: Kernel, devices: list[str]) -> None:
        """Raise Unsupported when an L1 kernel (read from its .config) cannot run this mode."""

    def l2_options(self, devices: list[str]) -> dict:
        return {"allow_s3": False, "aux_ram_share": False}

    # -- the mode-specific parts of the flow ---------------------------------------------------
    def prepare_ram(self, flow: Flow) -> dict:
        """Set up L2's RAM outside PMEM, if the mode keeps it elsewhere (sets ``flow.ram_path``)."""
        return {}

    def reserve(self, flow: Flow) -> dict:
        """After the new L1 kernel boots: take back what the mode kept across the restart."""
        return {}

    def state_path(self, flow: Flow) -> str:
        """Where L1 keeps L2's device state between save and restore."""
        return STATE_FILE

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
        # The rig's shared_ram, unless the bench copies RAM on this cycle. Set both ways: a QEMU
        # that came in with x-ignore-shared on keeps it for its own save.
        if flow.ignore_shared or "x-ignore-shared" in flow.caps.capabilities:
            l2.qmp.cmd("migrate-set-capabilities", step=step,
                       capabilities=[{"capability": "x-ignore-shared", "state": flow.ignore_shared}])
        if self.migration_mode:
            l2.qmp.cmd("migrate-set-parameters", step=step, mode=self.migration_mode)

    def save_to_file(self, flow: Flow, uri: str | None = None, state: str = STATE_FILE) -> dict:
        """Stop L2, migrate its device state (and RAM, unless shared) to ``uri``, quit its QEMU."""
        l2 = flow.l2
        if l2.qmp.cmd("query-status", step="save")["status"] == "running":
            l2.qmp.cmd("stop", step="save")
        self.set_migration_options(l2, flow, "save")
        l2.qmp.cmd("migrate", step="save", uri=uri or self.migration_uri(flow.caps, incoming=False))
        info = l2.qmp.wait_migration(timeout=600, step="save")
        flow.quit_l2(l2, step="save")
        size = int(flow.rig.sh.check(f"stat -L -c %s {state}", step="save").strip())
        return {"state_file": state, "state_bytes": size, "ram_mib": flow.rig.config.l2_mem_mib,
                "migration": {k: info.get(k) for k in ("status", "total-time", "downtime")},
                "ram_transferred": info.get("ram", {}).get("transferred")}

    def restore_from_file(self, flow: Flow, plug_vfio: bool = True, uri: str | None = None) -> dict:
        """Start a new L2 QEMU with -incoming defer and load the state from ``uri``."""
        l2 = flow.start_l2(incoming=["defer"], plug_vfio=plug_vfio)
        self.set_migration_options(l2, flow, "restore")
        l2.qmp.cmd("migrate-incoming", step="restore", uri=uri or self.migration_uri(flow.caps, incoming=True))
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
            # The guest's suspend command returns once it runs again; it also says whether it had to
            # restore the ACPI PM window that QEMU's S3 wake resets and SeaBIOS leaves off.
            woke = flow.l2.console.expect(r"FR-WOKE lpc_pm_restored=(\d)", timeout=60, step="resume")
            return {"resumed_with": "system_wakeup", "was": status,
                    "guest_restored_acpi_pm_window": woke.group(1) == "1"}
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
        if "x-ignore-shared" in flow.caps.capabilities:
            # The new QEMU starts with it off; an old one that came in through a restore may have it on.
            old.qmp.cmd("migrate-set-capabilities", step="save",
                        capabilities=[{"capability": "x-ignore-shared", "state": False}])
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


LUO_DIR = "/run/fr-luo"  # the L1 helper's files, on L1's own root: nothing may keep /mnt/state busy at kexec
LUO_REQUIRED = {**LUO_KERNEL_OPTIONS, "CONFIG_KEXEC_FILE": "kexec_file_load (KHO hands over only through it)"}
KHO_LOG = ("KHO: found kexec handover data", "luo: Retrieved live update data")


def luo_kernel_reasons(options: dict[str, str], release: str, devices: list[str]) -> list[str]:
    """Why a kernel with this .config cannot run mode luo (empty: it can)."""
    if not options:
        # No .config to read: the boot will tell for RAM; passthrough cannot work either way.
        missing, lacking = [], list(LUO_PASSTHROUGH_OPTIONS)
    else:
        missing = [f"{name} ({why})" for name, why in LUO_REQUIRED.items() if options.get(name) not in ("y", "m")]
        lacking = [name for name in LUO_PASSTHROUGH_OPTIONS if options.get(name) not in ("y", "m")]
    reasons = [f"kernel {release} lacks {', '.join(missing)}"] if missing else []
    if devices and lacking:
        reasons.append(f"passthrough kept live across kexec needs the PCI/VFIO live-update series (in review); "
                       f"kernel {release} lacks {', '.join(lacking)}; use --devices none")
    elif devices:
        reasons.append(f"kernel {release} has the PCI/VFIO live-update series, but the harness's LUO helper "
                       "preserves only memfds (RAM, device state), not vfio/iommufd fds; use --devices none")
    return reasons


class Luo(Mode):
    """luo: L2's RAM and device state live in two memfds that the kernel's Live Update Orchestrator
    keeps across the kexec (docs/design.md §6, §10); no PMEM holds them. No QEMU knows LUO, so a small L1 daemon
    (``l1tool luo-hold``) owns the memfds: QEMU maps the RAM one through /proc/<pid>/fd/<n>, the save
    (x-ignore-shared) writes the state one, and the daemon preserves both in a LUO session (tokens
    1 and 2) before the kexec. After it, ``l1tool luo-retrieve`` takes them back for the new QEMU."""

    name = "luo"
    ram_backend = "luo"
    kernel_cmdline = ("kho=on", "liveupdate=on")  # KHO and LUO are off unless asked for at boot
    kexec_flags = ("-s",)  # KHO hands its data to the next kernel through kexec_file_load only

    def check(self, caps, devices, backend, shared_ram):
        super().check(caps, devices, self.ram_backend, shared_ram)
        if "x-ignore-shared" not in caps.capabilities:
            raise Unsupported(f"QEMU {caps.version} has no x-ignore-shared migration capability")
        if not shared_ram:
            raise Unsupported("luo keeps L2's RAM in a shared memfd; --no-shared-ram would copy it")

    def check_kernel(self, kernel, devices):
        reasons = luo_kernel_reasons(kernel.config_options(), kernel.release, devices)
        if reasons:
            raise Unsupported("mode luo: " + "; ".join(reasons))

    def _helper(self, flow: Flow, command: str, step: str) -> dict:
        out = flow.rig.sh.check(f"l1tool {command} --dir {LUO_DIR}", timeout=120, step=step)
        return parse_l1tool(out.strip().splitlines()[-1])

    def prepare_ram(self, flow):
        held = self._helper(flow, f"luo-hold --ram-size {flow.rig.config.l2_mem_mib << 20}", "prepare")
        flow.mode_state["luo"] = held
        flow.ram_path = held["ram_path"]
        return {"ram_path": flow.ram_path, "ram_lives_in": "a memfd held by `l1tool luo-hold` (not PMEM)",
                "luo_hold": held}

    def state_path(self, flow):
        return flow.mode_state["luo"]["state_path"]

    def save(self, flow):
        state = self.state_path(flow)
        # exec:cat rather than file:, which would open the /proc link with its own flags and seeks.
        facts = self.save_to_file(flow, uri=f"exec:cat > {state}", state=state)
        # Only now, with the RAM final and the state written: the memfds go into a LUO session.
        facts["luo_preserve"] = self._helper(flow, "luo-preserve", "save")
        flow.mode_state["saved_state_bytes"] = facts["state_bytes"]
        return {**facts, "ram_lives_in": f"memfd {flow.ram_path} (LUO token 1)",
                "state_lives_in": f"memfd {state} (LUO token 2)"}

    def reserve(self, flow):
        sh = flow.rig.sh
        _, log = sh.run("dmesg | grep -iE 'KHO|luo|liveupdate' | head -40")
        lines = [line.strip() for line in log.splitlines() if line.strip()]
        seen = [text for text in KHO_LOG if text in log]
        rc, out = sh.run(f"l1tool luo-retrieve --dir {LUO_DIR} --ram-size {flow.rig.config.l2_mem_mib << 20} "
                         "2>&1", timeout=120)
        if rc != 0:
            evidence = {"l1tool": out.strip(), "kernel_log": lines, "cmdline": sh.run("cat /proc/cmdline")[1]}
            if "retrieve" in out or "came back" in out:
                raise CheckFailed("memory", "L2 RAM is gone: the new kernel did not hand back the LUO session",
                                  evidence)
            raise StepError("reserve", "l1tool luo-retrieve failed", evidence)
        retrieved = parse_l1tool(out.strip().splitlines()[-1])
        flow.mode_state["luo"] = retrieved
        flow.ram_path = retrieved["ram_path"]
        saved = flow.mode_state.get("saved_state_bytes")
        if saved is not None and retrieved["state_size"] != saved:
            raise CheckFailed("memory", f"L2's device state came back from LUO with {retrieved['state_size']} "
                              f"bytes, not {saved}", {"luo_retrieve": retrieved, "kernel_log": lines})
        return {"luo_retrieve": retrieved, "kho_luo_log_seen": seen, "kernel_log": lines,
                "ram_lived_in": "a memfd kept by LUO across the kexec (token 1), not PMEM",
                "state_lived_in": "a memfd kept by LUO (token 2); the PMEM state region holds only the "
                                  "harness's logs and record"}

    def restore(self, flow):
        state = self.state_path(flow)
        facts = self.restore_from_file(flow, uri=f"exec:cat {state}")
        return {**facts, "ram_path": flow.ram_path, "state_from": state}


MODES: dict[str, Mode] = {m.name: m for m in (IgnoreShared(), CprReboot(), Hotplug(), CprTransfer(), Luo())}
AUTO_ORDER = ["cpr-reboot", "ignore-shared", "hotplug"]
"""What ``auto`` tries, most capable first. cpr-transfer is not in it: it does not restart the
host kernel, which is the point of a fast restart; ask for it by name. Nor is luo: it needs a
kernel built for it and boots L1 with extra parameters, which auto must not impose."""


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
