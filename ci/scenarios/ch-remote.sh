# Scenario ch-remote: Cloud Hypervisor v53.0's own client drives ext-vmm through a VM's whole
# life: create (a Cloud Hypervisor VmConfig), boot, ping, info, counters, pause (the guest's
# ticks stop), resume (they continue), pause, snapshot, shutdown-vmm; a second ext-vmm started
# with only --api-socket gets restore and resume (the guest continues from its last tick, no
# reboot), power-button (the guest's acpid powers it off: state Shutdown), shutdown (tolerated
# only because the VM is already down), delete, shutdown-vmm (exit 0). ext-remote, our own
# client, is checked against both VMMs (ping, info).
# lab-needs: cloud-hypervisor
# shellcheck source=ci/scenarios/lib.sh
. /opt/ext/scenarios/lib.sh

ch=/opt/ext/bin/ch-remote
[ -x "$ch" ] || fail "ch-remote is not in the lab image (# lab-needs: cloud-hypervisor)"
command -v ext-remote >/dev/null || fail "ext-remote is not in the lab image (did it build?)"
"$ch" --version

# Runs one ch-remote command against socket $1 (ch-remote --api-socket <socket> <command>...),
# under a time limit; output (stdout and stderr) to /tmp/ch.out and, prefixed, the console.
chr() {
    _sock=$1
    shift
    timeout -s KILL 300 "$ch" --api-socket "$_sock" "$@" >/tmp/ch.out 2>&1
    _status=$?
    sed 's/^/ch-remote '"$1"'| /' /tmp/ch.out
    [ "$_status" -eq 0 ] || echo "ch-remote $1| exit status $_status"
    return $_status
}

# Runs one ext-remote command against socket $1; output to /tmp/er.out and the console.
er() {
    _sock=$1
    shift
    timeout -s KILL 300 ext-remote --api-socket "$_sock" "$@" >/tmp/er.out 2>&1
    _status=$?
    sed 's/^/ext-remote '"$1"'| /' /tmp/er.out
    return $_status
}

# True when the JSON in file $1 has "state": "$2" (any whitespace).
says_state() {
    grep -Eq "\"state\"[[:space:]]*:[[:space:]]*\"$2\"" "$1"
}

# Waits (up to 20 s) until `ch-remote info` on socket $1 says state $2.
wait_state() {
    _tries=0
    until chr "$1" info && says_state /tmp/ch.out "$2"; do
        _tries=$((_tries + 1))
        [ "$_tries" -lt 40 ] || fail "info does not say $2: $(cat /tmp/ch.out)"
        sleep 0.5
    done
}

# The pid in the last vmm.ping answer (/tmp/ch.out or the file $1).
ping_pid() {
    sed -n 's/.*"pid"[[:space:]]*:[[:space:]]*\([0-9][0-9]*\).*/\1/p' "${1:-/tmp/ch.out}" | head -n 1
}

# The number of the last complete "EXT-TICK <n>" line of log $1: a line the guest was still
# writing when it was paused is not complete yet (its end comes after the restore).
last_tick() {
    if [ -z "$(tail -c 1 "$1")" ]; then cat "$1"; else sed '$d' "$1"; fi \
        | sed -n 's/.*EXT-TICK \([0-9][0-9]*\).*/\1/p' | tail -n 1
}

# The number of the first complete "EXT-TICK <n>" line of log $1.
first_tick() {
    sed -n 's/.*EXT-TICK \([0-9][0-9]*\).*/\1/p' "$1" | head -n 1
}

# --- the first ext-vmm: create, boot, run, pause/resume, snapshot ---------------------------
log1=/tmp/l2-ch1.log
sock1=/tmp/ch1.sock
start_vmm "$log1" 600 --api-socket "path=$sock1"
first_pid=$VMM_PID
wait_api_socket "$sock1"

chr "$sock1" ping || fail "ping of an empty VMM: $(cat /tmp/ch.out)"
[ "$(ping_pid)" = "$first_pid" ] || fail "ping reports pid $(ping_pid), we started $first_pid"
chr "$sock1" info && fail "info of an empty VMM succeeded: $(cat /tmp/ch.out)"

cat >/tmp/vm.json <<JSON
{"payload":{"kernel":"$L2_KERNEL","initramfs":"$L2_INITRAMFS",
  "cmdline":"console=ttyS0 loglevel=4 panic=-1 ext.test=ticker"},
 "cpus":{"boot_vcpus":1,"max_vcpus":1},
 "memory":{"size":536870912,"shared":false},
 "serial":{"mode":"Tty"},"console":{"mode":"Off"}}
