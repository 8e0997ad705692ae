# lab-needs: cloud-hypervisor-patched
# Scenario ch-snapshot: the snapshot-restore scenario's guest and workload under the patched
# Cloud Hypervisor v53.0 (integration/cloud-hypervisor/), seccomp on, driven by its own
# ch-remote. The L2 guest runs ext-work (32 MiB of seeded memory, "EXT-WORK <n> <checksum> ok"
# every tick) and a detached crun container, and reports its container count every 2 s by
# itself (ext.work_report=1: Cloud Hypervisor's --serial tty takes no input from a FIFO). VM A
# is paused and snapshotted (guest memory as memory.ext-snapshot, no memory-ranges), then
# killed by its PID. The snapshot is restored with memory_restore_mode=copy (vm.restore into a
# VMM started with only --api-socket) and ondemand (--restore): each guest continues from A's
# last tick with its memory sum intact, both print the same checksum for the same tick, and
# the container still runs. The ondemand VM's resident memory is printed 10 s after resume;
# it is snapshotted again, that snapshot restores and continues too. A has Cloud Hypervisor's
# in-process balloon (--balloon size=64M, which the guest's driver inflates at boot): both
# snapshots type exactly those 16384 pages Invalid (ext-snapshot inspect), the second one
# because the restored balloon carries its pages in its state.
# shellcheck source=ci/scenarios/lib.sh
. /opt/ext/scenarios/lib.sh

CH=/opt/ext/bin/cloud-hypervisor-patched
[ -x "$CH" ] || fail "the patched cloud-hypervisor is not in the lab image (# lab-needs: cloud-hypervisor-patched)"
[ -x /opt/ext/bin/ch-remote ] || fail "ch-remote is not in the lab image"
[ -x /opt/ext/bin/ext-snapshot ] || fail "ext-snapshot is not in the lab image"
snap1=/tmp/snap1
snap2=/tmp/snap2
cmdline="console=ttyS0 loglevel=4 panic=-1 ext.test=work ext.work_mib=32 ext.work_report=1"

# Starts the patched cloud-hypervisor: $1 log, then its arguments (VMM_PID).
launch() {
    launch_ch "$CH" "$@"
}

# Pauses the VM behind socket $1 and snapshots it into directory $2 (created first, as
# ch-remote requires); checks the memory is an ext-snapshot and prints size and time.
pause_and_snapshot() {
    ch_remote "$1" pause || fail "pause failed: $(cat /tmp/ch-remote.out)"
    mkdir -p "$2"
    _t=$(now)
    ch_remote "$1" snapshot "file://$2" || fail "snapshot to $2 failed: $(cat /tmp/ch-remote.out)"
    metric "snapshot_s=$(since "$_t") dir=$2 du_kib=$(du -k "$2" | tail -n 1 | cut -f1) memory_kib=$(du -k "$2/memory.ext-snapshot" | cut -f1) (L1 clock, emulated)"
    ls -ls "$2"
    [ -f "$2/memory.ext-snapshot" ] || fail "$2 holds no memory.ext-snapshot"
    [ ! -e "$2/memory-ranges" ] || fail "$2 holds a memory-ranges next to the ext-snapshot"
    grep -q 'ext-snapshot/1' "$2/state.json" || fail "$2/state.json does not record memory_format ext-snapshot/1"
    /opt/ext/bin/ext-snapshot inspect --json "$2/memory.ext-snapshot" >/tmp/inspect.json \
        || fail "ext-snapshot inspect of $2 failed"
    _invalid=$(tr -d ' \n' </tmp/inspect.json | sed -n 's/.*"invalid":\([0-9]*\).*/\1/p')
    metric "snapshot_pages dir=$2 $(tr -d ' \n' </tmp/inspect.json | sed -n 's/.*"pages":{\([^}]*\)}.*/\1/p' | tr -d '"')"
    [ "$_invalid" = 16384 ] || fail "$2: ${_invalid:-no} pages typed invalid, the balloon holds 16384"
}

# Checks that the restored guest in log $1 continues after tick $2 and that its container
# runs (the guest reports it every 2 s); sets CHECK_LINE to its line for tick $2 + 2.
check_continues() {
    check_ticks_continue "$1" "$2"
    wait_for_line "$1" 'EXT-CONTAINERS running=1' 60 "$VMM_PID" \
        || fail "$1: the container is not listed as running after restore"
    ! grep -q 'EXT-CONTAINERS running=0' "$1" || fail "$1: the container stopped"
    echo "ch-snapshot: $1 continued from tick $2: $CHECK_LINE"
}

