//! Netboot protocol servers and boot decisions.
//!
//! Every server takes an already-bound socket, a [`MachineLookup`] and a shutdown token, so the
//! same code runs under systemd socket activation, stand-alone, and in tests on port 0.
//! This crate knows nothing of Kubernetes, D-Bus or configuration files.

pub mod dhcp;
pub mod http;
pub mod ipxe;
pub mod lograte;
pub mod machine;
pub mod path;
pub mod provisioning;
pub mod ra;
pub mod tftp;

pub use machine::{BootEvent, MacAddr, Machine, MachineLookup};
pub use provisioning::{BootAction, ProgressReport, Provisioning};
