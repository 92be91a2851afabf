"""kvmshell: a secure multiuser front door to QEMU/KVM.

Keep this module empty of imports: every SSH command starts a Python
process, and start-up time is part of the user interface.
"""

__version__ = "0.1.0"
