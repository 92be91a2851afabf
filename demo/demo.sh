#!/bin/sh
# The demo: a VM user "kvmdemo" with the tiny test guest, started through
# kvmshell exactly as the user would (su - runs kvmshell as the login shell).
set -eu
cd "$(dirname "$0")/.."
GUEST=build/guest
USER=kvmdemo
VM=demo
MARKER=KVMSHELL-GUEST-READY

if ! id "$USER" >/dev/null 2>&1; then
    # As an admin makes a VM user: group kvmusers, shell kvmshell, and the
    # group of /dev/kvm, so the demo VM gets KVM where the host has it.
    kvmadm adduser "$USER"
fi
vmdir=$(sed -n 's/^ *vmdir *= *//p' /etc/kvmshell/kvmshell.conf | tail -n 1)
vmdir=${vmdir:-/var/lib/kvmshell/vms}
if [ ! -L "$vmdir/$VM" ]; then
    kvmadm create "$VM" --owner "$USER" -- -m 256
fi
dir="$vmdir/$(readlink "$vmdir/$VM")"
install -o "$USER" -m 644 "$GUEST/vmlinuz" "$dir/vmlinuz"
install -o "$USER" -m 644 "$GUEST/initrd.img" "$dir/initrd.img"

su - "$USER" -c "kill $VM" >/dev/null 2>&1 || true
echo "+ su - $USER -c 'start $VM -kernel vmlinuz -initrd initrd.img -append console=ttyS0'"
su - "$USER" -c "start $VM -kernel vmlinuz -initrd initrd.img -append console=ttyS0"
echo "+ waiting for the guest to boot (TCG is slow; KVM is used where the user may open /dev/kvm)"
i=0
while ! grep -q "$MARKER" "$dir/console.log" 2>/dev/null; do
    i=$((i + 1))
    if [ "$i" -gt 300 ]; then echo "demo: the guest did not boot; see $dir/qemu.log" >&2; exit 1; fi
    sleep 0.5
done
echo "+ the guest's serial console, as kept by kvmshell:"
tail -n 5 "$dir/console.log" | tr -d '\r' | sed 's/\x1b\[[0-9;]*[A-Za-z]//g'; echo
echo "+ su - $USER -c 'status $VM'"
su - "$USER" -c "status $VM"
echo
echo "The VM runs.  Reach it with:  su - $USER -c console"
echo "or over SSH, once its key is installed (kvmadm setkey $USER KEY.pub):  ssh -t $USER@localhost console"
