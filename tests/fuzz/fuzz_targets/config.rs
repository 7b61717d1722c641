//! The config parser: any text gives a config or an error naming the problem, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = lifeboat::config::Config::parse(text, std::path::Path::new("/fuzz/lifeboat.toml"));
    }
});
