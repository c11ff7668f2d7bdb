#!/bin/bash
# The checks of images/boot-test.sh, run inside the booted appliance by its boot test hook
# (gatewayd-image-test.service) with the 9p share as $1. Prints and appends to $1/results one
# `PASS name` / `FAIL name` line per check; each check's commands and output go to
# $1/logs/NAME.log. The host prints the summary.
#
# Topology, all inside the guest (10.x addresses only exist in these namespaces):
#
#   gd-client 10.77.0.100 ──┐
#   root ns gw0 10.77.0.1 ──┼── gd-lan br0     gatewayd (systemd) with XDP on gw0
#   gd-b1 10.77.0.11 ───────┤                  backends: VIP 10.77.100.1 on lo, kernel ipip
#   gd-b2 10.77.0.12 ───────┤                  (tunl0), a TCP service answering its name
#   gd-node 10.77.0.20 ─────┘                  an encryption peer of gatewayd: kernel
#                                              WireGuard, or a second gatewayd for IPsec
#
#   gd-wga 10.99.0.1 ── veth ── gd-wgb 10.99.0.2    kernel WireGuard, overlay 10.98.0.1/.2
#   gd-ipa 10.97.0.1 ── veth ── gd-ipb 10.97.0.2    IPsec ESP (XFRM states + policies)
set -u
SHARE=$1
RESULTS=$SHARE/results
LOGS=$SHARE/logs
CONFIG=/etc/gatewayd/gatewayd.toml
PINS=/sys/fs/bpf/gatewayd
DROPINS=/run/systemd/system/gatewayd.service.d
VIP=10.77.100.1
mkdir -p "$LOGS"
: >"$RESULTS"
touch "$SHARE/started"

fail() { echo "ASSERTION FAILED: $*"; exit 1; }
# wait_until SECONDS 'CONDITION': polls the shell condition until it holds; the bound only
# keeps a broken guest from hanging the test (generous under software emulation).
wait_until() {
    local limit=$(( SECONDS + $1 ))
    until eval "$2"; do
        [ $SECONDS -lt $limit ] || return 1
        sleep 0.2
    done
}
# check NAME FUNCTION: runs FUNCTION in a subshell with -e, its output to the log.
check() {
    local name=$1; shift
    ( set -ex; "$@" ) >"$LOGS/$name.log" 2>&1
    local status=$? verdict=PASS
    [ $status -eq 0 ] || verdict=FAIL
    echo "$verdict $name" | tee -a "$RESULTS"
    if [ $verdict = FAIL ]; then tail -n 15 "$LOGS/$name.log" | sed 's/^/    /'; fi
}

active_state() { systemctl show -p ActiveState --value gatewayd; }
is_active() { [ "$(active_state)" = active ]; }
main_pid() { systemctl show -p MainPID --value gatewayd; }
restarts() { systemctl show -p NRestarts --value gatewayd; }
# The program id attached at XDP on gw0, empty if none.
xdp_prog() { ip -d link show dev gw0 | sed -n 's/.*prog\/xdp id \([0-9]*\).*/\1/p'; }
# The bpf_link gatewayd pinned for gw0, if it holds the program attached there. (bpftool on
# this kernel does not show an XDP link's interface; the pin and the program id tie it to gw0.)
xdp_link() {
    local link
    link=$(bpftool -j link show pinned "$PINS/links/gw0/xdp-native" 2>/dev/null) || return 0
    if echo "$link" | grep -q "\"prog_id\":$(xdp_prog)[,}]"; then
        echo "$link" | grep -o '"id":[0-9]*' | cut -d: -f2
    fi
}
ctl() { gatewayctl "$@"; }
# gatewayctl -o json pretty-prints: `"key": value`.
json_number() { grep -o "\"$1\": *[0-9]*" | head -n 1 | sed 's/.*: *//'; }
generation() { ctl -o json status | json_number config_generation; }
ctl_answers() { ctl status >/dev/null 2>&1; }
in_ns() { local ns=$1; shift; ip netns exec "gd-$ns" "$@"; }

