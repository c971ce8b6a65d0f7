//! Which Machines of the cluster netboot serves, by the rules both inventories share
//! ([`crate::machines`]: [`machines::check`], then a MAC or IP claimed by several valid Machines
//! disqualifies all of them, [`conflicts::clash`]), kept up to date one Machine at a time.
//!
//! [`Judge`] follows the watch events: a status write (most events) changes nothing it depends
//! on and costs a map lookup; a changed spec re-judges that Machine and the Machines sharing its
//! old or new MAC or IP only. Judging the whole set on every reconcile cost about 2 ms at 1000
//! Machines, O(n²) over a burst of status changes. `judge` (the whole set at once, through
//! [`machines::judge`]) is the reference it is tested against.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::Ipv4Addr;
use std::sync::Arc;

use kube::{Resource, ResourceExt};
use netboot::MacAddr;

use super::crd::{Machine, MachineSpec};
use crate::machines::{self, conflicts, AddressRules, Invalid, Problem};

/// The verdict on every Machine at one moment.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Verdicts {
    /// What netboot answers, by MAC.
    pub served: HashMap<MacAddr, netboot::Machine>,
    /// Every Machine not served, by name.
    pub problems: BTreeMap<String, Problem>,
    /// `spec.reimage` of the served Machines that set it, by name.
    pub reimage: HashMap<String, String>,
    /// The served Machines' own image and disk hints, by name (those that give any).
    pub imaging: HashMap<String, machines::ImagingSpec>,
}

impl From<machines::Snapshot> for Verdicts {
    fn from(snapshot: machines::Snapshot) -> Verdicts {
        Verdicts {
            served: snapshot.served,
            problems: snapshot
                .rejected
                .into_iter()
                .filter_map(|r| Some((r.machine?, r.problem)))
                .collect(),
            reimage: snapshot.reimage,
            imaging: snapshot.imaging,
        }
    }
}

/// Judges `machines` at once, exactly like the YAML folder ([`machines::judge`]). Machines
/// being deleted (and `leaving`) are not served and claim nothing.
#[cfg(test)]
pub fn judge(machines: &[Arc<Machine>], rules: &AddressRules, leaving: Option<&str>) -> Verdicts {
    let mut named: Vec<(String, &Machine)> = machines
        .iter()
        .filter(|m| m.meta().deletion_timestamp.is_none())
        .map(|m| (m.name_any(), m.as_ref()))
        .filter(|(name, _)| leaving != Some(name.as_str()))
        .collect();
    // By name: conflict messages list the other claimants in this order.
    named.sort_by(|a, b| a.0.cmp(&b.0));
    let claims = named.iter().map(|(name, m)| machines::Claim {
        name,
        spec: &m.spec,
        file: None,
        document: None,
    });
    machines::judge(claims, rules).into()
}

/// What judging a Machine depends on: its spec, and whether it is being deleted (its status
/// does not count).
#[derive(Debug, Clone, PartialEq)]
struct Input {
    spec: MachineSpec,
    /// Being deleted: not served, claims nothing.
    leaving: bool,
}

impl Input {
    fn of(machine: &Machine) -> Input {
        Input {
            spec: machine.spec.clone(),
            leaving: machine.meta().deletion_timestamp.is_some(),
        }
    }

    /// Whether `machine` is judged on exactly this (compared in place: no copy for the common
    /// case of a status-only change).
    fn same_as(&self, machine: &Machine) -> bool {
        self.spec == machine.spec && self.leaving == machine.meta().deletion_timestamp.is_some()
    }
}

#[derive(Debug)]
enum Checked {
    Leaving,
    Invalid(Invalid),
    Valid(netboot::Machine),
}

#[derive(Debug)]
struct Entry {
    input: Input,
    checked: Checked,
}

/// What an update changed, for the caller to act on (the netboot table, reimage requests,
/// the Machines' own imaging orders, reconciling the other party of a conflict).
#[derive(Debug, Default, PartialEq)]
pub struct Outcome {
    pub served_changed: bool,
    pub reimage_changed: bool,
    pub imaging_changed: bool,
    /// Machines whose problem appeared, changed or went away.
    pub problems_changed: BTreeSet<String>,
}

impl Outcome {
    pub fn is_empty(&self) -> bool {
        !self.served_changed
            && !self.reimage_changed
            && !self.imaging_changed
            && self.problems_changed.is_empty()
    }
}

