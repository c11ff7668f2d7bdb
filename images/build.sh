#!/usr/bin/env bash
# Builds the gatewayd appliance image: a minimal Debian 12 (bookworm) system with Debian's
# kernel, systemd and gatewayd from this tree, as a bootable raw disk plus the kernel and initrd
# for direct boot. See images/README.md.
#
#   sudo images/build.sh [--bin-dir DIR] [--out DIR] [--autologin]
#
#   --bin-dir DIR   where gatewayd and gatewayctl were built (default: target/debug)
#   --out DIR       output directory (default: images/out)
#   --autologin     log root in on the serial console without a password (lab images only)
#
# Environment: DEBIAN_MIRROR overrides the mirror (default: the host's configured Debian mirror),
# IMAGE_CACHE the directory of the cached package set (default: images/cache).
#
# Needs root, debootstrap, e2fsprogs, fdisk (sfdisk), grub-pc-bin (installed if missing). Uses
# no loop device and mounts nothing outside its own chroot: the file system is made from a
# directory (mkfs.ext4 -d) and written into the partition of a plain file.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BIN_DIR=$ROOT/target/debug
OUT=$ROOT/images/out
CACHE=${IMAGE_CACHE:-$ROOT/images/cache}
AUTOLOGIN=0
SUITE=bookworm
LABEL=gatewayd-root
# Everything a gateway needs, and the tools to look at it; nothing else (no recommends).
PACKAGES=(
    linux-image-amd64 systemd systemd-sysv udev kmod
    iproute2 procps wireguard-tools ethtool bpftool iputils-ping tcpdump
    e2fsprogs
)

while [ $# -gt 0 ]; do
    case $1 in
        --bin-dir) BIN_DIR=$(realpath "$2"); shift 2 ;;
        --out) OUT=$(realpath -m "$2"); shift 2 ;;
        --autologin) AUTOLOGIN=1; shift ;;
        *) sed -n '2,/^set -e/p' "$0" | sed 's/^# \{0,1\}//;$d' >&2; exit 2 ;;
    esac
done

say() { printf '== %s\n' "$*"; }
die() { echo "build.sh: $*" >&2; exit 1; }

[ "$(id -u)" -eq 0 ] || die "run me as root"
for bin in gatewayd gatewayctl; do
    [ -x "$BIN_DIR/$bin" ] || die "$BIN_DIR/$bin not found: run \`cargo build --workspace\` first"
done

