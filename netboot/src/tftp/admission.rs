//! Which read requests get a transfer: at most `max_transfers` at once, at most
//! `max_transfers_per_peer` of them for one client address. When all are taken, a transfer is
//! stopped to make room: the oldest one whose client has not acknowledged anything yet, else
//! the one left waiting for an ACK the longest, if for at least a retransmission timeout (its
//! client is gone). A never-acknowledged flood from many addresses, however fast, thus only
//! ever displaces its own transfers: a newcomer always gets a place, and a client that has
//! acknowledged once keeps its transfer while it keeps acknowledging. (Any fixed grace before a
//! silent transfer may be displaced would let a fast enough flood refill every place as soon as
//! it became free.) A client's very first transfer is exposed for as long as its first ACK
//! takes, against `max_transfers` newer silent requests (64 at 300 requests/s: 210 ms); an
//! address that answered a transfer in the last [`KNOWN_FOR`] (a PXE client's tsize probe, an
//! earlier file) starts its transfers as answered.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

/// Stored times count from here, so that a time minus a few seconds stays one.
const TIME_BASE: u64 = 1 << 32;
/// How long an address that answered a transfer counts as known.
pub const KNOWN_FOR: Duration = Duration::from_secs(600);
/// Known addresses kept at most (expired ones are dropped first; beyond, no more are added).
const KNOWN_CAPACITY: usize = 4096;

/// What a transfer shares with the table.
struct Progress {
    /// Milliseconds (from [`TIME_BASE`]) of the last ACK that moved the transfer on, or of its
    /// start.
    last_ack: AtomicU64,
    /// The client has acknowledged something: it is there and answering.
    answered: AtomicBool,
}

impl Progress {
    fn now(epoch: Instant) -> u64 {
        TIME_BASE.saturating_add(u64::try_from(epoch.elapsed().as_millis()).unwrap_or(u64::MAX))
    }
}

struct Entry {
    peer: IpAddr,
    progress: Arc<Progress>,
    stop: CancellationToken,
}

#[derive(Default)]
struct Table {
    next_id: u64,
    entries: HashMap<u64, Entry>,
    per_peer: HashMap<IpAddr, usize>,
    /// Addresses that answered a transfer, and when they last did.
    known: HashMap<IpAddr, u64>,
}

impl Table {
    fn remove(&mut self, id: u64) -> Option<Entry> {
        let entry = self.entries.remove(&id)?;
        if let Some(n) = self.per_peer.get_mut(&entry.peer) {
            *n -= 1;
            if *n == 0 {
                self.per_peer.remove(&entry.peer);
            }
        }
        Some(entry)
    }
}

/// Why a request got no transfer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Busy {
    /// This address has its share.
    PerPeer,
    /// Every transfer is taken, acknowledged and moving.
    Full,
}

/// The transfer table.
pub(super) struct Transfers {
    max: usize,
    per_peer: usize,
    /// A transfer that was acknowledged before and has waited this long for the next ACK may
    /// be stopped to make room.
    stalled: Duration,
    epoch: Instant,
    table: Mutex<Table>,
}

/// A transfer's place; freed when dropped.
pub(super) struct Place {
    transfers: Arc<Transfers>,
    id: u64,
    peer: IpAddr,
    progress: Arc<Progress>,
    /// Cancelled when the transfer is stopped to make room.
    pub stop: CancellationToken,
}

impl Place {
    /// The client acknowledged something new (or answered at all: an ERROR counts).
    pub fn acked(&self) {
        let now = Progress::now(self.transfers.epoch);
        self.progress.last_ack.store(now, Ordering::Relaxed);
        if !self.progress.answered.swap(true, Ordering::Relaxed) {
            self.transfers.remember(self.peer, now);
        }
    }
}

impl Drop for Place {
    fn drop(&mut self) {
        self.transfers.lock().remove(self.id);
    }
}

