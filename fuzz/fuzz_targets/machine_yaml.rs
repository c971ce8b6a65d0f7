//! The folder inventory's Machine manifests (several `---` documents per file), read and
//! judged as the folder loader does.
#![no_main]

use std::net::Ipv4Addr;

use agent::machines::{folder, AddressRules};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|text: &str| {
    let rules = AddressRules {
        subnet: "10.77.0.0/24".parse().expect("subnet"),
        reserved: vec![Ipv4Addr::new(10, 77, 0, 1)],
    };
    let snapshot = folder::judge_text(text, &rules);
    for machine in snapshot.served.values() {
        assert!(rules.subnet.contains(&machine.ip), "{machine:?}");
        assert!(!rules.reserved.contains(&machine.ip), "{machine:?}");
    }
});
