# The body of scenarios ch-vs-stock-off and ch-vs-stock-on (source it after lib.sh; see
# ch-vs-stock-off.sh for what they measure): `compare_shared off|on` runs the same guest under
# stock and patched Cloud Hypervisor with that memory mode and prints the figures and targets.
# One memory mode per L1 boot: a single L1 running both modes went silent under TCG in 3 of 5
# runs, each time in the second mode, after a dozen 512 MiB guests.
# shellcheck shell=sh
STOCK=/opt/ext/bin/cloud-hypervisor
PATCHED=/opt/ext/bin/cloud-hypervisor-patched
for _tool in "$STOCK" "$PATCHED" /opt/ext/bin/ch-remote /opt/ext/bin/ext-snapshot; do
    [ -x "$_tool" ] || fail "$_tool is not in the lab image"
done
guest_kib=524288
cmdline="console=ttyS0 loglevel=4 panic=-1 ext.test=work ext.work_mib=128 ext.work_auto=1"

# MET when $1 <= $2, NOT MET otherwise.
verdict() {
    awk -v a="$1" -v b="$2" 'BEGIN { if (a <= b) print "MET"; else print "NOT_MET" }'
}

# Waits for the guest's workload in log $1 to have freed its half and ticked twice more.
follow_workload() {
    wait_for_line "$1" 'EXT-WORK 2 [0-9a-f]+ ok' 300 "$VMM_PID" || fail "$2: the workload did not start"
    wait_for_line "$1" 'EXT-WORK-FREED' 240 "$VMM_PID" || fail "$2: the workload did not free memory"
    _freed_at=$(last_tick "$1")
    wait_for_line "$1" "EXT-WORK $((_freed_at + 2)) [0-9a-f]+ ok" 120 "$VMM_PID" \
        || fail "$2: the workload stalled after the free"
}


