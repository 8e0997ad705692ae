# Shared helpers for lab scenarios (busybox sh in L1). Source it first:
#   . /opt/ext/scenarios/lib.sh
# A scenario ends by calling `pass` or `fail <reason>`; L1's init powers the machine off after
# the scenario script returns, so anything started here ends with L1 even when a step fails.
# shellcheck shell=sh disable=SC2034  # the variables set here are for the scenarios to read

L2_KERNEL=/opt/l2/vmlinux
L2_INITRAMFS=/opt/l2/initramfs.cpio
EXT_RESULT_FILE=/run/ext-scenario-result
_ext_background_pids=""

# Stops every background process a helper started (VMMs, console followers).
cleanup_background() {
    # busybox tail -f looks for new data once a second: let followers show the last lines.
    [ -z "${_ext_followers:-}" ] || sleep 1.2
    for pid in $_ext_background_pids; do
        kill -KILL "$pid" 2>/dev/null
    done
    _ext_background_pids=""
}

pass() {
    cleanup_background
    : >"$EXT_RESULT_FILE"
    echo "EXT-SCENARIO-RESULT: PASS"
    exit 0
}

fail() {
    cleanup_background
    : >"$EXT_RESULT_FILE"
    echo "EXT-SCENARIO-RESULT: FAIL $*"
    exit 1
}

# Seconds since L1 booted, with centiseconds: the clock all scenario timings use.
now() {
    read -r _now_up _ </proc/uptime
    echo "$_now_up"
}

# Seconds elapsed since a value returned by `now`.
since() {
    awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.2f", b - a }'
}

# Milliseconds since a `now` value.
ms_since() {
    awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%d", (b - a) * 1000 + 0.5 }'
}

# $1 / $2 with three decimals ("inf" when $2 is 0).
ratio() {
    awk -v a="$1" -v b="$2" 'BEGIN { if (b > 0) printf "%.3f", a / b; else print "inf" }'
}

# Prints a measurement in one greppable format: EXT-METRIC <name>=<value> [notes].
metric() {
    echo "EXT-METRIC $*"
}

# Shows a console log live on L1's console, each line prefixed, until cleanup_background.
follow_log() {
    # $1: file, $2: prefix
    tail -n +1 -f "$1" 2>/dev/null | awk -v prefix="$2| " '{ sub(/\r$/, ""); print prefix $0; fflush() }' &
    _ext_background_pids="$_ext_background_pids $!"
    _ext_followers=1
}

# Starts `<program> <args...>` in the background under a hard time limit, stdout and stderr
# to <log>, and follows the log on the console. Sets BG_PID and BG_STARTED (a `now` value).
start_background() {
    # $1: log file, $2: time limit in seconds, $3...: program and arguments
    _log=$1
    _limit=$2
    shift 2
    : >"$_log"
    BG_STARTED=$(now)
    timeout -s KILL "$_limit" "$@" >"$_log" 2>&1 &
    BG_PID=$!
    _ext_background_pids="$_ext_background_pids $BG_PID"
    follow_log "$_log" "$(basename "$1")"
}

# Starts ext-vmm (see start_background); VMM_PID and VMM_STARTED are set.
start_vmm() {
    # $1: log file, $2: time limit in seconds, $3...: ext-vmm arguments
    command -v ext-vmm >/dev/null || fail "ext-vmm is not in the lab image (did it build?)"
    _vlog=$1
    _vlimit=$2
    shift 2
    start_background "$_vlog" "$_vlimit" ext-vmm "$@"
    VMM_PID=$BG_PID
    VMM_STARTED=$BG_STARTED
}

# Waits until a line matching the extended regex appears in the file. Returns 1 after the
# timeout, or 2 as soon as the optional process id given as $4 has exited without it.
wait_for_line() {
    # $1: file, $2: regex, $3: timeout in seconds, $4: pid that must stay alive (optional)
    _deadline=$(awk -v a="$(now)" -v t="$3" 'BEGIN { printf "%.2f", a + t }')
    while :; do
        grep -Eq -- "$2" "$1" 2>/dev/null && return 0
        if [ -n "${4:-}" ] && ! kill -0 "$4" 2>/dev/null; then
            grep -Eq -- "$2" "$1" 2>/dev/null && return 0
            return 2
        fi
        awk -v a="$(now)" -v d="$_deadline" 'BEGIN { exit !(a >= d) }' && return 1
        sleep 0.1
    done
}

# Waits for a background process to exit. Sets EXIT_STATUS; returns 1 on timeout.
wait_exit() {
    # $1: pid, $2: timeout in seconds
    _deadline=$(awk -v a="$(now)" -v t="$2" 'BEGIN { printf "%.2f", a + t }')
    while kill -0 "$1" 2>/dev/null; do
        # A zombie child still answers kill -0; `wait` below reaps it.
        grep -q '^State:.*Z' "/proc/$1/status" 2>/dev/null && break
        awk -v a="$(now)" -v d="$_deadline" 'BEGIN { exit !(a >= d) }' && return 1
        sleep 0.1
    done
    wait "$1"
    EXIT_STATUS=$?
    return 0
}

