# Scenario balloon: vhost-user-mem, the out-of-process virtio-balloon, beside ext-vmm and
# beside stock Cloud Hypervisor v53.0, with a real Linux guest's virtio_balloon driver.
#
# ext-vmm (--memory shared=on, --generic-vhost-user device_type=balloon): the guest negotiates
# statistics and free page reporting through ext-vmm's frontend. It fills 256 MiB of tmpfs and
# removes it; free page reporting must return at least 90% of it to the host (the memfd's
# allocated bytes, measured by the daemon) within 10 s. The balloon is inflated by 128 MiB
# through the daemon's control API (the guest is told through the config-change message) and
# the inflated pages leave the memfd. ext-vmm's own snapshot (vm.snapshot) and the daemon's
# snapshot both type the inflated pages Invalid. The snapshot is restored in a new ext-vmm with
# the same daemon, with copy and then on demand through `vhost-user-mem serve` (the page
# server): each time the guest continues, the balloon deflates to 0 and the guest reuses the
# memory. The daemon is killed with SIGKILL and started again: the VM runs on, the frontend
# reconnects, and the balloon inflates again.
# Stock Cloud Hypervisor v53.0 with the same daemon: inflating through the daemon's API returns
# the memory to the host, deflating gives it back to the guest (its MemTotal); its generic
# vhost-user frontend forwards no device feature bits, so statistics and reporting are not
# negotiated there (shown as the guest's feature bits).
# lab-needs: cloud-hypervisor
# lab-needs: tool curl
# shellcheck source=ci/scenarios/lib.sh
. /opt/ext/scenarios/lib.sh
# shellcheck source=ci/scenarios/balloon-lib.sh
. /opt/ext/scenarios/balloon-lib.sh

command -v ext-remote >/dev/null || fail "ext-remote is not in the lab image (did it build?)"
command -v vhost-user-mem >/dev/null || fail "vhost-user-mem is not in the lab image (did it build?)"
CH=/opt/ext/bin/cloud-hypervisor
input=/tmp/balloon-input
rm -f "$input"
mkfifo "$input" || fail "mkfifo failed"
exec 3<>"$input"

# Starts a VMM in the background with the console FIFO as stdin: $1 log, then the command.
launch() {
    _log=$1
    shift
    : >"$_log"
    "$@" <&3 >"$_log" 2>&1 &
    VMM_PID=$!
    _ext_background_pids="$_ext_background_pids $VMM_PID"
    follow_log "$_log" "$(basename "$_log" .log)"
}

# Sends console command $2 to the guest of log $1 and waits up to $4 s for a new line matching
# $3 (lines from earlier commands do not count).
guest_cmd() {
    _before=$(count_lines "$1" "$3")
    echo "$2" >&3
    _deadline=$(awk -v a="$(now)" -v t="$4" 'BEGIN { printf "%.2f", a + t }')
    while [ "$(count_lines "$1" "$3")" -le "$_before" ]; do
        kill -0 "$VMM_PID" 2>/dev/null || return 2
        awk -v a="$(now)" -v d="$_deadline" 'BEGIN { exit !(a >= d) }' && return 1
        sleep 0.2
    done
}

balloon_dev="device_type=balloon,socket=$VU_SOCK,queue_sizes=[256,256,256,256]"
cmdline="console=ttyS0 loglevel=4 panic=-1 ext.test=balloon"

# --- ext-vmm: boot with the balloon -------------------------------------------------------
start_daemon /tmp/vum-1.log
launch /tmp/vmm-a.log ext-vmm --kernel "$L2_KERNEL" --initramfs "$L2_INITRAMFS" --cmdline "$cmdline" \
    --cpus boot=1 --memory size=512M,shared=on --serial tty --api-socket path=/tmp/a.sock \
    --generic-vhost-user "$balloon_dev,control_socket=$VU_API"
wait_for_line /tmp/vmm-a.log 'EXT-TICK 3' 300 "$VMM_PID" || fail "the guest did not start"
[ "$(guest_bit /tmp/vmm-a.log 1)" = 1 ] || fail "ext-vmm: STATS_VQ not negotiated"
[ "$(guest_bit /tmp/vmm-a.log 2)" = 1 ] || fail "ext-vmm: DEFLATE_ON_OOM not negotiated"
[ "$(guest_bit /tmp/vmm-a.log 5)" = 1 ] || fail "ext-vmm: REPORTING not negotiated"
metric "balloon_features vmm=ext-vmm guest_bits=$(sed -n 's/.*EXT-BALLOON-FEATURES \([01]*\).*/\1/p' /tmp/vmm-a.log | tail -n 1 | cut -c1-8)"
# Linux reports what is free at boot too: let that settle.
sleep 5
status
alloc_boot=$ALLOC

