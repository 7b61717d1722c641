//! The manifest parser: never a panic, and a manifest it accepts is written back to bytes it
//! accepts again as the same manifest.
#![no_main]

use libfuzzer_sys::fuzz_target;
use lifeboat::manifest::Manifest;

fuzz_target!(|data: &[u8]| {
    if let Ok(manifest) = Manifest::from_json(data) {
        let again =
            Manifest::from_json(&manifest.to_json()).expect("a written manifest reads back");
        assert_eq!(again, manifest);
    }
});
