#!/bin/bash
# Build a real Debian 12 (bookworm) guest for kvmshell's tests: a qcow2 root
# disk plus the cloud kernel and its initramfs, meant for QEMU under TCG.
#
# Usage: tests/guest/build-debian.sh OUTDIR        (default: <repo>/build/debian)
#
# Produces, in OUTDIR:
#   debian.qcow2   ext4 root file system, label "root", no partition table
#                  (3 GiB virtual; use it with snapshot=on or an overlay)
#   vmlinuz        the linux-image-cloud-amd64 kernel
#   initrd.img     its initramfs (boots from IDE and from virtio-blk)
#   .built         sha256 of this script; when it matches, the build is skipped
#
# Boot:  -kernel OUTDIR/vmlinuz -initrd OUTDIR/initrd.img
#        -append 'root=/dev/sda rw console=ttyS0'   (if=ide)
#        -append 'root=/dev/vda rw console=ttyS0'   (if=virtio)
# The guest logs root in automatically on ttyS0 (prompt "root@debian-guest:~# ")
# and prints the line KVMSHELL-DEBIAN-READY on the console once boot has
# finished (after multi-user.target and cloud-init's last stage).  It has
# systemd, dbus/logind (so it obeys the ACPI power button), openssh-server and
# cloud-init (datasources NoCloud and None only, hostname preserved, host keys
# made at build time and kept, no network configuration unless the kernel
# command line has network-config=BASE64).  tests/debianrig.py has the
# constants.
#
# Runs as root on Debian 12.  Installs mmdebstrap with apt-get if missing and
# nothing else; downloads packages only from the Debian archive(s) this
# machine's apt is configured with.  The build happens in OUTDIR.tmp, which is
# renamed to OUTDIR at the end, so an interrupted build never looks cached.
set -euo pipefail

SELF="$(readlink -f "${BASH_SOURCE[0]}")"
REPO="$(cd "$(dirname "$SELF")/../.." && pwd)"
OUTDIR="${1:-$REPO/build/debian}"

SUITE=bookworm
HOSTNAME_=debian-guest
IMAGE_SIZE=3G
PACKAGES=systemd-sysv,dbus,openssh-server,cloud-init,linux-image-cloud-amd64

log() { echo "build-debian: $*" >&2; }
die() { log "error: $*"; exit 1; }

script_sum() { sha256sum "$SELF" | cut -d' ' -f1; }

cached() {
    [ -s "$OUTDIR/debian.qcow2" ] && [ -s "$OUTDIR/vmlinuz" ] && [ -s "$OUTDIR/initrd.img" ] &&
        [ -f "$OUTDIR/.built" ] && [ "$(head -n1 "$OUTDIR/.built")" = "$(script_sum)" ]
}

cached && exit 0

[ "$(id -u)" = 0 ] || die "must run as root (mmdebstrap --mode=root)"

mkdir -p "$(dirname "$OUTDIR")"
OUTDIR="$(cd "$(dirname "$OUTDIR")" && pwd)/$(basename "$OUTDIR")"
TMPDIR_="$OUTDIR.tmp"

# Serialise concurrent builds into the same OUTDIR, then look again.
exec 9>"$OUTDIR.lock"
flock 9
cached && exit 0

export DEBIAN_FRONTEND=noninteractive

# --- tools -----------------------------------------------------------------
if ! command -v mmdebstrap >/dev/null 2>&1; then
    log "installing mmdebstrap"
    if ! apt-get install -y -qq --no-install-recommends mmdebstrap >&2; then
        apt-get update -qq >&2 || log "apt-get update failed; going on with the lists we have"
        apt-get install -y -qq --no-install-recommends mmdebstrap >&2
    fi
fi
for tool in mke2fs qemu-img flock; do
    command -v "$tool" >/dev/null 2>&1 || die "$tool is missing (apt-get install e2fsprogs qemu-utils util-linux)"
done