# --- free page reporting ------------------------------------------------------------------
guest_cmd /tmp/vmm-a.log fill 'EXT-FILLED fill' 240 || fail "the guest did not fill 256 MiB"
sleep 1
status
alloc_filled=$ALLOC
guest_cmd /tmp/vmm-a.log drop 'EXT-DROPPED' 60 || fail "the guest did not drop its 256 MiB"
# (A few MiB of the fill can land on guest pages the host already had: free fragments below
# 2 MiB, which Linux never reports; returned_of_added_pct shows it.)
added=$((alloc_filled - alloc_boot))
wait_alloc_at_most $((alloc_filled - 256 * MIB * 9 / 10)) 10
returned_s=$RETURNED_S
returned=$((alloc_filled - ALLOC))
metric "free_page_reporting freed_kib=262144 allocated_before_kib=$((alloc_boot / 1024)) allocated_filled_kib=$((alloc_filled / 1024)) added_kib=$((added / 1024)) allocated_after_kib=$((ALLOC / 1024)) returned_kib=$((returned / 1024)) returned_of_freed_pct=$((returned * 100 / (256 * MIB))) returned_of_added_pct=$((returned * 100 / added)) seconds=${returned_s:-timeout} (L1 clock, emulated)"
[ -n "$returned_s" ] || fail "free page reporting returned $((returned / 1024)) KiB of the 262144 KiB freed within 10 s (90% needed; the fill added $((added / 1024)) KiB)"
vu GET stats || fail "stats failed"

# --- inflate by 128 MiB ----------------------------------------------------------------------
# Free memory is already back on the host (reported): inflating it cannot drop the allocation
# again, but the inflated pages must stay out of it (the stock Cloud Hypervisor part below, where
# reporting is not negotiated, shows the drop).
sleep 5
status
alloc_before=$ALLOC
vu PUT resize "{\"target_bytes\":$((128 * MIB))}" || fail "resize to 128 MiB failed"
wait_actual 32768 180 || fail "the guest did not inflate to 32768 pages (actual $ACTUAL)"
inflated=$(field bytes_inflated)
metric "inflate vmm=ext-vmm target_kib=131072 allocated_before_kib=$((alloc_before / 1024)) allocated_after_kib=$((ALLOC / 1024)) dropped_kib=$(((alloc_before - ALLOC) / 1024)) inflated_bytes=$inflated (the free memory it took was already returned by reporting)"
[ "$ALLOC" -le $((alloc_before + 16 * MIB)) ] || fail "inflating 128 MiB made the host allocate $(((ALLOC - alloc_before) / 1024)) KiB"
[ "$inflated" -ge $((128 * MIB)) ] || fail "the daemon counts $inflated bytes inflated"

# --- snapshots: ext-vmm's and the daemon's ------------------------------------------------
tick=$(sed -n 's/.*EXT-TICK \([0-9][0-9]*\).*/\1/p' /tmp/vmm-a.log | tail -n 1)
remote /tmp/a.sock pause || fail "pause failed"
remote /tmp/a.sock snapshot --destination-url file:///tmp/snap-a || fail "ext-vmm snapshot failed: $(cat /tmp/remote.out)"
remote /tmp/a.sock counters || fail "counters failed"
vmm_invalid=$(counter snapshot invalid_pages)
vmm_data=$(counter snapshot data_pages)
vu PUT snapshot '{"destination_url":"file:///tmp/daemon-snap.ext"}' || fail "daemon snapshot failed"
daemon_invalid=$(field invalid)
metric "snapshot vmm=ext-vmm invalid_pages=$vmm_invalid invalid_kib_not_stored=$((vmm_invalid * 4)) data_pages=$vmm_data memory_du_kib=$(du -k /tmp/snap-a | tail -n 1 | cut -f1)"
metric "snapshot vmm=vhost-user-mem invalid_pages=$daemon_invalid file_du_kib=$(du -k /tmp/daemon-snap.ext | cut -f1) answer=$(tr -d ' \n' </tmp/vu.out | head -c 300)"
[ "${vmm_invalid:-0}" -ge 32768 ] || fail "ext-vmm's snapshot typed ${vmm_invalid:-0} pages Invalid, the balloon holds 32768"
[ "${daemon_invalid:-0}" -ge 32768 ] || fail "the daemon's snapshot typed ${daemon_invalid:-0} pages Invalid"
kill -KILL "$VMM_PID"
wait_exit "$VMM_PID" 30 || fail "ext-vmm survived SIGKILL"

