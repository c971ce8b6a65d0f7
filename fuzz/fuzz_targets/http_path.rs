//! HTTP request paths: percent-decoding and the refusals. What is accepted has no `..`
//! segment, no control character and no backslash.
#![no_main]

use libfuzzer_sys::fuzz_target;
use netboot::http::decode_path;

fuzz_target!(|raw: &str| {
    if let Ok(path) = decode_path(raw) {
        assert!(path.split('/').all(|segment| segment != ".."), "{path:?}");
        assert!(!path.chars().any(char::is_control), "{path:?}");
        assert!(!path.contains('\\'), "{path:?}");
    }
});
