# Shared by the scripts that start apexd under load and measure it (ab-relay, cpu-per-message,
# relay-bench, profile-callgrind, profile-flamegraph); sourced, not run.

# edge_address LOG [TENTHS]: waits up to TENTHS tenths of a second (default 100) for apexd's
# "apexd ready" line in LOG and prints the apex-edge address it names (127.0.0.1:PORT). Fails
# when none came.
edge_address() {
    local log=$1 tenths=${2:-100} addr
    for _ in $(seq "$tenths"); do
        addr=$(grep -m1 "apexd ready" "$log" 2>/dev/null | grep -oE 'edge=127\.0\.0\.1:[0-9]+' | cut -d= -f2 || true)
        if [[ -n "$addr" ]]; then
            echo "$addr"
            return 0
        fi
        sleep 0.1
    done
    return 1
}

# cpu_window PID SECONDS: called just after a load run of SECONDS measured seconds (after a 1 s
# warm-up) was started, sleeps into its measured window and reads PID's CPU time across it,
# while the load is steady (after the loader's warm-up and set-up, before its end and drain).
# Prints "USER_NS SYSTEM_NS WALL_NS": PID's user and system CPU time over the window and the
# window's length.
cpu_window() {
    local pid=$1 seconds=$2 hz u0 s0 u1 s1 t0 t1
    hz=$(getconf CLK_TCK)
    sleep 1.3
    read -r u0 s0 < <(awk '{print $14, $15}' "/proc/$pid/stat")
    t0=$(date +%s%N)
    sleep "$(awk -v s="$seconds" 'BEGIN { print s - 0.6 }')"
    read -r u1 s1 < <(awk '{print $14, $15}' "/proc/$pid/stat")
    t1=$(date +%s%N)
    echo "$(( (u1 - u0) * 1000000000 / hz )) $(( (s1 - s0) * 1000000000 / hz )) $((t1 - t0))"
}
