//! provisioner.yaml: parsing and every validation after it.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|text: &str| {
    let _ = agent::config::Config::parse(std::path::Path::new("provisioner.yaml"), text);
});
