//! The machines netboot serves, from either inventory: a folder of Machine manifests
//! ([`folder`]) or the cluster's Machine resources (`cluster::controller`). Both read the CRD's
//! own types (`cluster::crd::MachineSpec`), judge them by the same rules ([`judge`]: one
//! validation, [`check`], then one conflict rule, [`conflicts`]) into a [`Snapshot`], and feed the
//! one [`Table`] the servers read.
//!
//! What the API server checks by the CRD's schema (MAC pattern, `format: ipv4`, host name, image,
//! role…) the folder checks the same way, so that a manifest is accepted by the folder exactly
//! when `kubectl apply` would accept it (`crd_tests.rs` holds both to the same documents). What
//! needs context the API server does not have (the subnet, the server's and gateway's addresses,
//! the other Machines) both sources check here.

mod check;
pub mod conflicts;
#[cfg(test)]
mod crd_tests;
pub mod folder;
mod table;

use std::collections::HashMap;
use std::fmt;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use ipnet::Ipv4Net;
use netboot::{MacAddr, Machine};

pub use check::{check, imaging, ImagingSpec, Invalid};
pub use table::Table;

use crate::cluster::crd::MachineSpec;

/// What judging a Machine needs that the Machine does not say: the provisioning subnet and the
/// addresses no machine may take.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AddressRules {
    pub subnet: Ipv4Net,
    /// The server's own address and the gateway.
    pub reserved: Vec<Ipv4Addr>,
}

/// Why a Machine is not served.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Problem {
    /// Not a Machine document the API server would take (the folder only: the API server
    /// refuses these itself).
    Malformed(folder::Malformed),
    /// The spec fails a check ([`check`]).
    Invalid(Invalid),
    /// Its name, MAC or IP is also claimed by other Machines (one sentence per clash, [`conflicts::clash`]).
    Conflict(Vec<String>),
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Problem::Malformed(e) => e.fmt(f),
            Problem::Invalid(e) => e.fmt(f),
            Problem::Conflict(clashes) => f.write_str(&clashes.join("; ")),
        }
    }
}

impl Problem {
    pub fn message(&self) -> String {
        self.to_string()
    }

    /// A mistake to fix, rather than a document that is not a Machine and is skipped (a
    /// ConfigMap beside the Machines).
    pub fn is_error(&self) -> bool {
        !matches!(self, Problem::Malformed(folder::Malformed::Kind(_)))
    }
}

/// One Machine as a source read it, to be judged.
#[derive(Debug, Clone, Copy)]
pub struct Claim<'a> {
    pub name: &'a str,
    pub spec: &'a MachineSpec,
    /// The file it was read from (the folder), named in conflict messages.
    pub file: Option<&'a Path>,
    /// Its document's place in the file, from 1 (the folder).
    pub document: Option<usize>,
}

/// A Machine (or, in the folder, a document) that is not served.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    pub machine: Option<String>,
    pub file: Option<PathBuf>,
    /// The document's place in its file, from 1 (the folder).
    pub document: Option<usize>,
    pub problem: Problem,
}

impl fmt::Display for Rejection {
    /// `machines/a.yaml, document 2 (Machine node2): spec.ipAddress: …`
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut place = Vec::new();
        if let Some(file) = &self.file {
            place.push(file.display().to_string());
        }
        if let Some(document) = self.document {
            place.push(format!("document {document}"));
        }
        let mut place = place.join(", ");
        if let Some(machine) = &self.machine {
            if !place.is_empty() {
                place.push(' ');
            }
            // A skipped document is not a Machine: its name alone.
            let kind = if self.problem.is_error() {
                "Machine "
            } else {
                ""
            };
            place.push_str(&format!("({kind}{machine})"));
        }
        if place.is_empty() {
            write!(f, "{}", self.problem)
        } else {
            write!(f, "{place}: {}", self.problem)
        }
    }
}

/// What a source says at one moment.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Snapshot {
    /// What netboot answers, by MAC.
    pub served: HashMap<MacAddr, Machine>,
    /// `spec.reimage` of the served Machines that set it, by name.
    pub reimage: HashMap<String, String>,
    /// The own image and disk hints of the served Machines that give any, by name.
    pub imaging: HashMap<String, ImagingSpec>,
    /// Everything left out, with why.
    pub rejected: Vec<Rejection>,
}

/// Judges a set of Machines: each is checked on its own ([`check`]), then any name, MAC or IP
/// claimed by several valid Machines disqualifies every claimant ([`conflicts`]): serving
/// either one would hand out an address or boot file that another machine also claims.
pub fn judge<'a>(claims: impl IntoIterator<Item = Claim<'a>>, rules: &AddressRules) -> Snapshot {
    let mut snapshot = Snapshot::default();
    let mut valid: Vec<(Claim<'a>, Machine)> = Vec::new();
    for claim in claims {
        match check(claim.name, claim.spec, rules) {
            Ok(machine) => valid.push((claim, machine)),
            Err(invalid) => snapshot.rejected.push(Rejection {
                machine: Some(claim.name.to_string()),
                file: claim.file.map(Path::to_path_buf),
                document: claim.document,
                problem: Problem::Invalid(invalid),
            }),
        }
    }
    let labelled: Vec<(&Machine, String)> = valid
        .iter()
        .map(|(claim, machine)| (machine, conflicts::label(claim.name, claim.file)))
        .collect();
    let mut clashes = conflicts::conflicts(&labelled);
    for (i, (claim, machine)) in valid.into_iter().enumerate() {
        match clashes.remove(&i) {
            Some(clashes) => snapshot.rejected.push(Rejection {
                machine: Some(machine.name),
                file: claim.file.map(Path::to_path_buf),
                document: claim.document,
                problem: Problem::Conflict(clashes),
            }),
            None => {
                if let Some(value) = &claim.spec.reimage {
                    snapshot.reimage.insert(machine.name.clone(), value.clone());
                }
                let imaging = imaging(claim.spec);
                if !imaging.is_empty() {
                    snapshot.imaging.insert(machine.name.clone(), imaging);
                }
                snapshot.served.insert(machine.mac, machine);
            }
        }
    }
    snapshot
}
