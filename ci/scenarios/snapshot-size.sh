# lab-needs: cloud-hypervisor
# Scenario snapshot-size: what a snapshot costs on disk and in time, against what the real,
# stock Cloud Hypervisor v53.0 writes for the same guest. The L2 guest has 1 GiB; ext-work
# touches 192 MiB and then frees half of it (the kernel runs with init_on_free=1, so freed
# pages become zero). For shared=off and shared=on, the same guest with the same workload runs
# first under ext-vmm (pause, vm.snapshot: our ext-snapshot file) and then under
# /opt/ext/bin/cloud-hypervisor (pause, `ch-remote snapshot file:///dir`: its memory-ranges
# file, dense for shared=off, the memfd's data extents for shared=on), one VMM after the
# other, never both at once. Printed side by side: guest memory size, bytes the guest really
# holds (MemTotal - MemFree), allocated (du) and apparent sizes of both memory files, both
# snapshot times (each API call timed on the L1 clock; ours also from vm.counters) and the
# ratios ours/Cloud Hypervisor. Cloud Hypervisor's --serial tty reads no input when stdin is
# not a terminal, so the guest drives its workload itself (ext.work_auto=1 in ci/guest/l2-init:
# meminfo, free, meminfo), under both VMMs alike. Lab timings are emulated: compare the ratios
# only. Needs a 4 GiB L1 (`ci/lab run snapshot-size --memory 4096`; integration/tests/lab.rs
# passes it): /tmp is a tmpfs of half of L1's memory and holds Cloud Hypervisor's dense 1 GiB
# memory-ranges for shared=off.
# shellcheck source=ci/scenarios/lib.sh
. /opt/ext/scenarios/lib.sh

CLOUD_HYPERVISOR=/opt/ext/bin/cloud-hypervisor
CH_REMOTE=/opt/ext/bin/ch-remote
command -v ext-remote >/dev/null || fail "ext-remote is not in the lab image (did it build?)"
for _tool in "$CLOUD_HYPERVISOR" "$CH_REMOTE"; do
    [ -x "$_tool" ] || fail "$_tool is not in the lab image (# lab-needs: cloud-hypervisor)"
done

guest_kib=1048576
cmdline="console=ttyS0 loglevel=4 panic=-1 init_on_free=1 ext.test=work ext.work_mib=192 ext.work_auto=1"

# `remote` (one ext-remote command, output in /tmp/remote.out) comes from lib.sh.

# Runs one ch-remote command: $1 socket, then the command; output to /tmp/ch-remote.out and,
# prefixed, to the console.
ch() {
    _sock=$1
    shift
    timeout -s KILL 600 "$CH_REMOTE" --api-socket "$_sock" "$@" >/tmp/ch-remote.out 2>&1
    _status=$?
    sed 's/^/ch-remote '"$1"'| /' /tmp/ch-remote.out
    return $_status
}

# The value of counter $2 in group $1 of the last `remote counters` output.
counter() {
    tr -d ' \n' </tmp/remote.out | sed -n 's/.*"'"$1"'":{\([^}]*\)}.*/\1/p' \
        | tr ',' '\n' | sed -n 's/^"'"$2"'":\([0-9]*\)$/\1/p'
}

# kB the guest holds (MemTotal - MemFree) by the $2-th EXT-MEMINFO line of log $1.
meminfo_used_kib() {
    grep 'EXT-MEMINFO' "$1" | sed -n "$2p" \
        | awk '{ for (i = 2; i <= NF; i++) { split($i, kv, "="); v[kv[1]] = kv[2] } print v["MemTotal:"] - v["MemFree:"] }'
}

