# Scenario perm: guest page permissions (ext-perm inside ext-vmm) on a real Linux guest.
# ext-vmm boots L2 with ext.test=perm: the guest's /bin/ext-perm-probe (ci/guest/perm-probe.c,
# a static C program at CPL3) reports the guest-physical addresses of four locked pages of
# its own and then waits for one command per phase on the console. The scenario feeds the
# console through a FIFO on ext-vmm's stdin (serial input), and between phases changes the
# pages' permissions through the REST API (ext-remote perm-set, view 0 = every vCPU):
#   1. data page r-x     -> the guest's write is refused: value unchanged, SIGSEGV (#GP)
#   2. code page rw-     -> calling it is refused before it runs: SIGSEGV at the page start
#   3. page b rw-        -> the 10-byte mov that starts in page a and ends in page b runs once
#                           under a temporary grant (RAX holds its immediate), and the `ret`
#                           right after it in page b is refused again: SIGSEGV at b+5
#   4. all rwx again     -> everything runs, the write lands, memslots are merged back
#   5. view 1 (data page r-x) assigned to vCPU 1 -> the probe's write from CPU 0 lands
#                           (emulated by ext-perm: memslots carry the intersection of views),
#                           the same write from CPU 1 is refused
# The guest has two vCPUs, so the grant in phase 3 holds the other vCPU out of guest mode.
# Each guest-visible result is checked, and so are the violation and grant reports and
# counters read over REST (ext/perm.violations).
# shellcheck source=ci/scenarios/lib.sh
. /opt/ext/scenarios/lib.sh

log=/tmp/l2-perm.log
sock=/tmp/ext-vmm-perm.sock
console_in=/tmp/l2-perm.console
command -v ext-remote >/dev/null || fail "ext-remote is not in the lab image (did it build?)"
command -v ext-vmm >/dev/null || fail "ext-vmm is not in the lab image (did it build?)"

# Runs one ext-remote command; its output goes to /tmp/remote.out and the console.
remote() {
    ext-remote --api-socket "$sock" "$@" >/tmp/remote.out 2>&1
    _status=$?
    sed 's/^/ext-remote '"$1"'| /' /tmp/remote.out
    return $_status
}

# Sets permissions on one page of view 0.
protect() {
    # $1: gpa, $2: permissions
    remote perm-set --view 0 --gpa "$1" --size 4096 --permissions "$2" \
        || fail "perm-set $1 $2 failed: $(cat /tmp/remote.out)"
}

# The value of a numeric JSON key in /tmp/remote.out (the counters' names are unique).
json_number() {
    sed -n 's/.*"'"$1"'":\([0-9][0-9]*\).*/\1/p' /tmp/remote.out | head -n1
}

# Reads the violations report into /tmp/remote.out.
violations() {
    remote perm-violations || fail "perm.violations failed: $(cat /tmp/remote.out)"
}

# The value of key=value in the last console line matching a tag.
field() {
    # $1: tag, $2: key
    grep -a "$1" "$log" | tail -n1 | tr -d '\r' | sed -n 's/.*[[:space:]]'"$2"'=\([^[:space:]]*\).*/\1/p'
}

# Sends a command line to the guest console and waits for the probe's answer.
phase() {
    # $1: command, $2: answer tag
    echo "$1" >&3
    wait_for_line "$log" "$2" 60 "$VMM_PID" || fail "no $2 line after '$1' (or ext-vmm exited)"
}

# Expects a field of a tagged line to equal a value.
expect() {
    # $1: tag, $2: key, $3: expected value, $4: what it means
    _got=$(field "$1" "$2")
    [ "$_got" = "$3" ] || fail "$4: $1 $2=$_got, expected $3"
}

rm -f "$console_in"
mkfifo "$console_in" || fail "mkfifo $console_in"
# Held open read-write, so ext-vmm's stdin never sees end-of-file and our writes never block.
exec 3<>"$console_in"

# shellcheck disable=SC2016  # expanded by the inner shell, which gets the FIFO as $1
start_background "$log" 400 sh -c 'input=$1; shift; exec ext-vmm "$@" <"$input"' sh "$console_in" \
    --kernel "$L2_KERNEL" --initramfs "$L2_INITRAMFS" \
    --cmdline "console=ttyS0 loglevel=4 panic=-1 ext.test=perm" \
    --cpus boot=2 --memory size=512M,shared=off --serial tty --api-socket "path=$sock"