# --- A: boot, run, snapshot, kill ----------------------------------------------------------
launch /tmp/ch-a.log --kernel "$L2_KERNEL" --initramfs "$L2_INITRAMFS" --cmdline "$cmdline" \
    --cpus boot=1 --memory size=384M --balloon size=64M --serial tty --console off --api-socket /tmp/a.sock
wait_for_line /tmp/ch-a.log 'EXT-WORK 3 [0-9a-f]+ ok' 300 "$VMM_PID" || fail "the workload did not start in L2"
wait_for_line /tmp/ch-a.log 'EXT-CONTAINERS running=1' 60 "$VMM_PID" || fail "the container is not running before the snapshot"
ch_remote /tmp/a.sock info >/dev/null || fail "vm.info failed"
tries=0
until tr -d ' \n' </tmp/ch-remote.out | grep -q '"memory_actual_size":335544320'; do
    tries=$((tries + 1)); [ "$tries" -lt 120 ] || fail "the guest did not inflate the 64 MiB balloon: $(grep -o '"memory_actual_size":[0-9]*' /tmp/ch-remote.out)"
    sleep 1
    ch_remote /tmp/a.sock info >/dev/null
done
pause_and_snapshot /tmp/a.sock "$snap1"
tick1=$(last_tick /tmp/ch-a.log)
kill_vmm_pid
echo "ch-snapshot: A stopped after tick $tick1"

# --- copy, through vm.restore on a VMM without a VM -----------------------------------------
launch /tmp/ch-copy.log --api-socket /tmp/copy.sock
wait_api_socket /tmp/copy.sock
t=$(now)
ch_remote /tmp/copy.sock restore "source_url=file://$snap1,memory_restore_mode=copy" \
    || fail "vm.restore (copy) failed: $(cat /tmp/ch-remote.out)"
metric "restore_s=$(since "$t") mode=copy (vm.restore, L1 clock, emulated)"
ch_remote /tmp/copy.sock info >/dev/null || fail "vm.info after restore failed"
grep -q '"Paused"' /tmp/ch-remote.out || fail "the restored VM is not Paused"
ch_remote /tmp/copy.sock resume || fail "resume after restore failed: $(cat /tmp/ch-remote.out)"
check_continues /tmp/ch-copy.log "$tick1"
line_copy=$CHECK_LINE
metric "resident_kib=$(resident_kib "$VMM_PID") mode=copy guest_kib=393216"
kill_vmm_pid

# --- ondemand, through --restore; resident memory; snapshot again ---------------------------
launch /tmp/ch-ondemand.log --api-socket /tmp/ondemand.sock \
    --restore "source_url=file://$snap1,memory_restore_mode=ondemand"
wait_api_socket /tmp/ondemand.sock
ch_remote /tmp/ondemand.sock resume || fail "resume after the ondemand restore failed: $(cat /tmp/ch-remote.out)"
check_continues /tmp/ch-ondemand.log "$tick1"
[ "$CHECK_LINE" = "$line_copy" ] || fail "ondemand printed '$CHECK_LINE', copy printed '$line_copy'"
sleep 10
metric "resident_kib=$(resident_kib "$VMM_PID") mode=ondemand after_10s=1 guest_kib=393216 snapshot_memory_kib=$(du -k "$snap1/memory.ext-snapshot" | cut -f1)"
wait_for_line /tmp/ch-ondemand.log "EXT-WORK $((tick1 + 4)) " 60 "$VMM_PID" || fail "ondemand stalled"
pause_and_snapshot /tmp/ondemand.sock "$snap2"
tick2=$(last_tick /tmp/ch-ondemand.log)
kill_vmm_pid

# --- the second-generation snapshot ---------------------------------------------------------
launch /tmp/ch-gen2.log --api-socket /tmp/gen2.sock --restore "source_url=file://$snap2"
wait_api_socket /tmp/gen2.sock
ch_remote /tmp/gen2.sock resume || fail "resume of the second snapshot failed: $(cat /tmp/ch-remote.out)"
check_continues /tmp/ch-gen2.log "$tick2"
kill_vmm_pid
! grep -q 'EXT-L2-FAIL' /tmp/ch-a.log /tmp/ch-copy.log /tmp/ch-ondemand.log /tmp/ch-gen2.log \
    || fail "a guest reported a failure"
pass
