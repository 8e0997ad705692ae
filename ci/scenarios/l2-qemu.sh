# Scenario l2-qemu: boots the same L2 guest (PVH vmlinux + initramfs, ext.test=boot) under QEMU
# with KVM inside L1, then under ext-vmm, and reports both boot times measured on the same clock
# in the same lab run (absolute lab timings are emulated; the ratio is what means something).
# lab-needs: qemu
# shellcheck source=ci/scenarios/lib.sh
. /opt/ext/scenarios/lib.sh

cmdline="console=ttyS0 loglevel=4 panic=-1 ext.test=boot"

qemu_log=/tmp/l2-qemu.log
start_background "$qemu_log" 240 qemu-system-x86_64 -accel kvm -M q35 -cpu host -m 512 -smp 1 \
    -nographic -no-reboot -nic none -vga none \
    -kernel "$L2_KERNEL" -initrd "$L2_INITRAMFS" -append "$cmdline"
qemu_pid=$BG_PID
qemu_started=$BG_STARTED
wait_for_line "$qemu_log" 'EXT-L2-INIT' 180 "$qemu_pid" || fail "L2 under QEMU/KVM did not reach its init"
qemu_boot=$(since "$qemu_started")
metric "l2_boot_s=$qemu_boot vmm=qemu (qemu start to EXT-L2-INIT, L1 clock)"
wait_for_line "$qemu_log" 'EXT-L2-POWEROFF' 120 "$qemu_pid" || fail "L2 under QEMU never printed EXT-L2-POWEROFF"
grep -q 'EXT-CONTAINER-OK' "$qemu_log" || fail "crun container marker missing under QEMU"
wait_exit "$qemu_pid" 60 || fail "QEMU still running 60 s after the guest powered off"

command -v ext-vmm >/dev/null || fail "ext-vmm is not in the lab image; QEMU L2 boot took $qemu_boot s"
vmm_log=/tmp/l2-ext-vmm.log
start_vmm "$vmm_log" 240 --kernel "$L2_KERNEL" --initramfs "$L2_INITRAMFS" --cmdline "$cmdline" \
    --cpus boot=1 --memory size=512M,shared=off --serial tty
wait_for_line "$vmm_log" 'EXT-L2-INIT' 180 "$VMM_PID" || fail "L2 under ext-vmm did not reach its init"
vmm_boot=$(since "$VMM_STARTED")
metric "l2_boot_s=$vmm_boot vmm=ext-vmm (ext-vmm start to EXT-L2-INIT, L1 clock)"
wait_for_line "$vmm_log" 'EXT-L2-POWEROFF' 120 "$VMM_PID" || fail "L2 under ext-vmm never printed EXT-L2-POWEROFF"
wait_exit "$VMM_PID" 60 || fail "ext-vmm still running 60 s after the guest powered off"

metric "l2_boot_ratio=$(awk -v v="$vmm_boot" -v q="$qemu_boot" 'BEGIN { printf "%.2f", v / q }') (ext-vmm / qemu)"
pass
