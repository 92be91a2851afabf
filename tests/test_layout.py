"""The architecture, enforced: trust levels in the folder tree (the import
contract in setup.cfg, checked with import-linter), and no import cycles.

Marked ``core``: it needs no VM, and it must fail the suite on a violation.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.core

REPO = Path(__file__).resolve().parents[1]
LINT = [sys.executable, "-c", "import sys; from importlinter.cli import lint_imports_command; "
        "sys.exit(lint_imports_command())"]


def _lint(cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(LINT + ["--config", "setup.cfg", "--no-cache"], cwd=cwd,
                          capture_output=True, text=True, timeout=120,
                          env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(cwd)})


def test_import_contract_kept() -> None:
    r = _lint(REPO)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "6 kept, 0 broken" in r.stdout


@pytest.mark.parametrize("module,line,contract", [
    ("privileged/nethelper.py", "from kvmshell.shell import cli", "helpers import only"),
    ("privileged/nethelper.py", "from kvmshell.admin import users", "helpers import only"),
    ("common/vmtree.py", "from kvmshell.shell import monitor", "shared core imports neither"),
    ("admin/kvmadm.py", "from kvmshell.shell import monitor", "none imports another"),
    ("web/app.py", "from kvmshell.shell import cli", "none imports another"),
    ("web/runner.py", "from kvmshell.privileged import pamhelper", "none imports another"),
    ("web/sessions.py", "import pam", "no QEMU, netlink or PAM library"),
    ("privileged/pamhelper.py", "from kvmshell.web import app", "helpers import only"),
    ("privileged/pamhelper.py", "import pyroute2", "login helper imports python-pam, not"),
    ("privileged/nethelper.py", "import pam", "network helper imports pyroute2, not"),
    ("common/config.py", "from kvmshell.web import sessions", "shared core imports neither"),
])
def test_a_deliberate_violation_breaks_the_contract(tmp_path: Path, module: str, line: str,
                                                    contract: str) -> None:
    shutil.copytree(REPO / "kvmshell", tmp_path / "kvmshell",
                    ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "setup.cfg", tmp_path / "setup.cfg")
    target = tmp_path / "kvmshell" / module
    text = target.read_text()
    head, sep, rest = text.partition("from __future__ import annotations\n")
    target.write_text(head + sep + line + "\n" + rest)
    r = _lint(tmp_path)
    assert r.returncode != 0, r.stdout
    assert "BROKEN" in r.stdout
    assert contract in " ".join(r.stdout.split()), r.stdout


def test_no_import_cycles() -> None:
    """No module imports one that imports it back, directly or through others
    (lazy imports inside functions count: grimp sees them)."""
    import grimp

    graph = grimp.build_graph("kvmshell")
    cycles = []
    for importer in sorted(graph.modules):
        for imported in graph.find_modules_directly_imported_by(importer):
            back = graph.find_shortest_chain(importer=imported, imported=importer)
            if back:
                cycles.append(" -> ".join((importer,) + tuple(back)))
    assert not cycles, "\n".join(cycles)


def test_every_module_lives_in_a_trust_level() -> None:
    pkg = REPO / "kvmshell"
    loose = [p.name for p in pkg.glob("*.py") if p.name != "__init__.py"]
    assert not loose, f"modules outside common/, shell/, admin/, privileged/, web/: {loose}"
    assert {p.name for p in pkg.iterdir() if p.is_dir() and p.name != "__pycache__"} == {
        "common", "shell", "admin", "privileged", "web"}


def test_the_network_helper_speaks_netlink_through_pyroute2() -> None:
    import grimp

    graph = grimp.build_graph("kvmshell", include_external_packages=True)
    assert "pyroute2" in graph.find_modules_directly_imported_by("kvmshell.privileged.nethelper")
    src = (REPO / "kvmshell/privileged/nethelper.py").read_text()
    # No hand-packed netlink: no message types or header packing of its own.
    for marker in ("RTM_", "NLM_F_", "nlmsghdr", '"=LHHLL"', "AF_NETLINK"):
        assert marker not in src, marker


def test_the_login_helper_asks_pam_through_python_pam() -> None:
    import grimp

    graph = grimp.build_graph("kvmshell", include_external_packages=True)
    assert graph.find_shortest_chain(importer="kvmshell.privileged.pamhelper", imported="pam")
    src = (REPO / "kvmshell/privileged/pamhelper.py").read_text()
    for marker in ("ctypes", "libpam", "/etc/shadow", "spwd", "crypt"):
        assert marker not in src, marker
