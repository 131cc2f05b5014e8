//! A module's `manifest.yaml`: size cap, YAML parse, schema and safety validation.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = powernode::manifest::parse(data);
});