# --- mirrors: the Debian archive(s) the host's apt already uses ------------
# Emits one-line "deb URI SUITE COMPONENTS" entries for SUITE, SUITE-updates
# and SUITE-security, from one-line .list and deb822 .sources files.  Other
# repositories (third-party, other suites) are left out, and so are their
# options; mmdebstrap then checks signatures with the host's Debian keyring.
host_mirrors() {
    local f files=()
    for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources; do
        [ -f "$f" ] && files+=("$f")
    done
    [ ${#files[@]} -gt 0 ] || return 0
    awk -v suite="$SUITE" '
        function want(s) { return s == suite || s == suite "-updates" || s == suite "-security" }
        function emit(types, uris, suites, comps,    nt, t, nu, u, ns, s, i, j, k) {
            nt = split(types, t, /[ \t]+/); nu = split(uris, u, /[ \t]+/); ns = split(suites, s, /[ \t]+/)
            for (i = 1; i <= nt; i++) if (t[i] == "deb")
                for (j = 1; j <= nu; j++) if (u[j] != "")
                    for (k = 1; k <= ns; k++) if (want(s[k])) {
                        line = "deb " u[j] " " s[k] " " comps
                        if (!(line in seen)) { seen[line] = 1; print line }
                    }
        }
        function flush() {
            if (enabled != "no" && types != "" && uris != "" && suites != "")
                emit(types, uris, suites, comps == "" ? "main" : comps)
            types = uris = suites = comps = enabled = ""; key = ""
        }
        FNR == 1 { flush(); deb822 = (FILENAME ~ /\.sources$/) }
        /^[ \t]*#/ { next }
        !deb822 {
            sub(/#.*/, ""); sub(/[ \t]+$/, "")
            if ($1 != "deb") next
            line = $0; sub(/^[ \t]*deb[ \t]+/, "", line)
            if (line ~ /^\[/) sub(/^\[[^]]*\][ \t]*/, "", line)
            n = split(line, w, /[ \t]+/)
            if (n < 2 || !want(w[2])) next
            c = ""; for (i = 3; i <= n; i++) c = c (c == "" ? "" : " ") w[i]
            emit("deb", w[1], w[2], c == "" ? "main" : c)
            next
        }
        /^[ \t]*$/ { flush(); next }
        /^[ \t]/ { next }                       # continuation (e.g. inline Signed-By key)
        {
            key = tolower($0); sub(/:.*/, "", key)
            val = $0; sub(/^[^:]*:[ \t]*/, "", val); sub(/[ \t]+$/, "", val)
            if (key == "types") types = val
            else if (key == "uris") uris = val
            else if (key == "suites") suites = val
            else if (key == "components") comps = val
            else if (key == "enabled") enabled = tolower(val)
        }
        END { flush() }
    ' "${files[@]}"
}

mapfile -t MIRRORS < <(host_mirrors)
if [ ${#MIRRORS[@]} -eq 0 ]; then
    log "no $SUITE entry in the host's apt sources; using deb.debian.org"
    MIRRORS=("deb http://deb.debian.org/debian $SUITE main")
fi
for m in "${MIRRORS[@]}"; do log "mirror: $m"; done

# --- build into OUTDIR.tmp -------------------------------------------------
ROOTFS="$TMPDIR_/rootfs"

# Never let rm cross into a mount point mmdebstrap may have left behind.
remove_tmp() {
    [ -e "$TMPDIR_" ] || return 0
    if [ -d "$ROOTFS" ]; then
        local mp
        for mp in $(awk -v r="$ROOTFS/" 'index($2, r) == 1 { print $2 }' /proc/self/mounts | sort -r); do
            umount -l "$mp" 2>/dev/null || true
        done
    fi
    rm -rf --one-file-system "$TMPDIR_"
}
trap remove_tmp EXIT
# Die by exit, not by the signal, so that the EXIT trap runs (after the
# foreground command, e.g. mmdebstrap tidying its own mounts, has ended).
trap 'exit 130' INT
trap 'exit 143' TERM
trap 'exit 129' HUP

remove_tmp
mkdir -p "$TMPDIR_"
START=$SECONDS

log "mmdebstrap $SUITE into $ROOTFS"
mmdebstrap --variant=important --include="$PACKAGES" --mode=root \
    "$SUITE" "$ROOTFS" "${MIRRORS[@]}" >&2

log "configuring the root file system"
SYSD="$ROOTFS/etc/systemd/system"

# Serial console: a getty on ttyS0 that logs root in without a password.
mkdir -p "$SYSD/getty.target.wants" "$SYSD/serial-getty@ttyS0.service.d"
ln -sfn /lib/systemd/system/serial-getty@.service "$SYSD/getty.target.wants/serial-getty@ttyS0.service"
cat >"$SYSD/serial-getty@ttyS0.service.d/autologin.conf" <<'EOF'
# kvmshell test guest: root is logged in on the serial console at once.
[Service]
ExecStart=
ExecStart=-/sbin/agetty -o '-p -f -- \\u' --autologin root --keep-baud 115200,57600,38400,9600 - $TERM
EOF

# Nothing waits for a network that a test may never give the guest, nothing
# reaches for the archive behind a test's back, and no e2scrub at boot.
for unit in systemd-networkd-wait-online.service ifupdown-wait-online.service \
            apt-daily.timer apt-daily-upgrade.timer e2scrub_reap.service; do
    if [ -e "$ROOTFS/lib/systemd/system/$unit" ]; then
        ln -sfn /dev/null "$SYSD/$unit"
    fi
done

echo "$HOSTNAME_" >"$ROOTFS/etc/hostname"
cat >"$ROOTFS/etc/hosts" <<EOF
127.0.0.1	localhost
127.0.1.1	$HOSTNAME_
::1		localhost ip6-localhost ip6-loopback
ff02::1		ip6-allnodes
ff02::2		ip6-allrouters
EOF

cat >"$ROOTFS/etc/fstab" <<'EOF'
# <file system>	<mount point>	<type>	<options>		<dump>	<pass>
LABEL=root	/		ext4	rw,errors=remount-ro	0	1
EOF

# An empty machine-id: every boot (snapshot=on) gets a fresh one and is not
# treated as a first boot (no preset-all).
: >"$ROOTFS/etc/machine-id"
rm -f "$ROOTFS/var/lib/dbus/machine-id"

mkdir -p "$ROOTFS/etc/cloud/cloud.cfg.d"
cat >"$ROOTFS/etc/cloud/cloud.cfg.d/90-kvmshell.cfg" <<'EOF'
# kvmshell test guest: no metadata-server probing; a NoCloud seed (a "cidata"
# disk, or ds=nocloud on the kernel command line) is still honoured.
datasource_list: [ NoCloud, None ]
# Keep /etc/hostname, and the ssh host keys made at build time (making new
# ones on every boot is slow under TCG); print none of them on the console.
preserve_hostname: true
ssh_deletekeys: false
ssh_genkeytypes: [ ecdsa, ed25519, rsa ]
ssh:
  emit_keys_to_console: false
no_ssh_fingerprints: true
# C.UTF-8 needs no locales package (the default, en_US.UTF-8, fails).
locale: C.UTF-8
# No fallback DHCP on the first NIC: with no DHCP server (a kvmshell tap)
# networking.service, and so the login, would wait for dhclient (~60 s).
# A config given on the kernel command line (network-config=BASE64) still
# wins over this; a NoCloud seed's network-config does not.
network:
  config: disabled
EOF
echo "LANG=C.UTF-8" >"$ROOTFS/etc/default/locale"

# One fixed line on the console once boot has finished, cloud-init included
# (its output no longer interleaves with a test's commands after this).
cat >"$SYSD/kvmshell-ready.service" <<'EOF'
[Unit]
Description=Tell the console that boot has finished
After=multi-user.target cloud-init.target cloud-final.service

[Service]
Type=oneshot
ExecStart=/bin/sh -c 'printf "\\nKVMSHELL-DEBIAN-READY\\n" >/dev/console'

[Install]
WantedBy=multi-user.target
EOF
mkdir -p "$SYSD/multi-user.target.wants"
ln -sfn /etc/systemd/system/kvmshell-ready.service "$SYSD/multi-user.target.wants/kvmshell-ready.service"

# A shell a test can drive: no bracketed-paste escapes, no pager, no colours.
cat >"$ROOTFS/root/.inputrc" <<'EOF'
$include /etc/inputrc
set enable-bracketed-paste off
EOF
cat >>"$ROOTFS/root/.bashrc" <<'EOF'

# kvmshell test guest
export PAGER=cat SYSTEMD_PAGER= SYSTEMD_COLORS=0
EOF

# Size: no apt lists or caches, no downloaded packages.
rm -rf "$ROOTFS"/var/lib/apt/lists/* "$ROOTFS"/var/cache/apt/*.bin \
       "$ROOTFS"/var/cache/apt/archives/*.deb "$ROOTFS"/var/cache/apt/archives/partial/*
mkdir -p "$ROOTFS/var/lib/apt/lists/partial"

# Kernel and initramfs.
shopt -s nullglob
kernels=("$ROOTFS"/boot/vmlinuz-*)
initrds=("$ROOTFS"/boot/initrd.img-*)
shopt -u nullglob
[ ${#kernels[@]} -eq 1 ] || die "expected one kernel in /boot, found ${#kernels[@]}"
[ ${#initrds[@]} -eq 1 ] || die "expected one initrd in /boot, found ${#initrds[@]}"
cp "${kernels[0]}" "$TMPDIR_/vmlinuz"
cp "${initrds[0]}" "$TMPDIR_/initrd.img"
chmod 644 "$TMPDIR_/vmlinuz" "$TMPDIR_/initrd.img"
log "kernel $(basename "${kernels[0]}")"

log "making the ext4 image"
truncate -s "$IMAGE_SIZE" "$TMPDIR_/root.raw"
mke2fs -q -t ext4 -d "$ROOTFS" -L root "$TMPDIR_/root.raw"
qemu-img convert -f raw -O qcow2 "$TMPDIR_/root.raw" "$TMPDIR_/debian.qcow2"
rm -f "$TMPDIR_/root.raw"
rm -rf --one-file-system "$ROOTFS"

script_sum >"$TMPDIR_/.built"
sync -f "$TMPDIR_/debian.qcow2"

rm -rf --one-file-system "$OUTDIR"
mv "$TMPDIR_" "$OUTDIR"
log "built $OUTDIR in $((SECONDS - START)) s"
