//! HTTP `Range` against a file length from the input: a part is always inside the file.
#![no_main]

use libfuzzer_sys::fuzz_target;
use netboot::http::{parse_range, RangeRequest};

fuzz_target!(|input: (u64, &str)| {
    let (len, value) = input;
    if let RangeRequest::Part { start, end } = parse_range(value, len) {
        assert!(
            start <= end && end < len,
            "{value:?} on {len}: {start}-{end}"
        );
    }
});