VMM_PID=$BG_PID
VMM_STARTED=$BG_STARTED

wait_for_line "$log" 'EXT-L2-INIT' 180 "$VMM_PID" || fail "L2 did not reach its init (or ext-vmm exited)"
metric "l2_boot_s=$(since "$VMM_STARTED") vmm=ext-vmm (ext-vmm start to EXT-L2-INIT, L1 clock)"
wait_for_line "$log" 'EXT-PERM-READY' 60 "$VMM_PID" || fail "the probe never reported its pages"
grep -aq 'EXT-PERM-FATAL' "$log" && fail "probe: $(grep -a 'EXT-PERM-FATAL' "$log" | head -n1)"
data=$(field EXT-PERM-READY data)
code=$(field EXT-PERM-READY exec)
page_a=$(field EXT-PERM-READY straddle_a)
page_b=$(field EXT-PERM-READY straddle_b)
for gpa in "$data" "$code" "$page_a" "$page_b"; do
    case "$gpa" in
        0x*) [ "$((gpa))" -ne 0 ] || fail "the probe could not read a GPA from pagemap" ;;
        *) fail "bad GPA '$gpa' in the probe's READY line" ;;
    esac
done
echo "perm: data $data, code $code, straddle $page_a | $page_b"

remote perm-capabilities || fail "perm.capabilities failed: $(cat /tmp/remote.out)"
memslots_before=$(json_number memslots)
grep -q '"backend":"kvm-memslot"' /tmp/remote.out || fail "backend is not kvm-memslot"

# 1. Write protection.
protect "$data" r-x
phase write EXT-PERM-WRITE
expect EXT-PERM-WRITE value 0x1111111111111111 "the refused write reached memory"
expect EXT-PERM-WRITE sigsegv 1 "the guest did not see the refused write as a fault"
violations
[ "$(json_number violations)" = 1 ] || fail "expected 1 violation after the write phase"
grep -q '"access":"write","kind":"data","gpa":'"$((data))"',' /tmp/remote.out \
    || fail "no write violation reported at $data"

# 2. Execute trapping.
protect "$code" rw-
phase exec EXT-PERM-EXEC
expect EXT-PERM-EXEC sigsegv 1 "calling a non-executable page did not fault"
expect EXT-PERM-EXEC fault_off 0 "the fault was not at the first instruction of the page"
expect EXT-PERM-EXEC returned none:0 "code in a non-executable page ran"
violations
[ "$(json_number violations)" = 2 ] || fail "expected 2 violations after the exec phase"
grep -q '"access":"execute","kind":"execute","gpa":'"$((code))"',' /tmp/remote.out \
    || fail "no execute violation reported at $code"

# 3. One straddling instruction under a temporary grant; page b stays non-executable.
protect "$page_b" rw-
phase straddle EXT-PERM-STRADDLE
expect EXT-PERM-STRADDLE rax 0x1122334455667788 "the straddling mov did not run (RAX)"
expect EXT-PERM-STRADDLE sigsegv 1 "the instruction after the straddle ran in a non-executable page"
expect EXT-PERM-STRADDLE fault_off 5 "the fault after the grant was not at the ret in page b"
violations
[ "$(json_number straddle_grants)" = 1 ] || fail "expected exactly 1 straddle grant"
[ "$(json_number violations)" = 3 ] || fail "expected 3 violations after the straddle phase"
grep -q '"event":"grant"' /tmp/remote.out || fail "no grant report"
grep -q '"straddle":true' /tmp/remote.out || fail "the grant is not reported as a straddle"
grep -q '"retired":true' /tmp/remote.out || fail "the granted instruction did not retire"
grep -q '"access":"execute","kind":"execute","gpa":'"$((page_b + 5))"',' /tmp/remote.out \
    || fail "no execute violation reported for the ret at $page_b+5"
method=$(sed -n 's/.*"method":"\([a-z_]*\)".*/\1/p' /tmp/remote.out | head -n1)
cp /tmp/remote.out /tmp/perm-violations.json

