# lab-needs: cloud-hypervisor-patched
# lab-needs: tool curl
# Scenario ch-balloon: vhost-user-mem beside the patched Cloud Hypervisor v53.0, with a real
# Linux guest's virtio_balloon driver. The patched generic vhost-user frontend forwards the
# backend's device feature bits, so the guest negotiates statistics and free page reporting
# (stock v53 negotiates neither: scenario balloon). The guest fills 256 MiB of tmpfs and
# removes it by itself (ext.balloon_auto=1: --serial tty takes no console input from a FIFO);
# free page reporting returns that memory to the host (the memfd's allocated bytes, measured by
# the daemon). The balloon is inflated by 128 MiB through the daemon's control API; Cloud
# Hypervisor's vm.snapshot (given the daemon's control socket) types exactly those pages
# Invalid. The snapshot is restored (copy) in a new Cloud Hypervisor with the same daemon: the
# guest continues, the daemon still holds the balloon's config (128 MiB), and the balloon
# deflates to 0 after the restore.
# shellcheck source=ci/scenarios/lib.sh
. /opt/ext/scenarios/lib.sh
# shellcheck source=ci/scenarios/balloon-lib.sh
. /opt/ext/scenarios/balloon-lib.sh

CH=/opt/ext/bin/cloud-hypervisor-patched
for _tool in "$CH" /opt/ext/bin/ch-remote /opt/ext/bin/ext-snapshot; do
    [ -x "$_tool" ] || fail "$_tool is not in the lab image"
done
command -v vhost-user-mem >/dev/null || fail "vhost-user-mem is not in the lab image (did it build?)"
balloon_dev="device_type=balloon,socket=$VU_SOCK,queue_sizes=[256,256,256,256],control_socket=$VU_API"
cmdline="console=ttyS0 loglevel=4 panic=-1 ext.test=balloon ext.balloon_auto=1"

# Starts the patched cloud-hypervisor: $1 log, then its arguments (VMM_PID).
launch() {
    launch_ch "$CH" "$@"
}

# --- boot with the balloon: features, free page reporting --------------------------------
start_daemon /tmp/vum.log
launch /tmp/ch-a.log --kernel "$L2_KERNEL" --initramfs "$L2_INITRAMFS" --cmdline "$cmdline" \
    --cpus boot=1 --memory size=512M,shared=on --serial tty --console off --api-socket /tmp/a.sock \
    --generic-vhost-user "$balloon_dev"
wait_for_line /tmp/ch-a.log 'EXT-BALLOON-FEATURES' 300 "$VMM_PID" || fail "the guest did not start"
metric "balloon_features vmm=cloud-hypervisor-patched guest_bits=$(sed -n 's/.*EXT-BALLOON-FEATURES \([01]*\).*/\1/p' /tmp/ch-a.log | tail -n 1 | cut -c1-8)"
[ "$(guest_bit /tmp/ch-a.log 1)" = 1 ] || fail "patched CH: STATS_VQ not negotiated"
[ "$(guest_bit /tmp/ch-a.log 5)" = 1 ] || fail "patched CH: REPORTING not negotiated"
wait_for_line /tmp/ch-a.log 'EXT-FILLED fill' 300 "$VMM_PID" || fail "the guest did not fill 256 MiB"
status
alloc_filled=$ALLOC
wait_for_line /tmp/ch-a.log 'EXT-DROPPED' 120 "$VMM_PID" || fail "the guest did not drop its 256 MiB"
wait_alloc_at_most $((alloc_filled - 256 * MIB * 8 / 10)) 30
returned_s=$RETURNED_S
metric "free_page_reporting vmm=cloud-hypervisor-patched freed_kib=262144 allocated_filled_kib=$((alloc_filled / 1024)) allocated_after_kib=$((ALLOC / 1024)) returned_kib=$(((alloc_filled - ALLOC) / 1024)) seconds=${returned_s:-timeout} (L1 clock, emulated)"
[ -n "$returned_s" ] || fail "free page reporting under patched CH returned $(((alloc_filled - ALLOC) / 1024)) KiB of the 262144 KiB freed within 30 s"
vu GET stats || fail "stats failed"

# --- inflate by 128 MiB; snapshot types it Invalid ------------------------------------------
vu PUT resize "{\"target_bytes\":$((128 * MIB))}" || fail "resize to 128 MiB failed"
wait_actual 32768 180 || fail "the guest did not inflate to 32768 pages (actual $ACTUAL)"
tick=$(sed -n 's/.*EXT-TICK \([0-9][0-9]*\).*/\1/p' /tmp/ch-a.log | tail -n 1)
ch_remote /tmp/a.sock pause || fail "pause failed: $(cat /tmp/ch-remote.out)"
mkdir -p /tmp/snap
ch_remote /tmp/a.sock snapshot file:///tmp/snap || fail "snapshot failed: $(cat /tmp/ch-remote.out)"
/opt/ext/bin/ext-snapshot inspect --json /tmp/snap/memory.ext-snapshot >/tmp/inspect.json \
    || fail "ext-snapshot inspect failed"
invalid=$(tr -d ' \n' </tmp/inspect.json | sed -n 's/.*"invalid":\([0-9]*\).*/\1/p')
metric "snapshot vmm=cloud-hypervisor-patched $(tr -d ' \n' </tmp/inspect.json | sed -n 's/.*"pages":{\([^}]*\)}.*/\1/p' | tr -d '"') memory_du_kib=$(du -k /tmp/snap/memory.ext-snapshot | cut -f1)"
[ "${invalid:-0}" -ge 32768 ] || fail "the snapshot typed ${invalid:-0} pages Invalid, the balloon holds 32768"
kill -KILL "$VMM_PID"
wait_exit "$VMM_PID" 30 || fail "cloud-hypervisor survived SIGKILL"

# --- restore (copy) with the same daemon; the balloon's config survived; deflate -------------
launch /tmp/ch-b.log --api-socket /tmp/b.sock --restore "source_url=file:///tmp/snap"
wait_api_socket /tmp/b.sock
ch_remote /tmp/b.sock resume || fail "resume failed: $(cat /tmp/ch-remote.out)"
wait_for_line /tmp/ch-b.log "EXT-TICK $((tick + 2))" 180 "$VMM_PID" || fail "the restored guest did not continue after tick $tick"
status
[ "$ACTUAL" = 32768 ] || fail "after the restore the daemon reports $ACTUAL balloon pages, not 32768"
vu PUT resize '{"target_bytes":0}' || fail "resize to 0 failed"
wait_actual 0 180 || fail "the restored guest did not deflate (actual $ACTUAL)"
metric "restore vmm=cloud-hypervisor-patched mode=copy balloon_pages_after_restore=32768 deflated_to=0"
kill -KILL "$VMM_PID"
wait_exit "$VMM_PID" 30
kill -KILL "$VU_PID"
wait_exit "$VU_PID" 30
! grep -q 'EXT-L2-FAIL' /tmp/ch-a.log /tmp/ch-b.log || fail "a guest reported a failure"
pass
