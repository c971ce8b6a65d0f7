//! Which disk to image, from a sysfs tree (`/sys/block`, or a fake tree in tests). The rule:
//! the hinted disk if hints are given; otherwise the only disk that is non-removable,
//! writable, not on USB, not virtual (loop, ram, zram, dm, md, nbd…) and large enough. Zero or
//! several candidates is an error listing every disk and why it was or was not chosen: we
//! never guess.

use std::fmt;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use wire::orders::DiskHints;

const SECTOR: u64 = 512;

/// Whether the hints name a disk (rather than only filtering by size).
fn identifies_a_disk(hints: &DiskHints) -> bool {
    hints.path.is_some() || hints.serial.is_some() || hints.model.is_some()
}

/// A whole disk as sysfs describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Disk {
    /// Kernel name, e.g. `vda`, `nvme0n1`.
    pub name: String,
    /// `/dev/NAME`.
    pub dev_path: PathBuf,
    pub size: u64,
    pub read_only: bool,
    pub removable: bool,
    pub usb: bool,
    /// Not real hardware (loop, ram, zram, device mapper, md, nbd, …) or a special area of a
    /// real device (eMMC boot partitions, RPMB, hidden NVMe multipath paths).
    pub not_a_plain_disk: bool,
    pub serial: Option<String>,
    pub model: Option<String>,
}

impl fmt::Display for Disk {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} ({} bytes, {:.1} GiB",
            self.dev_path.display(),
            self.size,
            self.size as f64 / (1u64 << 30) as f64
        )?;
        if let Some(model) = &self.model {
            write!(f, ", model {model:?}")?;
        }
        if let Some(serial) = &self.serial {
            write!(f, ", serial {serial:?}")?;
        }
        f.write_str(")")
    }
}

/// A disk and why it was left out (empty: it is a candidate).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Considered {
    pub disk: Disk,
    pub excluded_because: Vec<String>,
}

/// Every disk seen, one per line, with the reasons.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskList(pub Vec<Considered>);

impl fmt::Display for DiskList {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_empty() {
            return f.write_str("\n  (no disks at all)");
        }
        for considered in &self.0 {
            write!(f, "\n  {}", considered.disk)?;
            if considered.excluded_because.is_empty() {
                f.write_str(": candidate")?;
            } else {
                write!(f, ": {}", considered.excluded_because.join(", "))?;
            }
        }
        Ok(())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    #[error("cannot read {path}: {source}")]
    Sysfs { path: PathBuf, source: io::Error },
    #[error("no disk matches the hints ({hints}); disks:{disks}")]
    HintMatchesNothing {
        hints: Box<DiskHints>,
        disks: DiskList,
    },
    #[error("several disks match the hints ({hints}), refusing to pick one; disks:{disks}")]
    HintMatchesSeveral {
        hints: Box<DiskHints>,
        disks: DiskList,
    },
    #[error("the hinted disk {disk} cannot be used: {reasons}")]
    HintedDiskUnusable { disk: Box<Disk>, reasons: String },
    #[error("no disk qualifies (non-removable, writable, not USB, not virtual, large enough); disks:{disks}")]
    NoCandidate { disks: DiskList },
    #[error("several disks qualify, refusing to guess; give a disk hint. Disks:{disks}")]
    SeveralCandidates { disks: DiskList },
}

fn read_attr(path: &Path) -> Option<String> {
    let text = fs::read(path).ok()?;
    let text = String::from_utf8_lossy(&text).trim().to_owned();
    (!text.is_empty()).then_some(text)
}

fn read_flag(path: &Path) -> bool {
    read_attr(path).is_some_and(|v| v == "1")
}