# 4. Everything allowed again.
protect "$data" rwx
protect "$code" rwx
protect "$page_b" rwx
phase restore EXT-PERM-RESTORED
expect EXT-PERM-RESTORED exec 0x600d "the code page does not run after it was made executable again"
expect EXT-PERM-RESTORED straddle 0x1122334455667788 "the straddle does not run after page b was made executable again"
expect EXT-PERM-RESTORED value 0x2222222222222222 "the write does not land after write access was restored"
expect EXT-PERM-RESTORED sigsegv 0 "a fault with every page allowed"
remote perm-capabilities || fail "perm.capabilities failed: $(cat /tmp/remote.out)"
memslots_after=$(json_number memslots)
[ "$memslots_after" = "$memslots_before" ] \
    || fail "memslots not merged back: $memslots_before before, $memslots_after after"
violations
[ "$(json_number violations)" = 3 ] || fail "violations after restoring every page: $(json_number violations)"

# 5. Per-vCPU views: vCPU 1 in view 1, where the data page is read-only.
remote perm-create-view --view 1 --default-permissions rwx || fail "create-view failed: $(cat /tmp/remote.out)"
remote perm-set --view 1 --gpa "$data" --size 4096 --permissions r-x || fail "perm-set view 1 failed"
remote perm-assign --vcpu 1 --view 1 || fail "perm-assign failed: $(cat /tmp/remote.out)"
phase views EXT-PERM-VIEWS
expect EXT-PERM-VIEWS cpu0 0 "the probe could not run on CPU 0"
expect EXT-PERM-VIEWS cpu1 1 "the probe could not run on CPU 1"
expect EXT-PERM-VIEWS sigsegv0 0 "vCPU 0 (view 0, data rwx) was refused its write"
expect EXT-PERM-VIEWS value0 0x3333333333333333 "vCPU 0's write did not land"
expect EXT-PERM-VIEWS sigsegv1 1 "vCPU 1 (view 1, data r-x) was not refused its write"
expect EXT-PERM-VIEWS value1 0x3333333333333333 "vCPU 1's refused write reached memory"
violations
[ "$(json_number violations)" = 4 ] || fail "expected 4 violations after the views phase"
grep -q '"vcpu":1,"view":1,"access":"write","kind":"data","gpa":'"$((data))"',' /tmp/remote.out \
    || fail "no write violation of vCPU 1 in view 1 reported"
[ "$(json_number emulated_writes)" -ge 1 ] || fail "vCPU 0's write was not emulated by ext-perm"
remote perm-assign --vcpu 1 --view 0 || fail "perm-assign back to view 0 failed"
remote perm-capabilities || fail "perm.capabilities failed: $(cat /tmp/remote.out)"
[ "$(json_number memslots)" = "$memslots_before" ] || fail "memslots not merged back after the views phase"
violations

metric "perm_violations=$(json_number violations) perm_straddle_grants=$(json_number straddle_grants)" \
    "perm_single_step_grants=$(json_number single_step_grants) perm_emulated_grants=$(json_number emulated_grants)" \
    "perm_grant_method=$method perm_exits=$(json_number exits) perm_emulated_reads=$(json_number emulated_reads)" \
    "perm_emulated_writes=$(json_number emulated_writes) memslots=$memslots_before"

phase 'done' EXT-PERM-DONE
grep -aq 'EXT-L2-FAIL' "$log" && fail "guest: $(grep -a 'EXT-L2-FAIL' "$log" | head -n1)"
# The guest powers off; ext-vmm keeps serving the API until vmm.shutdown.
tries=0
until remote info && grep -q '"state"[[:space:]]*:[[:space:]]*"Shutdown"' /tmp/remote.out; do
    tries=$((tries + 1))
    [ "$tries" -lt 60 ] || fail "the guest did not power off after EXT-PERM-DONE"
    sleep 0.5
done
remote shutdown-vmm || fail "vmm.shutdown failed: $(cat /tmp/remote.out)"
wait_exit "$VMM_PID" 30 || fail "ext-vmm still running 30 s after vmm.shutdown"
[ "$EXIT_STATUS" -eq 0 ] || fail "ext-vmm exited with status $EXIT_STATUS"
pass