# --- restore (copy) with the same daemon; deflate and reuse ---------------------------------
launch /tmp/vmm-b.log ext-vmm --restore "source_url=file:///tmp/snap-a,memory_restore_mode=copy,resume=true" \
    --api-socket path=/tmp/b.sock
wait_for_line /tmp/vmm-b.log "EXT-TICK $((tick + 2))" 180 "$VMM_PID" || fail "the restored guest did not continue after tick $tick"
vu PUT resize '{"target_bytes":0}' || fail "resize to 0 failed"
wait_actual 0 180 || fail "the restored guest did not deflate (actual $ACTUAL)"
guest_cmd /tmp/vmm-b.log reuse 'EXT-FILLED reuse' 240 || fail "the restored guest could not reuse 128 MiB"
status
metric "restore mode=copy deflated_to=0 reuse_allocated_kib=$((ALLOC / 1024))"
kill -KILL "$VMM_PID"
wait_exit "$VMM_PID" 30 || fail "ext-vmm (copy) survived SIGKILL"

# --- restore (ondemand through vhost-user-mem's page server) with the same daemon ------------
start_background /tmp/ps.log 1800 vhost-user-mem serve --snapshot /tmp/snap-a/memory.ext-snapshot \
    --socket /tmp/ps.sock
PS_PID=$BG_PID
tries=0
until [ -S /tmp/ps.sock ]; do
    tries=$((tries + 1)); [ "$tries" -lt 300 ] || fail "the page server never opened its socket"; sleep 0.1
done
launch /tmp/vmm-c.log ext-vmm \
    --restore "source_url=file:///tmp/snap-a,memory_restore_mode=ondemand,page_server=/tmp/ps.sock,resume=true" \
    --api-socket path=/tmp/c.sock
wait_for_line /tmp/vmm-c.log "EXT-TICK $((tick + 2))" 180 "$VMM_PID" || fail "the guest restored through the page server did not continue after tick $tick"
# The daemon's target is already 0 (the copy restore deflated): say it again, so the guest hears.
vu PUT resize '{"target_bytes":0}' || fail "resize to 0 failed"
wait_actual 0 180 || fail "the guest restored on demand did not deflate (actual $ACTUAL)"
guest_cmd /tmp/vmm-c.log reuse 'EXT-FILLED reuse' 240 || fail "the guest restored on demand could not reuse 128 MiB"
remote /tmp/c.sock counters >/dev/null || fail "counters failed"
metric "restore mode=ondemand page_server=1 deflated_to=0 page_server_failed=$(counter restore_ondemand page_server_failed) vmm_rss_kib=$(awk '/^VmRSS:/ { print $2 }' "/proc/$VMM_PID/status")"
[ "$(counter restore_ondemand page_server)" = 1 ] || fail "vm.counters does not show the page server: $(cat /tmp/remote.out)"

# --- the daemon dies and comes back ---------------------------------------------------------
kill -KILL "$VU_PID"
wait_exit "$VU_PID" 30 || fail "vhost-user-mem survived SIGKILL"
sleep 3
wait_for_line /tmp/vmm-c.log "EXT-TICK $(($(sed -n 's/.*EXT-TICK \([0-9][0-9]*\).*/\1/p' /tmp/vmm-c.log | tail -n 1) + 2))" 60 "$VMM_PID" \
    || fail "the VM stopped running without its balloon daemon"
start_daemon /tmp/vum-2.log
remote /tmp/c.sock counters >/dev/null
tries=0
until [ "$(counter vhost-user0 reconnects)" = 1 ]; do
    tries=$((tries + 1)); [ "$tries" -lt 60 ] || fail "the frontend did not reconnect: $(cat /tmp/remote.out)"
    sleep 1
    remote /tmp/c.sock counters >/dev/null