impl Transfers {
    pub fn new(max: usize, per_peer: usize, stalled: Duration) -> Arc<Transfers> {
        Arc::new(Transfers {
            max: max.max(1),
            per_peer: per_peer.max(1),
            stalled,
            epoch: Instant::now(),
            table: Mutex::new(Table::default()),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Table> {
        match self.table.lock() {
            Ok(guard) => guard,
            Err(poisoned) => poisoned.into_inner(),
        }
    }

    fn remember(&self, peer: IpAddr, now: u64) {
        let ttl = u64::try_from(KNOWN_FOR.as_millis()).unwrap_or(u64::MAX);
        let mut table = self.lock();
        if table.known.len() >= KNOWN_CAPACITY && !table.known.contains_key(&peer) {
            table.known.retain(|_, at| now.saturating_sub(*at) < ttl);
            if table.known.len() >= KNOWN_CAPACITY {
                return;
            }
        }
        table.known.insert(peer, now);
    }

    /// A place for a transfer to `peer`; `Ok((place, stopped))` tells whether another transfer
    /// was stopped for it.
    pub fn admit(self: &Arc<Self>, peer: IpAddr) -> Result<(Place, bool), Busy> {
        let now = Progress::now(self.epoch);
        let mut table = self.lock();
        if table.per_peer.get(&peer).copied().unwrap_or(0) >= self.per_peer {
            return Err(Busy::PerPeer);
        }
        let mut stopped = false;
        if table.entries.len() >= self.max {
            let stalled = u64::try_from(self.stalled.as_millis()).unwrap_or(u64::MAX);
            // Never answered first (oldest first), then gone quiet (longest first).
            let victim = table
                .entries
                .iter()
                .filter_map(|(id, e)| {
                    let last = e.progress.last_ack.load(Ordering::Relaxed);
                    if !e.progress.answered.load(Ordering::Relaxed) {
                        Some((0u8, last, *id))
                    } else {
                        (now.saturating_sub(last) >= stalled).then_some((1u8, last, *id))
                    }
                })
                .min()
                .map(|(_, _, id)| id);
            match victim.and_then(|id| table.remove(id)) {
                Some(entry) => {
                    entry.stop.cancel();
                    stopped = true;
                }
                None => return Err(Busy::Full),
            }
        }
        let id = table.next_id;
        table.next_id += 1;
        let ttl = u64::try_from(KNOWN_FOR.as_millis()).unwrap_or(u64::MAX);
        let known = table
            .known
            .get(&peer)
            .is_some_and(|at| now.saturating_sub(*at) < ttl);
        let progress = Arc::new(Progress {
            last_ack: AtomicU64::new(now),
            answered: AtomicBool::new(known),
        });
        let stop = CancellationToken::new();
        table.entries.insert(
            id,
            Entry {
                peer,
                progress: progress.clone(),
                stop: stop.clone(),
            },
        );
        *table.per_peer.entry(peer).or_default() += 1;
        Ok((
            Place {
                transfers: self.clone(),
                id,
                peer,
                progress,
                stop,
            },
            stopped,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shares_caps_and_stopping_the_silent_then_the_stalled() {
        let transfers = Transfers::new(3, 2, Duration::from_millis(1000));
        let a: IpAddr = "10.0.0.1".parse().expect("ip");
        let b: IpAddr = "10.0.0.2".parse().expect("ip");
        let c: IpAddr = "10.0.0.3".parse().expect("ip");
        let (a1, _) = transfers.admit(a).expect("a1");
        let (a2, _) = transfers.admit(a).expect("a2");
        assert_eq!(transfers.admit(a).err(), Some(Busy::PerPeer));
        let (b1, _) = transfers.admit(b).expect("b1");
        // Full. None has been acknowledged: the oldest goes, however young.
        let (b2, stopped) = transfers.admit(b).expect("b2 takes a1's place");
        assert!(stopped && a1.stop.is_cancelled() && !a2.stop.is_cancelled());
        // a1's place dropping later frees nothing more.
        drop(a1);
        assert_eq!(transfers.lock().entries.len(), 3);
        // Every client answers and keeps answering: busy.
        for p in [&a2, &b1, &b2] {
            p.acked();
        }
        assert_eq!(transfers.admit(c).err(), Some(Busy::Full));
        // b1 went quiet 2 s ago, a2 1.5 s ago: b1 goes first.
        let now = Progress::now(transfers.epoch);
        b1.progress.last_ack.store(now - 2000, Ordering::Relaxed);
        a2.progress.last_ack.store(now - 1500, Ordering::Relaxed);
        let (c1, stopped) = transfers.admit(c).expect("c1 takes b1's place");
        assert!(stopped && b1.stop.is_cancelled() && !a2.stop.is_cancelled());
        c1.acked();
        let (c2, _) = transfers.admit(c).expect("c2 takes a2's place");
        assert!(a2.stop.is_cancelled());
        // c answered before: c2 counts as answered. b2 went quiet 5 s ago and goes for d1.
        b2.progress.last_ack.store(now - 5000, Ordering::Relaxed);
        let d: IpAddr = "10.0.0.4".parse().expect("ip");
        let (d1, _) = transfers.admit(d).expect("d1 takes b2's place");
        assert!(b2.stop.is_cancelled());
        // d has never answered: its silent transfer goes first.
        let (a3, _) = transfers.admit(a).expect("a3 takes d1's place");
        assert!(d1.stop.is_cancelled() && !c1.stop.is_cancelled() && !c2.stop.is_cancelled());
        drop((a2, a3, b1, b2, c1, c2, d1));
        assert_eq!(transfers.lock().entries.len(), 0);
        assert!(transfers.lock().per_peer.is_empty());
    }

    #[test]
    fn an_address_that_answered_starts_as_answered() {
        let transfers = Transfers::new(2, 2, Duration::from_secs(1));
        let known: IpAddr = "10.0.0.20".parse().expect("ip");
        let other: IpAddr = "10.0.0.99".parse().expect("ip");
        let (first, _) = transfers.admit(known).expect("first");
        first.acked();
        drop(first);
        // Its next transfer, silent so far, outlasts a stranger's silent one.
        let (again, _) = transfers.admit(known).expect("again");
        let (stranger, _) = transfers.admit(other).expect("stranger");
        let (_newcomer, stopped) = transfers.admit(other).expect("newcomer");
        assert!(stopped && stranger.stop.is_cancelled() && !again.stop.is_cancelled());
        // Still full of an answered, moving transfer and the silent newcomer: the newcomer goes.
        let (_next, _) = transfers.admit(other).expect("next");
        assert!(!again.stop.is_cancelled());
    }
}
