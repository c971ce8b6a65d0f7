//! stage2: PID 1 of the imaging initrd, as a library so its parts are tested on the host.
//! What it is told (its orders on the kernel command line) and what it reports back are the
//! `wire` crate's, shared with netboot.
//!
//! - [`image`]: streams an image onto a disk, verified, so a partial image never boots;
//! - [`provision`]: the imaging step: disk, image, cloud-init drop-in, reports to netboot;
//! - [`disk`]: which disk to write, from sysfs, never guessing;
//! - [`init`]: PID 1 itself: API file systems, drivers, DHCP;
//! - [`modules`]: kernel module index (modules.dep/alias/softdep) and loading;
//! - [`initrd`]: builds the initrd that carries stage2 and the modules.

pub mod disk;
pub mod image;
pub mod init;
pub mod initrd;
pub mod modules;
pub mod provision;