/// Reads one disk from `sys_block/NAME`.
pub fn read_disk(sys_block: &Path, name: &str) -> Result<Disk, DiskError> {
    let dir = sys_block.join(name);
    let size_path = dir.join("size");
    let sectors = read_attr(&size_path)
        .and_then(|v| v.parse::<u64>().ok())
        .ok_or_else(|| DiskError::Sysfs {
            path: size_path.clone(),
            source: io::Error::new(io::ErrorKind::InvalidData, "missing or not a number"),
        })?;
    // /sys/block/NAME links into /sys/devices/…: the path says how the disk is attached.
    let device_path = fs::canonicalize(&dir).unwrap_or_else(|_| dir.clone());
    let usb = device_path
        .components()
        .any(|c| c.as_os_str().to_string_lossy().starts_with("usb"));
    let virtual_device = device_path.to_string_lossy().contains("/devices/virtual/");
    const VIRTUAL_PREFIXES: &[&str] = &[
        "loop", "ram", "zram", "dm-", "md", "nbd", "sr", "fd", "mtdblock", "ubiblock",
    ];
    let special_name = VIRTUAL_PREFIXES.iter().any(|p| name.starts_with(p))
        || (name.starts_with("mmcblk") && (name.contains("boot") || name.contains("rpmb")));
    // vpd_pg80 (SCSI unit serial number page) has a 4-byte header before the ASCII serial.
    let vpd_serial = || {
        let raw = fs::read(dir.join("device/vpd_pg80")).ok()?;
        let text = String::from_utf8_lossy(raw.get(4..)?).trim().to_owned();
        (!text.is_empty()).then_some(text)
    };
    Ok(Disk {
        name: name.to_owned(),
        dev_path: Path::new("/dev").join(name),
        size: sectors * SECTOR,
        read_only: read_flag(&dir.join("ro")),
        removable: read_flag(&dir.join("removable")),
        usb,
        not_a_plain_disk: virtual_device || special_name || read_flag(&dir.join("hidden")),
        serial: read_attr(&dir.join("serial"))
            .or_else(|| read_attr(&dir.join("device/serial")))
            .or_else(vpd_serial),
        model: read_attr(&dir.join("device/model")),
    })
}