JSON
chr "$sock1" create /tmp/vm.json || fail "create: $(cat /tmp/ch.out)"
wait_state "$sock1" Created
# A field ext-vmm does not implement is refused by name, and the VM stays as it is.
printf '{"payload":{"kernel":"%s"},"memory":{"hugepages":true}}' "$L2_KERNEL" >/tmp/bad.json
chr "$sock1" create /tmp/bad.json && fail "a second create with hugepages succeeded"
grep -q 'hugepages' /tmp/ch.out || fail "the refusal does not name memory.hugepages: $(cat /tmp/ch.out)"
wait_state "$sock1" Created

booted=$(now)
chr "$sock1" boot || fail "boot: $(cat /tmp/ch.out)"
wait_for_line "$log1" 'EXT-L2-INIT' 240 "$VMM_PID" || fail "L2 did not reach its init after boot"
metric "l2_boot_s=$(since "$booted") (ch-remote boot to EXT-L2-INIT, L1 clock)"
wait_for_line "$log1" 'EXT-TICK 3' 90 "$VMM_PID" || fail "the guest's ticker never reached EXT-TICK 3"

chr "$sock1" ping || fail "ping: $(cat /tmp/ch.out)"
[ "$(ping_pid)" = "$first_pid" ] || fail "ping reports pid $(ping_pid), we started $first_pid"
wait_state "$sock1" Running
chr "$sock1" counters || fail "counters: $(cat /tmp/ch.out)"
grep -q 'tx_bytes' /tmp/ch.out || fail "counters has no serial tx_bytes: $(cat /tmp/ch.out)"
# Our own client on the same VMM.
er "$sock1" ping || fail "ext-remote ping: $(cat /tmp/er.out)"
[ "$(ping_pid /tmp/er.out)" = "$first_pid" ] || fail "ext-remote ping reports pid $(ping_pid /tmp/er.out)"
er "$sock1" info || fail "ext-remote info: $(cat /tmp/er.out)"
says_state /tmp/er.out Running || fail "ext-remote info does not say Running: $(cat /tmp/er.out)"

paused=$(now)
chr "$sock1" pause || fail "pause: $(cat /tmp/ch.out)"
metric "pause_s=$(since "$paused") (the ch-remote pause call, L1 clock)"
# A tick already on its way out of the UART may land just after the pause returns.
sleep 1
paused_ticks=$(count_lines "$log1" 'EXT-TICK')
sleep 3
after_ticks=$(count_lines "$log1" 'EXT-TICK')
[ "$after_ticks" -eq "$paused_ticks" ] \
    || fail "pause: ticks continued while paused ($paused_ticks then $after_ticks in 3 s)"
echo "ch-remote: paused for 3 s, tick count stayed at $paused_ticks"
wait_state "$sock1" Paused
chr "$sock1" resume || fail "resume: $(cat /tmp/ch.out)"
resumed_from=$(last_tick "$log1")
wait_for_line "$log1" "EXT-TICK $((resumed_from + 1))([^0-9]|$)" 60 "$VMM_PID" \
    || fail "resume: ticks did not continue after tick $resumed_from"
wait_state "$sock1" Running

chr "$sock1" pause || fail "second pause: $(cat /tmp/ch.out)"
wait_state "$sock1" Paused
snap=/tmp/ch-snap
# ch-remote's snapshot takes a destination URL whose directory must exist (Cloud Hypervisor's
# rule; ext-vmm creates a missing one).
mkdir -p "$snap"
snapped=$(now)
chr "$sock1" snapshot "file://$snap" || fail "snapshot: $(cat /tmp/ch.out)"
metric "snapshot_s=$(since "$snapped") du_kib=$(du -k "$snap" | tail -n 1 | cut -f1) (the ch-remote snapshot call, L1 clock)"
ls -ls "$snap"
if [ ! -s "$snap/state.json" ] || [ ! -s "$snap/config.json" ]; then
    fail "snapshot: $snap has no state.json/config.json"
