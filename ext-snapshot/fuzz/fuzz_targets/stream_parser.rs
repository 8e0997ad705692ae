//! Fuzzes the snapshot stream parser: header, region table and every record of arbitrary
//! bytes must parse to `Ok` or a clean `Err`, never panic or hang.
#![no_main]

use ext_snapshot::StreamReader;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(mut reader) = StreamReader::new(data) else {
        return;
    };
    let _ = reader.layout().len();
    while let Ok(Some(record)) = reader.next_record() {
        assert!(record.pages > 0);
        assert!(record.data.is_empty() || record.data.len() as u64 == record.pages * 4096);
    }
});
