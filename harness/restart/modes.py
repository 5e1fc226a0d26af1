"""Restart modes: how L2's state is saved and loaded around the L1 restart.

Each mode says what it needs (probed from QEMU and the kernel, so a missing feature is an
UNSUPPORTED verdict, never a crash) and implements only its own part of the flow: ``save``,
``restore`` and ``resume`` (and luo's ``prepare_ram`` and ``reserve``). The order of the steps is
the flow's business (flow.py).

A mode sees the run through a ``RestartContext`` (the rig, the current L2, where L2's RAM lives,
the QEMU's capabilities, the workloads) and changes nothing in the flow: what it makes, a new L2
generation or a new home for L2's RAM, it returns in an ``Outcome``, which the flow adopts. What a
mode keeps between its own steps (luo: the helper's memfds) lives in the mode instance, which is
the run's own (``choose`` gives a fresh one).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from fastrestart.artifacts.workloads import parse_l1tool
from fastrestart.errors import CheckFailed, StepError, Unsupported
from fastrestart.restart.probes import LUO_KERNEL_OPTIONS, LUO_PASSTHROUGH_OPTIONS, VFIO_CPR_SINCE, QemuCaps
from fastrestart.vm.guest import STATE_DIR, L2Machine
from fastrestart.vm.rig import BOOT_DEADLINE_S

if TYPE_CHECKING:
    from fastrestart.artifacts.kernels import Kernel
    from fastrestart.restart.checks import Workloads
    from fastrestart.vm.rig import Rig

STATE_FILE = f"{STATE_DIR}/l2.state"


@dataclass
class RestartContext:
    """What a mode may use of the run, and no more."""

    rig: Rig
    caps: QemuCaps
    l2: L2Machine | None  # the generation that runs the guest now
    ram_path: str  # where L2's RAM lives now ('' for private RAM)
    ignore_shared: bool  # False: the save copies L2's RAM into the state file (the bench's ram-copy)
    workloads: Workloads | None
    new_l2: Callable[..., L2Machine]  # the next L2 generation, with this run's arguments, not launched
    log: Callable[[str], None] = lambda _text: None  # a line in flow.log


@dataclass
class Outcome:
    """What a mode's part of a step gives back: its evidence, and what the flow adopts."""

    facts: dict = field(default_factory=dict)
    l2: L2Machine | None = None  # a new generation that runs the guest from now on
    ram_path: str | None = None  # L2's RAM lives here from now on


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
    def prepare_ram(self, ctx: RestartContext) -> Outcome:
        """Set up L2's RAM outside PMEM, if the mode keeps it elsewhere (``Outcome.ram_path``)."""
        return Outcome()

    def reserve(self, ctx: RestartContext) -> Outcome:
        """After the new L1 kernel boots: take back what the mode kept across the restart."""
        return Outcome()

    def state_path(self) -> str:
        """Where L1 keeps L2's device state between save and restore."""
        return STATE_FILE

    def save(self, ctx: RestartContext) -> Outcome:
        raise NotImplementedError

    def restore(self, ctx: RestartContext) -> Outcome:
        raise NotImplementedError

    def resume(self, ctx: RestartContext) -> Outcome:
        ctx.l2.qmp.cmd("cont", step="resume")
        return Outcome({"resumed_with": "cont"})

    # -- shared helpers --------------------------------------------------------------------
    def migration_uri(self, caps: QemuCaps, incoming: bool) -> str:
        if caps.has_file_uri:
            return f"file:{STATE_FILE}"
        # QEMU < 8.2 has no file: transport; QEMU's exec runs /bin/sh from the L1 userspace.
        return f"exec:cat {STATE_FILE}" if incoming else f"exec:cat > {STATE_FILE}"

    def set_migration_options(self, l2: L2Machine, ctx: RestartContext, step: str) -> None:
        # The rig's shared_ram, unless the bench copies RAM on this cycle. Set both ways: a QEMU
        # that came in with x-ignore-shared on keeps it for its own save.
        if ctx.ignore_shared or "x-ignore-shared" in ctx.caps.capabilities:
            l2.qmp.cmd("migrate-set-capabilities", step=step,
                       capabilities=[{"capability": "x-ignore-shared", "state": ctx.ignore_shared}])
        if self.migration_mode:
            l2.qmp.cmd("migrate-set-parameters", step=step, mode=self.migration_mode)

    def save_to_file(self, ctx: RestartContext, uri: str | None = None, state: str = STATE_FILE) -> dict:
        """Stop L2, migrate its device state (and RAM, unless shared) to ``uri``, quit its QEMU."""
        l2 = ctx.l2
        if l2.qmp.cmd("query-status", step="save")["status"] == "running":
            l2.qmp.cmd("stop", step="save")
        self.set_migration_options(l2, ctx, "save")
        l2.qmp.cmd("migrate", step="save", uri=uri or self.migration_uri(ctx.caps, incoming=False))
        info = l2.qmp.wait_migration(timeout=600, step="save")
        l2.quit(step="save")
        size = int(ctx.rig.sh.check(f"stat -L -c %s {state}", step="save").strip())
        return {"state_file": state, "state_bytes": size, "ram_mib": ctx.rig.config.l2_mem_mib,
                "migration": {k: info.get(k) for k in ("status", "total-time", "downtime")},
                "ram_transferred": info.get("ram", {}).get("transferred")}

    def restore_from_file(self, ctx: RestartContext, plug_vfio: bool = True, uri: str | None = None) -> Outcome:
        """Start a new L2 QEMU with -incoming defer and load the state from ``uri``; the new QEMU
        is the Outcome's L2."""
        l2 = ctx.new_l2(incoming=["defer"], plug_vfio=plug_vfio).launch()
        try:
            self.set_migration_options(l2, ctx, "restore")
            l2.qmp.cmd("migrate-incoming", step="restore", uri=uri or self.migration_uri(ctx.caps, incoming=True))
            info = l2.qmp.wait_migration(timeout=600, step="restore")
            status = l2.qmp.cmd("query-status", step="restore")
        except BaseException:
            l2.close()  # not adopted: nothing else would close its connections (it goes with L1)
            raise
        return Outcome({"runstate": status["status"], "migration": info.get("status")}, l2=l2)


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

    def save(self, ctx):
        return Outcome(self.save_to_file(ctx))

    def restore(self, ctx):
        return self.restore_from_file(ctx)


