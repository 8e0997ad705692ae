# Scenario snapshot-size: what a snapshot costs on disk and in time, against what Cloud
# Hypervisor writes for the same memory. The L2 guest has 1 GiB; ext-work touches 192 MiB and
# then frees half of it (the kernel runs with init_on_free=1, so freed pages become zero).
# For shared=off and shared=on, one vm.snapshot with cloud_hypervisor_baseline writes our
# ext-snapshot file and, timed separately, Cloud Hypervisor's memory file (dense for
# shared=off, the memfd's data extents for shared=on). Printed side by side: guest memory
# size, bytes the guest really holds (MemTotal - MemFree), allocated bytes of both files, and
# both write times. Lab timings are emulated: compare the ratios only. Needs a 4 GiB L1
# (`ci/lab run snapshot-size --memory 4096`; integration/tests/lab.rs passes it).
# shellcheck source=ci/scenarios/lib.sh
. /opt/ext/scenarios/lib.sh

command -v ext-remote >/dev/null || fail "ext-remote is not in the lab image (did it build?)"
input=/tmp/size-input
rm -f "$input"
mkfifo "$input" || fail "mkfifo failed"
exec 3<>"$input"

remote() {
    # $1: socket, then the ext-remote command
    _sock=$1
    shift
    ext-remote --api-socket "$_sock" "$@" >/tmp/remote.out 2>&1
    _status=$?
    sed 's/^/ext-remote '"$1"'| /' /tmp/remote.out
    return $_status
}

# The value of counter $2 in group $1 of the last `remote counters` output.
counter() {
    tr -d ' \n' </tmp/remote.out | sed -n 's/.*"'"$1"'":{\([^}]*\)}.*/\1/p' \
        | tr ',' '\n' | sed -n 's/^"'"$2"'":\([0-9]*\)$/\1/p'
}

# Guest memory in use in kB, from the workload's `meminfo` console command: MemTotal - MemFree.
guest_used_kib() {
    _before=$(count_lines "$1" 'EXT-MEMINFO')
    echo meminfo >&3
    _tries=0
    while [ "$(count_lines "$1" 'EXT-MEMINFO')" -le "$_before" ]; do
        _tries=$((_tries + 1)); [ "$_tries" -lt 300 ] || fail "no meminfo answer"; sleep 0.1
    done
    grep 'EXT-MEMINFO' "$1" | tail -n 1 \
        | awk '{ for (i = 2; i <= NF; i++) { split($i, kv, "="); v[kv[1]] = kv[2] } print v["MemTotal:"] - v["MemFree:"] }'
}

for shared in off on; do
    log=/tmp/size-$shared.log
    sock=/tmp/size-$shared.sock
    dir=/tmp/size-$shared
    : >"$log"
    ext-vmm --kernel "$L2_KERNEL" --initramfs "$L2_INITRAMFS" \
        --cmdline "console=ttyS0 loglevel=4 panic=-1 init_on_free=1 ext.test=work ext.work_mib=192" \
        --cpus boot=1 --memory "size=1G,shared=$shared" --serial tty --api-socket "path=$sock" \
        <&3 >"$log" 2>&1 &
    VMM_PID=$!
    _ext_background_pids="$_ext_background_pids $VMM_PID"
    follow_log "$log" "size-$shared"
    wait_for_line "$log" 'EXT-WORK 2 [0-9a-f]+ ok' 300 "$VMM_PID" || fail "shared=$shared: the workload did not start"
    held_before=$(guest_used_kib "$log")
    echo free >&3
    wait_for_line "$log" 'EXT-WORK-FREED' 60 "$VMM_PID" || fail "shared=$shared: the workload did not free memory"
    freed_at=$(sed -n 's/.*EXT-WORK \([0-9][0-9]*\) [0-9a-f]* ok.*/\1/p' "$log" | tail -n 1)
    wait_for_line "$log" "EXT-WORK $((freed_at + 2)) [0-9a-f]+ ok" 60 "$VMM_PID" || fail "shared=$shared: workload stalled after free"
    held=$(guest_used_kib "$log")

    remote "$sock" pause || fail "pause failed: $(cat /tmp/remote.out)"
    remote "$sock" snapshot --destination-url "file://$dir" --cloud-hypervisor-baseline \
        || fail "shared=$shared: snapshot failed: $(cat /tmp/remote.out)"
    remote "$sock" counters >/dev/null || fail "counters failed: $(cat /tmp/remote.out)"
    ours_us=$(counter snapshot memory_micros)
    ours_total_us=$(counter snapshot micros)
    ours_alloc=$(counter snapshot allocated_bytes)
    base_us=$(counter snapshot baseline_micros)
    base_alloc=$(counter snapshot baseline_allocated_bytes)
    data_pages=$(counter snapshot data_pages)
    zero_pages=$(counter snapshot zero_pages)
    unpopulated=$(counter snapshot unpopulated_pages)
    if [ -z "$ours_us" ] || [ -z "$base_us" ] || [ -z "$ours_alloc" ] || [ -z "$base_alloc" ]; then
        fail "shared=$shared: snapshot counters missing"
    fi
    du_ours=$(du -k "$dir/memory.ext-snapshot" | cut -f1)
    du_base=$(du -k "$dir/baseline-memory" | cut -f1)
    metric "snapshot_size shared=$shared guest_memory_kib=1048576 guest_held_kib=$held guest_held_before_free_kib=$held_before ext_snapshot_du_kib=$du_ours ch_baseline_du_kib=$du_base data_pages=$data_pages zero_pages=$zero_pages unpopulated_pages=$unpopulated"
    metric "snapshot_time shared=$shared ext_snapshot_memory_ms=$((ours_us / 1000)) ext_snapshot_total_ms=$((ours_total_us / 1000)) ch_baseline_ms=$((base_us / 1000)) (emulated: compare ratios)"
    # The sparse file must not hold much more than the guest does, and never the whole guest.
    [ "$du_ours" -lt 1048576 ] || fail "shared=$shared: the snapshot allocates the whole guest ($du_ours kB)"
    [ "$du_ours" -lt $((held + 65536)) ] \
        || fail "shared=$shared: the snapshot ($du_ours kB) holds far more than the guest ($held kB)"

    remote "$sock" shutdown || fail "vm.shutdown failed: $(cat /tmp/remote.out)"
    remote "$sock" shutdown-vmm || fail "vmm.shutdown failed: $(cat /tmp/remote.out)"
    wait_exit "$VMM_PID" 60 || fail "shared=$shared: ext-vmm did not exit"
    rm -rf "$dir"
done
pass
