"""kvmshell's side of the privileged network helper (see helper.py)."""

from __future__ import annotations

from kvmshell.config import Config
from kvmshell.errors import RuntimeFailure
from kvmshell.vmtree import VM


def up(cfg: Config, vm: VM) -> list[int]:
    raise RuntimeFailure(f"VM {vm.name}: tap networking is not available in this build")


def down(cfg: Config, vm: VM) -> None:
    return None