# Follows the guest's own workload sequence in log $1 (VMM pid $2, label $3 for messages):
# ext-work running, meminfo, free, meminfo, two more ticks. Sets HELD_BEFORE and HELD (kB).
follow_workload() {
    wait_for_line "$1" 'EXT-WORK 2 [0-9a-f]+ ok' 300 "$2" || fail "$3: the workload did not start"
    wait_for_line "$1" 'EXT-WORK-FREED' 180 "$2" || fail "$3: the workload did not free memory"
    _tries=0
    while [ "$(count_lines "$1" 'EXT-MEMINFO')" -lt 2 ]; do
        _tries=$((_tries + 1))
        [ "$_tries" -lt 1800 ] || fail "$3: no second EXT-MEMINFO line after the free"
        kill -0 "$2" 2>/dev/null || fail "$3: the VMM exited during the workload"
        sleep 0.1
    done
    _freed_at=$(sed -n 's/.*EXT-WORK \([0-9][0-9]*\) [0-9a-f]* ok.*/\1/p' "$1" | tail -n 1)
    wait_for_line "$1" "EXT-WORK $((_freed_at + 2)) [0-9a-f]+ ok" 120 "$2" \
        || fail "$3: the workload stalled after the free"
    HELD_BEFORE=$(meminfo_used_kib "$1" 1)
    HELD=$(meminfo_used_kib "$1" 2)
    if [ -z "$HELD_BEFORE" ] || [ -z "$HELD" ]; then
        fail "$3: EXT-MEMINFO lines unreadable"
    fi
}