# Counts the lines matching the extended regex in a file.
count_lines() {
    grep -Ec -- "$2" "$1" 2>/dev/null || true
}

# Runs one ext-remote command (at most 600 s): $1 socket, then the command; output to
# /tmp/remote.out and, prefixed, to the console. Scenarios may define their own.
remote() {
    _sock=$1
    shift
    timeout -s KILL 600 ext-remote --api-socket "$_sock" "$@" >/tmp/remote.out 2>&1
    _status=$?
    sed 's/^/ext-remote '"$1"'| /' /tmp/remote.out
    return $_status
}

# The value of counter $2 in group $1 of the last `remote counters` output (the first if the
# name occurs twice). Scenarios may define their own.
counter() {
    tr -d ' \n' </tmp/remote.out | sed -n 's/.*"'"$1"'":{\([^}]*\)}.*/\1/p' \
        | tr ',' '\n' | sed -n 's/^"'"$2"'":\([0-9][0-9]*\)$/\1/p' | head -n 1
}

# The highest tick number of ext-work ("EXT-WORK <n> <checksum> ok") in a log.
last_tick() {
    sed -n 's/.*EXT-WORK \([0-9][0-9]*\) [0-9a-f]* ok.*/\1/p' "$1" | tail -n 1
}

# The full "EXT-WORK <n> <checksum> ok" line of tick $2 in log $1.
tick_line() {
    grep -Eo "EXT-WORK $2 [0-9a-f]+ ok" "$1" | head -n 1
}

# Runs one command of Cloud Hypervisor's ch-remote (/opt/ext/bin, at most 600 s): $1 socket,
# then the command; output to /tmp/ch-remote.out and, prefixed, to the console.
ch_remote() {
    _sock=$1
    shift
    timeout -s KILL 600 /opt/ext/bin/ch-remote --api-socket "$_sock" "$@" >/tmp/ch-remote.out 2>&1
    _status=$?
    sed 's/^/ch-remote '"$1"'| /' /tmp/ch-remote.out
    return $_status
}

# KiB of guest memory process $1 holds: RssAnon + RssShmem (private and memfd pages alike).
resident_kib() {
    awk '/^Rss(Anon|Shmem):/ { kib += $2 } END { print kib + 0 }' "/proc/$1/status" 2>/dev/null
}

# Starts Cloud Hypervisor binary $1 in the background, log $2, then its arguments; stdin is
# /dev/null (its --serial tty reads no input from a FIFO). Sets VMM_PID (the process itself,
# so it can be killed by PID).
launch_ch() {
    _bin=$1
    _log=$2
    shift 2
    : >"$_log"
    "$_bin" "$@" </dev/null >"$_log" 2>&1 &
    VMM_PID=$!
    _ext_background_pids="$_ext_background_pids $VMM_PID"
    follow_log "$_log" "$(basename "$_log" .log)"
}

# Waits up to 60 s for the API socket $1 of VMM_PID.
wait_api_socket() {
    _tries=0
    until [ -S "$1" ]; do
        _tries=$((_tries + 1))
        [ "$_tries" -lt 600 ] || fail "the VMM never opened $1"
        kill -0 "$VMM_PID" 2>/dev/null || fail "the VMM exited before opening $1"
        sleep 0.1
    done
}

# Kills VMM_PID and reaps it.
kill_vmm_pid() {
    kill -KILL "$VMM_PID" 2>/dev/null
    wait_exit "$VMM_PID" 30 || fail "VMM $VMM_PID survived SIGKILL"
}

# Checks that the ext-work guest restored in log $1 continues after tick $2 with its memory
# intact: tick $2 + 2 appears, no BAD sum, the first tick is $2 + 1 or $2 + 2. Sets
# CHECK_LINE to its line for tick $2 + 2.
check_ticks_continue() {
    wait_for_line "$1" "EXT-WORK $(($2 + 2)) [0-9a-f]+ (ok|BAD)" 180 "$VMM_PID" \
        || fail "$1: the workload did not continue after tick $2"
    ! grep -q 'EXT-WORK [0-9]* [0-9a-f]* BAD' "$1" || fail "$1: guest memory lost: $(grep BAD "$1" | head -n 1)"
    _first=$(sed -n 's/.*EXT-WORK \([0-9][0-9]*\) [0-9a-f]* ok.*/\1/p' "$1" | head -n 1)
    if [ -z "$_first" ] || [ "$_first" -le "$2" ] || [ "$_first" -gt $(($2 + 2)) ]; then
        fail "$1: first tick after restore is ${_first:-none}, the snapshot was taken after tick $2"
    fi
    CHECK_LINE=$(tick_line "$1" $(($2 + 2)))
}
