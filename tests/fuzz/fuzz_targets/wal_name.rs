//! WAL file names and LSNs: never a panic; a name accepted keeps its text, and a segment's
//! number gives back its name.
#![no_main]

use libfuzzer_sys::fuzz_target;
use lifeboat::wal::{Lsn, WalFile, segment_name};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let _ = Lsn::parse(text);
    if let Some(file) = WalFile::parse(text) {
        assert_eq!(file.name, text);
        if let Some(segment) = file.segment(16 << 20)
            && text.len() == 24
        {
            assert_eq!(segment_name(file.timeline, segment, 16 << 20), text);
        }
    }
});
