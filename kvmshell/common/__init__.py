"""Shared by every runner (the VM user's kvmshell, root's kvmadm and the
privileged helpers): the option table and the admin's option parser, the
VM tree and identifier, the host config, the exception tree, the guest
network names.  Imports nothing from :mod:`kvmshell.shell`,
:mod:`kvmshell.admin` or :mod:`kvmshell.privileged` (setup.cfg's import
contract)."""
