#!/usr/bin/env bash
# gatewayd demo: a client, a gateway running gatewayd with config/demo.toml, and three backends,
# each in its own network namespace on one bridge. Sends requests to the VIP, prints which
# backend answered, shows what gatewayctl reports, then removes everything (also on failure
# or Ctrl-C).
#
#   sudo integration/demo.sh
#
# Needs: root, iproute2, ethtool, python3, clang-19 (already needed to build gatewayd).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
CONFIG=$ROOT/config/demo.toml
BIN=$ROOT/target/debug
P=gd-demo-                       # namespace prefix
VIP=10.77.100.1
VIP6=fd00:77:100::1
SOCKET=/run/gatewayd-demo/gatewayd.sock
WORK=$(mktemp -d /tmp/gatewayd-demo.XXXXXX)
PIDS=()                          # background processes this script started

say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
in_ns() { local ns=$1; shift; ip netns exec "$P$ns" "$@"; }
# gatewayd itself runs with `nsenter --net` only: `ip netns exec` would also give it a private
# mount namespace with a fresh /sys, and its bpffs pins would vanish with that namespace.
gatewayd_in() { local ns=$1; shift; nsenter --net="/run/netns/$P$ns" "$BIN/gatewayd" "$@"; }
gatewayctl() { "$BIN/gatewayctl" --socket "$SOCKET" "$@"; }

cleanup() {
    set +e
    say "tearing down"
    for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null; done
    for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null; done
    # The daemon leaves its programs attached on exit by design; teardown removes them.
    [ -x "$BIN/gatewayd" ] && "$BIN/gatewayd" teardown --config "$CONFIG" 2>&1 | tail -n 1
    for b in b1 b2 b3; do rm -rf "/sys/fs/bpf/gatewayd-demo-decap-$b"; done
    for ns in client gw b1 b2 b3 lan; do ip netns del "$P$ns" 2>/dev/null; done
    rm -rf "$WORK" /run/gatewayd-demo
    echo "done: no namespaces, pins or processes left"
}

if [ "$(id -u)" -ne 0 ]; then
    echo "run me as root: sudo $0" >&2
    exit 1
fi
for tool in ip ethtool python3 clang-19 nsenter; do
    command -v "$tool" >/dev/null || { echo "missing: $tool" >&2; exit 1; }
done
if ip netns list | grep -q "^$P"; then
    echo "namespaces $P* exist already: is another demo running?" >&2
    exit 1
fi
trap cleanup EXIT

say "building gatewayd"
as_user() { sudo -u "$SUDO_USER" -H bash -lc "$1"; }
if [ -n "${SUDO_USER:-}" ] && [ "$SUDO_USER" != root ] && as_user 'command -v cargo' >/dev/null 2>&1; then
    # Build as the invoking user, so target/ does not become root's.
    as_user "cd '$ROOT' && cargo build --workspace"
elif command -v cargo >/dev/null; then
    (cd "$ROOT" && cargo build --workspace)
elif [ -x "$BIN/gatewayd" ] && [ -x "$BIN/gatewayctl" ]; then
    echo "cargo not found: using the binaries already in $BIN"
else
    echo "cargo not found, and nothing built in $BIN" >&2
    exit 1
fi

say "creating the namespaces: lan (bridge), client, gw, b1, b2, b3"
for ns in lan client gw b1 b2 b3; do
    ip netns add "$P$ns"
    in_ns "$ns" ip link set lo up
done
in_ns lan ip link add br0 type bridge
in_ns lan ip link set br0 up

# plug HOST ADDR4 ADDR6: a veth from HOST's eth0 to a port of the bridge.
plug() {
    local host=$1 addr4=$2 addr6=$3
    ip link add eth0 netns "$P$host" type veth peer name "to-$host" netns "${P}lan"
    in_ns lan ip link set "to-$host" master br0 up
    in_ns "$host" ip addr add "$addr4/24" dev eth0
    in_ns "$host" ip addr add "$addr6/64" dev eth0 nodad
    in_ns "$host" ip link set eth0 up
}
plug gw 10.77.0.1 fd00:77::1
plug client 10.77.0.100 fd00:77::100
for i in 1 2 3; do plug "b$i" "10.77.0.1$i" "fd00:77::1$i"; done