for shared in off on; do
    # --- ext-vmm ---------------------------------------------------------------------------
    log=/tmp/size-ext-$shared.log
    sock=/tmp/size-ext-$shared.sock
    dir=/tmp/size-ext-$shared
    start_vmm "$log" 900 --kernel "$L2_KERNEL" --initramfs "$L2_INITRAMFS" --cmdline "$cmdline" \
        --cpus boot=1 --memory "size=1G,shared=$shared" --serial tty --api-socket "path=$sock"
    follow_workload "$log" "$VMM_PID" "ext-vmm shared=$shared"
    held_before=$HELD_BEFORE
    held=$HELD

    remote "$sock" pause || fail "ext-vmm shared=$shared: pause failed: $(cat /tmp/remote.out)"
    t=$(now)
    remote "$sock" snapshot --destination-url "file://$dir" \
        || fail "ext-vmm shared=$shared: snapshot failed: $(cat /tmp/remote.out)"
    ours_ms=$(ms_since "$t")
    remote "$sock" counters >/dev/null || fail "counters failed: $(cat /tmp/remote.out)"
    ours_us=$(counter snapshot memory_micros)
    ours_total_us=$(counter snapshot micros)
    ours_alloc=$(counter snapshot allocated_bytes)
    data_pages=$(counter snapshot data_pages)
    zero_pages=$(counter snapshot zero_pages)
    unpopulated=$(counter snapshot unpopulated_pages)
    if [ -z "$ours_us" ] || [ -z "$ours_total_us" ] || [ -z "$ours_alloc" ]; then
        fail "ext-vmm shared=$shared: snapshot counters missing"
    fi
    [ -f "$dir/memory.ext-snapshot" ] || fail "ext-vmm shared=$shared: no $dir/memory.ext-snapshot"
    du_ours=$(du -k "$dir/memory.ext-snapshot" | cut -f1)
    size_ours=$(stat -c %s "$dir/memory.ext-snapshot")
    metric "snapshot_size shared=$shared vmm=ext-vmm guest_memory_kib=$guest_kib guest_held_kib=$held guest_held_before_free_kib=$held_before memory_file_du_kib=$du_ours memory_file_bytes=$size_ours data_pages=$data_pages zero_pages=$zero_pages unpopulated_pages=$unpopulated"
    metric "snapshot_time shared=$shared vmm=ext-vmm api_ms=$ours_ms memory_ms=$((ours_us / 1000)) total_ms=$((ours_total_us / 1000)) (api: the ext-remote call on the L1 clock; memory/total: vm.counters; emulated: compare ratios)"
    # The sparse file must not hold much more than the guest does, and never the whole guest.
    [ "$du_ours" -lt "$guest_kib" ] || fail "shared=$shared: the snapshot allocates the whole guest ($du_ours kB)"
    [ "$du_ours" -lt $((held + 65536)) ] \
        || fail "shared=$shared: the snapshot ($du_ours kB) holds far more than the guest ($held kB)"

    remote "$sock" shutdown || fail "vm.shutdown failed: $(cat /tmp/remote.out)"
    remote "$sock" shutdown-vmm || fail "vmm.shutdown failed: $(cat /tmp/remote.out)"
    wait_exit "$VMM_PID" 60 || fail "shared=$shared: ext-vmm did not exit"
    rm -rf "$dir"

    # --- Cloud Hypervisor v53.0 (stock), the same guest and workload -----------------------
    log=/tmp/size-ch-$shared.log
    sock=/tmp/size-ch-$shared.sock
    dir=/tmp/size-ch-$shared
    start_background "$log" 900 "$CLOUD_HYPERVISOR" --api-socket "path=$sock" \
        --kernel "$L2_KERNEL" --initramfs "$L2_INITRAMFS" --cmdline "$cmdline" \
        --cpus boot=1 --memory "size=1G,shared=$shared" --serial tty --console off
    ch_pid=$BG_PID
    follow_workload "$log" "$ch_pid" "cloud-hypervisor shared=$shared"
    ch_held_before=$HELD_BEFORE
    ch_held=$HELD

    ch "$sock" pause || fail "cloud-hypervisor shared=$shared: pause failed: $(cat /tmp/ch-remote.out)"
    # Cloud Hypervisor writes into an existing directory only.
    mkdir -p "$dir"
    t=$(now)
    ch "$sock" snapshot "file://$dir" \
        || fail "cloud-hypervisor shared=$shared: snapshot failed: $(cat /tmp/ch-remote.out)"
    ch_ms=$(ms_since "$t")
    ls -ls "$dir"
    [ -s "$dir/memory-ranges" ] \
        || fail "cloud-hypervisor shared=$shared: $dir/memory-ranges is missing or empty"
    du_ch=$(du -k "$dir/memory-ranges" | cut -f1)
    size_ch=$(stat -c %s "$dir/memory-ranges")
    metric "snapshot_size shared=$shared vmm=cloud-hypervisor guest_memory_kib=$guest_kib guest_held_kib=$ch_held guest_held_before_free_kib=$ch_held_before memory_file_du_kib=$du_ch memory_file_bytes=$size_ch (memory-ranges)"
    metric "snapshot_time shared=$shared vmm=cloud-hypervisor api_ms=$ch_ms (the ch-remote call on the L1 clock; emulated: compare ratios)"
    metric "snapshot_ratio shared=$shared du_ours_over_ch=$(ratio "$du_ours" "$du_ch") bytes_ours_over_ch=$(ratio "$size_ours" "$size_ch") time_ours_over_ch=$(ratio "$ours_ms" "$ch_ms") (time: both API calls on the L1 clock)"

    # Cloud Hypervisor is the peer, not under test: one that does not leave is killed. Its
    # vmm.shutdown of a paused VM was seen not to answer at all, so the call gets 30 s.
    timeout -s KILL 30 "$CH_REMOTE" --api-socket "$sock" shutdown-vmm >/tmp/ch-remote.out 2>&1 \
        || echo "snapshot-size: cloud-hypervisor shutdown-vmm failed or hung, killing it"
    sed 's/^/ch-remote shutdown-vmm| /' /tmp/ch-remote.out
    if ! wait_exit "$ch_pid" 60; then
        kill -KILL "$ch_pid" 2>/dev/null
        wait_exit "$ch_pid" 30 || fail "cloud-hypervisor $ch_pid survived SIGKILL"
    fi
    [ "$EXIT_STATUS" -eq 0 ] || echo "snapshot-size: cloud-hypervisor exited with status $EXIT_STATUS"
    rm -rf "$dir"
done
pass
