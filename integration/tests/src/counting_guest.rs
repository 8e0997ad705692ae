//! The counting guest of the snapshot tests: it keeps a counter in memory, prints one letter
//! per step on COM1 (`'a' + count % 16`) and powers off after [`STEPS`] steps, so its whole
//! serial output is known in advance ([`expected_output`]). A VM paused, snapshotted and
//! restored mid-run must, together with the original's output before the pause, print exactly
//! that output.

/// Steps the guest makes before powering off.
pub const STEPS: u32 = 60_000;
/// Guest-physical address of the counter.
pub const COUNTER: u32 = 0x3000;

/// The counting guest (32-bit code, entered like a PVH kernel; wrap it with
/// [`crate::test_kernel::pvh_elf`]).
pub fn counting_guest() -> Vec<u8> {
    let counter = COUNTER.to_le_bytes();
    let mut code = vec![0xff, 0x05]; // loop: inc dword [COUNTER]
    code.extend(counter);
    code.push(0xa1); // mov eax, [COUNTER]
    code.extend(counter);
    code.extend([0x66, 0xba, 0xf8, 0x03]); // mov dx, 0x3f8
    code.extend([0x24, 0x0f]); // and al, 0x0f
    code.extend([0x04, b'a']); // add al, 'a'
    code.push(0xee); // out dx, al
    code.push(0xa1); // mov eax, [COUNTER]
    code.extend(counter);
    code.push(0x3d); // cmp eax, STEPS
    code.extend(STEPS.to_le_bytes());
    let back = -(code.len() as i8 + 2);
    code.extend([0x75, back as u8]); // jne loop
    code.extend([0x66, 0xba, 0xc0, 0x03]); // mov dx, 0x3c0 (ACPI sleep control)
    code.extend([0xb0, 0x34]); // mov al, SLP_TYP 5 | SLP_EN
    code.push(0xee); // out dx, al
    code.extend([0xf4, 0xeb, 0xfd]); // hlt; jmp hlt
    code
}

/// The guest's whole serial output, from boot to power-off.
pub fn expected_output() -> Vec<u8> {
    (1..=STEPS).map(|c| b'a' + (c % 16) as u8).collect()
}

/// Where [`paced_guest`] writes its data pages.
pub const PACED_FILL_ADDR: u32 = 0x20_0000;

/// A counting guest that runs until stopped, for tests of whole VMMs (Cloud Hypervisor): it
/// first fills `fill_bytes` (a multiple of 4) from [`PACED_FILL_ADDR`] with each dword's own
/// address (data pages a snapshot must keep), then counts forever at [`COUNTER`], printing
/// `'a' + count % 16` on COM1 after each step and busy-waiting `delay` iterations between
/// steps, so a test can pause it mid-run. Its output, across any pause, snapshot and
/// restore, is each letter followed by the next one ([`is_paced_output`]).
pub fn paced_guest(fill_bytes: u32, delay: u32) -> Vec<u8> {
    let counter = COUNTER.to_le_bytes();
    let mut code = vec![0xbf]; // mov edi, PACED_FILL_ADDR
    code.extend(PACED_FILL_ADDR.to_le_bytes());
    code.push(0xb9); // mov ecx, fill_bytes / 4
    code.extend((fill_bytes / 4).to_le_bytes());
    let fill = code.len();
    code.extend([0x89, 0x3f]); // fill: mov [edi], edi
    code.extend([0x83, 0xc7, 0x04]); // add edi, 4
    code.push(0x49); // dec ecx
    let back = fill as i32 - (code.len() as i32 + 2);
    code.extend([0x75, back as i8 as u8]); // jnz fill
    let count = code.len();
    code.extend([0xff, 0x05]); // count: inc dword [COUNTER]
    code.extend(counter);
    code.push(0xa1); // mov eax, [COUNTER]
    code.extend(counter);
    code.extend([0x24, 0x0f]); // and al, 0x0f
    code.extend([0x04, b'a']); // add al, 'a'
    code.extend([0x66, 0xba, 0xf8, 0x03]); // mov dx, 0x3f8
    code.push(0xee); // out dx, al
    code.push(0xb9); // mov ecx, delay
    code.extend(delay.max(1).to_le_bytes());
    let wait = code.len();
    code.push(0x49); // wait: dec ecx
    let back = wait as i32 - (code.len() as i32 + 2);
    code.extend([0x75, back as i8 as u8]); // jnz wait
    let back = count as i32 - (code.len() as i32 + 2);
    code.extend([0xeb, back as i8 as u8]); // jmp count
    code
}

/// Whether `output` is a run of [`paced_guest`]'s letters: each one the successor of the one
/// before it (so nothing was lost or repeated across a pause, snapshot or restore).
pub fn is_paced_output(output: &[u8]) -> bool {
    output.iter().all(|c| (b'a'..b'a' + 16).contains(c))
        && output
            .windows(2)
            .all(|w| (w[1] - b'a') == (w[0] - b'a' + 1) % 16)
}