# The host's Debian mirror (deb822 or one-line sources), else Debian's CDN.
host_mirror() {
    { grep -hsE '^URIs:' /etc/apt/sources.list.d/*.sources | awk '{print $2}'
      grep -hsE '^deb ' /etc/apt/sources.list | awk '{print $2}'; } |
        grep -E "/debian/?$" | head -n 1 || true
}
MIRROR=${DEBIAN_MIRROR:-$(host_mirror)}
MIRROR=${MIRROR:-http://deb.debian.org/debian}

need=()
command -v debootstrap >/dev/null || need+=(debootstrap)
command -v mkfs.ext4 >/dev/null || need+=(e2fsprogs)
command -v sfdisk >/dev/null || need+=(fdisk)
[ -f /usr/lib/grub/i386-pc/boot.img ] || need+=(grub-pc-bin)
if [ ${#need[@]} -gt 0 ]; then
    say "installing ${need[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

WORK=$(mktemp -d /var/tmp/gatewayd-image.XXXXXX)
ROOTFS=$WORK/rootfs
cleanup() {
    local status=$?
    set +e
    # debootstrap mounts /proc and /sys in the chroot while installing; a failure midway can
    # leave them. Innermost first.
    findmnt -rn -o TARGET | grep -F "$ROOTFS" | sort -r | while read -r m; do umount -l "$m"; done
    rm -rf "$WORK"
    [ $status -eq 0 ] || echo "build.sh: failed (status $status); nothing left behind" >&2
}
trap cleanup EXIT
START=$SECONDS

# The package downloads are the slow, network-bound part: cache them per package set and mirror.
mkdir -p "$CACHE" "$OUT"
key=$(printf '%s\n' "$SUITE" "$MIRROR" "${PACKAGES[@]}" | sha256sum | cut -c1-16)
TARBALL=$CACHE/debootstrap-$SUITE-$key.tgz
if [ ! -s "$TARBALL" ]; then
    say "downloading the package set from $MIRROR (cached as $TARBALL)"
    debootstrap --variant=minbase --include="$(IFS=,; echo "${PACKAGES[*]}")" \
        --make-tarball="$WORK/packages.tgz" "$SUITE" "$WORK/download" "$MIRROR" >"$WORK/debootstrap.log" 2>&1 ||
        { tail -n 30 "$WORK/debootstrap.log"; die "debootstrap --make-tarball failed"; }
    mv "$WORK/packages.tgz" "$TARBALL"
    rm -rf "$WORK/download"
fi

say "installing Debian $SUITE into the root file system"
debootstrap --variant=minbase --include="$(IFS=,; echo "${PACKAGES[*]}")" \
    --unpack-tarball="$TARBALL" "$SUITE" "$ROOTFS" "$MIRROR" >"$WORK/debootstrap.log" 2>&1 ||
    { tail -n 30 "$WORK/debootstrap.log"; die "debootstrap failed"; }

say "installing gatewayd from $BIN_DIR"
install -d -m 0755 "$ROOTFS/usr/lib/systemd/system" "$ROOTFS/usr/share/doc/gatewayd"
# Debug symbols are most of a debug build's size; the embedded eBPF objects are data and stay.
for bin in gatewayd gatewayctl; do
    strip -o "$ROOTFS/usr/bin/$bin" "$BIN_DIR/$bin"
    chmod 0755 "$ROOTFS/usr/bin/$bin"
done
install -m 0644 "$ROOT/systemd/gatewayd.service" "$ROOTFS/usr/lib/systemd/system/"
install -m 0644 "$ROOT/README.md" "$ROOT/config/gatewayd.example.toml" "$ROOTFS/usr/share/doc/gatewayd/"
install -d -m 0755 "$ROOTFS/etc/gatewayd"
install -m 0644 "$ROOT/images/rootfs/gatewayd.toml" "$ROOTFS/etc/gatewayd/gatewayd.toml"
chroot "$ROOTFS" /usr/bin/gatewayd check-config /etc/gatewayd/gatewayd.toml >/dev/null

say "configuring the system"
echo gatewayd >"$ROOTFS/etc/hostname"
printf '127.0.0.1\tlocalhost\n127.0.1.1\tgatewayd\n::1\tlocalhost ip6-localhost ip6-loopback\n' >"$ROOTFS/etc/hosts"
cat >"$ROOTFS/etc/fstab" <<EOF
LABEL=$LABEL  /            ext4  defaults,noatime  0  1
bpffs               /sys/fs/bpf  bpf   mode=0700         0  0
EOF
install -m 0644 "$ROOT/images/rootfs/60-gatewayd.conf" "$ROOTFS/etc/sysctl.d/"
# A fresh machine id on first boot, so copies of the image are distinct machines.
: >"$ROOTFS/etc/machine-id"
rm -f "$ROOTFS/var/lib/dbus/machine-id"
# The hook the boot test uses; inert unless the kernel command line asks for it.
install -d -m 0755 "$ROOTFS/usr/lib/gatewayd"
install -m 0755 "$ROOT/images/rootfs/image-test-hook" "$ROOTFS/usr/lib/gatewayd/"
install -m 0644 "$ROOT/images/rootfs/gatewayd-image-test.service" "$ROOTFS/usr/lib/systemd/system/"
# The serial getty comes from console=ttyS0 on the command line (systemd-getty-generator).
systemctl --root="$ROOTFS" enable gatewayd.service gatewayd-image-test.service 2>&1 | grep -v '^Created symlink' || true
if [ "$AUTOLOGIN" = 1 ]; then
    install -d "$ROOTFS/etc/systemd/system/serial-getty@ttyS0.service.d"
    cat >"$ROOTFS/etc/systemd/system/serial-getty@ttyS0.service.d/autologin.conf" <<'EOF'
[Service]
ExecStart=
ExecStart=-/sbin/agetty --autologin root --noclear --keep-baud 115200,57600,38400,9600 %I $TERM
EOF
fi
# Journal on disk, bounded: a gateway's logs survive a reboot but never fill the disk.
install -d "$ROOTFS/var/log/journal" "$ROOTFS/etc/systemd/journald.conf.d"
printf '[Journal]\nSystemMaxUse=64M\n' >"$ROOTFS/etc/systemd/journald.conf.d/size.conf"

# Kernel modules for hardware a gateway does not have (graphics, sound, cameras, radios) are
# a third of the root file system.
kver=$(basename "$(readlink -f "$ROOTFS/vmlinuz")" | sed 's/^vmlinuz-//')
for dir in drivers/gpu drivers/media sound drivers/net/wireless net/wireless net/mac80211 \
    drivers/bluetooth net/bluetooth drivers/staging drivers/isdn drivers/iio; do
    rm -rf "$ROOTFS/usr/lib/modules/$kver/kernel/$dir"
done
chroot "$ROOTFS" depmod -a "$kver"

# What the image does not need at run time.
rm -rf "$ROOTFS"/var/cache/apt/archives/*.deb "$ROOTFS"/var/lib/apt/lists/* \
    "$ROOTFS"/usr/share/man/* "$ROOTFS"/usr/share/info/* "$ROOTFS"/usr/share/locale/* \
    "$ROOTFS"/var/log/*.log "$ROOTFS"/var/cache/debconf/*-old
find "$ROOTFS/usr/share/doc" -mindepth 2 ! -name copyright ! -path '*/gatewayd/*' -delete 2>/dev/null || true

say "writing kernel, initrd and the disk image to $OUT"
kernel=$(readlink -f "$ROOTFS/vmlinuz")
initrd=$(readlink -f "$ROOTFS/initrd.img")
[ -f "$kernel" ] && [ -f "$initrd" ] || die "no kernel or initrd in the root file system"
# Direct boot: qemu -kernel/-initrd, PXE; the same line is in the disk's GRUB config.
CMDLINE="root=LABEL=$LABEL rw console=ttyS0,115200 net.ifnames=0 quiet"
install -d "$ROOTFS/boot/grub"
cat >"$ROOTFS/boot/grub/grub.cfg" <<EOF
set timeout=1
serial --unit=0 --speed=115200
terminal_input serial console
terminal_output serial console
menuentry 'gatewayd appliance' {
    search --no-floppy --label --set=root $LABEL
    linux ${kernel#"$ROOTFS"} $CMDLINE
    initrd ${initrd#"$ROOTFS"}
}
EOF

# Root file system: the installed size plus room for logs, state and upgrades.
used_mb=$(du -sm --apparent-size "$ROOTFS" | cut -f1)
fs_mb=$(( used_mb * 13 / 10 + 256 ))
mkfs.ext4 -q -F -L "$LABEL" -d "$ROOTFS" "$WORK/root.ext4" "${fs_mb}M" >/dev/null
# One MBR partition at 1 MiB; the gap before it holds GRUB's core image.
disk=$OUT/gatewayd.img
rm -f "$disk"
truncate -s $(( fs_mb + 1 ))M "$disk"
echo "start=2048, type=83, bootable" | sfdisk -q --label dos "$disk"
dd if="$WORK/root.ext4" of="$disk" bs=1M seek=1 conv=notrunc,sparse status=none
# GRUB for BIOS boot without a loop device: a core image that finds the root file system by
# label and reads its config from it, written after the MBR, and boot.img's code into the MBR
# (its first 440 bytes: the partition table stays). Both images' default sector pointers assume
# exactly this layout (core image at sector 1), so nothing needs patching.
printf 'search --no-floppy --label --set=root %s\nset prefix=($root)/boot/grub\n' "$LABEL" >"$WORK/early.cfg"
grub-mkimage -O i386-pc -o "$WORK/core.img" -p /boot/grub -c "$WORK/early.cfg" \
    biosdisk part_msdos ext2 search search_label normal linux serial terminal echo
dd if=/usr/lib/grub/i386-pc/boot.img of="$disk" bs=440 count=1 conv=notrunc status=none
dd if="$WORK/core.img" of="$disk" bs=512 seek=1 conv=notrunc status=none
cp "$kernel" "$OUT/vmlinuz"
cp "$initrd" "$OUT/initrd.img"
echo "$CMDLINE" >"$OUT/cmdline"
chroot "$ROOTFS" dpkg-query -W -f '${Package} ${Version}\n' >"$OUT/packages.txt"

say "done in $(( SECONDS - START )) s"
ls -l "$disk" "$OUT/vmlinuz" "$OUT/initrd.img"
echo "disk: $(du -m --apparent-size "$disk" | cut -f1) MB apparent, $(du -m "$disk" | cut -f1) MB allocated (sparse); root file system $(( used_mb )) MB used"
