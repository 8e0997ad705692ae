# Scenario api: ext-vmm with --api-socket runs the ticking L2 guest; the API pauses it (the
# guest's clock-driven output stops), resumes it (the output continues), reports each state in
# vm.info, and shuts the guest and then the VMM down.
# shellcheck source=ci/scenarios/lib.sh
. /opt/ext/scenarios/lib.sh

log=/tmp/l2-api.log
sock=/tmp/ext-vmm.sock
command -v ext-remote >/dev/null || fail "ext-remote is not in the lab image (did it build?)"

# Runs one ext-remote command; its output goes to /tmp/remote.out and the console.
remote() {
    ext-remote --api-socket "$sock" "$@" >/tmp/remote.out 2>&1
    _status=$?
    sed 's/^/ext-remote '"$1"'| /' /tmp/remote.out
    return $_status
}

# Asserts that vm.info reports the given state.
expect_state() {
    remote info || fail "info failed while expecting state $1: $(cat /tmp/remote.out)"
    grep -Eq "\"state\"[[:space:]]*:[[:space:]]*\"$1\"" /tmp/remote.out \
        || fail "info does not say $1: $(cat /tmp/remote.out)"
}

start_vmm "$log" 400 --kernel "$L2_KERNEL" --initramfs "$L2_INITRAMFS" \
    --cmdline "console=ttyS0 loglevel=4 panic=-1 ext.test=ticker" \
    --cpus boot=1 --memory size=512M,shared=off --serial tty --api-socket "path=$sock"

wait_for_line "$log" 'EXT-L2-INIT' 180 "$VMM_PID" || fail "L2 did not reach its init (or ext-vmm exited)"
metric "l2_boot_s=$(since "$VMM_STARTED") vmm=ext-vmm (ext-vmm start to EXT-L2-INIT, L1 clock)"
wait_for_line "$log" 'EXT-TICK 3' 60 "$VMM_PID" || fail "the guest's ticker never reached EXT-TICK 3"
[ -S "$sock" ] || fail "API socket $sock does not exist"
mode=$(stat -c %a "$sock")
[ "$mode" = 600 ] || fail "API socket mode is $mode, not 600"

remote ping || fail "ping failed: $(cat /tmp/remote.out)"
expect_state Running
remote counters || fail "counters failed: $(cat /tmp/remote.out)"

remote pause || fail "pause failed: $(cat /tmp/remote.out)"
# A tick already on its way out of the UART may land just after the pause returns.
sleep 1
paused_ticks=$(count_lines "$log" 'EXT-TICK')
sleep 3
after_ticks=$(count_lines "$log" 'EXT-TICK')
[ "$after_ticks" -eq "$paused_ticks" ] \
    || fail "ticks continued while paused ($paused_ticks then $after_ticks in 3 s)"
echo "api: paused for 3 s, tick count stayed at $paused_ticks"
expect_state Paused

remote resume || fail "resume failed: $(cat /tmp/remote.out)"
wait_for_line "$log" "EXT-TICK $((paused_ticks + 1))([^0-9]|$)" 30 "$VMM_PID" \
    || fail "ticks did not continue after resume (stuck at $paused_ticks)"
echo "api: ticks continued after resume"
expect_state Running

remote shutdown || fail "vm.shutdown failed: $(cat /tmp/remote.out)"
kill -0 "$VMM_PID" 2>/dev/null || fail "ext-vmm exited on vm.shutdown; it must keep serving the API"
# The vCPUs stop asynchronously: give the state a few seconds to settle.
tries=0
until remote info && grep -q '"state"[[:space:]]*:[[:space:]]*"Shutdown"' /tmp/remote.out; do
    tries=$((tries + 1))
    [ "$tries" -lt 20 ] || fail "info does not say Shutdown after vm.shutdown: $(cat /tmp/remote.out)"
    sleep 0.5
done
remote ping || fail "ping after vm.shutdown failed: $(cat /tmp/remote.out)"
remote shutdown-vmm || fail "vmm.shutdown failed: $(cat /tmp/remote.out)"
wait_exit "$VMM_PID" 30 || fail "ext-vmm still running 30 s after vmm.shutdown"
[ "$EXIT_STATUS" -eq 0 ] || fail "ext-vmm exited with status $EXIT_STATUS after vmm.shutdown"
pass
