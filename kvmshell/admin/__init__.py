"""Runs as root, by the admin's hand: ``kvmadm`` (the tree, VM users and
their keys) and the installer of the helpers' stubs.  May use the shared
core; not the user's shell."""