/// Every entry of `sys_block`, sorted by name.
pub fn list_disks(sys_block: &Path) -> Result<Vec<Disk>, DiskError> {
    let entries = fs::read_dir(sys_block).map_err(|source| DiskError::Sysfs {
        path: sys_block.to_owned(),
        source,
    })?;
    let mut names: Vec<String> = entries
        .filter_map(|entry| entry.ok())
        .map(|entry| entry.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
        .iter()
        .map(|name| read_disk(sys_block, name))
        .collect()
}

/// The kernel name a path hint refers to: `/dev/vda` → `vda`; symlinks such as
/// `/dev/disk/by-id/…` are resolved when they exist on this system.
fn hinted_name(path: &Path) -> Option<String> {
    let resolved = fs::canonicalize(path).unwrap_or_else(|_| path.to_owned());
    resolved
        .file_name()
        .map(|name| name.to_string_lossy().into_owned())
}

/// True when the hint is not given, else what `check` says.
fn matches_if_given<T>(hint: Option<T>, check: impl FnOnce(T) -> bool) -> bool {
    match hint {
        None => true,
        Some(hint) => check(hint),
    }
}

fn matches_hints(disk: &Disk, hints: &DiskHints) -> bool {
    matches_if_given(hints.path.as_deref(), |path| {
        hinted_name(Path::new(path)).as_deref() == Some(&disk.name)
    }) && matches_if_given(hints.serial.as_deref(), |serial| {
        disk.serial.as_deref() == Some(serial.trim())
    }) && matches_if_given(hints.model.as_deref(), |model| {
        disk.model
            .as_deref()
            .is_some_and(|m| m.trim().eq_ignore_ascii_case(model.trim()))
    })
}

/// Why `disk` cannot take the image even when chosen explicitly.
fn unusable_reasons(disk: &Disk, hints: &DiskHints, image_size: Option<u64>) -> Vec<String> {
    let mut reasons = Vec::new();
    if disk.read_only {
        reasons.push("read-only".to_owned());
    }
    if disk.size == 0 {
        reasons.push("no medium (size 0)".to_owned());
    }
    if let Some(image) = image_size.filter(|&image| disk.size < image) {
        reasons.push(format!("smaller than the image ({image} bytes)"));
    }
    if let Some(min) = hints.min_size.filter(|&min| disk.size < min) {
        reasons.push(format!("smaller than the minimum size hint ({min} bytes)"));
    }
    reasons
}

/// Chooses the disk to image; see the module documentation for the rule.
pub fn choose_disk(
    sys_block: &Path,
    hints: &DiskHints,
    image_size: Option<u64>,
) -> Result<Disk, DiskError> {
    let disks = list_disks(sys_block)?;
    if identifies_a_disk(hints) {
        let considered: Vec<Considered> = disks
            .into_iter()
            .map(|disk| {
                let excluded_because = if matches_hints(&disk, hints) {
                    Vec::new()
                } else {
                    vec!["does not match the hints".to_owned()]
                };
                Considered {
                    disk,
                    excluded_because,
                }
            })
            .collect();
        let matching: Vec<&Considered> = considered
            .iter()
            .filter(|c| c.excluded_because.is_empty())
            .collect();
        return match matching.as_slice() {
            [only] => {
                let reasons = unusable_reasons(&only.disk, hints, image_size);
                if reasons.is_empty() {
                    Ok(only.disk.clone())
                } else {
                    Err(DiskError::HintedDiskUnusable {
                        disk: Box::new(only.disk.clone()),
                        reasons: reasons.join(", "),
                    })
                }
            }
            [] => Err(DiskError::HintMatchesNothing {
                hints: Box::new(hints.clone()),
                disks: DiskList(considered),
            }),
            _ => Err(DiskError::HintMatchesSeveral {
                hints: Box::new(hints.clone()),
                disks: DiskList(considered),
            }),
        };
    }

    let considered: Vec<Considered> = disks
        .into_iter()
        .map(|disk| {
            let mut excluded_because = Vec::new();
            if disk.not_a_plain_disk {
                excluded_because.push("virtual or special device".to_owned());
            }
            if disk.removable {
                excluded_because.push("removable".to_owned());
            }
            if disk.usb {
                excluded_because.push("on USB".to_owned());
            }
            excluded_because.extend(unusable_reasons(&disk, hints, image_size));
            Considered {
                disk,
                excluded_because,
            }
        })
        .collect();
    let candidates: Vec<&Considered> = considered
        .iter()
        .filter(|c| c.excluded_because.is_empty())
        .collect();
    match candidates.as_slice() {
        [only] => Ok(only.disk.clone()),
        [] => Err(DiskError::NoCandidate {
            disks: DiskList(considered),
        }),
        _ => Err(DiskError::SeveralCandidates {
            disks: DiskList(considered),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    const GIB: u64 = 1 << 30;

    /// A fake `/sys` with `block/NAME` symlinks into `devices/…`, as the kernel lays it out.
    struct FakeSys {
        root: tempfile::TempDir,
    }

    struct FakeDisk<'a> {
        name: &'a str,
        /// Where under `devices/` the disk sits, e.g. `pci0000:00/0000:00:04.0/virtio1`.
        bus_path: &'a str,
        size: u64,
        ro: bool,
        removable: bool,
        serial: Option<&'a str>,
        model: Option<&'a str>,
    }

    impl<'a> FakeDisk<'a> {
        fn new(name: &'a str, bus_path: &'a str, size: u64) -> Self {
            Self {
                name,
                bus_path,
                size,
                ro: false,
                removable: false,
                serial: None,
                model: None,
            }
        }
    }

    impl FakeSys {
        fn new() -> Self {
            let root = tempfile::tempdir().expect("ok");
            fs::create_dir_all(root.path().join("block")).expect("ok");
            Self { root }
        }

        fn block(&self) -> PathBuf {
            self.root.path().join("block")
        }

        fn add(&self, disk: FakeDisk) -> &Self {
            let dir = self
                .root
                .path()
                .join("devices")
                .join(disk.bus_path)
                .join("block")
                .join(disk.name);
            fs::create_dir_all(dir.join("device")).expect("ok");
            fs::write(dir.join("size"), format!("{}\n", disk.size / SECTOR)).expect("ok");
            fs::write(dir.join("ro"), if disk.ro { "1\n" } else { "0\n" }).expect("ok");
            fs::write(
                dir.join("removable"),
                if disk.removable { "1\n" } else { "0\n" },
            )
            .expect("ok");
            if let Some(serial) = disk.serial {
                fs::write(dir.join("serial"), serial).expect("ok");
            }
            if let Some(model) = disk.model {
                fs::write(dir.join("device/model"), format!("{model:<16}\n")).expect("ok");
            }
            let target = Path::new("../devices")
                .join(disk.bus_path)
                .join("block")
                .join(disk.name);
            symlink(target, self.block().join(disk.name)).expect("ok");
            self
        }
    }

    fn typical_machine() -> FakeSys {
        let sys = FakeSys::new();
        sys.add(FakeDisk {
            serial: Some("disk-a"),
            ..FakeDisk::new("vda", "pci0000:00/0000:00:04.0/virtio1", 20 * GIB)
        })
        .add(FakeDisk::new("loop0", "virtual", 30 * GIB))
        .add(FakeDisk::new("zram0", "virtual", 30 * GIB))
        .add(FakeDisk::new("ram0", "virtual", 30 * GIB))
        .add(FakeDisk::new("dm-0", "virtual", 30 * GIB))
        .add(FakeDisk {
            removable: true,
            ..FakeDisk::new("sr0", "pci0000:00/0000:00:01.1/ata2/host1", GIB)
        })
        .add(FakeDisk {
            model: Some("USB Stick"),
            ..FakeDisk::new(
                "sdb",
                "pci0000:00/0000:00:14.0/usb1/1-1/1-1:1.0/host3/target3:0:0/3:0:0:0",
                64 * GIB,
            )
        })
        .add(FakeDisk {
            ro: true,
            ..FakeDisk::new("sdc", "pci0000:00/0000:00:1f.2/ata3/host2", 64 * GIB)
        });
        sys
    }

    #[test]
    fn the_only_plain_writable_disk_is_chosen() {
        let sys = typical_machine();
        let disk = choose_disk(&sys.block(), &DiskHints::default(), Some(GIB)).expect("ok");
        assert_eq!(disk.name, "vda");
        assert_eq!(disk.dev_path, Path::new("/dev/vda"));
        assert_eq!(disk.size, 20 * GIB);
        assert_eq!(disk.serial.as_deref(), Some("disk-a"));
    }

    #[test]
    fn usb_is_seen_from_the_device_path() {
        let sys = typical_machine();
        let sdb = read_disk(&sys.block(), "sdb").expect("ok");
        assert!(sdb.usb);
        assert_eq!(sdb.model.as_deref(), Some("USB Stick"));
        assert!(!read_disk(&sys.block(), "vda").expect("ok").usb);
        assert!(
            read_disk(&sys.block(), "loop0")
                .expect("ok")
                .not_a_plain_disk
        );
    }

    #[test]
    fn two_equal_disks_are_refused_and_listed() {
        let sys = FakeSys::new();
        sys.add(FakeDisk::new(
            "vda",
            "pci0000:00/0000:00:04.0/virtio1",
            20 * GIB,
        ))
        .add(FakeDisk::new(
            "vdb",
            "pci0000:00/0000:00:05.0/virtio2",
            20 * GIB,
        ));
        let error =
            choose_disk(&sys.block(), &DiskHints::default(), Some(GIB)).expect_err("must fail");
        let DiskError::SeveralCandidates { disks } = &error else {
            panic!("unexpected: {error}");
        };
        assert_eq!(disks.0.len(), 2);
        let message = error.to_string();
        assert!(
            message.contains("/dev/vda") && message.contains("/dev/vdb"),
            "{message}"
        );
        assert!(message.contains("candidate"), "{message}");
    }

    #[test]
    fn no_candidate_lists_every_disk_with_its_reason() {
        let sys = typical_machine();
        let error = choose_disk(&sys.block(), &DiskHints::default(), Some(40 * GIB))
            .expect_err("must fail");
        assert!(matches!(error, DiskError::NoCandidate { .. }), "{error}");
        let message = error.to_string();
        for expected in [
            "/dev/vda",
            "smaller than the image",
            "/dev/loop0",
            "virtual or special device",
            "/dev/sdb",
            "on USB",
            "/dev/sdc",
            "read-only",
            "removable",
        ] {
            assert!(
                message.contains(expected),
                "{expected:?} missing in: {message}"
            );
        }
    }

    #[test]
    fn empty_tree_is_no_candidate() {
        let sys = FakeSys::new();
        let error = choose_disk(&sys.block(), &DiskHints::default(), None).expect_err("must fail");
        assert!(matches!(error, DiskError::NoCandidate { .. }));
    }

    #[test]
    fn hints_pick_one_of_two_equal_disks() {
        let sys = FakeSys::new();
        sys.add(FakeDisk {
            serial: Some("S1"),
            model: Some("QEMU HARDDISK"),
            ..FakeDisk::new("sda", "pci0000:00/0000:00:1f.2/ata1/host0", 20 * GIB)
        })
        .add(FakeDisk {
            serial: Some("S2"),
            model: Some("QEMU HARDDISK"),
            ..FakeDisk::new("sdb", "pci0000:00/0000:00:1f.2/ata2/host1", 20 * GIB)
        });
        let by_serial = DiskHints {
            serial: Some("S2".into()),
            ..DiskHints::default()
        };
        assert_eq!(
            choose_disk(&sys.block(), &by_serial, None)
                .expect("ok")
                .name,
            "sdb"
        );
        let by_path = DiskHints {
            path: Some("/dev/provisioner-test-no-such-dir/sda".into()),
            ..DiskHints::default()
        };
        assert_eq!(
            choose_disk(&sys.block(), &by_path, None).expect("ok").name,
            "sda"
        );
        // The model matches both: refused, never guessed.
        let by_model = DiskHints {
            model: Some("qemu harddisk".into()),
            ..DiskHints::default()
        };
        let error = choose_disk(&sys.block(), &by_model, None).expect_err("must fail");
        assert!(
            matches!(error, DiskError::HintMatchesSeveral { .. }),
            "{error}"
        );
        // Serial and model together narrow it down.
        let both = DiskHints {
            serial: Some("S1".into()),
            ..by_model
        };
        assert_eq!(
            choose_disk(&sys.block(), &both, None).expect("ok").name,
            "sda"
        );
    }

    #[test]
    fn a_hint_that_matches_nothing_is_an_error() {
        let sys = typical_machine();
        let hints = DiskHints {
            serial: Some("nope".into()),
            ..DiskHints::default()
        };
        let error = choose_disk(&sys.block(), &hints, None).expect_err("must fail");
        assert!(
            matches!(error, DiskError::HintMatchesNothing { .. }),
            "{error}"
        );
        assert!(error.to_string().contains("serial=\"nope\""));
    }

    #[test]
    fn a_hinted_disk_must_be_writable_and_large_enough() {
        let sys = typical_machine();
        let read_only = DiskHints {
            path: Some("/dev/provisioner-test-no-such-dir/sdc".into()),
            ..DiskHints::default()
        };
        let error = choose_disk(&sys.block(), &read_only, None).expect_err("must fail");
        assert!(
            matches!(&error, DiskError::HintedDiskUnusable { reasons, .. } if reasons.contains("read-only")),
            "{error}"
        );
        let too_small = DiskHints {
            serial: Some("disk-a".into()),
            min_size: Some(100 * GIB),
            ..DiskHints::default()
        };
        let error = choose_disk(&sys.block(), &too_small, None).expect_err("must fail");
        assert!(
            matches!(error, DiskError::HintedDiskUnusable { .. }),
            "{error}"
        );
        // A hint may name a USB disk on purpose.
        let usb = DiskHints {
            model: Some("USB Stick".into()),
            ..DiskHints::default()
        };
        assert_eq!(
            choose_disk(&sys.block(), &usb, Some(GIB)).expect("ok").name,
            "sdb"
        );
    }

    #[test]
    fn min_size_alone_filters_the_automatic_choice() {
        let sys = FakeSys::new();
        sys.add(FakeDisk::new(
            "nvme0n1",
            "pci0000:00/0000:00:06.0/nvme/nvme0",
            100 * GIB,
        ))
        .add(FakeDisk::new(
            "vda",
            "pci0000:00/0000:00:04.0/virtio1",
            8 * GIB,
        ));
        let hints = DiskHints {
            min_size: Some(50 * GIB),
            ..DiskHints::default()
        };
        assert_eq!(
            choose_disk(&sys.block(), &hints, None).expect("ok").name,
            "nvme0n1"
        );
    }
}
