//! Per-machine provisioning status: phase, progress, message and when the machine was last seen.
//!
//! The store is the one place phases change. Boot events from the servers and reports from
//! stage2 go through it; every change is sent to subscribers (D-Bus, `STATUS=`), every phase
//! change is one journald record with a fixed `MESSAGE_ID`, and the whole table is written to a
//! state file so that a restart in the middle of provisioning resumes where it was.
//!
//! It also keeps each machine's provisioning token bound to the machine (DESIGN.md, Security):
//!
//! * A token is handed out ([`StatusStore::imaging_token`]) only to a request from the
//!   machine's reserved address, within a window after netboot acknowledged the machine's DHCP
//!   lease (a *DHCP cycle*: each ACK starts a new one). In proxy mode the LAN's DHCP server
//!   sends the ACK: netboot's ProxyDHCP answer to the machine's iPXE (the one that names its
//!   script URL) starts the cycle instead, and the reserved address is the one the LAN's server
//!   must give the machine.
//! * A live token is never replaced by another request of the same cycle: a repeated script
//!   request (iPXE retrying) gets the same token. Only a new cycle (the machine booted from the
//!   network again) or a new provisioning (reimage) mints a new one. To give the same token
//!   again without storing it, its plain text is kept in memory for its cycle only (wiped when
//!   the next ACK comes, the window passes, or the machine leaves); the state file holds its
//!   sha256 only. Deriving it from a long-lived key instead would keep a key in memory that
//!   makes every token; this keeps at most one live secret per machine, for a few minutes.
//! * Reports and cloud-init fetches with the token must come from the reserved address too.
//!
//! DHCP cycles are not written to the state file: after a restart a machine must do DHCP again
//! before it is given a token (a token already given keeps working).
//!
//! | module | holds |
//! |---|---|
//! | `phase` | the phase model, [`MachineStatus`], the `STATUS=` summary |
//! | `store` | [`StatusStore`]: the table, the one place phases change, the broadcast of [`Change`]s |
//! | `credentials` | tokens, DHCP cycles, stage2's reports and the user-data gate |
//! | `state_file` | the state file: its format, the atomic writer, the restore |
//! | `journal` | the journald records |

mod credentials;
mod journal;
mod phase;
mod state_file;
mod store;
#[cfg(test)]
mod tests;

pub use phase::{MachineStatus, Phase, PhaseCounts};
pub use state_file::default_state_file;
pub use store::{Change, Report, StatusStore};
