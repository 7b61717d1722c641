//! The manifest parser: never a panic, and a manifest it accepts is written back to bytes it
//! accepts again as the same manifest. Most inputs are first sealed the way lifeboat seals
//! manifests (`manifest_sha256` = the sha256 of the text with that value as 64 zeros), so
//! that the fuzzer reaches the parsing behind the seal and not only the seal check.
#![no_main]

use libfuzzer_sys::fuzz_target;
use lifeboat::manifest::Manifest;
use sha2::{Digest, Sha256};

const FIELD: &str = "\"manifest_sha256\": \"";

fn sealed(text: &str) -> Option<String> {
    let at = text.rfind(FIELD)? + FIELD.len();
    let value = text.get(at..at + 64)?;
    let zeros = "0".repeat(64);
    let unsealed = format!("{}{zeros}{}", &text[..at], &text[at + 64..]);
    let seal = hex::encode(Sha256::digest(unsealed.as_bytes()));
    (value != seal).then(|| format!("{}{seal}{}", &text[..at], &text[at + 64..]))
}

fuzz_target!(|data: &[u8]| {
    let resealed = std::str::from_utf8(data).ok().and_then(sealed);
    for input in [Some(data), resealed.as_deref().map(str::as_bytes)]
        .into_iter()
        .flatten()
    {
        if let Ok(manifest) = Manifest::from_json(input) {
            let again =
                Manifest::from_json(&manifest.to_json()).expect("a written manifest reads back");
            assert_eq!(again, manifest);
        }
    }
});
