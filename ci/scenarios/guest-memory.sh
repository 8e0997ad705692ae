# Scenario guest-memory: captures the memory of a real, booted L2 Linux guest for
# ext-snapshot's tests (ext-snapshot/tests/real_guest.rs). QEMU/KVM in L1 runs the L2 guest
# with ext.test=ticker (a detached crun container, then a tick every 0.5 s) on 512 MiB of
# file-backed shared memory in a tmpfs, so the file's holes are exactly the guest pages the
# host never populated. Once the guest has ticked for a while QEMU is frozen (SIGSTOP: vCPU
# and devices stop, memory is stable) and GNU tar --sparse (holes found with SEEK_DATA, so
# pages the guest zeroed stay data, distinct from holes) writes the file and a description to
# the output disk. ci/guest-memory-image runs this and unpacks the result on the host.
# lab-needs: qemu
# lab-needs: tool tar
# lab-needs: outdisk 1024
# shellcheck source=ci/scenarios/lib.sh
. /opt/ext/scenarios/lib.sh

ticks=20
command -v qemu-system-x86_64 >/dev/null || fail "qemu-system-x86_64 is not in the lab image"
# By full path: busybox sh runs its own applets (tar among them) before looking at PATH.
gnu_tar=/opt/ext/bin/tar
[ -x "$gnu_tar" ] || fail "GNU tar is not in the lab image"
[ -b /dev/vda ] || fail "no output disk /dev/vda (virtio_pci/virtio_blk not loaded in L1?)"

# L1's /dev/shm is a plain directory on the initramfs (ramfs: no holes); the memory file must
# live on a tmpfs for SEEK_DATA to report what the guest touched.
mkdir -p /dev/shm
mount -t tmpfs -o size=600m tmpfs /dev/shm || fail "cannot mount a tmpfs on /dev/shm"
mem=/dev/shm/l2mem
cmdline="console=ttyS0 loglevel=4 panic=-1 ext.test=ticker"

start_background /tmp/l2.log 400 qemu-system-x86_64 -accel kvm -M q35,memory-backend=l2mem \
    -cpu host -m 512 -object "memory-backend-file,id=l2mem,size=512M,mem-path=$mem,share=on" \
    -smp 1 -nographic -no-reboot -nic none -vga none \
    -kernel "$L2_KERNEL" -initrd "$L2_INITRAMFS" -append "$cmdline"
wait_for_line /tmp/l2.log 'EXT-L2-INIT' 180 "$BG_PID" || fail "L2 under QEMU did not reach its init"
metric "l2_boot_s=$(since "$BG_STARTED") (QEMU start to EXT-L2-INIT, L1 clock)"
# Console lines end in CR LF: match the number followed by anything but a digit.
wait_for_line /tmp/l2.log "EXT-TICK ${ticks}[^0-9]" 120 "$BG_PID" || fail "L2 did not tick $ticks times"
grep -q 'EXT-L2-FAIL' /tmp/l2.log && fail "L2 reported $(grep -m1 'EXT-L2-FAIL' /tmp/l2.log)"

# start_background's pid is the timeout wrapper: freeze QEMU itself (the only one in L1).
qemu_pid=$(pidof qemu-system-x86_64) || fail "QEMU is not running"
kill -STOP "$qemu_pid" || fail "cannot stop QEMU"
metric "l2_memory_allocated_kib=$(du -k "$mem" | cut -f1) of $((512 * 1024)) (tmpfs blocks after $ticks ticks)"

mkdir -p /tmp/out
{
    echo "source: ci/scenarios/guest-memory.sh (lab L1, QEMU/KVM, q35, memory-backend-file on tmpfs, share=on)"
    echo "l2_kernel_cmdline: $cmdline"
    echo "frozen_after: EXT-TICK $ticks"
    echo "l1_kernel: $(uname -r)"
    echo "l2_memory_allocated_kib: $(du -k "$mem" | cut -f1)"
    echo "layout: one region, guest physical address 0, 512 MiB (q35 with 512 MiB has no PCI hole below it)"
} >/tmp/out/info.txt
tar_started=$(now)
"$gnu_tar" -c --sparse --hole-detection=seek -f /dev/vda -C /tmp/out info.txt -C /dev/shm l2mem \
    || fail "tar to the output disk failed"
sync
metric "l2_memory_tar_s=$(since "$tar_started") (sparse tar to the output disk, L1 clock)"
kill -KILL "$qemu_pid"
pass
