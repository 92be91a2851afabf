#!/bin/bash
# Build a tiny test guest for kvmshell's tests: a Debian bookworm cloud kernel
# plus a busybox initramfs, meant for QEMU `-machine pc` under TCG.
#
# Usage: tests/guest/build-guest.sh [OUTDIR]      (default: <repo>/build/guest)
#
# Produces OUTDIR/vmlinuz and OUTDIR/initrd.img (gzip newc cpio).  When both
# exist and OUTDIR/.stamp holds this script's sha256, it exits at once.
# Runs as root on Debian 12; installs any missing build tool with apt-get and
# fetches the kernel with `apt-get download` (never installs it on the host).
#
# Guest kernel command line:
#   kvmshell.ip=ADDR/PREFIX   address for eth0 (virtio-net-pci); lo is always up
#   kvmshell.gw=ADDR          optional default gateway
# The guest prints the line KVMSHELL-GUEST-READY on the console once it is up,
# then runs a shell (prompt "guest# ") on ttyS0, respawned when it exits.
# An ACPI power-button press (QMP system_powerdown) powers it off at once.
set -euo pipefail

SELF="$(readlink -f "${BASH_SOURCE[0]}")"
REPO="$(cd "$(dirname "$SELF")/../.." && pwd)"
OUTDIR="${1:-$REPO/build/guest}"

# Modules the guest needs, if the kernel builds them as modules; their
# dependencies are added (and ordered) from `modinfo -F depends`.
ROOT_MODULES="virtio_pci virtio_net virtio_blk ata_piix sd_mod evdev button"
APT_NEEDS=(busybox-static cpio kmod gzip)

log() { echo "build-guest: $*" >&2; }
die() { log "error: $*"; exit 1; }

script_sum() { sha256sum "$SELF" | cut -d' ' -f1; }

cached() {
    [ -s "$OUTDIR/vmlinuz" ] && [ -s "$OUTDIR/initrd.img" ] && [ -f "$OUTDIR/.stamp" ] &&
        [ "$(head -n1 "$OUTDIR/.stamp")" = "$(script_sum)" ]
}

cached && exit 0

mkdir -p "$OUTDIR"
OUTDIR="$(cd "$OUTDIR" && pwd)"
# Serialise concurrent builds into the same OUTDIR, then look again.
exec 9>"$OUTDIR/.lock"
flock 9
cached && exit 0
rm -f "$OUTDIR/.stamp"

[ "$(id -u)" = 0 ] || die "must run as root (apt-get, device nodes in the initramfs)"

export DEBIAN_FRONTEND=noninteractive
APT_UPDATED=0
apt_update_once() {
    if [ "$APT_UPDATED" = 0 ]; then
        log "apt-get update"
        apt-get update -qq >&2 || log "apt-get update failed; going on with the lists we have"
        APT_UPDATED=1
    fi
}

ensure_pkgs() {
    local p missing=()
    for p in "$@"; do
        dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    log "installing ${missing[*]}"
    if ! apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2; then
        apt_update_once
        apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2
    fi
}

# apt-get download PKG into the current directory: first as usual, then
# after an update (fresh machine, stale lists), then outside _apt's sandbox.
apt_download() {
    apt-get download -qq "$1" >&2 && return 0
    apt_update_once
    apt-get download -qq "$1" >&2 && return 0
    log "apt-get download $1 failed in the _apt sandbox; retrying as root"
    apt-get download -qq -o APT::Sandbox::User=root "$1" >&2
}

ensure_pkgs "${APT_NEEDS[@]}"

WORK="$(mktemp -d /tmp/kvmshell-guest.XXXXXX)"
trap 'rm -rf "$WORK"' EXIT