class CprReboot(Mode):
    """cpr-reboot: like ignore-shared, but vfio may stay attached if the guest is suspended to RAM."""

    name = "cpr-reboot"
    min_qemu = (8, 2)
    migration_mode = "cpr-reboot"

    def l2_options(self, devices):
        return {"allow_s3": bool(devices), "aux_ram_share": False}

    def save(self, ctx):
        facts = {}
        if ctx.rig.devices:
            facts["suspend"] = self.suspend(ctx)
        facts.update(self.save_to_file(ctx))
        return Outcome(facts)

    @staticmethod
    def suspend(ctx: RestartContext) -> dict:
        """The guest suspends itself to RAM (cpr-reboot with devices attached needs it)."""
        l2 = ctx.l2
        since = len(l2.qmp.events)
        in_flight = ctx.workloads.before_suspend() if ctx.workloads else ""
        # fr-suspend (guests/l2) prints FR-WOKE once the guest runs again.
        l2.console.send(f"fr-suspend {in_flight}".strip())
        event = l2.qmp.wait_event("SUSPEND", timeout=BOOT_DEADLINE_S, step="save", since=since)
        return {"suspended_at": event.received}

    def restore(self, ctx):
        return self.restore_from_file(ctx)

    def resume(self, ctx):
        l2 = ctx.l2
        status = l2.qmp.cmd("query-status", step="resume")["status"]
        if status == "suspended":
            l2.qmp.cmd("system_wakeup", step="resume")
            l2.qmp.wait_event("WAKEUP", timeout=30, step="resume")
            # The guest's suspend command returns once it runs again; it also says whether it had to
            # restore the ACPI PM window that QEMU's S3 wake resets and SeaBIOS leaves off.
            woke = l2.console.expect(r"FR-WOKE lpc_pm_restored=(\d)", timeout=60, step="resume")
            return Outcome({"resumed_with": "system_wakeup", "was": status,
                            "guest_restored_acpi_pm_window": woke.group(1) == "1"})
        l2.qmp.cmd("cont", step="resume")
        return Outcome({"resumed_with": "cont", "was": status})


