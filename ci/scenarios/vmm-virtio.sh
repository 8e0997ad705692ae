# Scenario vmm-virtio: ext-vmm's devices seen from inside a real guest. Two vCPUs, 4 GiB of
# memfd-backed shared memory (so RAM continues above the 32-bit MMIO gap; L1 only touches what
# the guest uses), a virtio-blk disk and the virtio console; the L2 shell on the serial console
# is driven through ext-vmm's stdin (serial input), reads a marker the host put on the disk,
# writes one back, writes to hvc0, counts its CPUs, and powers off.
. /opt/ext/scenarios/lib.sh

log=/tmp/l2-virtio.log
disk=/tmp/vmm-virtio-disk.img
input=/tmp/vmm-virtio-input

dd if=/dev/zero of="$disk" bs=1M count=8 2>/dev/null || fail "cannot create the disk image"
printf 'EXT-DISK-MARKER' | dd of="$disk" bs=512 seek=100 conv=notrunc 2>/dev/null
rm -f "$input"
mkfifo "$input" || fail "mkfifo failed"
# Read-write open: neither side blocks, and ext-vmm's stdin stays open while we write.
exec 3<>"$input"

: >"$log"
VMM_STARTED=$(now)
timeout -s KILL 300 ext-vmm --kernel "$L2_KERNEL" --initramfs "$L2_INITRAMFS" \
    --cmdline "console=ttyS0 loglevel=4 panic=-1" \
    --cpus boot=2 --memory size=4G,shared=on --serial tty \
    --disk "path=$disk" <&3 >"$log" 2>&1 &
VMM_PID=$!
_ext_background_pids="$_ext_background_pids $VMM_PID"
follow_log "$log" ext-vmm

wait_for_line "$log" 'EXT-L2-INIT' 180 "$VMM_PID" || fail "L2 did not reach its init"
metric "l2_boot_s=$(since "$VMM_STARTED") vmm=ext-vmm cpus=2 memory=4G,shared=on (ext-vmm start to EXT-L2-INIT, L1 clock)"
sleep 2
# Markers are computed in the guest so the echoed command line never matches them.
echo 'echo EXT-CPUS-$(grep -c ^processor /proc/cpuinfo)' >&3
echo 'echo EXT-MEMKB-$(awk "/MemTotal/ { print \$2 }" /proc/meminfo)' >&3
echo 'echo EXT-VIRTIO-$(ls /sys/bus/virtio/devices | wc -l)' >&3
echo 'echo EXT-SIZE-$(cat /sys/block/vda/size)' >&3
echo 'echo EXT-READ-$(dd if=/dev/vda bs=512 skip=100 count=1 2>/dev/null | head -c 15)' >&3
echo 'echo EXT-HVC-$((40 + 2)) >/dev/hvc0' >&3
echo 'printf EXT-DISK-WRITTEN | dd of=/dev/vda bs=512 seek=200 conv=fsync 2>/dev/null; echo EXT-WROTE-$?' >&3
wait_for_line "$log" 'EXT-WROTE-[0-9]' 60 "$VMM_PID" || fail "the guest shell never ran the commands"
echo 'poweroff -f' >&3

grep -q 'EXT-CPUS-2' "$log" || fail "the guest does not see 2 CPUs"
mem_kb=$(sed -n 's/.*EXT-MEMKB-\([0-9][0-9]*\).*/\1/p' "$log" | head -n 1)
[ -n "$mem_kb" ] && [ "$mem_kb" -gt 3800000 ] || fail "the guest sees ${mem_kb:-no} kB of RAM, not ~4 GiB"
grep -q 'EXT-VIRTIO-2' "$log" || fail "the guest did not bind 2 virtio-mmio devices"
grep -q 'EXT-SIZE-16384' "$log" || fail "virtio-blk capacity is not 16384 sectors"
grep -q 'EXT-READ-EXT-DISK-MARKER' "$log" || fail "the guest did not read the host's marker from vda"
grep -q 'EXT-HVC-42' "$log" || fail "output to hvc0 did not come out of ext-vmm"
grep -q 'EXT-WROTE-0' "$log" || fail "the guest's write to vda failed"
wait_exit "$VMM_PID" 60 || fail "ext-vmm still running 60 s after poweroff"
[ "$EXIT_STATUS" -eq 0 ] || fail "ext-vmm exited with status $EXIT_STATUS"
dd if="$disk" bs=512 skip=200 count=1 2>/dev/null | grep -q 'EXT-DISK-WRITTEN' \
    || fail "the guest's write did not reach the disk image"
metric "l2_run_s=$(since "$VMM_STARTED") vmm=ext-vmm cpus=2 (start to exit, with shell commands)"
pass