gatewayd_config() { # BACKEND2
    cat <<EOF
[logging]
level = "info"

[[interfaces]]
name = "gw0"
xdp_mode = "native"

[lb]
# Small: software emulation computes the tables slowly, and two backends need no more.
maglev_table_size = 251

[[services]]
name = "web"
vip = "$VIP"
port = 80
protocol = "tcp"
encapsulation = "ipip"
backends = [{ address = "10.77.0.11" }, { address = "$1" }]
EOF
}
GOOD_CONFIG=$(gatewayd_config 10.77.0.12)
BROKEN_CONFIG=$(gatewayd_config 10.77.0.300)

# One TCP connection from the client to the VIP; prints the name of the backend that answered.
request() {
    in_ns client timeout 10 bash -c "exec 3<>/dev/tcp/$VIP/80 && read -r name <&3 && echo \$name"
}

setup_topology() {
    for ns in lan client b1 b2 node; do
        ip netns add "gd-$ns"
        in_ns "$ns" ip link set lo up
    done
    in_ns lan ip link add br0 type bridge
    in_ns lan ip link set br0 up
    # The gateway is the guest's own namespace, where systemd runs gatewayd.
    ip link add gw0 type veth peer name to-gw netns gd-lan
    ip addr add 10.77.0.1/24 dev gw0
    ip link set gw0 up
    in_ns lan ip link set to-gw master br0 up
    # A veth receives its peer's XDP_TX frames only if it runs XDP itself (real NICs need
    # nothing): a pass-everything program, compiled on the host.
    in_ns lan ip link set dev to-gw xdpdrv obj "$SHARE/xdp_pass.o" sec xdp
    local host addr
    for host in client:10.77.0.100 b1:10.77.0.11 b2:10.77.0.12 node:10.77.0.20; do
        addr=${host#*:}; host=${host%:*}
        ip link add eth0 netns "gd-$host" type veth peer name "to-$host" netns gd-lan
        in_ns lan ip link set "to-$host" master br0 up
        in_ns "$host" ip addr add "$addr/24" dev eth0
        in_ns "$host" ip link set eth0 up
    done
    in_ns client ip route add "$VIP/32" via 10.77.0.1
    # veth leaves checksums to the receiver, which does not survive XDP_TX: let the client
    # compute its own, as a real NIC would.
    in_ns client ethtool -K eth0 tx off >/dev/null
    # Backends decapsulate with the kernel's ipip driver (docs/dsr-backends.md, option 2).
    modprobe ipip
    for b in b1 b2; do
        in_ns "$b" ip addr add "$VIP/32" dev lo
        in_ns "$b" sysctl -qw net.ipv4.conf.all.arp_ignore=1 net.ipv4.conf.all.arp_announce=2
        in_ns "$b" ip link set tunl0 up
        in_ns "$b" sysctl -qw net.ipv4.conf.all.rp_filter=0 net.ipv4.conf.eth0.rp_filter=0 \
            net.ipv4.conf.tunl0.rp_filter=0
        # Not through in_ns: a backgrounded function is a subshell, and $! would be its pid.
        ip netns exec "gd-$b" systemd-socket-activate -l "$VIP:80" --accept --inetd echo "$b" 2>/dev/null &
        echo $! >>/run/gd-pids
    done
}

cleanup() {
    # One pid per line: word splitting is what is wanted here.
    # shellcheck disable=SC2046
    [ -f /run/gd-pids ] && kill $(cat /run/gd-pids) 2>/dev/null
    rm -rf "$DROPINS"
    systemctl daemon-reload
    for ns in $(ip netns list | awk '/^gd-/{print $1}'); do ip netns del "$ns"; done
    ip link del gw0 2>/dev/null
}
trap cleanup EXIT

# --- the appliance as built -----------------------------------------------------------------

boot_default_config() {
    uname -a
    systemctl --no-pager status gatewayd || true
    is_active || fail "gatewayd is $(active_state) after boot with the shipped config"
    [ "$(stat -f -c %T /sys/fs/bpf)" = bpf_fs ] || fail "/sys/fs/bpf is not bpffs"
    [ "$(cat /proc/sys/net/ipv4/ip_forward)" = 1 ] || fail "forwarding is off"
    ctl status
    [ "$(systemctl is-enabled gatewayd)" = enabled ]
}

# The unit's exposure as `systemd-analyze security` rates it (2.5 or lower: issue #15), printed
# with the results. Every other check runs the daemon under this unit: a permission the
# hardening takes away fails there.
unit_security_exposure() {
    systemd-analyze security --no-pager gatewayd
    local score
    score=$(systemd-analyze security --no-pager gatewayd |
        sed -n 's/.*exposure level for gatewayd.service: \([0-9.]*\).*/\1/p')
    echo "    systemd-analyze security gatewayd: ${score:-unknown}" >>"$RESULTS"
    awk -v s="$score" 'BEGIN { exit !(s != "" && s <= 2.5) }' || fail "exposure ${score:-unknown} is above 2.5"
}

# --- systemd lifecycle ----------------------------------------------------------------------

# Type=notify: the unit is "activating" while the daemon runs but has not sent READY=1, and
# "active" only once the XDP program is attached and the service programmed. A drop-in holds
# the daemon before it execs (the shell execs gatewayd, keeping the main PID), so the activating
# state is observed deterministically, not by racing a fast start.
ready_only_after_attach() {
    systemctl stop gatewayd
    gatewayd teardown
    [ -z "$(xdp_prog)" ] || fail "XDP still attached after teardown"
    echo "$GOOD_CONFIG" >"$CONFIG"
    rm -f /run/gatewayd-start-gate
    mkdir -p "$DROPINS"
    cat >"$DROPINS/50-start-gate.conf" <<'EOF'
[Service]
ExecStart=
ExecStart=/bin/sh -c 'while [ ! -e /run/gatewayd-start-gate ]; do sleep 0.1; done; exec /usr/bin/gatewayd --config /etc/gatewayd/gatewayd.toml'
EOF
    systemctl daemon-reload
    systemctl start --no-block gatewayd
    wait_until 60 '[ "$(main_pid)" != 0 ]'
    [ "$(active_state)" = activating ] || fail "state $(active_state) before READY=1"
    [ -z "$(xdp_prog)" ] || fail "XDP attached before the daemon ran"
    touch /run/gatewayd-start-gate
    wait_until 180 '[ "$(active_state)" != activating ]'
    is_active || fail "state $(active_state) after start"
    # At the moment systemd calls it active, the datapath is complete.
    [ -n "$(xdp_prog)" ] || fail "active but no XDP program on gw0"
    [ "$(generation)" = 1 ]
    ctl lb list | grep -q "$VIP"
    rm -f "$DROPINS/50-start-gate.conf" /run/gatewayd-start-gate
    systemctl daemon-reload
}

# SIGHUP with an invalid file: the daemon stays active, the maps and the program stay as they
# were, the failure is reported; a valid file then applies.
reload_broken_config_keeps_state() {
    local prog services backends
    prog=$(xdp_prog)
    services=$(ctl lb list)
    backends=$(bpftool map dump pinned "$PINS/maps/gd_backends")
    echo "$BROKEN_CONFIG" >"$CONFIG"
    systemctl reload gatewayd
    wait_until 60 'ctl -o json status | grep -q "\"last_reload\": *{"'
    ctl -o json status | grep -q '"ok": *false' || fail "the broken reload was not reported"
    ctl status | grep 10.77.0.300
    is_active || fail "state $(active_state) after a broken reload"
    [ "$(generation)" = 1 ]
    [ "$(ctl lb list)" = "$services" ] || fail "gatewayctl lb list changed"
    [ "$(bpftool map dump pinned "$PINS/maps/gd_backends")" = "$backends" ] || fail "gd_backends changed"
    [ "$(xdp_prog)" = "$prog" ]
    journalctl -u gatewayd --no-pager | grep 'reload rejected'
    echo "$GOOD_CONFIG" >"$CONFIG"
    systemctl reload gatewayd
    wait_until 60 '[ "$(generation)" = 2 ]'
    is_active
}

# DSR through the kernel's ipip driver: every connection to the VIP is answered by a backend,
# directly (the gateway only sees the client's packets).
# What explains a DSR path that does not answer.
dsr_diagnostics() {
    ctl lb stats || true
    ip neigh show dev gw0
    ip -s link show gw0
    for b in b1 b2; do in_ns "$b" ss -ltn; in_ns "$b" ip -s link show tunl0; done
}

dsr_kernel_ipip_backends() {
    local n name answered=""
    for n in 1 2 3 4 5 6; do
        name=$(request) || { dsr_diagnostics; fail "connection $n to $VIP:80 got no answer"; }
        echo "connection $n answered by $name"
        case $name in b1|b2) answered="$answered $name" ;; *) fail "unexpected answer '$name'" ;; esac
    done
    ctl lb list
    for b in b1 b2; do in_ns "$b" ip -s link show tunl0; done
    # The answers came through the tunnel: the backends' tunl0 received the flows.
    local rx=0 b
    for b in b1 b2; do
        rx=$(( rx + $(in_ns "$b" cat /sys/class/net/tunl0/statistics/rx_packets) ))
    done
    [ "$rx" -gt 0 ] || fail "no packet decapsulated by tunl0"
    # The backends have no gatewayd decap program: the kernel driver did the work.
    ! bpftool prog show | grep gatewayd_decap || fail "a decap program is loaded"
}

