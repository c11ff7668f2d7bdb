#!/usr/bin/env bash
# Boots the appliance image built by images/build.sh under qemu and runs the system checks inside
# it (images/guest/run.sh): systemd lifecycle of gatewayd, DSR to kernel-ipip backends, kernel
# WireGuard and IPsec ESP; then boots the disk once more through its own bootloader (GRUB) to the
# login prompt. Prints `PASS name` / `FAIL name` per check, then `N passed, N failed`; exits
# non-zero if any check failed or the guest did not get to run them.
#
#   sudo images/boot-test.sh [--image-dir DIR] [--timeout SECONDS]
#
#   --image-dir DIR   the output of images/build.sh (default: images/out)
#   --timeout S       give up on the guest after S seconds (default: 1500)
#
# The guest has no network (-nic none); it boots the kernel and initrd directly, from a
# copy-on-write overlay, so the image stays as built. Results come back through a 9p share.
# Software emulation (TCG) unless GATEWAYD_QEMU_ACCEL says otherwise (e.g. kvm).
# Needs: qemu-system-x86 (installed from bookworm-backports if missing, see images/README.md),
# qemu-utils, clang-19 (for a two-line XDP program the guest attaches to its bridge port).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
IMAGE_DIR=$ROOT/images/out
TIMEOUT=1500
ACCEL=${GATEWAYD_QEMU_ACCEL:-tcg}

while [ $# -gt 0 ]; do
    case $1 in
        --image-dir) IMAGE_DIR=$(realpath "$2"); shift 2 ;;
        --timeout) TIMEOUT=$2; shift 2 ;;
        *) sed -n '2,/^set -e/p' "$0" | sed 's/^# \{0,1\}//;$d' >&2; exit 2 ;;
    esac
done

die() { echo "boot-test.sh: $*" >&2; exit 1; }
for f in gatewayd.img vmlinuz initrd.img cmdline; do
    [ -f "$IMAGE_DIR/$f" ] || die "$IMAGE_DIR/$f missing: build the image with images/build.sh"
done

# Debian 12's own qemu-system-x86 conflicts with the newer qemu-utils some hosts carry; the
# backports build matches it.
if ! command -v qemu-system-x86_64 >/dev/null || ! command -v qemu-img >/dev/null; then
    [ "$(id -u)" -eq 0 ] || die "qemu-system-x86 is missing; run me as root to install it"
    if ! grep -rqs bookworm-backports /etc/apt/sources.list /etc/apt/sources.list.d/; then
        cat >/etc/apt/sources.list.d/bookworm-backports.sources <<'EOF'
Types: deb
URIs: http://deb.debian.org/debian
Suites: bookworm-backports
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
    fi
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq -t bookworm-backports \
        --no-install-recommends qemu-system-x86 qemu-utils >/dev/null
fi
command -v clang-19 >/dev/null || die "clang-19 is missing (apt-get install clang-19)"

WORK=$(mktemp -d /var/tmp/gatewayd-boot-test.XXXXXX)
SHARE=$WORK/share
QEMU_PID=
cleanup() {
    local status=$?
    set +e
    [ -n "$QEMU_PID" ] && qemu_stop
    # Keep what explains a failure next to the image; the rest goes.
    if [ -d "$SHARE/logs" ]; then
        rm -rf "$IMAGE_DIR/boot-test-logs"
        cp -r "$SHARE/logs" "$IMAGE_DIR/boot-test-logs"
    fi
    [ -f "$WORK/console.log" ] && cp "$WORK/console.log" "$IMAGE_DIR/boot-test-console.log"
    [ -f "$WORK/console-grub.log" ] && cp "$WORK/console-grub.log" "$IMAGE_DIR/boot-test-console-grub.log"
    rm -rf "$WORK"
    exit $status
}
trap cleanup EXIT
trap 'exit 130' INT TERM

mkdir -p "$SHARE"
install -m 0755 "$ROOT/images/guest/run.sh" "$SHARE/run.sh"
cat >"$WORK/xdp_pass.c" <<'EOF'
__attribute__((section("xdp"), used)) int xdp_pass(void *ctx) { return 2; /* XDP_PASS */ }
char _license[] __attribute__((section("license"), used)) = "GPL";
EOF
clang-19 -O2 -target bpf -c "$WORK/xdp_pass.c" -o "$SHARE/xdp_pass.o"
qemu-img create -q -f qcow2 -F raw -b "$IMAGE_DIR/gatewayd.img" "$WORK/overlay.qcow2"

