//! Go-style durations (`1m30s`, `500ms`): parsing never panics, and whatever parses prints
//! back to a string that parses to the same duration.
#![no_main]

use berth_proxy::GoDuration;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|input: &str| {
    if let Ok(duration) = input.parse::<GoDuration>() {
        let printed = duration.to_string();
        let again: GoDuration = printed
            .parse()
            .unwrap_or_else(|e| panic!("{printed:?} (from {input:?}) does not parse: {e}"));
        assert_eq!(again.get(), duration.get(), "{input:?} -> {printed:?}");
    }
});
