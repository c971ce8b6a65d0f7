//! The contract between netboot (which boots a machine into stage2 and hears from it) and
//! stage2 (PID 1 of the imaging initrd): each item is written by one side and read by the
//! other, so both take it from here and cannot drift apart.
//!
//! - [`orders`]: what stage2 is told to do, on the kernel command line of the iPXE script:
//!   netboot writes it ([`orders::ImagingOrders::kernel_args`]), stage2 parses it
//!   ([`orders::Orders::from_cmdline`]);
//! - [`report`]: stage2's progress reports, the JSON body of `POST /report/{mac}`;
//! - [`seed`]: the NoCloud seed URL stage2 writes for cloud-init and netboot serves;
//! - [`dhcp`]: the option filter both DHCP ends (netboot's server, stage2's client) run before
//!   handing a datagram to the generic decoder.
//!
//! Deliberately small (serde and thiserror): stage2 links it statically into the initrd.

pub mod dhcp;
pub mod orders;
pub mod report;
pub mod seed;