say "gateway: forwarding on; gatewayd with config/demo.toml"
in_ns gw sysctl -qw net.ipv4.ip_forward=1 net.ipv6.conf.all.forwarding=1
in_ns gw sysctl -qw net.ipv4.conf.all.send_redirects=0 net.ipv4.conf.eth0.send_redirects=0
# A veth only receives XDP_TX frames from its peer if it runs XDP (NAPI) itself: give the
# bridge port facing the gateway a program that passes everything. Real NICs need nothing.
cat > "$WORK/xdp_pass.c" <<'EOF'
__attribute__((section("xdp"), used)) int xdp_pass(void *ctx) { return 2; /* XDP_PASS */ }
char _license[] __attribute__((section("license"), used)) = "GPL";
EOF
clang-19 -O2 -target bpf -c "$WORK/xdp_pass.c" -o "$WORK/xdp_pass.o"
in_ns lan ip link set dev to-gw xdpdrv obj "$WORK/xdp_pass.o" sec xdp

gatewayd_in gw check-config "$CONFIG"
# Not through gatewayd_in: a backgrounded function is a subshell, and $! would be its pid.
nsenter --net="/run/netns/${P}gw" "$BIN/gatewayd" --config "$CONFIG" >"$WORK/gatewayd.log" 2>&1 &
PIDS+=($!)
for _ in $(seq 100); do
    gatewayctl status >/dev/null 2>&1 && break
    kill -0 "${PIDS[-1]}" 2>/dev/null || { cat "$WORK/gatewayd.log"; exit 1; }
    sleep 0.2
done
gatewayctl status >/dev/null || { cat "$WORK/gatewayd.log"; exit 1; }

say "backends: VIPs on lo, decap on eth0, an HTTP server answering its name"
cat > "$WORK/backend.py" <<'EOF'
import http.server, socket, socketserver, sys, threading

name, addresses = sys.argv[1], sys.argv[2:]

class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = f"{name}\n".encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass

class Server(http.server.ThreadingHTTPServer):
    def server_bind(self):
        # HTTPServer's own would look the VIP up in DNS, which the namespace cannot reach.
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = name, 80

class Server6(Server):
    address_family = socket.AF_INET6

servers = [(Server6 if ":" in a else Server)((a, 80), Handler) for a in addresses]
for s in servers[1:]:
    threading.Thread(target=s.serve_forever, daemon=True).start()
servers[0].serve_forever()
EOF
for i in 1 2 3; do
    b=b$i
    in_ns "$b" ip addr add "$VIP/32" dev lo
    in_ns "$b" ip addr add "$VIP6/128" dev lo nodad
    # The VIP must not be announced by the backends, and the client's packets arrive with a
    # source that is not routed back through the tunnel.
    in_ns "$b" sysctl -qw net.ipv4.conf.all.arp_ignore=1 net.ipv4.conf.all.arp_announce=2
    in_ns "$b" sysctl -qw net.ipv4.conf.all.rp_filter=0 net.ipv4.conf.eth0.rp_filter=0
    gatewayd_in "$b" decap attach --interface eth0 --bpffs "/sys/fs/bpf/gatewayd-demo-decap-$b" 2>/dev/null
    nsenter --net="/run/netns/$P$b" python3 "$WORK/backend.py" "$b" "$VIP" "$VIP6" &
    PIDS+=($!)
done

say "client: the VIPs are routed via the gateway"
in_ns client ip route add "$VIP/32" via 10.77.0.1
in_ns client ip -6 route add "$VIP6/128" via fd00:77::1
# veth leaves checksums to the receiver (CHECKSUM_PARTIAL), which does not survive XDP_TX:
# let the client compute its own, as a real NIC's sender would.
in_ns client ethtool -K eth0 tx off >/dev/null

get() {
    in_ns client python3 - "$1" <<'EOF'
import sys, time, urllib.request
error = None
for attempt in range(20):   # the servers may still be starting
    try:
        print(urllib.request.urlopen(sys.argv[1], timeout=5).read().decode().strip())
        sys.exit(0)
    except OSError as e:
        error = e
        time.sleep(0.2)
print("no answer:", error)
sys.exit(1)
EOF
}

say "10 requests to http://$VIP/ (each a new connection, balanced by Maglev)"
for n in $(seq 10); do printf 'request %2d -> %s\n' "$n" "$(get "http://$VIP/")"; done
say "5 requests to http://[$VIP6]/"
for n in $(seq 5); do printf 'request %2d -> %s\n' "$n" "$(get "http://[$VIP6]/")"; done

say "gatewayctl status"
gatewayctl status
say "gatewayctl lb list"
gatewayctl lb list
say "gatewayctl lb stats (non-zero reasons)"
gatewayctl lb stats | awk 'NR <= 2 || $2 != 0'