# A restart adopts the pinned program and link: the same program stays attached throughout,
# and connections made while the daemon restarts are answered.
restart_keeps_xdp_attached() {
    local prog link pid
    echo "$GOOD_CONFIG" >"$CONFIG"
    bpftool link show
    ls -R "$PINS/links"
    prog=$(xdp_prog); link=$(xdp_link)
    [ -n "$prog" ] || fail "no XDP program on gw0"
    [ -n "$link" ] || fail "no bpf_link holds the XDP program on gw0"
    pid=$(main_pid)
    : >/run/gd-restart-samples
    ( while [ ! -e /run/gd-restart-done ]; do
          echo "xdp=$(xdp_prog) answer=$(request || echo none)" >>/run/gd-restart-samples
      done ) &
    local sampler=$!
    systemctl restart gatewayd
    wait_until 30 '[ "$(wc -l </run/gd-restart-samples)" -ge 2 ]'
    touch /run/gd-restart-done
    wait "$sampler"
    rm -f /run/gd-restart-done
    cat /run/gd-restart-samples
    [ "$(main_pid)" != "$pid" ] || fail "not restarted"
    is_active
    ! grep -v "^xdp=$prog answer=b[12]$" /run/gd-restart-samples || fail "a sample without the program or an answer"
    [ "$(xdp_prog)" = "$prog" ]
    [ "$(xdp_link)" = "$link" ]
    ctl -o json status | grep -q '"origin": *"adopted"' || fail "the program was not adopted"
}