# ---------------------------------------------------------------- kernel
mkdir -p "$WORK/debs"
# Let the _apt sandbox user write here, so apt-get download needs no fallback.
chmod 755 "$WORK"
chown _apt "$WORK/debs" 2>/dev/null || true
(
    cd "$WORK/debs"
    apt_download linux-image-cloud-amd64
    meta="$(ls linux-image-cloud-amd64_*.deb)"
    kpkg="$(dpkg-deb -f "$meta" Depends | tr ',|' '\n' | sed 's/(.*//; s/[[:space:]]//g' |
        grep -E '^linux-image-[0-9].*-cloud-amd64$' | head -n1 || true)"
    if [ -z "$kpkg" ]; then
        kpkg="$(apt-cache depends linux-image-cloud-amd64 | sed -n 's/^[[:space:]]*Depends:[[:space:]]*//p' |
            grep -E '^linux-image-[0-9].*-cloud-amd64$' | head -n1 || true)"
    fi
    [ -n "$kpkg" ] || die "cannot resolve the kernel package behind linux-image-cloud-amd64"
    log "kernel package: $kpkg"
    apt_download "$kpkg"
    dpkg-deb -x "$(ls "$kpkg"_*.deb)" "$WORK/kernel"
)

KDIR="$WORK/kernel"
KVER="$(find "$KDIR/lib/modules" -mindepth 1 -maxdepth 1 -printf '%f\n' | head -n1)"
[ -n "$KVER" ] || die "no lib/modules in the kernel package"
MODDIR="$KDIR/lib/modules/$KVER"
VMLINUZ="$KDIR/boot/vmlinuz-$KVER"
[ -f "$VMLINUZ" ] || die "no boot/vmlinuz-$KVER in the kernel package"
log "kernel $KVER"

# ---------------------------------------------------------------- modules
norm() { echo "${1//-/_}"; }

declare -A MODPATH=() BUILTIN=() SEEN=()
while IFS= read -r f; do
    b="${f##*/}"; b="${b%%.ko*}"
    MODPATH["$(norm "$b")"]="$f"
done < <(cd "$MODDIR" && find kernel -name '*.ko' -o -name '*.ko.*')
if [ -f "$MODDIR/modules.builtin" ]; then
    while IFS= read -r f; do
        b="${f##*/}"; b="${b%%.ko*}"
        BUILTIN["$(norm "$b")"]=1
    done < "$MODDIR/modules.builtin"
fi

# Uncompressed copy of a module in $WORK/ko (busybox insmod takes plain .ko).
plain_ko() {
    local name="$1" src="$MODDIR/${MODPATH[$1]}" dst="$WORK/ko/$1.ko"
    mkdir -p "$WORK/ko"
    if [ ! -f "$dst" ]; then
        case "$src" in
            *.ko)     cp "$src" "$dst" ;;
            *.ko.xz)  ensure_pkgs xz-utils; xz -dc "$src" >"$dst" ;;
            *.ko.zst) ensure_pkgs zstd; zstd -qdc "$src" >"$dst" ;;
            *.ko.gz)  gzip -dc "$src" >"$dst" ;;
            *) die "unknown module format: $src" ;;
        esac
    fi
    echo "$dst"
}