/// The verdicts of a set of Machines, kept up to date one Machine at a time.
#[derive(Debug)]
pub struct Judge {
    rules: AddressRules,
    entries: HashMap<String, Entry>,
    /// The valid Machines claiming each MAC and each IP, by name.
    by_mac: HashMap<MacAddr, BTreeSet<String>>,
    by_ip: HashMap<Ipv4Addr, BTreeSet<String>>,
    /// The MAC each served Machine is served under.
    served_mac: HashMap<String, MacAddr>,
    verdicts: Verdicts,
}

impl Judge {
    pub fn new(rules: AddressRules) -> Judge {
        Judge {
            rules,
            entries: HashMap::new(),
            by_mac: HashMap::new(),
            by_ip: HashMap::new(),
            served_mac: HashMap::new(),
            verdicts: Verdicts::default(),
        }
    }

    /// A judge of `machines` (a full list), built in one pass.
    pub fn of(rules: AddressRules, machines: impl IntoIterator<Item = Arc<Machine>>) -> Judge {
        let mut judge = Judge::new(rules);
        judge.rebuild(machines.into_iter().map(|m| (m.name_any(), Input::of(&m))));
        judge
    }

    pub fn verdicts(&self) -> &Verdicts {
        &self.verdicts
    }

    pub fn problem(&self, name: &str) -> Option<&Problem> {
        self.verdicts.problems.get(name)
    }

    /// The Machine was added or changed (a deletion timestamp included).
    pub fn update(&mut self, machine: &Machine) -> Outcome {
        let name = machine.name_any();
        if let Some(entry) = self.entries.get(&name) {
            if entry.input.same_as(machine) {
                return Outcome::default();
            }
        }
        self.set(&name, Some(Input::of(machine)))
    }

    /// The Machine is being deleted: no longer served, claims nothing (also before its
    /// deletion timestamp has been seen here).
    pub fn leave(&mut self, name: &str) -> Outcome {
        let Some(entry) = self.entries.get(name) else {
            return Outcome::default();
        };
        if entry.input.leaving {
            return Outcome::default();
        }
        let mut input = entry.input.clone();
        input.leaving = true;
        self.set(name, Some(input))
    }

    /// The Machine is gone.
    pub fn remove(&mut self, name: &str) -> Outcome {
        if !self.entries.contains_key(name) {
            return Outcome::default();
        }
        self.set(name, None)
    }

    /// What changed from `before` to `self` (both judged in full).
    pub fn compare(before: &Judge, after: &Judge) -> Outcome {
        let (b, a) = (&before.verdicts, &after.verdicts);
        let mut problems_changed = BTreeSet::new();
        for (name, problem) in &a.problems {
            if b.problems.get(name) != Some(problem) {
                problems_changed.insert(name.clone());
            }
        }
        for name in b.problems.keys() {
            if !a.problems.contains_key(name) {
                problems_changed.insert(name.clone());
            }
        }
        Outcome {
            served_changed: b.served != a.served,
            reimage_changed: b.reimage != a.reimage,
            imaging_changed: b.imaging != a.imaging,
            problems_changed,
        }
    }

    fn check(&self, name: &str, input: &Input) -> Checked {
        if input.leaving {
            return Checked::Leaving;
        }
        match machines::check(name, &input.spec, &self.rules) {
            Ok(machine) => Checked::Valid(machine),
            Err(invalid) => Checked::Invalid(invalid),
        }
    }

    /// Replaces everything with `inputs`: indexes first, then one verdict per Machine.
    fn rebuild(&mut self, inputs: impl Iterator<Item = (String, Input)>) {
        *self = Judge::new(self.rules.clone());
        for (name, input) in inputs {
            let checked = self.check(&name, &input);
            self.index(&name, &checked);
            self.entries.insert(name, Entry { input, checked });
        }
        let names: Vec<String> = self.entries.keys().cloned().collect();
        let mut outcome = Outcome::default();
        for name in names {
            self.recompute(&name, &mut outcome);
        }
    }

    fn index(&mut self, name: &str, checked: &Checked) {
        if let Checked::Valid(m) = checked {
            self.by_mac
                .entry(m.mac)
                .or_default()
                .insert(name.to_string());
            self.by_ip.entry(m.ip).or_default().insert(name.to_string());
        }
    }

    /// Takes `name` out of the indexes; returns the other claimants of its MAC and IP.
    fn unindex(&mut self, name: &str, checked: &Checked) -> Vec<String> {
        let mut others = Vec::new();
        if let Checked::Valid(m) = checked {
            for owners in [self.by_mac.get_mut(&m.mac), self.by_ip.get_mut(&m.ip)]
                .into_iter()
                .flatten()
            {
                owners.remove(name);
                others.extend(owners.iter().cloned());
            }
            if self.by_mac.get(&m.mac).is_some_and(BTreeSet::is_empty) {
                self.by_mac.remove(&m.mac);
            }
            if self.by_ip.get(&m.ip).is_some_and(BTreeSet::is_empty) {
                self.by_ip.remove(&m.ip);
            }
        }
        others
    }