# qemu_start CONSOLE_LOG ARGS...: one guest on the overlay, no network, serial to CONSOLE_LOG.
qemu_start() {
    local console=$1; shift
    qemu-system-x86_64 -accel "$ACCEL" -machine q35 -cpu max -smp 2 -m 2048 \
        -nic none -display none -no-reboot -monitor none -serial "file:$console" \
        -drive "file=$WORK/overlay.qcow2,if=virtio,format=qcow2" "$@" &
    QEMU_PID=$!
}
# qemu_wait SECONDS 'CONDITION': until the guest exits or CONDITION holds; kills a guest still
# running after SECONDS (the last resort against a hung guest).
qemu_wait() {
    local limit=$(( SECONDS + $1 ))
    while kill -0 "$QEMU_PID" 2>/dev/null && ! eval "$2"; do
        if [ $SECONDS -ge $limit ]; then
            echo "guest still running after $1 s: killing it"
            kill "$QEMU_PID"
            break
        fi
        sleep 1
    done
}
qemu_stop() {
    kill "$QEMU_PID" 2>/dev/null || true
    wait "$QEMU_PID" 2>/dev/null || true
    QEMU_PID=
}

host_results=()
START=$SECONDS
echo "booting $IMAGE_DIR/gatewayd.img (accel $ACCEL; console: $IMAGE_DIR/boot-test-console.log)"
qemu_start "$WORK/console.log" \
    -kernel "$IMAGE_DIR/vmlinuz" -initrd "$IMAGE_DIR/initrd.img" \
    -append "$(cat "$IMAGE_DIR/cmdline") gatewayd.image_test" \
    -virtfs "local,path=$SHARE,mount_tag=gatewayd-test,security_model=none,id=gatewayd-test"
qemu_wait "$TIMEOUT" '[ -e "$SHARE/started" ]'
[ -e "$SHARE/started" ] && echo "guest booted and started its checks after $(( SECONDS - START )) s"
# Stream the results as the guest writes them; the guest powers off when it is done.
shown=0
print_new_results() {
    local lines
    lines=$(wc -l <"$SHARE/results" 2>/dev/null || echo 0)
    if [ "$lines" -gt "$shown" ]; then sed -n "$(( shown + 1 )),${lines}p" "$SHARE/results"; shown=$lines; fi
}
qemu_wait $(( TIMEOUT - (SECONDS - START) )) 'print_new_results; false'
qemu_stop
print_new_results
echo "guest finished after $(( SECONDS - START )) s"
if [ "$(cat "$SHARE/status" 2>/dev/null)" = 0 ]; then
    host_results+=("PASS guest_completed_checks")
else
    host_results+=("FAIL guest_completed_checks")
    echo "--- last lines of the serial console:"
    tail -n 40 "$WORK/console.log" 2>/dev/null | sed 's/^/    /'
fi
printf '%s\n' "${host_results[-1]}"

# The disk boots by itself too: BIOS, GRUB from the MBR, kernel and initrd from the partition,
# up to the serial console's login prompt. (The checks above boot the same kernel directly.)
START=$SECONDS
rm -f "$WORK/overlay.qcow2"
qemu-img create -q -f qcow2 -F raw -b "$IMAGE_DIR/gatewayd.img" "$WORK/overlay.qcow2"
touch "$WORK/console-grub.log"
qemu_start "$WORK/console-grub.log"
qemu_wait "$TIMEOUT" 'grep -q "gatewayd login:" "$WORK/console-grub.log"'
qemu_stop
if grep -q "gatewayd login:" "$WORK/console-grub.log"; then
    host_results+=("PASS disk_boots_with_grub")
else
    host_results+=("FAIL disk_boots_with_grub")
    tail -n 20 "$WORK/console-grub.log" | sed 's/^/    /'
fi
printf '%s (%d s)\n' "${host_results[-1]}" $(( SECONDS - START ))

all=$(cat "$SHARE/results"; printf '%s\n' "${host_results[@]}")
passed=$(grep -c '^PASS ' <<<"$all" || true)
failed=$(grep -c '^FAIL ' <<<"$all" || true)
echo "$passed passed, $failed failed"
[ "$failed" -eq 0 ]