ORDER=()
BUILTIN_USED=()
visit() {
    local name dep deps
    name="$(norm "$1")"
    [ -n "${SEEN[$name]:-}" ] && return 0
    SEEN["$name"]=1
    if [ -n "${BUILTIN[$name]:-}" ]; then
        BUILTIN_USED+=("$name")
        return 0
    fi
    [ -n "${MODPATH[$name]:-}" ] || die "module $name is neither built in nor shipped in $KVER"
    deps="$(modinfo -F depends "$(plain_ko "$name")")"
    for dep in ${deps//,/ }; do
        visit "$dep"
    done
    ORDER+=("$name")
}
for m in $ROOT_MODULES; do visit "$m"; done
log "modules, in load order: ${ORDER[*]:-(none)}"
[ ${#BUILTIN_USED[@]} -eq 0 ] || log "built into the kernel: ${BUILTIN_USED[*]}"

# ---------------------------------------------------------------- initramfs
ROOT="$WORK/root"
mkdir -p "$ROOT"/{bin,dev,proc,sys,tmp,root,etc/acpi,lib/modules,var/log,var/run,run}
ln -s bin "$ROOT/sbin"
mkdir -p "$ROOT/usr"
ln -s ../bin "$ROOT/usr/bin"
ln -s ../bin "$ROOT/usr/sbin"
chmod 1777 "$ROOT/tmp"
mknod -m 600 "$ROOT/dev/console" c 5 1
mknod -m 666 "$ROOT/dev/null" c 1 3

BUSYBOX="$(dpkg -L busybox-static | grep -E '/bin/busybox$' | head -n1)"
[ -x "$BUSYBOX" ] || die "busybox-static's busybox not found"
cp "$BUSYBOX" "$ROOT/bin/busybox"
for a in $("$BUSYBOX" --list); do
    [ "$a" = busybox ] || ln -s busybox "$ROOT/bin/$a"
done

: >"$ROOT/etc/modules.list"
for m in "${ORDER[@]}"; do
    cp "$(plain_ko "$m")" "$ROOT/lib/modules/$m.ko"
    echo "$m" >>"$ROOT/etc/modules.list"
done
echo "$KVER" >"$ROOT/etc/kernel-version"

# busybox acpid: the evdev KEY_POWER event maps to "PWRF"; the action file
# maps PWRF to /etc/acpi/poweroff, which it runs.
echo "PWRF poweroff" >"$ROOT/etc/acpid.conf"
cat >"$ROOT/etc/acpi/poweroff" <<'EOF'
#!/bin/sh
echo "kvmshell-guest: ACPI power button, powering off" >/dev/console
exec poweroff -f
EOF
chmod 755 "$ROOT/etc/acpi/poweroff"

echo "root:x:0:0:root:/root:/bin/sh" >"$ROOT/etc/passwd"
echo "root:x:0:" >"$ROOT/etc/group"

cat >"$ROOT/init" <<'EOF'
#!/bin/sh
# kvmshell test guest init (generated by tests/guest/build-guest.sh)
export PATH=/bin HOME=/root TERM=vt100 PS1='guest# '
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
exec </dev/console >/dev/console 2>&1

while read -r m; do
    insmod "/lib/modules/$m.ko" || echo "init: insmod $m failed"
done </etc/modules.list

IP='' GW=''
read -r cmdline </proc/cmdline
set -f
for arg in $cmdline; do
    case "$arg" in
        kvmshell.ip=*) IP="${arg#*=}" ;;
        kvmshell.gw=*) GW="${arg#*=}" ;;
    esac
done
set +f

ip link set lo up
if [ -n "$IP" ]; then
    i=0
    while [ ! -e /sys/class/net/eth0 ] && [ $i -lt 100 ]; do usleep 50000; i=$((i + 1)); done
    if ip addr add "$IP" dev eth0 && ip link set eth0 up; then
        [ -z "$GW" ] || ip route add default via "$GW" || echo "init: no route via $GW"
        # Ready means ready: wait (up to ~3 s) for the link to be operationally up.
        i=0
        while [ "$(cat /sys/class/net/eth0/operstate)" != up ] && [ $i -lt 60 ]; do
            usleep 50000; i=$((i + 1))
        done
    else
        echo "init: cannot configure eth0 with $IP"
    fi
fi

if [ -e /dev/input/event0 ]; then
    acpid -l /var/log/acpid.log
else
    echo "init: no /dev/input/event0, ACPI power button will not work"
fi

# Keep later kernel messages off the console the tests read.
dmesg -n 1
echo KVMSHELL-GUEST-READY

while :; do
    setsid cttyhack sh
    sleep 1
done
EOF
chmod 755 "$ROOT/init"

find "$ROOT" -exec touch -h -d @0 {} +   # same inputs, same initrd bytes
( cd "$ROOT" && find . -mindepth 1 | LC_ALL=C sort |
    cpio -o -H newc --owner=0:0 --reproducible --quiet ) | gzip -9n >"$WORK/initrd.img"

cp "$VMLINUZ" "$OUTDIR/.vmlinuz.new"
cp "$WORK/initrd.img" "$OUTDIR/.initrd.img.new"
mv -f "$OUTDIR/.vmlinuz.new" "$OUTDIR/vmlinuz"
mv -f "$OUTDIR/.initrd.img.new" "$OUTDIR/initrd.img"
echo "$KVER" >"$OUTDIR/kernel-version"
script_sum >"$OUTDIR/.stamp"
log "wrote $OUTDIR/vmlinuz and $OUTDIR/initrd.img ($(du -h "$OUTDIR/initrd.img" | cut -f1)), kernel $KVER"
