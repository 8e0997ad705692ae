# Scenario boot: ext-vmm boots the L2 guest, which runs a crun container and powers off.
# PASS when the container's marker and the guest's poweroff marker appear and ext-vmm exits 0.
# shellcheck source=ci/scenarios/lib.sh
. /opt/ext/scenarios/lib.sh

log=/tmp/l2-boot.log
start_vmm "$log" 240 --kernel "$L2_KERNEL" --initramfs "$L2_INITRAMFS" \
    --cmdline "console=ttyS0 loglevel=4 panic=-1 ext.test=boot" \
    --cpus boot=1 --memory size=512M,shared=off --serial tty

wait_for_line "$log" 'EXT-L2-INIT' 180 "$VMM_PID"
case $? in
    0) metric "l2_boot_s=$(since "$VMM_STARTED") vmm=ext-vmm (ext-vmm start to EXT-L2-INIT, L1 clock)" ;;
    1) fail "L2 did not reach its init within 180 s" ;;
    *) fail "ext-vmm exited before L2 reached its init" ;;
esac
wait_for_line "$log" 'EXT-CONTAINER-OK' 120 "$VMM_PID" || fail "the crun container's marker EXT-CONTAINER-OK never appeared"
wait_for_line "$log" 'EXT-L2-POWEROFF' 60 "$VMM_PID" || fail "the guest never printed EXT-L2-POWEROFF"
wait_exit "$VMM_PID" 60 || fail "ext-vmm still running 60 s after the guest powered off"
[ "$EXIT_STATUS" -eq 0 ] || fail "ext-vmm exited with status $EXIT_STATUS after guest poweroff"
metric "l2_run_s=$(since "$VMM_STARTED") vmm=ext-vmm (ext-vmm start to exit)"
pass