    fn set(&mut self, name: &str, input: Option<Input>) -> Outcome {
        let mut affected: BTreeSet<String> = BTreeSet::from([name.to_string()]);
        if let Some(old) = self.entries.remove(name) {
            affected.extend(self.unindex(name, &old.checked));
        }
        if let Some(input) = input {
            let checked = self.check(name, &input);
            self.index(name, &checked);
            if let Checked::Valid(m) = &checked {
                for owners in [self.by_mac.get(&m.mac), self.by_ip.get(&m.ip)]
                    .into_iter()
                    .flatten()
                {
                    affected.extend(owners.iter().cloned());
                }
            }
            self.entries
                .insert(name.to_string(), Entry { input, checked });
        }
        let mut outcome = Outcome::default();
        for name in &affected {
            self.recompute(name, &mut outcome);
        }
        outcome
    }

    /// The verdict on `name` from its entry and the indexes.
    fn recompute(&mut self, name: &str, outcome: &mut Outcome) {
        let was_served = self
            .served_mac
            .remove(name)
            .and_then(|mac| self.verdicts.served.remove(&mac));
        let was_reimage = self.verdicts.reimage.remove(name);
        let was_imaging = self.verdicts.imaging.remove(name);
        let had = self.verdicts.problems.remove(name);
        let mut served = None;
        let mut reimage = None;
        let mut imaging = None;
        let mut problem = None;
        match self.entries.get(name) {
            None => {}
            Some(Entry {
                checked: Checked::Leaving,
                ..
            }) => {}
            Some(Entry {
                checked: Checked::Invalid(reason),
                ..
            }) => problem = Some(Problem::Invalid(reason.clone())),
            Some(Entry {
                checked: Checked::Valid(machine),
                input,
            }) => {
                // The other claimants of each key, by name (in the cluster names are unique:
                // no name clashes).
                fn others<'a>(
                    owners: Option<&'a BTreeSet<String>>,
                    name: &str,
                ) -> Option<Vec<&'a str>> {
                    let owners = owners?;
                    (owners.len() > 1).then(|| {
                        owners
                            .iter()
                            .filter(|o| o.as_str() != name)
                            .map(String::as_str)
                            .collect()
                    })
                }
                let mut clashes = Vec::new();
                if let Some(others) = others(self.by_mac.get(&machine.mac), name) {
                    clashes.push(conflicts::clash(&conflicts::Key::Mac(machine.mac), &others));
                }
                if let Some(others) = others(self.by_ip.get(&machine.ip), name) {
                    clashes.push(conflicts::clash(&conflicts::Key::Ip(machine.ip), &others));
                }
                if clashes.is_empty() {
                    served = Some(machine.clone());
                    reimage = input.spec.reimage.clone();
                    imaging = Some(machines::imaging(&input.spec)).filter(|i| !i.is_empty());
                } else {
                    problem = Some(Problem::Conflict(clashes));
                }
            }
        }
        if served != was_served {
            outcome.served_changed = true;
        }
        if reimage != was_reimage {
            outcome.reimage_changed = true;
        }
        if imaging != was_imaging {
            outcome.imaging_changed = true;
        }
        if problem != had {
            outcome.problems_changed.insert(name.to_string());
        }
        if let Some(machine) = served {
            self.served_mac.insert(name.to_string(), machine.mac);
            self.verdicts.served.insert(machine.mac, machine);
        }
        if let Some(value) = reimage {
            self.verdicts.reimage.insert(name.to_string(), value);
        }
        if let Some(value) = imaging {
            self.verdicts.imaging.insert(name.to_string(), value);
        }
        if let Some(problem) = problem {
            self.verdicts.problems.insert(name.to_string(), problem);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules() -> AddressRules {
        AddressRules {
            subnet: "10.77.0.0/24".parse().expect("cidr"),
            reserved: vec![Ipv4Addr::new(10, 77, 0, 1)],
        }
    }

    fn machine(name: &str, mac: u8, ip: u8) -> Machine {
        Machine::new(
            name,
            MachineSpec {
                mac_address: format!("52:54:00:00:00:{mac:02x}"),
                ip_address: format!("10.77.0.{ip}"),
                hostname: None,
                image: None,
                root_device: None,
                reimage: None,
            },
        )
    }

    /// A small deterministic generator (xorshift): the same sequence on every run.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self, below: u64) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0 % below
        }
    }

    /// Random adds, spec changes (MAC, IP, an invalid IP, reimage, a root device), deletions
    /// and removals over a few names and few addresses (so clashes come and go): after every
    /// step the incremental verdicts equal a full judgement of the same set, and the outcome
    /// names exactly what changed.
    #[test]
    fn incremental_verdicts_equal_a_full_judgement() {
        let mut rng = Rng(0x2545_f491_4f6c_dd1d);
        let mut judge = Judge::new(rules());
        let mut set: BTreeMap<String, Machine> = BTreeMap::new();
        let mut clashes_seen = 0;
        let mut imaging_changes = 0;
        for step in 0..3000 {
            let name = format!("m{}", rng.next(12));
            let before = Judge::of(rules(), set.values().cloned().map(Arc::new));
            let outcome = match rng.next(10) {
                0 => {
                    set.remove(&name);
                    judge.remove(&name)
                }
                1 => match set.get_mut(&name) {
                    Some(m) => {
                        m.meta_mut().deletion_timestamp =
                            Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                                k8s_openapi::jiff::Timestamp::UNIX_EPOCH,
                            ));
                        judge.update(m)
                    }
                    None => judge.leave(&name),
                },
                2 => {
                    let mut m = machine(&name, rng.next(6) as u8, 2 + rng.next(6) as u8);
                    m.spec.ip_address = "10.78.0.9".into();
                    set.insert(name.clone(), m.clone());
                    judge.update(&m)
                }
                3 => {
                    let mut m = machine(&name, rng.next(6) as u8, 2 + rng.next(6) as u8);
                    m.spec.reimage = Some(format!("r{}", rng.next(2)));
                    set.insert(name.clone(), m.clone());
                    judge.update(&m)
                }
                4 => {
                    let mut m = machine(&name, rng.next(6) as u8, 2 + rng.next(6) as u8);
                    m.spec.root_device = Some(crate::cluster::crd::RootDeviceHints {
                        path: Some(format!("/dev/vd{}", ["a", "b"][rng.next(2) as usize])),
                        ..Default::default()
                    });
                    set.insert(name.clone(), m.clone());
                    judge.update(&m)
                }
                _ => {
                    let m = machine(&name, rng.next(6) as u8, 2 + rng.next(6) as u8);
                    set.insert(name.clone(), m.clone());
                    judge.update(&m)
                }
            };
            let full = judge_all(&set);
            assert_eq!(judge.verdicts(), &full, "step {step}");
            let expected = Judge::compare(
                &before,
                &Judge::of(rules(), set.values().cloned().map(Arc::new)),
            );
            assert_eq!(outcome, expected, "step {step}: outcome");
            imaging_changes += usize::from(outcome.imaging_changed);
            clashes_seen += full
                .problems
                .values()
                .filter(|p| matches!(p, Problem::Conflict(_)))
                .count();
        }
        assert!(
            clashes_seen > 1000,
            "the sequence makes clashes ({clashes_seen})"
        );
        assert!(
            imaging_changes > 100,
            "the sequence changes imaging orders ({imaging_changes})"
        );
    }

    fn judge_all(set: &BTreeMap<String, Machine>) -> Verdicts {
        let all: Vec<Arc<Machine>> = set.values().cloned().map(Arc::new).collect();
        judge(&all, &rules(), None)
    }

    /// A status write is the most common event: it changes nothing.
    #[test]
    fn a_status_change_changes_nothing() {
        let mut judge = Judge::new(rules());
        let mut m = machine("a", 1, 2);
        assert!(judge.update(&m).served_changed);
        m.status = Some(crate::cluster::crd::MachineStatus {
            phase: Some("PXEBooting".into()),
            ..Default::default()
        });
        assert!(judge.update(&m).is_empty());
    }

    /// Two claimants of one IP, then one moves away: the other is served again.
    #[test]
    fn a_conflict_resolves_when_one_claimant_moves() {
        let mut judge = Judge::new(rules());
        judge.update(&machine("a", 1, 10));
        let outcome = judge.update(&machine("b", 2, 10));
        assert_eq!(
            outcome.problems_changed,
            BTreeSet::from(["a".to_string(), "b".to_string()])
        );
        assert_eq!(
            judge.problem("a"),
            Some(&Problem::Conflict(vec![
                "ipAddress 10.77.0.10 is also claimed by Machine b".into()
            ]))
        );
        let outcome = judge.update(&machine("b", 2, 11));
        assert!(outcome.served_changed);
        assert_eq!(judge.verdicts().served.len(), 2);
        assert!(judge.verdicts().problems.is_empty());
    }
}