# The watchdog: a daemon that stops pinging (SIGSTOP) is killed and restarted by systemd.
watchdog_restarts_hung_daemon() {
    echo "$GOOD_CONFIG" >"$CONFIG"
    mkdir -p "$DROPINS"
    # A short watchdog; a stopped process ignores the watchdog's SIGABRT, so SIGKILL follows
    # after TimeoutAbortSec.
    printf '[Service]\nWatchdogSec=10s\nTimeoutAbortSec=5s\n' >"$DROPINS/60-watchdog.conf"
    systemctl daemon-reload
    systemctl restart gatewayd
    is_active
    local before pid
    before=$(restarts); pid=$(main_pid)
    kill -STOP "$pid"
    wait_until 120 '[ "$(restarts)" -gt "$before" ]'
    wait_until 120 is_active
    [ "$(main_pid)" != "$pid" ]
    journalctl -u gatewayd --no-pager | grep -i 'watchdog timeout'
    echo "NRestarts $before -> $(restarts)"
    rm -f "$DROPINS/60-watchdog.conf"
    systemctl daemon-reload
    systemctl restart gatewayd
    is_active
}

# journald receives tracing's fields as journal fields, not just text.
journal_structured_fields() {
    local json
    json=$(journalctl -u gatewayd -o json --no-pager)
    echo "$json" | grep '"F_GENERATION"' | tail -n 1
    echo "$json" | grep -q '"SYSLOG_IDENTIFIER":"gatewayd"'
    echo "$json" | grep -q '"F_GENERATION":"2"' || fail "no GENERATION field on the reload message"
    echo "$json" | grep -q '"TARGET":"gatewayd::daemon"' || fail "no TARGET field"
    echo "$json" | grep -q '"CODE_FILE":' || fail "no CODE_FILE field"
}