compare_shared() {
    shared=$1
    for flavour in stock patched; do
        label="$flavour shared=$shared"
        if [ "$flavour" = stock ]; then bin=$STOCK; else bin=$PATCHED; fi
        dir=/tmp/vs-$flavour-$shared
        sock=/tmp/vs-$flavour-$shared.sock
        mkdir -p "$dir"

        # --- boot, workload, pause, snapshot ----------------------------------------------
        launch_ch "$bin" "/tmp/vs-$flavour-$shared.log" --api-socket "path=$sock" \
            --kernel "$L2_KERNEL" --initramfs "$L2_INITRAMFS" --cmdline "$cmdline" \
            --cpus boot=1 --memory "size=512M,shared=$shared" --serial tty --console off
        follow_workload "/tmp/vs-$flavour-$shared.log" "$label"
        ch_remote "$sock" pause || fail "$label: pause failed: $(cat /tmp/ch-remote.out)"
        t=$(now)
        ch_remote "$sock" snapshot "file://$dir" || fail "$label: snapshot failed: $(cat /tmp/ch-remote.out)"
        snap_ms=$(ms_since "$t")
        kill_vmm_pid
        ls -ls "$dir"
        if [ "$flavour" = stock ]; then
            memory=$dir/memory-ranges
            [ -s "$memory" ] || fail "$label: no memory-ranges"
            data_kib=""
        else
            memory=$dir/memory.ext-snapshot
            [ -s "$memory" ] || fail "$label: no memory.ext-snapshot"
            [ ! -e "$dir/memory-ranges" ] || fail "$label: a memory-ranges next to the ext-snapshot"
            /opt/ext/bin/ext-snapshot inspect --json "$memory" >/tmp/inspect.json \
                || fail "$label: ext-snapshot inspect failed"
            data_kib=$(($(tr -d ' \n' </tmp/inspect.json | sed -n 's/.*"data_bytes":\([0-9]*\).*/\1/p') / 1024))
            sed 's/^/inspect| /' /tmp/inspect.json | grep -v '"id"'
        fi
        du_kib=$(du -k "$memory" | cut -f1)
        bytes=$(stat -c %s "$memory")

        # --- a stock snapshot restores in the patched binary (its memory-ranges, copy) --------
        if [ "$flavour" = stock ]; then
            xsock=/tmp/vs-cross-$shared.sock
            launch_ch "$PATCHED" "/tmp/vs-cross-$shared.log" --api-socket "path=$xsock" \
                --restore "source_url=file://$dir"
            wait_api_socket "$xsock"
            ch_remote "$xsock" resume || fail "$label: the patched binary did not resume stock's snapshot"
            tick=$(last_tick "/tmp/vs-$flavour-$shared.log")
            wait_for_line "/tmp/vs-cross-$shared.log" "EXT-WORK $((tick + 2)) [0-9a-f]+ ok" 180 "$VMM_PID" \
                || fail "$label: stock's snapshot restored in the patched binary did not continue"
            echo "ch-vs-stock: stock's shared=$shared snapshot continues in the patched binary"
            kill_vmm_pid
        fi

        # --- copy restore through vm.restore ------------------------------------------------
        rsock=/tmp/vs-$flavour-$shared-copy.sock
        launch_ch "$bin" "/tmp/vs-$flavour-$shared-copy.log" --api-socket "path=$rsock"
        wait_api_socket "$rsock"
        t=$(now)
        ch_remote "$rsock" restore "source_url=file://$dir,memory_restore_mode=copy" \
            || fail "$label: copy restore failed: $(cat /tmp/ch-remote.out)"
        copy_ms=$(ms_since "$t")
        ch_remote "$rsock" resume || fail "$label: resume after the copy restore failed"
        tick=$(last_tick "/tmp/vs-$flavour-$shared.log")
        wait_for_line "/tmp/vs-$flavour-$shared-copy.log" "EXT-WORK $((tick + 2)) [0-9a-f]+ ok" 180 "$VMM_PID" \
            || fail "$label: the copy-restored guest did not continue"
        copy_resident=$(resident_kib "$VMM_PID")
        kill_vmm_pid

        # --- ondemand restore: resident memory 10 s after resume -----------------------------
        osock=/tmp/vs-$flavour-$shared-ondemand.sock
        launch_ch "$bin" "/tmp/vs-$flavour-$shared-ondemand.log" --api-socket "path=$osock" \
            --restore "source_url=file://$dir,memory_restore_mode=ondemand"
        wait_api_socket "$osock"
        ch_remote "$osock" resume || fail "$label: resume after the ondemand restore failed"
        sleep 10
        ondemand_resident=$(resident_kib "$VMM_PID")
        wait_for_line "/tmp/vs-$flavour-$shared-ondemand.log" "EXT-WORK $((tick + 2)) [0-9a-f]+ ok" 180 "$VMM_PID" \
            || fail "$label: the ondemand-restored guest did not continue"
        kill_vmm_pid
        rm -rf "$dir"

        metric "l1_memory shared=$shared vmm=$flavour $(awk '/^(MemAvailable|Shmem):/ { printf "%s%d ", $1, $2 }' /proc/meminfo)tmp_kib=$(du -sk /tmp | cut -f1)"
        metric "ch_vs_stock shared=$shared vmm=$flavour guest_kib=$guest_kib memory_file_du_kib=$du_kib memory_file_bytes=$bytes data_kib=${data_kib:-n/a} snapshot_ms=$snap_ms copy_restore_ms=$copy_ms copy_resident_kib=$copy_resident ondemand_resident_10s_kib=$ondemand_resident (L1 clock, emulated)"
        eval "du_$flavour=$du_kib snap_$flavour=$snap_ms copy_$flavour=$copy_ms od_$flavour=$ondemand_resident"
        [ "$flavour" = patched ] && patched_data_kib=$data_kib
    done
    # shellcheck disable=SC2154  # set by the eval above
    {
        size_limit=$((patched_data_kib + patched_data_kib / 100 + 32))
        metric "ch_vs_stock_ratio shared=$shared du_patched_over_stock=$(ratio "$du_patched" "$du_stock") snapshot_time_patched_over_stock=$(ratio "$snap_patched" "$snap_stock") copy_restore_time_patched_over_stock=$(ratio "$copy_patched" "$copy_stock") ondemand_resident_patched_over_stock=$(ratio "$od_patched" "$od_stock")"
        metric "ch_vs_stock_target shared=$shared size=$(verdict "$du_patched" "$size_limit") (${du_patched} KiB <= ${size_limit} KiB) ondemand_resident=$(verdict "$od_patched" $((patched_data_kib + 16384))) (${od_patched} KiB <= data ${patched_data_kib} KiB + 16 MiB the guest and VMM touch)"
        if [ "$shared" = off ]; then
            metric "ch_vs_stock_target shared=off snapshot_time=$(verdict "$snap_patched" $((snap_stock / 2))) (${snap_patched} ms <= 0.5 x ${snap_stock} ms)"
        fi
        # Sizes and residency are not timings: they hold or the patch is broken.
        [ "$du_patched" -lt "$du_stock" ] || [ "$shared" = on ] \
            || fail "shared=off: the patched snapshot ($du_patched KiB) is not smaller than stock's ($du_stock KiB)"
        [ "$du_patched" -le "$size_limit" ] || fail "shared=$shared: the patched memory file holds more than its data"
        [ "$od_patched" -lt "$od_stock" ] || fail "shared=$shared: the patched ondemand restore holds as much as stock's"
    }
}
