# Scenario l2-qemu: boots the same L2 guest (PVH vmlinux + initramfs, ext.test=boot) under QEMU
# with KVM inside L1 and under ext-vmm, in the order QEMU, ext-vmm, ext-vmm, QEMU (so a drift of
# L1 over the run hits both alike), and reports each boot time and the ratio of the means, all
# on L1's clock in one lab run (absolute lab timings are emulated; the ratio is what counts).
# lab-needs: qemu
# shellcheck source=ci/scenarios/lib.sh
. /opt/ext/scenarios/lib.sh

cmdline="console=ttyS0 loglevel=4 panic=-1 ext.test=boot"
command -v ext-vmm >/dev/null || fail "ext-vmm is not in the lab image"
command -v qemu-system-x86_64 >/dev/null || fail "qemu-system-x86_64 is not in the lab image"

# Boots L2 once under the named VMM to its poweroff; sets BOOT_S (start to EXT-L2-INIT).
boot_once() {
    # $1: qemu or ext-vmm, $2: round number
    _log="/tmp/l2-$1-$2.log"
    case "$1" in
        qemu)
            start_background "$_log" 240 qemu-system-x86_64 -accel kvm -M q35 -cpu host -m 512 \
                -smp 1 -nographic -no-reboot -nic none -vga none \
                -kernel "$L2_KERNEL" -initrd "$L2_INITRAMFS" -append "$cmdline"
            ;;
        ext-vmm)
            start_background "$_log" 240 ext-vmm --kernel "$L2_KERNEL" --initramfs "$L2_INITRAMFS" \
                --cmdline "$cmdline" --cpus boot=1 --memory size=512M,shared=off --serial tty
            ;;
    esac
    wait_for_line "$_log" 'EXT-L2-INIT' 180 "$BG_PID" || fail "L2 under $1 did not reach its init (round $2)"
    BOOT_S=$(since "$BG_STARTED")
    metric "l2_boot_s=$BOOT_S vmm=$1 round=$2 (start to EXT-L2-INIT, L1 clock)"
    wait_for_line "$_log" 'EXT-L2-POWEROFF' 120 "$BG_PID" || fail "L2 under $1 never printed EXT-L2-POWEROFF (round $2)"
    grep -q 'EXT-CONTAINER-OK' "$_log" || fail "crun container marker missing under $1 (round $2)"
    wait_exit "$BG_PID" 60 || fail "$1 still running 60 s after the guest powered off (round $2)"
    [ "$EXIT_STATUS" -eq 0 ] || fail "$1 exited with status $EXIT_STATUS (round $2)"
}

qemu_total=0
vmm_total=0
round=0
for vmm in qemu ext-vmm ext-vmm qemu; do
    round=$((round + 1))
    boot_once "$vmm" "$round"
    case "$vmm" in
        qemu) qemu_total=$(awk -v a="$qemu_total" -v b="$BOOT_S" 'BEGIN { print a + b }') ;;
        *) vmm_total=$(awk -v a="$vmm_total" -v b="$BOOT_S" 'BEGIN { print a + b }') ;;
    esac
done
metric "l2_boot_mean_s qemu=$(awk -v t="$qemu_total" 'BEGIN { printf "%.2f", t / 2 }') ext-vmm=$(awk -v t="$vmm_total" 'BEGIN { printf "%.2f", t / 2 }')"
metric "l2_boot_ratio=$(awk -v v="$vmm_total" -v q="$qemu_total" 'BEGIN { printf "%.2f", v / q }') (ext-vmm / qemu)"
pass
