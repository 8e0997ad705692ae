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
