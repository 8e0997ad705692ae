# Scenario snapshot-restore: the L2 guest runs ext-work (32 MiB of seeded memory, a running
# checksum printed every tick as "EXT-WORK <n> <checksum> ok") and a detached crun container.
# ext-vmm A is paused and snapshotted through the API, then killed by its PID. The snapshot is
# restored in a new ext-vmm process in each memory mode: copy (vm.restore into an ext-vmm
# started with only --api-socket), mapped (--restore) and ondemand (--restore with the API).
# Each restored guest must continue where A stopped (the counter goes on from A's last tick,
# the memory sum still matches, every mode prints the same checksum for the same tick), list
# its container as running and answer console commands. The ondemand VM is snapshotted again
# and killed; that second snapshot is restored, runs, and is snapshotted as a diff against it
# (only pages dirtied since); the chain is restored and the guest powered off cleanly.
# shellcheck source=ci/scenarios/lib.sh
. /opt/ext/scenarios/lib.sh

command -v ext-remote >/dev/null || fail "ext-remote is not in the lab image (did it build?)"
input=/tmp/snapshot-input
snap1=/tmp/snap1
snap2=/tmp/snap2
snap3=/tmp/snap3
rm -f "$input"
mkfifo "$input" || fail "mkfifo failed"
# Read-write open: neither side blocks, and each ext-vmm's stdin stays open while we write.
exec 3<>"$input"

# Starts ext-vmm in the background with the console FIFO as stdin: $1 log, then its arguments.
# Sets VMM_PID (the ext-vmm process itself, so it can be killed by PID).
launch() {
    _log=$1
    shift
    : >"$_log"
    ext-vmm "$@" <&3 >"$_log" 2>&1 &
    VMM_PID=$!
    _ext_background_pids="$_ext_background_pids $VMM_PID"
    follow_log "$_log" "$(basename "$_log" .log)"
}

remote() {
    # $1: socket, then the ext-remote command
    _sock=$1
    shift
    ext-remote --api-socket "$_sock" "$@" >/tmp/remote.out 2>&1
    _status=$?
    sed 's/^/ext-remote '"$1"'| /' /tmp/remote.out
    return $_status
}

# Pauses the VM behind socket $1 and snapshots it into directory $2; prints the timing.
pause_and_snapshot() {
    remote "$1" pause || fail "pause failed: $(cat /tmp/remote.out)"
    _t=$(now)
    remote "$1" snapshot --destination-url "file://$2" || fail "snapshot to $2 failed: $(cat /tmp/remote.out)"
    metric "snapshot_s=$(since "$_t") dir=$2 du_kib=$(du -k "$2" | tail -n 1 | cut -f1) (L1 clock, emulated)"
    ls -ls "$2"
}

# Kills the ext-vmm behind socket $1 by the PID it reports.
kill_vmm() {
    remote "$1" ping || fail "ping failed: $(cat /tmp/remote.out)"
    _pid=$(sed -n 's/.*"pid"[[:space:]]*:[[:space:]]*\([0-9][0-9]*\).*/\1/p' /tmp/remote.out)
    [ "$_pid" = "$VMM_PID" ] || fail "vmm.ping reports pid $_pid, we started $VMM_PID"
    kill -KILL "$_pid"
    wait_exit "$_pid" 30 || fail "ext-vmm $_pid survived SIGKILL"
}

# Checks that the restored guest in log $1 continues after tick $2 and that its container
# runs; sets CHECK_LINE to its line for tick $2 + 2.
check_continues() {
    check_ticks_continue "$1" "$2"
    echo containers >&3
    wait_for_line "$1" 'EXT-CONTAINERS running=1' 60 "$VMM_PID" \
        || fail "$1: the container is not listed as running after restore"
    echo "snapshot-restore: $1 continued from tick $2: $CHECK_LINE"
}

# --- A: boot, run, snapshot, kill ----------------------------------------------------------
launch /tmp/vmm-a.log --kernel "$L2_KERNEL" --initramfs "$L2_INITRAMFS" \
    --cmdline "console=ttyS0 loglevel=4 panic=-1 ext.test=work ext.work_mib=32" \
    --cpus boot=1 --memory size=384M --serial tty --api-socket path=/tmp/a.sock
wait_for_line /tmp/vmm-a.log 'EXT-WORK 3 [0-9a-f]+ ok' 240 "$VMM_PID" || fail "the workload did not start in L2"
echo containers >&3
wait_for_line /tmp/vmm-a.log 'EXT-CONTAINERS running=1' 60 "$VMM_PID" || fail "the container is not running before the snapshot"
pause_and_snapshot /tmp/a.sock "$snap1"
tick1=$(last_tick /tmp/vmm-a.log)
kill_vmm /tmp/a.sock
echo "snapshot-restore: A stopped after tick $tick1"

# --- copy, through vm.restore on a VMM without a VM -----------------------------------------
launch /tmp/vmm-copy.log --api-socket path=/tmp/copy.sock
tries=0
until [ -S /tmp/copy.sock ]; do
    tries=$((tries + 1)); [ "$tries" -lt 100 ] || fail "the empty ext-vmm never opened its socket"; sleep 0.1
