//! The RDB check: any bytes, fed in any split, give a verdict and never a panic; the verdict
//! does not depend on how the stream was split.
#![no_main]

use libfuzzer_sys::fuzz_target;
use lifeboat::sources::redis::RdbCheck;

fuzz_target!(|data: &[u8]| {
    let mut whole = RdbCheck::default();
    whole.update(data);
    let whole = whole.finish();
    let mut split = RdbCheck::default();
    for chunk in data.chunks(7) {
        split.update(chunk);
    }
    assert_eq!(split.finish(), whole);
});
