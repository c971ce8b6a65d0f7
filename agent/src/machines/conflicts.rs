//! The conflict rule, the same for both sources: a name, MAC or IP claimed by several Machines
//! disqualifies every claimant, each told in one sentence per clash ([`clash`]).

use std::collections::BTreeMap;
use std::fmt;
use std::net::Ipv4Addr;
use std::path::Path;

use netboot::{MacAddr, Machine};

/// What two Machines may not share. In the cluster names are unique already; in the folder
/// two files may name the same Machine.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Key<'a> {
    Mac(MacAddr),
    Ip(Ipv4Addr),
    Name(&'a str),
}

impl fmt::Display for Key<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Key::Mac(mac) => write!(f, "macAddress {mac}"),
            Key::Ip(ip) => write!(f, "ipAddress {ip}"),
            Key::Name(name) => write!(f, "name {name}"),
        }
    }
}

/// The one message of a clash: `macAddress 52:54:00:00:00:0a is also claimed by Machine b`.
/// `others` are the other claimants' labels (`label`).
pub fn clash(key: &Key<'_>, others: &[&str]) -> String {
    format!("{key} is also claimed by Machine {}", others.join(", "))
}

/// A claimant as conflict messages name it: its name, and the file it is in (the folder).
pub(super) fn label(name: &str, file: Option<&Path>) -> String {
    match file {
        Some(file) => format!("{name} ({})", file.display()),
        None => name.to_string(),
    }
}

/// The clashes of every machine claiming a key with others, by index into `machines`
/// (each with its label), in key order: MACs, then IPs, then names.
pub(super) fn conflicts(machines: &[(&Machine, String)]) -> BTreeMap<usize, Vec<String>> {
    let mut owners: BTreeMap<Key<'_>, Vec<usize>> = BTreeMap::new();
    for (i, (m, _)) in machines.iter().enumerate() {
        for key in [Key::Mac(m.mac), Key::Ip(m.ip), Key::Name(&m.name)] {
            owners.entry(key).or_default().push(i);
        }
    }
    let mut clashes: BTreeMap<usize, Vec<String>> = BTreeMap::new();
    for (key, owners) in owners.iter().filter(|(_, o)| o.len() > 1) {
        for &i in owners {
            let others: Vec<&str> = owners
                .iter()
                .filter(|&&j| j != i)
                .map(|&j| machines[j].1.as_str())
                .collect();
            clashes.entry(i).or_default().push(clash(key, &others));
        }
    }
    clashes
}
