"""What every verb of kvmshell gets: the verb table (data) and the context.

The verb table is read by ``help``, the interactive prompt's completion
and the tests; :mod:`kvmshell.shell.cli` maps each verb to its handler.
A :class:`Context` carries the caller (always the real uid: kvmshell runs
as the VM user) and the host config, loaded on first use.
"""

from __future__ import annotations

import os

TYPE_CHECKING = False  # not "from typing": that import alone costs ~10 ms
if TYPE_CHECKING:
    from kvmshell.common.config import Config
    from kvmshell.common.vmtree import VM

# The command set, as data: verb -> (synopsis, summary).  Read by 'help'
# (text and --json), the prompt's completion, the audit record (a synopsis
# that starts with [VM] names the VM first) and the man page kvmshell(1).
VERBS: dict[str, tuple[str, str]] = {
    "help": ("[VERB] [--json]", "show this help"),
    "list": ("[--json]", "list your VMs and their state"),
    "status": ("[VM] [--json]", "show whether a VM runs, its pid and accelerator (kvm/tcg)"),
    "start": ("[VM] [OPTIONS...]", "start a VM; OPTIONS from 'help start'"),
    "stop": ("[VM]", "power a VM off through ACPI, killing it after a timeout"),
    "kill": ("[VM]", "stop a VM at once"),
    "reset": ("[VM]", "hard-reset a running VM (as the reset button)"),
    "save": ("[VM] NAME", "save a running VM's state to NAME and stop it ('start -loadvm NAME')"),
    "upload": ("[VM] NAME [--size BYTES]", "store stdin as image NAME in the VM's directory"),
    "images": ("[VM] [--json]", "list the VM's files: bytes on disk, virtual size, name"),
    "rm": ("[VM] NAME", "remove file NAME (as 'images' shows it) from the VM's directory"),
    "quota": ("[--json]", "your budgets: what your running VMs use, and what is left"),
    "disk": ("create|clone|reset|resize|info [VM] NAME ...",
             "make, clone, reset, grow or inspect a disk image; 'help disk'"),
    "snapshot": ("list|create|revert|delete [VM] DISK [TAG]",
                 "qcow2 internal snapshots of a stopped VM's disk"),
    "console": ("[VM] [OPTIONS...]", "attach to the serial console; OPTIONS from 'help console'"),
    "vnc": ("[VM]", "carry the VM's display over stdin/stdout, for a VNC client"),
    "autostart": ("[VM] [on|off]", "start the VM at boot with its last start's options, or not"),
    "connect": ("[VM] PORT", "carry one TCP connection to the guest's PORT over stdin/stdout"),
}

# Verbs that print one JSON document (docs/json.md) when given --json, in
# any position; kvmshell.shell.cli takes the word out and sets ctx.json.
# Of disk's sub-verbs only 'info' does (disks.DISK_VERBS: "[--json]" in its
# synopsis); the others refuse the word.  help --json and kvmshell(1) read this.
JSON_VERBS = frozenset({"help", "list", "status", "images", "quota", "disk"})


class Context:
    """What every verb needs: the config path, the caller, the output mode
    (``json``), and the fields a verb adds to its audit record (``audit``:
    ``vm``, the resolved VM's name; ``options``, start's options as parsed)."""

    def __init__(self, config_path: str) -> None:
        self.config_path = config_path
        self.uid = os.getuid()
        self._cfg: object = None
        self.json = False
        self.audit: dict[str, "str | list[str]"] = {}

    @property
    def cfg(self) -> "Config":
        """The host config (raises ConfigError if it cannot be loaded)."""
        from kvmshell.common import config
        if self._cfg is None:
            # Only from the admin's places: the user's code may pick our argv.
            self._cfg = config.load(self.config_path, places=config.USER_CONFIG_DIRS)
        assert isinstance(self._cfg, config.Config)
        return self._cfg

    def pick(self, name: str | None) -> "VM":
        """The caller's VM *name* (or only VM), noted for the audit record;
        errors as :func:`kvmshell.common.vmtree.pick`."""
        from kvmshell.common import vmtree
        vm = vmtree.pick(self.cfg, self.uid, name)
        self.audit["vm"] = vm.name
        return vm