# stop leaves the datapath forwarding (documented); teardown removes every pin and program.
stop_then_teardown_cleans_up() {
    local prog
    prog=$(xdp_prog)
    systemctl stop gatewayd
    [ "$(active_state)" = inactive ]
    [ "$(xdp_prog)" = "$prog" ] || fail "stop detached the program"
    [ "$(request)" != "" ] || fail "no answer while the daemon is stopped"
    gatewayd teardown
    [ -z "$(xdp_prog)" ] || fail "XDP still attached after teardown"
    [ ! -e "$PINS" ] || fail "pins left: $(ls -R "$PINS")"
    ! bpftool prog show | grep gatewayd_ || fail "gatewayd programs still loaded"
}

# --- gatewayd's node encryption on a kernel that has WireGuard and ESP -----------------------

# start_gatewayd EXTRA_TOML: the lab config plus EXTRA_TOML, started by systemd from a clean
# slate (whatever an earlier check left is torn down under the config that made it).
start_gatewayd() {
    stop_gatewayd
    printf '%s\n\n%s\n' "$GOOD_CONFIG" "$1" >"$CONFIG"
    cat "$CONFIG"
    systemctl start gatewayd || { journalctl -u gatewayd -n 30 --no-pager; fail "gatewayd did not start"; }
}
stop_gatewayd() {
    systemctl stop gatewayd
    gatewayd teardown
}
json_string() { grep -o "\"$1\": *\"[^\"]*\"" | head -n 1 | sed 's/.*: *"//; s/"$//'; }