done
metric "reconnect disconnects=$(counter vhost-user0 disconnects) reconnects=$(counter vhost-user0 reconnects)"
vu PUT resize "{\"target_bytes\":$((64 * MIB))}" || fail "resize after the restart failed"
wait_actual 16384 180 || fail "the balloon did not work after the daemon's restart (actual $ACTUAL)"
guest_cmd /tmp/vmm-c.log poweroff 'EXT-L2-POWEROFF' 60 || fail "the guest did not power off"
# With an API socket the VMM outlives its VM, as Cloud Hypervisor does.
remote /tmp/c.sock shutdown-vmm || fail "vmm.shutdown failed: $(cat /tmp/remote.out)"
wait_exit "$VMM_PID" 60 || fail "ext-vmm did not exit after vmm.shutdown"
kill -KILL "$VU_PID" "$PS_PID"
wait_exit "$VU_PID" 30
wait_exit "$PS_PID" 30

# --- stock Cloud Hypervisor v53.0 -------------------------------------------------------------
[ -x "$CH" ] || fail "cloud-hypervisor is not in the lab image"
start_daemon /tmp/vum-3.log
# Its --serial tty reads no console input from a FIFO: the guest runs the steps by itself
# (ext.balloon_auto=1) and follows the balloon through MemTotal.
launch /tmp/ch.log "$CH" --kernel "$L2_KERNEL" --initramfs "$L2_INITRAMFS" \
    --cmdline "$cmdline ext.balloon_auto=1" \
    --cpus boot=1 --memory size=512M,shared=on --serial tty --console off --api-socket /tmp/ch.sock \
    --generic-vhost-user "$balloon_dev"
wait_for_line /tmp/ch.log 'EXT-DROPPED' 300 "$VMM_PID" || fail "the guest did not fill and drop under Cloud Hypervisor"
metric "balloon_features vmm=cloud-hypervisor guest_bits=$(sed -n 's/.*EXT-BALLOON-FEATURES \([01]*\).*/\1/p' /tmp/ch.log | tail -n 1 | cut -c1-8) (stock v53 forwards no device feature bits)"
[ "$(guest_bit /tmp/ch.log 5)" = 0 ] || fail "stock Cloud Hypervisor negotiated REPORTING: the README is wrong"
sleep 3
status
ch_before=$ALLOC
vu PUT resize "{\"target_bytes\":$((128 * MIB))}" || fail "CH: resize failed"
wait_actual 32768 180 || fail "CH: the guest did not inflate (actual $ACTUAL)"
ch_inflated=$ALLOC
wait_for_line /tmp/ch.log 'EXT-INFLATED' 60 "$VMM_PID" || fail "CH: the guest's MemTotal did not show the inflation"
metric "inflate vmm=cloud-hypervisor allocated_before_kib=$((ch_before / 1024)) allocated_after_kib=$((ch_inflated / 1024)) dropped_kib=$(((ch_before - ch_inflated) / 1024))"
[ $((ch_before - ch_inflated)) -ge $((128 * MIB * 9 / 10)) ] || fail "CH: inflating 128 MiB returned $(((ch_before - ch_inflated) / 1024)) KiB"
vu PUT resize '{"target_bytes":0}' || fail "CH: resize to 0 failed"
wait_actual 0 180 || fail "CH: the guest did not deflate (actual $ACTUAL)"
wait_for_line /tmp/ch.log 'EXT-DEFLATED' 120 "$VMM_PID" || fail "CH: the guest's MemTotal did not come back after the deflate"
metric "deflate vmm=cloud-hypervisor $(sed -n 's/.*\(EXT-DEFLATED MemTotal=[0-9]*\).*/\1/p' /tmp/ch.log | tail -n 1) inflated_MemTotal=$(sed -n 's/.*EXT-INFLATED MemTotal=\([0-9]*\).*/\1/p' /tmp/ch.log | tail -n 1)"
kill -KILL "$VMM_PID"
wait_exit "$VMM_PID" 30
! grep -q 'EXT-L2-FAIL' /tmp/vmm-a.log /tmp/vmm-b.log /tmp/vmm-c.log /tmp/ch.log || fail "a guest reported a failure: $(grep -h 'EXT-L2-FAIL' /tmp/vmm-a.log /tmp/vmm-b.log /tmp/vmm-c.log /tmp/ch.log | head -n 1)"
echo "lab balloon: PASS"
pass
