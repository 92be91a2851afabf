"""Runs as the VM user: the ``kvmshell`` login shell / ForceCommand, its
verbs, the launcher that builds QEMU's argv and opens the user's files,
and the per-VM supervisor (console multiplexer) that outlives it.  Never
imported by root's code."""
