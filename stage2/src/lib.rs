//! stage2: PID 1 of the imaging initrd, as a library so its parts are tested on the host.
//!
//! - [`init`]: PID 1 itself: API file systems, drivers, DHCP;
//! - [`modules`]: kernel module index (modules.dep/alias/softdep) and loading;
//! - [`initrd`]: builds the initrd that carries stage2 and the modules.

pub mod init;
pub mod initrd;
pub mod modules;
