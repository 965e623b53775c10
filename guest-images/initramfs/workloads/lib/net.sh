# Shared by the net-* workloads, which source it (it is not a workload):
# the guest's address, eth0, TCP servers announced once they listen, and
# the per-connection handlers of the sink and source servers.
#
# Nothing here depends on time or randomness except what the network
# brings in: the servers' output is a function of the bytes received.

NET_ECHO_PORT=7000
NET_SINK_PORT=7001
NET_SOURCE_PORT=7002

# Give eth0 the address of vmft.ip=A.B.C.D/NN (default 10.77.0.50/24) and
# bring it up; without a network card, say so and exit 1.
net_up() {
    addr=10.77.0.50/24
    for arg in $(cat /proc/cmdline); do
        case "$arg" in
            vmft.ip=*) addr="${arg#vmft.ip=}" ;;
        esac
    done
    if [ ! -e /sys/class/net/eth0 ]; then
        echo "net: error: no eth0: the VM has no network card (vmft --net tap=NAME)"
        exit 1
    fi
    ip link set lo up
    if ! ip addr add "$addr" dev eth0; then
        echo "net: error: cannot give eth0 the address $addr (vmft.ip=A.B.C.D/NN)"
        exit 1
    fi
    if ! ip link set eth0 up; then
        echo "net: error: cannot bring eth0 up"
        exit 1
    fi
    echo "net: eth0 up at $addr"
}

# Whether something listens on TCP port $1: the port in hex in state
# LISTEN (0A) in /proc/net/tcp (tcp6 too, for a kernel with IPv6).
net_listening() {
    hex=$(printf '%04X' "$1")
    grep -qs ":$hex 0*:0000 0A" /proc/net/tcp /proc/net/tcp6
}

# net_serve NAME PORT PROG [ARGS]: a persistent TCP server on PORT that runs
# PROG for every connection (its stdin and stdout are the connection),
# announced as "net: NAME server on PORT" once it listens.
net_serve() {
    name=$1
    port=$2
    shift 2
    # -ll: keep listening after a connection; -e: PROG per connection.
    nc -ll -p "$port" -e "$@" &
    pid=$!
    net_pids="$net_pids $pid"
    tries=0
    until net_listening "$port"; do
        tries=$((tries + 1))
        if [ "$tries" -gt 100 ] || ! kill -0 "$pid" 2>/dev/null; then
            echo "net: error: the $name server on $port does not listen"
            net_stop
            exit 1
        fi
        sleep 0.1
    done
    echo "net: $name server on $port"
}

net_stop() {
    for pid in $net_pids; do
        kill "$pid" 2>/dev/null
    done
}

# net_workload N SERVER...: eth0 up, the servers (echo, sink, source), then
# a line "net tick I" every second for N seconds (N=0: until the VM is
# stopped), to show progress in a transcript; then the servers must still
# be there.
net_workload() {
    n=${1:-10}
    shift
    net_pids=
    net_up
    for server in "$@"; do
        case "$server" in
            echo) net_serve echo "$NET_ECHO_PORT" /bin/cat ;;
            sink) net_serve sink "$NET_SINK_PORT" /bin/sh -c '. /workloads/lib/net.sh; net_sink_conn' ;;
            source) net_serve source "$NET_SOURCE_PORT" /bin/sh -c '. /workloads/lib/net.sh; net_source_conn' ;;
            *) echo "net: error: no server $server"; net_stop; exit 1 ;;
        esac
    done
    i=1
    while [ "$n" -eq 0 ] || [ "$i" -le "$n" ]; do
        sleep 1
        echo "net tick $i"
        i=$((i + 1))
    done
    for pid in $net_pids; do
        if ! kill -0 "$pid" 2>/dev/null; then
            echo "net: error: a server ended"
            net_stop
            exit 1
        fi
    done
    net_stop
    echo "net: done after $n s"
}

# One connection to the sink: everything until the client's end of stream,
# then "net-sink: bytes=N sum=SHA256" (its count and SHA-256) both on the
# console and back to the client, which then sees the close.
net_sink_conn() {
    f=/tmp/net-sink.$$
    cat > "$f"
    bytes=$(wc -c < "$f")
    sum=$(sha256sum < "$f")
    rm -f "$f"
    line="net-sink: bytes=$((bytes)) sum=${sum%% *}"
    echo "$line" > /dev/console
    echo "$line"
}

# One connection to the source: the client sends a number K and a newline;
# the source sends the lines of `seq 1 K` (each number once, in order, so
# the client can tell a lost, repeated or reordered byte) and closes, then
# prints "net-source: bytes=N sum=SHA256 lines=K" on the console.
net_source_conn() {
    read -r k
    cr=$(printf '\r')
    k=${k%"$cr"}
    case "$k" in
        '' | *[!0-9]*)
            echo "net-source: error: the request is not a number of lines" > /dev/console
            echo "net-source: error: send a number of lines and a newline"
            return 1
            ;;
    esac
    f=/tmp/net-source.$$
    seq 1 "$k" > "$f"
    cat "$f"
    bytes=$(wc -c < "$f")
    sum=$(sha256sum < "$f")
    rm -f "$f"
    echo "net-source: bytes=$((bytes)) sum=${sum%% *} lines=$k" > /dev/console
}