class Hotplug(Mode):
    """The baseline for QEMUs without vfio CPR: unplug the devices, save, restore, plug them back."""

    name = "hotplug"
    guest_visible = True

    def check(self, caps, devices, backend, shared_ram):
        super().check(caps, devices, backend, shared_ram)
        if "x-ignore-shared" not in caps.capabilities:
            raise Unsupported(f"QEMU {caps.version} has no x-ignore-shared migration capability")

    def save(self, ctx):
        # The devices leave the guest: their workloads are verified now and start again after.
        ctx.workloads.stop_devices(ctx.l2, "before unplug", step="save")
        unplugged = ctx.l2.unplug_vfio(step="save")
        facts = self.save_to_file(ctx)
        facts["unplugged"] = unplugged
        return Outcome(facts)

    def restore(self, ctx):
        return self.restore_from_file(ctx, plug_vfio=False)

    def resume(self, ctx):
        facts = super().resume(ctx).facts
        facts["replugged"] = ctx.l2.replug_vfio(step="resume")
        ctx.workloads.restart_devices(ctx.l2, step="resume")
        facts["guest_visible"] = "the guest saw its devices unplugged and plugged back"
        return Outcome(facts)


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

    def save(self, ctx):
        """The old QEMU hands over to a new one and quits; the new one is the Outcome's L2 (not
        connected yet: ``restore`` connects it)."""
        old = ctx.l2
        main, cpr = self.channels()
        ctx.rig.sh.check("rm -f /sysroot/run/cpr-*.sock", step="save")
        # The new QEMU blocks on the cpr channel before it creates its chardevs: it is reached
        # only once the old one has handed over.
        new = ctx.new_l2(incoming=[json.dumps(main), json.dumps(cpr)], connect=False).launch()
        try:
            ctx.rig.sh.check("i=0; while [ ! -S /sysroot/run/cpr-cpr.sock ] && [ $i -lt 600 ]; do "
                             "sleep 0.1; i=$((i+1)); done; test -S /sysroot/run/cpr-cpr.sock", timeout=90,
                             step="save")
            old.qmp.cmd("migrate-set-parameters", step="save", mode=self.migration_mode)
            if "x-ignore-shared" in ctx.caps.capabilities:
                # The new QEMU starts with it off; an old one that came in through a restore may have it on.
                old.qmp.cmd("migrate-set-capabilities", step="save",
                            capabilities=[{"capability": "x-ignore-shared", "state": False}])
            old.qmp.cmd("migrate", step="save", channels=[main, cpr])
            info = old.qmp.wait_migration(timeout=300, step="save")
            old.quit(step="save")
        except BaseException:
            new.close()  # not adopted: nothing else would close its log (it goes with L1)
            raise
        return Outcome({"old_pid": old.pid, "new_pid": new.pid,
                        "migration": {k: info.get(k) for k in ("status", "total-time", "downtime")},
                        "ram_transferred": info.get("ram", {}).get("transferred")}, l2=new)

    def restore(self, ctx):
        l2 = ctx.l2
        l2.connect()
        info = l2.qmp.wait_migration(timeout=120, step="restore")
        return Outcome({"migration": info.get("status"),
                        "runstate": l2.qmp.cmd("query-status", step="restore")["status"]})

    def resume(self, ctx):
        status = ctx.l2.qmp.cmd("query-status", step="resume")["status"]
        if status != "running":
            ctx.l2.qmp.cmd("cont", step="resume")
            return Outcome({"resumed_with": "cont", "was": status})
        return Outcome({"resumed_with": "autostart", "was": status})


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

    def __init__(self) -> None:
        self.held: dict = {}  # what l1tool last reported about the memfds it holds (paths, sizes)
        self.saved_state_bytes: int | None = None  # the device state written by the last save

    def _helper(self, ctx: RestartContext, command: str, step: str) -> dict:
        out = ctx.rig.sh.check(f"l1tool {command} --dir {LUO_DIR}", timeout=120, step=step)
        return parse_l1tool(out.strip().splitlines()[-1])

    def prepare_ram(self, ctx):
        self.held = self._helper(ctx, f"luo-hold --ram-size {ctx.rig.config.l2_mem_mib << 20}", "prepare")
        return Outcome({"ram_path": self.held["ram_path"], "ram_lives_in": "a memfd held by `l1tool luo-hold` "
                        "(not PMEM)", "luo_hold": self.held}, ram_path=self.held["ram_path"])

    def state_path(self):
        return self.held["state_path"]

    def save(self, ctx):
        state = self.state_path()
        # exec:cat rather than file:, which would open the /proc link with its own flags and seeks.
        facts = self.save_to_file(ctx, uri=f"exec:cat > {state}", state=state)
        # Only now, with the RAM final and the state written: the memfds go into a LUO session.
        facts["luo_preserve"] = self._helper(ctx, "luo-preserve", "save")
        self.saved_state_bytes = facts["state_bytes"]
        return Outcome({**facts, "ram_lives_in": f"memfd {ctx.ram_path} (LUO token 1)",
                        "state_lives_in": f"memfd {state} (LUO token 2)"})

    def reserve(self, ctx):
        sh = ctx.rig.sh
        _, log = sh.run("dmesg | grep -iE 'KHO|luo|liveupdate' | head -40")
        lines = [line.strip() for line in log.splitlines() if line.strip()]
        seen = [text for text in KHO_LOG if text in log]
        rc, out = sh.run(f"l1tool luo-retrieve --dir {LUO_DIR} --ram-size {ctx.rig.config.l2_mem_mib << 20} "
                         "2>&1", timeout=120)
        if rc != 0:
            evidence = {"l1tool": out.strip(), "kernel_log": lines, "cmdline": sh.run("cat /proc/cmdline")[1]}
            if "retrieve" in out or "came back" in out:
                raise CheckFailed("memory", "L2 RAM is gone: the new kernel did not hand back the LUO session",
                                  evidence)
            raise StepError("reserve", "l1tool luo-retrieve failed", evidence)
        retrieved = parse_l1tool(out.strip().splitlines()[-1])
        self.held = retrieved
        if self.saved_state_bytes is not None and retrieved["state_size"] != self.saved_state_bytes:
            raise CheckFailed("memory", f"L2's device state came back from LUO with {retrieved['state_size']} "
                              f"bytes, not {self.saved_state_bytes}", {"luo_retrieve": retrieved, "kernel_log": lines})
        return Outcome({"luo_retrieve": retrieved, "kho_luo_log_seen": seen, "kernel_log": lines,
                        "ram_lived_in": "a memfd kept by LUO across the kexec (token 1), not PMEM",
                        "state_lived_in": "a memfd kept by LUO (token 2); the PMEM state region holds only the "
                                          "harness's logs and record"}, ram_path=retrieved["ram_path"])

    def restore(self, ctx):
        state = self.state_path()
        outcome = self.restore_from_file(ctx, uri=f"exec:cat {state}")
        outcome.facts.update(ram_path=ctx.ram_path, state_from=state)
        return outcome


MODES: dict[str, Mode] = {m.name: m for m in (IgnoreShared(), CprReboot(), Hotplug(), CprTransfer(), Luo())}
AUTO_ORDER = ["cpr-reboot", "ignore-shared", "hotplug"]
"""What ``auto`` tries, most capable first. cpr-transfer is not in it: it does not restart the
host kernel, which is the point of a fast restart; ask for it by name. Nor is luo: it needs a
kernel built for it and boots L1 with extra parameters, which auto must not impose."""


def choose(name: str, caps: QemuCaps, devices: list[str], backend: str, shared_ram: bool) -> Mode:
    """The mode to run (an instance of its own, for what the mode keeps during a run), or
    Unsupported with every reason."""
    if name != "auto":
        mode = MODES[name]
        mode.check(caps, devices, backend, shared_ram)
        return type(mode)()
    reasons = []
    for candidate in AUTO_ORDER:
        try:
            MODES[candidate].check(caps, devices, backend, shared_ram)
            return type(MODES[candidate])()
        except Unsupported as exc:
            reasons.append(f"{candidate}: {exc.reason}")
    raise Unsupported("no restart mode works here: " + "; ".join(reasons))