fi
# Paused and snapshotted: the log is complete up to here.
snap_tick=$(last_tick "$log1")
[ -n "$snap_tick" ] || fail "snapshot: no tick in the first VMM's log"
echo "ch-remote: snapshot taken after tick $snap_tick"
chr "$sock1" shutdown-vmm || fail "shutdown-vmm of the first VMM: $(cat /tmp/ch.out)"
wait_exit "$first_pid" 60 || fail "the first ext-vmm did not exit after shutdown-vmm"
[ "$EXIT_STATUS" -eq 0 ] || fail "the first ext-vmm exited with $EXIT_STATUS after shutdown-vmm"

# --- the second ext-vmm: restore, resume, power button, delete -----------------------------
log2=/tmp/l2-ch2.log
sock2=/tmp/ch2.sock
start_vmm "$log2" 600 --api-socket "path=$sock2"
wait_api_socket "$sock2"
chr "$sock2" ping || fail "ping of the second VMM: $(cat /tmp/ch.out)"
[ "$(ping_pid)" = "$VMM_PID" ] || fail "ping reports pid $(ping_pid), we started $VMM_PID"
restored=$(now)
chr "$sock2" restore "source_url=file://$snap" || fail "restore: $(cat /tmp/ch.out)"
metric "restore_s=$(since "$restored") (the ch-remote restore call, L1 clock)"
# restore without resume=true leaves the VM paused, as in Cloud Hypervisor.
wait_state "$sock2" Paused
er "$sock2" info || fail "ext-remote info after restore: $(cat /tmp/er.out)"
says_state /tmp/er.out Paused || fail "ext-remote info after restore does not say Paused: $(cat /tmp/er.out)"
chr "$sock2" resume || fail "resume after restore: $(cat /tmp/ch.out)"
wait_for_line "$log2" "EXT-TICK $((snap_tick + 2))([^0-9]|$)" 90 "$VMM_PID" \
    || fail "restore: the guest did not continue after tick $snap_tick"
metric "restore_to_tick_s=$(since "$restored") (restore call to EXT-TICK $((snap_tick + 2)), L1 clock)"
! grep -q 'EXT-L2-INIT' "$log2" || fail "restore: the guest booted again instead of continuing"
restored_first=$(first_tick "$log2")
if [ -z "$restored_first" ] || [ "$restored_first" -le "$snap_tick" ] \
    || [ "$restored_first" -gt $((snap_tick + 2)) ]; then
    fail "restore: first tick after restore is ${restored_first:-none}, the snapshot was taken after tick $snap_tick"
fi
echo "ch-remote: the restored guest continued with tick $restored_first after tick $snap_tick"
wait_state "$sock2" Running
er "$sock2" ping || fail "ext-remote ping of the second VMM: $(cat /tmp/er.out)"

pressed=$(now)
chr "$sock2" power-button || fail "power-button: $(cat /tmp/ch.out)"
wait_for_line "$log2" 'EXT-L2-POWER-BUTTON' 60 "$VMM_PID" \
    || fail "power-button: the guest did not see the power button (no EXT-L2-POWER-BUTTON)"
wait_state "$sock2" Shutdown
metric "power_button_to_shutdown_s=$(since "$pressed") (power-button call to info Shutdown, L1 clock)"
# The guest powered itself off: vm.shutdown has nothing left to stop. Cloud Hypervisor
# refuses it then (Shutdown -> Shutdown is no valid transition); either answer is fine as long
# as the VM is still reported down. vm.delete must succeed: it forgets a VM in any state.
if ! chr "$sock2" shutdown; then
    chr "$sock2" info || fail "shutdown failed and info failed: $(cat /tmp/ch.out)"
    says_state /tmp/ch.out Shutdown || fail "shutdown of a powered-off VM failed: $(cat /tmp/ch.out)"
    echo "ch-remote: shutdown of the powered-off VM refused, tolerated (the VM is already down)"
fi
chr "$sock2" delete || fail "delete: $(cat /tmp/ch.out)"
chr "$sock2" info && fail "info after delete succeeded: $(cat /tmp/ch.out)"
chr "$sock2" ping || fail "ping after delete: $(cat /tmp/ch.out)"
chr "$sock2" shutdown-vmm || fail "shutdown-vmm of the second VMM: $(cat /tmp/ch.out)"
wait_exit "$VMM_PID" 60 || fail "the second ext-vmm did not exit after shutdown-vmm"
[ "$EXIT_STATUS" -eq 0 ] || fail "the second ext-vmm exited with $EXIT_STATUS after shutdown-vmm"
pass
