//! The drill-file parser: any text gives a drill or an error naming the line, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ =
            lifeboat::drill::Drill::parse(text, std::path::Path::new("/fuzz/drill.toml"));
    }
});
