# Smoke test of the lab itself: L1 booted, KVM with nested paging is usable.
# shellcheck source=ci/scenarios/lib.sh
. /opt/ext/scenarios/lib.sh

[ -c /dev/kvm ] || fail "/dev/kvm is not a character device in L1"
grep -qw svm /proc/cpuinfo || fail "L1 CPU has no svm flag (QEMU -cpu lacks SVM)"
[ -d /sys/module/kvm_amd ] || fail "kvm_amd is not loaded"
npt=$(cat /sys/module/kvm_amd/parameters/npt 2>/dev/null)
case "$npt" in
    1|Y) ;;
    *) fail "kvm_amd nested paging is off (npt=$npt)" ;;
esac
nested=$(cat /sys/module/kvm_amd/parameters/nested 2>/dev/null)
echo "smoke: /dev/kvm present, kvm_amd npt=$npt nested=$nested"
if [ ! -s /opt/l2/vmlinux ] || [ ! -s /opt/l2/initramfs.cpio ]; then
    fail "L2 guest image missing under /opt/l2"
fi
for bin in /opt/ext/bin/*; do
    [ -x "$bin" ] || continue
    # Proves the shipped shared libraries are complete: the loader resolves everything.
    "$bin" --help >/dev/null 2>&1
    status=$?
    [ "$status" -ne 127 ] || fail "$bin cannot start in L1 (missing shared library?)"
    echo "smoke: $(basename "$bin") starts (--help exit status $status)"
done
pass