# implementation = "auto" picks the kernel module when the kernel has it (this one does); the
# node is a plain kernel WireGuard peer configured with `wg`. The ping crosses the tunnel and
# the node's underlay sees only WireGuard.
gatewayd_wireguard_kernel_auto() {
    wg genkey >/run/node.key
    start_gatewayd "[encryption]
mode = \"wireguard\"

[encryption.wireguard]
interface = \"gwd-wg0\"
listen_port = 51820
implementation = \"auto\"
address = \"10.98.1.1/24\"

[[peers]]
name = \"node\"
public_key = \"$(wg pubkey </run/node.key)\"
endpoint = \"10.77.0.20:51820\"
allowed_ips = [\"10.98.1.2/32\"]"
    local status gateway_key
    status=$(ctl -o json encryption status)
    echo "$status"
    [ "$(echo "$status" | json_string implementation)" = kernel ] || fail "auto did not choose the kernel module"
    ip -d link show gwd-wg0 | grep -q 'wireguard' || fail "gwd-wg0 is not a kernel WireGuard device"
    gateway_key=$(wg show gwd-wg0 public-key)
    echo "$status" | grep -q "\"public_key\": *\"$gateway_key\"" || fail "gatewayctl does not show the device's key"
    in_ns node ip link add wg0 type wireguard
    in_ns node wg set wg0 private-key /run/node.key listen-port 51820 \
        peer "$gateway_key" endpoint 10.77.0.1:51820 allowed-ips 10.98.1.1/32
    in_ns node ip addr add 10.98.1.2/24 dev wg0
    in_ns node ip link set wg0 up
    capture_start lan to-node
    in_ns node ping -c 3 -W 5 10.98.1.1
    capture_stop
    ctl encryption status
    [ "$(count lan 'udp port 51820')" -gt 0 ] || fail "no WireGuard packets on the wire"
    [ "$(count lan icmp)" -eq 0 ] || fail "ICMP in clear on the wire"
    in_ns node ip link del wg0
    stop_gatewayd
    ! ip link show gwd-wg0 2>/dev/null || fail "teardown left gwd-wg0"
}

# IPsec between two gatewayd: the systemd one (10.77.0.1) and one in the node namespace
# (10.77.0.20), with the same key file: both derive the same ESP states and install the
# policies; traffic between their allowed networks (10.96.1.0/24 behind the gateway,
# 10.96.2.0/24 behind the node) crosses the underlay as ESP.
gatewayd_ipsec_esp() {
    local keys node=/run/gd-node
    mkdir -p "$node"
    keys="1 $(od -An -tx1 -N32 /dev/urandom | tr -d ' \n')"
    echo "$keys" >/etc/gatewayd/ipsec.keys
    echo "$keys" >"$node/ipsec.keys"
    chmod 0600 /etc/gatewayd/ipsec.keys "$node/ipsec.keys"
    start_gatewayd '[encryption]
mode = "ipsec"

[encryption.ipsec]
key_file = "/etc/gatewayd/ipsec.keys"
local_address = "10.77.0.1"

[[peers]]
name = "node"
endpoint = "10.77.0.20:4500"
allowed_ips = ["10.96.2.0/24"]'
    printf '%s\n' '[daemon]' 'bpffs = "/sys/fs/bpf/gatewayd-node"' \
        "control_socket = \"$node/gatewayd.sock\"" "state_dir = \"$node\"" '' \
        '[encryption]' 'mode = "ipsec"' '' '[encryption.ipsec]' "key_file = \"$node/ipsec.keys\"" \
        'local_address = "10.77.0.20"' '' '[[peers]]' 'name = "gateway"' \
        'endpoint = "10.77.0.1:4500"' 'allowed_ips = ["10.96.1.0/24"]' >"$node/gatewayd.toml"
    cat "$node/gatewayd.toml"
    # nsenter, not ip netns exec: the latter's private /sys would hide the daemon's pins.
    nsenter --net=/run/netns/gd-node gatewayd --config "$node/gatewayd.toml" >"$node/log" 2>&1 &
    local node_daemon=$!
    wait_until 120 "gatewayctl --socket $node/gatewayd.sock status >/dev/null 2>&1" ||
        { cat "$node/log"; fail "the node's gatewayd did not start"; }
    ip addr add 10.96.1.1/32 dev lo
    ip route add 10.96.2.0/24 via 10.77.0.20
    in_ns node ip addr add 10.96.2.1/32 dev lo
    in_ns node ip route add 10.96.1.0/24 via 10.77.0.1
    ctl encryption status
    ctl -o json encryption status | grep -q '"states": *[1-9]' || fail "no XFRM states installed"
    ip xfrm state
    ip xfrm policy
    in_ns node ip xfrm policy
    # On the bridge port, the wire between the endpoints: an endpoint's own capture also shows
    # tunnel-mode ESP decrypted, as the kernel re-injects the inner packet on the same device.
    capture_start lan to-node
    ping -c 3 -W 5 -I 10.96.1.1 10.96.2.1
    capture_stop
    ip -s xfrm state
    # Both directions encrypted (the capture may stop before the last reply is recorded).
    [ "$(count lan "esp and src 10.77.0.1")" -gt 0 ] || fail "no ESP from the gateway on the wire"
    [ "$(count lan "esp and src 10.77.0.20")" -gt 0 ] || fail "no ESP from the node on the wire"
    [ "$(count lan icmp)" -eq 0 ] || fail "ICMP in clear on the wire"
    kill -TERM "$node_daemon"
    wait "$node_daemon" || true
    nsenter --net=/run/netns/gd-node gatewayd teardown --config "$node/gatewayd.toml"
    ip addr del 10.96.1.1/32 dev lo
    ip route del 10.96.2.0/24
    stop_gatewayd
    [ -z "$(ip xfrm state)" ] || fail "teardown left XFRM states"
    rm -f /etc/gatewayd/ipsec.keys
}

# --- full-kernel encryption between two namespaces, without gatewayd ------------------------

# pair NAME_A NAME_B PREFIX: two namespaces joined by a veth, PREFIX.1 and PREFIX.2.
pair() {
    ip netns add "gd-$1"; ip netns add "gd-$2"
    ip link add eth0 netns "gd-$1" type veth peer name eth0 netns "gd-$2"
    in_ns "$1" ip addr add "$3.1/24" dev eth0
    in_ns "$2" ip addr add "$3.2/24" dev eth0
    for ns in "$1" "$2"; do in_ns "$ns" ip link set lo up; in_ns "$ns" ip link set eth0 up; done
}

# capture_start NS [INTERFACE]: records NS's INTERFACE (default eth0) to /run/NS.pcap until
# capture_stop.
capture_start() {
    ip netns exec "gd-$1" tcpdump -Z root -i "${2:-eth0}" -n -U -w "/run/$1.pcap" 2>"/run/$1.tcpdump" &
    CAPTURE=$!
    wait_until 30 "grep -q 'listening on' /run/$1.tcpdump"
}
# SIGTERM: background jobs of a script ignore SIGINT.
capture_stop() { kill -TERM "$CAPTURE"; wait "$CAPTURE" || true; }
# count NS FILTER: packets of NS's capture matching FILTER.
# (Shown in the log through the check's own stderr: `tee /dev/stderr` would reopen the log file
# and truncate it.)
count() {
    local packets
    packets=$(tcpdump -r "/run/$1.pcap" -n "$2" 2>/dev/null)
    [ -z "$packets" ] || echo "$packets" >&2
    [ -z "$packets" ] && echo 0 || echo "$packets" | wc -l
}

# Kernel WireGuard (the module, not a userspace implementation): the overlay ping works and the
# underlay carries only WireGuard UDP, no ICMP in clear.
wireguard_kernel_encrypts() {
    pair wga wgb 10.99.0
    local ns
    for ns in wga wgb; do
        in_ns "$ns" ip link add wg0 type wireguard
        wg genkey >"/run/$ns.key"
    done
    lsmod | grep '^wireguard'
    in_ns wga wg set wg0 private-key /run/wga.key listen-port 51820 \
        peer "$(wg pubkey </run/wgb.key)" endpoint 10.99.0.2:51820 allowed-ips 10.98.0.2/32
    in_ns wgb wg set wg0 private-key /run/wgb.key listen-port 51820 \
        peer "$(wg pubkey </run/wga.key)" endpoint 10.99.0.1:51820 allowed-ips 10.98.0.1/32
    in_ns wga ip addr add 10.98.0.1/24 dev wg0
    in_ns wgb ip addr add 10.98.0.2/24 dev wg0
    for ns in wga wgb; do in_ns "$ns" ip link set wg0 up; done
    in_ns wga ip -d link show wg0 | grep -q wireguard
    capture_start wgb
    in_ns wga ping -c 3 -W 5 10.98.0.2
    capture_stop
    in_ns wga wg show wg0
    [ "$(count wgb 'udp port 51820')" -gt 0 ] || fail "no WireGuard packets on the underlay"
    [ "$(count wgb icmp)" -eq 0 ] || fail "ICMP in clear on the underlay"
    in_ns wga wg show wg0 latest-handshakes | awk '{exit !($2 > 0)}'
}

# IPsec ESP: XFRM states (AES-GCM) and policies in transport mode between the two underlay
# addresses; the ping is carried as ESP, and the states count what they protected.
ipsec_esp_kernel_encrypts() {
    pair ipa ipb 10.97.0
    local key ns
    key=0x$(od -An -tx1 -N20 /dev/urandom | tr -d ' \n')
    for ns in ipa ipb; do
        in_ns "$ns" ip xfrm state add src 10.97.0.1 dst 10.97.0.2 proto esp spi 0x1001 \
            reqid 1 mode transport aead 'rfc4106(gcm(aes))' "$key" 128
        in_ns "$ns" ip xfrm state add src 10.97.0.2 dst 10.97.0.1 proto esp spi 0x1002 \
            reqid 2 mode transport aead 'rfc4106(gcm(aes))' "$key" 128
    done
    for pol in "ipa 10.97.0.1 10.97.0.2 1 2" "ipb 10.97.0.2 10.97.0.1 2 1"; do
        set -- $pol
        in_ns "$1" ip xfrm policy add src "$2/32" dst "$3/32" dir out \
            tmpl src "$2" dst "$3" proto esp reqid "$4" mode transport
        in_ns "$1" ip xfrm policy add src "$3/32" dst "$2/32" dir in \
            tmpl src "$3" dst "$2" proto esp reqid "$5" mode transport
    done
    lsmod | grep '^esp4'
    capture_start ipb
    in_ns ipa ping -c 3 -W 5 10.97.0.2
    capture_stop
    in_ns ipa ip -s xfrm state
    [ "$(count ipb "esp and src 10.97.0.1")" -gt 0 ] || fail "no ESP from ipa on the wire"
    [ "$(count ipb "esp and src 10.97.0.2")" -gt 0 ] || fail "no ESP from ipb on the wire"
    [ "$(count ipb icmp)" -eq 0 ] || fail "ICMP in clear on the wire"
}

echo "guest: $(uname -r), up $(cut -d' ' -f1 /proc/uptime) s"
# Not in an if: bash ignores -e in a condition, even in a subshell.
( set -ex; setup_topology ) >"$LOGS/setup.log" 2>&1
setup=$?
if [ $setup -eq 0 ]; then
    check boot_default_config boot_default_config
    check unit_security_exposure unit_security_exposure
    check ready_only_after_attach ready_only_after_attach
    check reload_broken_config_keeps_state reload_broken_config_keeps_state
    check dsr_kernel_ipip_backends dsr_kernel_ipip_backends
    check restart_keeps_xdp_attached restart_keeps_xdp_attached
    check watchdog_restarts_hung_daemon watchdog_restarts_hung_daemon
    check journal_structured_fields journal_structured_fields
    check stop_then_teardown_cleans_up stop_then_teardown_cleans_up
    check gatewayd_wireguard_kernel_auto gatewayd_wireguard_kernel_auto
    check gatewayd_ipsec_esp gatewayd_ipsec_esp
else
    echo "FAIL setup_topology" | tee -a "$RESULTS"
    tail -n 15 "$LOGS/setup.log"
fi
check wireguard_kernel_encrypts wireguard_kernel_encrypts
check ipsec_esp_kernel_encrypts ipsec_esp_kernel_encrypts
journalctl -b --no-pager >"$LOGS/journal.txt"
