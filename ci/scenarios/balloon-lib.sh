# Helpers of the scenarios that run vhost-user-mem (balloon, ch-balloon); source it after
# lib.sh. The daemon listens on $VU_SOCK (vhost-user) and $VU_API (its control API).
# shellcheck shell=sh disable=SC2034  # the variables set here are for the scenarios to read

MIB=1048576
VU_SOCK=/tmp/vum.sock
VU_API=/tmp/vum-api.sock

# Starts the daemon in the background; sets VU_PID.
start_daemon() {
    rm -f "$VU_API"
    start_background "$1" 1800 vhost-user-mem --socket "$VU_SOCK" --api-socket "$VU_API"
    VU_PID=$BG_PID
    _tries=0
    until [ -S "$VU_API" ]; do
        _tries=$((_tries + 1)); [ "$_tries" -lt 300 ] || fail "vhost-user-mem never opened $VU_API"; sleep 0.1
    done
}

# The daemon's control API: $1 method, $2 endpoint, $3 optional JSON body. Output in /tmp/vu.out.
vu() {
    if [ -n "${3:-}" ]; then
        curl -sS --max-time 120 --unix-socket "$VU_API" -X "$1" -H 'Content-Type: application/json' \
            -d "$3" -o /tmp/vu.out -w '%{http_code}' "http://localhost/api/v1/$2" >/tmp/vu.code
    else
        curl -sS --max-time 120 --unix-socket "$VU_API" -X "$1" -o /tmp/vu.out -w '%{http_code}' \
            "http://localhost/api/v1/$2" >/tmp/vu.code
    fi
    _code=$(cat /tmp/vu.code)
    echo "vhost-user-mem $1 $2 -> $_code $(head -c 600 /tmp/vu.out)"
    case "$_code" in 2*) return 0 ;; *) return 1 ;; esac
}

# A number field of the last JSON answer (first occurrence of "$1": <digits>).
field() {
    tr -d ' \n' </tmp/vu.out | sed -n 's/.*"'"$1"'":\([0-9][0-9]*\).*/\1/p' | head -n 1
}

# The daemon's view of the memfd: sets ALLOC (allocated bytes) and ACTUAL (balloon pages).
status() {
    vu GET status || fail "status failed"
    ALLOC=$(field allocated_bytes)
    ACTUAL=$(field actual_pages)
    [ -n "$ALLOC" ] || fail "status has no allocated_bytes"
}

# Waits until the balloon's actual size is $1 pages (the guest inflated or deflated), up to $2 s.
wait_actual() {
    _deadline=$(awk -v a="$(now)" -v t="$2" 'BEGIN { printf "%.2f", a + t }')
    while :; do
        status
        [ "$ACTUAL" = "$1" ] && return 0
        awk -v a="$(now)" -v d="$_deadline" 'BEGIN { exit !(a >= d) }' && return 1
        sleep 1
    done
}

# The guest's balloon feature bits (a 64-character 0/1 string, bit 0 first) from log $1.
guest_bit() {
    sed -n 's/.*EXT-BALLOON-FEATURES \([01]*\).*/\1/p' "$1" | tail -n 1 | cut -c "$(($2 + 1))"
}


# Waits up to $2 s for the memfd's allocation to fall to $1 bytes or below (free page
# reporting at work). Sets RETURNED_S to the seconds it took, empty on timeout; ALLOC is the
# last figure.
wait_alloc_at_most() {
    _t=$(now)
    RETURNED_S=""
    while awk -v a="$(now)" -v s="$_t" -v l="$2" 'BEGIN { exit !(a - s < l) }'; do
        status
        if [ "$ALLOC" -le "$1" ]; then RETURNED_S=$(since "$_t"); return 0; fi
        sleep 0.5
    done
    return 1
}
