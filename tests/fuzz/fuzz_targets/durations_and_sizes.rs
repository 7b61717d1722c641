//! The duration and size parsers the config, drill files and command line share: any text
//! gives a value within bounds or an error, never a panic, and a duration taken is never
//! longer than the longest lifeboat accepts.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        if let Ok(duration) = lifeboat::config::bounded_duration(text) {
            assert!(duration <= lifeboat::config::LONGEST_DURATION);
        }
        let _ = lifeboat::config::parse_size("fuzz", text);
    }
});
