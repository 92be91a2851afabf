"""Runs as root, through sudo, on behalf of a VM user: the privileged
helpers.  Each takes a verb and a VM name, derives everything else from
root-owned files, and imports only :mod:`kvmshell.common`, the stdlib and
its own library (pyroute2) -- never the user's shell or kvmadm."""