done
remote /tmp/copy.sock info && fail "vm.info of a VMM without a VM succeeded"
t=$(now)
remote /tmp/copy.sock restore --source-url "file://$snap1" --memory-restore-mode copy \
    || fail "vm.restore (copy) failed: $(cat /tmp/remote.out)"
metric "restore_s=$(since "$t") mode=copy (vm.restore, L1 clock, emulated)"
remote /tmp/copy.sock info || fail "vm.info after restore failed: $(cat /tmp/remote.out)"
grep -q '"Paused"' /tmp/remote.out || fail "restored VM is not Paused"
remote /tmp/copy.sock resume || fail "resume after restore failed: $(cat /tmp/remote.out)"
check_continues /tmp/vmm-copy.log "$tick1"
line_copy=$CHECK_LINE
remote /tmp/copy.sock counters || fail "counters failed"
echo poweroff >&3
wait_for_line /tmp/vmm-copy.log 'EXT-L2-POWEROFF' 60 "$VMM_PID" || fail "copy: the guest did not power off"
remote /tmp/copy.sock shutdown-vmm || fail "vmm.shutdown failed: $(cat /tmp/remote.out)"
wait_exit "$VMM_PID" 60 || fail "copy: ext-vmm did not exit"
[ "$EXIT_STATUS" -eq 0 ] || fail "copy: ext-vmm exited with $EXIT_STATUS"

# --- mapped, through --restore (no API) --------------------------------------------------
t=$(now)
launch /tmp/vmm-mapped.log --restore "source_url=file://$snap1,memory_restore_mode=mapped,resume=true"
check_continues /tmp/vmm-mapped.log "$tick1"
metric "restore_to_tick_s=$(since "$t") mode=mapped (--restore to tick+2, L1 clock, emulated)"
[ "$CHECK_LINE" = "$line_copy" ] || fail "mapped printed '$CHECK_LINE', copy printed '$line_copy'"
echo poweroff >&3
wait_exit "$VMM_PID" 60 || fail "mapped: ext-vmm still running after the guest's poweroff"
[ "$EXIT_STATUS" -eq 0 ] || fail "mapped: ext-vmm exited with $EXIT_STATUS"

# --- ondemand, through --restore with the API; then snapshot again -------------------------
t=$(now)
launch /tmp/vmm-ondemand.log --restore "source_url=file://$snap1,memory_restore_mode=ondemand,resume=true" \
    --api-socket path=/tmp/ondemand.sock
check_continues /tmp/vmm-ondemand.log "$tick1"
metric "restore_to_tick_s=$(since "$t") mode=ondemand (--restore to tick+2, L1 clock, emulated)"
[ "$CHECK_LINE" = "$line_copy" ] || fail "ondemand printed '$CHECK_LINE', copy printed '$line_copy'"
remote /tmp/ondemand.sock counters || fail "counters failed: $(cat /tmp/remote.out)"
grep -q restore_ondemand /tmp/remote.out || fail "no on-demand counters"
wait_for_line /tmp/vmm-ondemand.log "EXT-WORK $((tick1 + 4)) " 60 "$VMM_PID" || fail "ondemand stalled"
pause_and_snapshot /tmp/ondemand.sock "$snap2"
tick2=$(last_tick /tmp/vmm-ondemand.log)
kill_vmm /tmp/ondemand.sock

# --- the second-generation snapshot, then a diff against it --------------------------------
launch /tmp/vmm-gen2.log --restore "source_url=file://$snap2,resume=true" --api-socket path=/tmp/gen2.sock
check_continues /tmp/vmm-gen2.log "$tick2"
wait_for_line /tmp/vmm-gen2.log "EXT-WORK $((tick2 + 4)) " 60 "$VMM_PID" || fail "gen2 stalled"
remote /tmp/gen2.sock pause || fail "pause failed: $(cat /tmp/remote.out)"
t=$(now)
remote /tmp/gen2.sock snapshot --destination-url "file://$snap3" --parent "file://$snap2" \
    || fail "diff snapshot failed: $(cat /tmp/remote.out)"
metric "diff_snapshot_s=$(since "$t") du_kib=$(du -k "$snap3" | tail -n 1 | cut -f1) full_du_kib=$(du -k "$snap2" | tail -n 1 | cut -f1) (L1 clock, emulated)"
remote /tmp/gen2.sock counters || fail "counters failed: $(cat /tmp/remote.out)"
grep -q same_as_parent_pages /tmp/remote.out || fail "no snapshot counters after the diff"
tick3=$(last_tick /tmp/vmm-gen2.log)
kill_vmm /tmp/gen2.sock

# --- restore the chain snap2 <- snap3 -------------------------------------------------------
launch /tmp/vmm-chain.log --restore "source_url=file://$snap3,memory_restore_mode=copy,resume=true"
check_continues /tmp/vmm-chain.log "$tick3"
echo poweroff >&3
wait_for_line /tmp/vmm-chain.log 'EXT-L2-POWEROFF' 60 "$VMM_PID" || fail "chain: the guest did not power off"
wait_exit "$VMM_PID" 60 || fail "chain: ext-vmm still running after the guest's poweroff"
[ "$EXIT_STATUS" -eq 0 ] || fail "chain: ext-vmm exited with $EXIT_STATUS"
pass
