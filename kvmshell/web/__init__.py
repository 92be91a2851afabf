"""The web front door, ``kvmshell-web``: runs as the unprivileged web user
(kvmweb), never root.  It imports only the shared core (an import contract
in setup.cfg says so) and acts through sudo: kvmshell as the logged-in
user, and the login helper (kvmshell/privileged/pamhelper.py)."""
