//! The imaging step PID 1 runs once the network is up: orders → disk → image → cloud-init
//! drop-in → `imaged`, with progress on the console and reported to netboot.
//!
//! Each step is a function of its inputs (paths, URLs), so the sequence runs on the host
//! against a regular file and a local HTTP server; only [`configure_root`]'s mount needs a
//! real block device.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, FileExt, FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use wire::orders::{Orders, Token};
use wire::report::{ProgressReport, MAX_MESSAGE_LEN};
use wire::seed::nocloud_seed_url;

use crate::image::{self, HttpSource, Progress, RetryPolicy, WriteOptions, WriteReport};

/// Where the drop-in goes inside the imaged root file system.
pub const DROP_IN_PATH: &str = "etc/cloud/cloud.cfg.d/90-provisioner.cfg";

/// GPT partition type GUIDs (on-disk mixed-endian byte order) that mark a root file system,
/// best first: "Linux root (x86-64)" from the Discoverable Partitions Specification, then
/// "Linux filesystem data" (accepted only when it is the only one, or labelled root).
const GPT_ROOT_X86_64: [u8; 16] = guid_bytes(0x4F68BCE3, 0xE8CD, 0x4DB1, 0x96E7FBCAF984B709);
const GPT_LINUX_DATA: [u8; 16] = guid_bytes(0x0FC63DAF, 0x8483, 0x4772, 0x8E793D69D8477DE4);
/// Partition labels taken to mean "the root file system".
const ROOT_LABELS: &[&str] = &["root", "rootfs", "cloudimg-rootfs"];

const fn guid_bytes(a: u32, b: u16, c: u16, d: u64) -> [u8; 16] {
    let a = a.to_le_bytes();
    let b = b.to_le_bytes();
    let c = c.to_le_bytes();
    let d = d.to_be_bytes();
    [
        a[0], a[1], a[2], a[3], b[0], b[1], c[0], c[1], d[0], d[1], d[2], d[3], d[4], d[5], d[6],
        d[7],
    ]
}

#[derive(Debug, thiserror::Error)]
pub enum ProvisionError {
    #[error("{0}")]
    Disk(#[from] crate::disk::DiskError),
    #[error("{0}")]
    Write(#[from] crate::image::WriteError),
    #[error("partition table of {path}: {reason}")]
    PartitionTable {
        path: PathBuf,
        reason: PartitionTableError,
    },
    #[error("no root partition on {path}: {reason}")]
    NoRootPartition {
        path: PathBuf,
        reason: RootChoiceError,
    },
    #[error("mounting {device} on {target}: {reason}")]
    Mount {
        device: PathBuf,
        target: PathBuf,
        reason: String,
    },
    #[error("writing the cloud-init drop-in {path}: {source}")]
    DropIn {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// Why the disk's partition table could not be read or re-read. (The io errors are shown in
/// the message and not chained as sources, so a report prints each cause once.)
#[derive(Debug, thiserror::Error)]
pub enum PartitionTableError {
    #[error("{0}")]
    Open(io::Error),
    #[error("reading the GPT header: {0}")]
    ReadHeader(io::Error),
    #[error("no GPT header (EFI PART) at LBA 1")]
    NoGpt,
    #[error("implausible GPT: {count} entries of {entry_size} bytes")]
    Implausible { count: u32, entry_size: usize },
    #[error("reading the GPT entries: {0}")]
    ReadEntries(io::Error),
    #[error("BLKRRPART: {0}")]
    Reread(nix::Error),
}

/// Why no partition was chosen as the root: never a guess.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RootChoiceError {
    #[error("several candidates: partitions {}", join_numbers(.0))]
    Ambiguous(Vec<u32>),
    #[error(
        "none typed Linux root (x86-64) or Linux filesystem, nor labelled {}; partitions: {}",
        ROOT_LABELS.join("/"),
        .0.iter().map(|(n, label)| format!("{n} {label:?}")).collect::<Vec<_>>().join(", ")
    )]
    NoCandidate(Vec<(u32, String)>),
}

fn join_numbers(numbers: &[u32]) -> String {
    numbers
        .iter()
        .map(u32::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

/// Sends stage2's reports to netboot: `POST {url}/report/{mac}` with the bearer token.
pub struct Reporter {
    agent: ureq::Agent,
    url: String,
    token: Token,
}

impl Reporter {
    pub fn new(netboot_url: &str, mac: [u8; 6], token: Token) -> Self {
        let mac = mac.map(|b| format!("{b:02x}")).join("-");
        Self {
            agent: ureq::AgentBuilder::new()
                .timeout_connect(Duration::from_secs(3))
                .timeout(Duration::from_secs(5))
                .build(),
            url: format!("{}/report/{mac}", netboot_url.trim_end_matches('/')),
            token,
        }
    }

    /// Sends one report, retrying `attempts` times; a report that cannot be delivered is
    /// logged and otherwise ignored (imaging does not stop because netboot is unreachable).
    pub fn send(&self, report: &ProgressReport, attempts: u32) -> bool {
        let body = report.to_json();
        for attempt in 1..=attempts.max(1) {
            let outcome = self
                .agent
                .post(&self.url)
                .set("Authorization", &format!("Bearer {}", self.token.expose()))
                .set("Content-Type", "application/json")
                .send_string(&body);
            match outcome {
                Ok(_) => return true,
                // A status answer is final: the token or phase was refused; retrying won't help.
                Err(ureq::Error::Status(status, _)) => {
                    tracing::warn!(status, url = self.url, "netboot refused the report");
                    return false;
                }
                Err(e) => {
                    tracing::warn!(attempt, error = %e, url = self.url, "report not delivered");
                    if attempt < attempts {
                        std::thread::sleep(Duration::from_millis(500 * u64::from(attempt)));
                    }
                }
            }
        }
        false
    }
}

/// How often progress reaches the console and netboot.
#[derive(Debug, Clone, Copy)]
pub struct Pacing {
    pub console_every: Duration,
    pub report_every: Duration,
}

impl Default for Pacing {
    fn default() -> Self {
        Self {
            console_every: Duration::from_secs(3),
            report_every: Duration::from_secs(5),
        }
    }
}

/// One console line: bytes, rate, percent.
pub fn progress_line(progress: &Progress) -> String {
    let mib = |b: u64| b as f64 / (1024.0 * 1024.0);
    let percent = progress
        .percent()
        .map(|p| format!("{p}%"))
        .unwrap_or_else(|| "?%".to_owned());
    let total = progress
        .total
        .map(|t| format!(" of {:.1} MiB", mib(t)))
        .unwrap_or_default();
    format!(
        "imaging: {:.1} MiB{total} written ({percent}), {:.1} MiB/s, {} s",
        mib(progress.bytes_written),
        mib(progress.bytes_per_second),
        progress.elapsed.as_secs()
    )
}

/// Streams the ordered image onto `target`, printing progress to `console` and reporting it
/// to netboot. On failure the writer has already wiped the partition tables.
pub fn write_ordered_image(
    orders: &Orders,
    target: &Path,
    reporter: &Reporter,
    pacing: Pacing,
    console: &mut dyn Write,
) -> Result<WriteReport, ProvisionError> {
    let mut options = WriteOptions::new(orders.imaging.sha256);
    options.expected_size = orders.imaging.image_size;
    options.progress_interval = pacing.console_every.min(pacing.report_every);
    let source = HttpSource::new(&orders.imaging.image_url, RetryPolicy::default());
    reporter.send(
        &ProgressReport::Imaging {
            progress: 0,
            bytes: Some(0),
            rate: None,
            message: Some(format!("writing {}", target.display())),
        },
        3,
    );
    let mut last_console: Option<Instant> = None;
    let mut last_report = Instant::now();
    let report = image::write_image(source, target, &options, |progress| {
        let due =
            |last: Option<Instant>, every: Duration| last.is_none_or(|t| t.elapsed() >= every);
        if due(last_console, pacing.console_every) {
            last_console = Some(Instant::now());
            let _ = writeln!(console, "{}", progress_line(progress));
            let _ = console.flush();
        }
        if due(Some(last_report), pacing.report_every) {
            last_report = Instant::now();
            // One attempt: a slow netboot must not stall the pipeline for long.
            reporter.send(
                &ProgressReport::Imaging {
                    progress: progress.percent().unwrap_or(0).min(99),
                    bytes: Some(progress.bytes_written),
                    rate: Some(progress.bytes_per_second),
                    message: None,
                },
                1,
            );
        }
    })?;
    let seconds = report.elapsed.as_secs_f64().max(0.001);
    let _ = writeln!(
        console,
        "imaging: wrote {} bytes ({} format, {} bytes fetched) in {:.1} s, {:.1} MiB/s, sha256 verified",
        report.bytes,
        report.format,
        report.source_bytes,
        seconds,
        report.bytes as f64 / seconds / (1024.0 * 1024.0)
    );
    reporter.send(
        &ProgressReport::Imaging {
            progress: 100,
            bytes: Some(report.bytes),
            rate: Some((report.bytes as f64 / seconds) as u64),
            message: None,
        },
        3,
    );
    Ok(report)
}

/// A GPT partition entry: what root-partition choice needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GptPartition {
    /// 1-based partition number (the kernel's numbering).
    pub number: u32,
    pub type_guid: [u8; 16],
    pub label: String,
}

/// Reads the primary GPT's partition entries from `disk`. Hand-written because it needs three
/// fields of a fixed little-endian layout (UEFI spec 5.3), read-only; the GPT crates bring
/// write support and extra dependencies into the static initrd binary for no gain here.
pub fn read_gpt(disk: &File, sector: u64) -> Result<Vec<GptPartition>, PartitionTableError> {
    let mut header = [0u8; 92];
    disk.read_exact_at(&mut header, sector)
        .map_err(PartitionTableError::ReadHeader)?;
    if &header[0..8] != b"EFI PART" {
        return Err(PartitionTableError::NoGpt);
    }
    let u32_at =
        |o: usize| u32::from_le_bytes([header[o], header[o + 1], header[o + 2], header[o + 3]]);
    let mut lba = [0u8; 8];
    lba.copy_from_slice(&header[72..80]);
    let entries_lba = u64::from_le_bytes(lba);
    let count = u32_at(80);
    let entry_size = u32_at(84) as usize;
    if !(128..=4096).contains(&entry_size) || count > 1024 {
        return Err(PartitionTableError::Implausible { count, entry_size });
    }
    let mut table = vec![0u8; count as usize * entry_size];
    disk.read_exact_at(&mut table, entries_lba.saturating_mul(sector))
        .map_err(PartitionTableError::ReadEntries)?;
    let mut partitions = Vec::new();
    for (index, entry) in table.chunks_exact(entry_size).enumerate() {
        let mut type_guid = [0u8; 16];
        type_guid.copy_from_slice(&entry[0..16]);
        if type_guid == [0u8; 16] {
            continue;
        }
        let name: Vec<u16> = entry[56..128]
            .chunks_exact(2)
            .map(|c| u16::from_le_bytes([c[0], c[1]]))
            .take_while(|&c| c != 0)
            .collect();
        partitions.push(GptPartition {
            number: index as u32 + 1,
            type_guid,
            label: String::from_utf16_lossy(&name),
        });
    }
    Ok(partitions)
}

/// The root partition: the one typed "Linux root (x86-64)", else the one labelled root, else
/// the only "Linux filesystem data" partition. Ambiguity is an error, never a guess.
pub fn choose_root(partitions: &[GptPartition]) -> Result<&GptPartition, RootChoiceError> {
    fn only(found: Vec<&GptPartition>) -> Option<Result<&GptPartition, RootChoiceError>> {
        match found.as_slice() {
            [] => None,
            [one] => Some(Ok(*one)),
            several => Some(Err(RootChoiceError::Ambiguous(
                several.iter().map(|p| p.number).collect(),
            ))),
        }
    }
    let typed = partitions
        .iter()
        .filter(|p| p.type_guid == GPT_ROOT_X86_64)
        .collect();
    let labelled = partitions
        .iter()
        .filter(|p| ROOT_LABELS.contains(&p.label.as_str()))
        .collect();
    let linux = partitions
        .iter()
        .filter(|p| p.type_guid == GPT_LINUX_DATA)
        .collect();
    only(typed)
        .or_else(|| only(labelled))
        .or_else(|| only(linux))
        .unwrap_or_else(|| {
            Err(RootChoiceError::NoCandidate(
                partitions
                    .iter()
                    .map(|p| (p.number, p.label.clone()))
                    .collect(),
            ))
        })
}

/// The device node of partition `number` of `disk_name`: looked up in sysfs (whatever the
/// driver's naming), else by the kernel's rule (`vda1`, `nvme0n1p1`, `mmcblk0p1`).
pub fn partition_device(sys_block: &Path, disk_name: &str, number: u32) -> PathBuf {
    if let Ok(entries) = fs::read_dir(sys_block.join(disk_name)) {
        for entry in entries.flatten() {
            let partition = fs::read_to_string(entry.path().join("partition")).unwrap_or_default();
            if partition.trim() == number.to_string() {
                return Path::new("/dev").join(entry.file_name());
            }
        }
    }
    let separator = if disk_name.ends_with(|c: char| c.is_ascii_digit()) {
        "p"
    } else {
        ""
    };
    Path::new("/dev").join(format!("{disk_name}{separator}{number}"))
}

/// The drop-in's text: cloud-init reads only NoCloud, seeded from netboot with the token.
pub fn drop_in_text(seed_url: &str) -> String {
    format!(
        "# Written by stage2: this machine's cloud-init configuration comes from netboot.\n\
         datasource_list: [NoCloud]\n\
         datasource:\n  NoCloud:\n    seedfrom: {seed_url}\n"
    )
}

/// Writes the drop-in under `root` (a mounted root file system), mode 0600, durably.
pub fn write_drop_in(root: &Path, seed_url: &str) -> Result<PathBuf, ProvisionError> {
    let path = root.join(DROP_IN_PATH);
    let error = |source| ProvisionError::DropIn {
        path: path.clone(),
        source,
    };
    if let Some(dir) = path.parent() {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(dir)
            .map_err(error)?;
    }
    let mut file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&path)
        .map_err(error)?;
    // An existing file keeps its mode on open: set it explicitly.
    file.set_permissions(std::os::unix::fs::PermissionsExt::from_mode(0o600))
        .map_err(error)?;
    file.write_all(drop_in_text(seed_url).as_bytes())
        .map_err(error)?;
    file.sync_all().map_err(error)?;
    Ok(path)
}

// BLKRRPART: _IO(0x12, 95), from linux/fs.h. The initrd has no blockdev(8) or udev to do this.
nix::ioctl_none!(blkrrpart, 0x12, 95);

/// Asks the kernel to re-read the partition table of a block device (no-op for a file), and
/// waits for partition `number` to appear in sysfs.
pub fn reread_partitions(disk: &File) -> Result<(), PartitionTableError> {
    if !disk
        .metadata()
        .map_err(PartitionTableError::Open)?
        .file_type()
        .is_block_device()
    {
        return Ok(());
    }
    use std::os::fd::AsRawFd;
    // The first attempt may meet EBUSY while udev-less devtmpfs settles; retry briefly.
    let mut last = nix::Error::UnknownErrno;
    for _ in 0..10 {
        // SAFETY: BLKRRPART takes no argument and touches no user memory; the fd is an open
        // block device for the whole call.
        #[allow(unsafe_code)]
        let outcome = unsafe { blkrrpart(disk.as_raw_fd()) };
        match outcome {
            Ok(_) => return Ok(()),
            Err(e) => last = e,
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    Err(PartitionTableError::Reread(last))
}

/// After a verified write: re-reads the partition table, mounts the root partition on
/// `mount_point`, writes the cloud-init drop-in, unmounts and syncs. Returns the partition.
pub fn configure_root(
    disk: &crate::disk::Disk,
    sys_block: &Path,
    mount_point: &Path,
    seed_url: &str,
) -> Result<PathBuf, ProvisionError> {
    let table_error = |reason: PartitionTableError| ProvisionError::PartitionTable {
        path: disk.dev_path.clone(),
        reason,
    };
    let file = File::open(&disk.dev_path).map_err(|e| table_error(PartitionTableError::Open(e)))?;
    reread_partitions(&file).map_err(table_error)?;
    let sector = fs::read_to_string(sys_block.join(&disk.name).join("queue/logical_block_size"))
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
        .unwrap_or(512);
    let partitions = read_gpt(&file, sector).map_err(table_error)?;
    drop(file);
    let root = choose_root(&partitions).map_err(|reason| ProvisionError::NoRootPartition {
        path: disk.dev_path.clone(),
        reason,
    })?;
    let device = partition_device(sys_block, &disk.name, root.number);
    // devtmpfs creates the node asynchronously after the re-read.
    let deadline = Instant::now() + Duration::from_secs(5);
    while !device.exists() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    tracing::info!(partition = %device.display(), number = root.number, label = root.label, "root partition");
    let mount_error = |reason: String| ProvisionError::Mount {
        device: device.clone(),
        target: mount_point.to_owned(),
        reason,
    };
    fs::create_dir_all(mount_point).map_err(|e| mount_error(e.to_string()))?;
    use nix::mount::{mount, umount, MsFlags};
    let mut mounted = Err("no file system type tried".to_owned());
    for fstype in ["ext4", "xfs", "btrfs"] {
        match mount(
            Some(&device),
            mount_point,
            Some(fstype),
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
            None::<&str>,
        ) {
            Ok(()) => {
                mounted = Ok(());
                break;
            }
            Err(e) => mounted = Err(format!("{fstype}: {e}")),
        }
    }
    mounted.map_err(mount_error)?;
    let written = write_drop_in(mount_point, seed_url);
    let unmounted = umount(mount_point);
    nix::unistd::sync();
    let path = written?;
    unmounted.map_err(|e| mount_error(format!("unmount: {e}")))?;
    tracing::info!(drop_in = %path.display(), "cloud-init drop-in written");
    Ok(device)
}

/// The whole imaging step once orders are known: choose the disk, write, configure, report.
/// On any error reports `failed` with the reason (the caller then reboots after a back-off).
pub fn provision(
    orders: &Orders,
    reporter: &Reporter,
    sys_block: &Path,
    pacing: Pacing,
    console: &mut dyn Write,
) -> Result<(), ProvisionError> {
    let outcome = (|| -> Result<(), ProvisionError> {
        let imaging = &orders.imaging;
        let disk = crate::disk::choose_disk(sys_block, &imaging.disk, imaging.image_size)?;
        let _ = writeln!(
            console,
            "imaging: disk {} ({} bytes, model {:?}, serial {:?})",
            disk.dev_path.display(),
            disk.size,
            disk.model,
            disk.serial
        );
        write_ordered_image(orders, &disk.dev_path, reporter, pacing, console)?;
        let seed_url = nocloud_seed_url(&orders.netboot_url, imaging.token.expose());
        let configured = configure_root(&disk, sys_block, Path::new("/run/root"), &seed_url);
        if configured.is_err() {
            // The image is unusable without its configuration: make it unbootable so the
            // machine comes back to netboot instead of booting half-provisioned.
            if let Ok(file) = OpenOptions::new().write(true).open(&disk.dev_path) {
                if let Err(e) = image::wipe_partition_tables(&file) {
                    tracing::error!(error = %e, "wiping the partition tables failed");
                }
            }
        }
        let partition = configured?;
        let _ = writeln!(
            console,
            "imaging: cloud-init drop-in written on {}",
            partition.display()
        );
        Ok(())
    })();
    match &outcome {
        Ok(()) => {
            reporter.send(&ProgressReport::Imaged { message: None }, 5);
        }
        Err(e) => {
            let _ = writeln!(console, "imaging failed: {e}");
            reporter.send(
                &ProgressReport::Failed {
                    message: truncate(&e.to_string(), MAX_MESSAGE_LEN),
                },
                5,
            );
        }
    }
    outcome
}

fn truncate(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_owned();
    }
    let mut end = max.saturating_sub(3);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", &text[..end])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gpt_disk(entries: &[([u8; 16], &str)]) -> tempfile::NamedTempFile {
        let file = tempfile::NamedTempFile::new().expect("temp file");
        let mut header = [0u8; 92];
        header[0..8].copy_from_slice(b"EFI PART");
        header[72..80].copy_from_slice(&2u64.to_le_bytes());
        header[80..84].copy_from_slice(&128u32.to_le_bytes());
        header[84..88].copy_from_slice(&128u32.to_le_bytes());
        file.as_file().write_all_at(&header, 512).expect("header");
        for (i, (guid, name)) in entries.iter().enumerate() {
            let mut entry = [0u8; 128];
            entry[0..16].copy_from_slice(guid);
            for (j, unit) in name.encode_utf16().enumerate() {
                entry[56 + 2 * j..58 + 2 * j].copy_from_slice(&unit.to_le_bytes());
            }
            file.as_file()
                .write_all_at(&entry, 1024 + 128 * i as u64)
                .expect("entry");
        }
        file.as_file().set_len(1024 + 128 * 128).expect("len");
        file
    }

    const ESP: [u8; 16] = guid_bytes(0xC12A7328, 0xF81F, 0x11D2, 0xBA4B00A0C93EC93B);

    #[test]
    fn guid_byte_order_matches_sfdisk() {
        // sfdisk writes 0FC63DAF-8483-4772-8E79-3D69D8477DE4 as these bytes.
        assert_eq!(
            hex::encode(GPT_LINUX_DATA),
            "af3dc60f838472478e793d69d8477de4"
        );
    }

    #[test]
    fn root_by_type_then_label_then_only_linux() {
        let disk = gpt_disk(&[
            (ESP, "esp"),
            (GPT_LINUX_DATA, "data"),
            (GPT_ROOT_X86_64, "x"),
        ]);
        let parts = read_gpt(disk.as_file(), 512).expect("gpt");
        assert_eq!(parts.len(), 3);
        assert_eq!(parts[1].label, "data");
        assert_eq!(choose_root(&parts).expect("root").number, 3);

        let disk = gpt_disk(&[
            (ESP, "esp"),
            (GPT_LINUX_DATA, "home"),
            (GPT_LINUX_DATA, "root"),
        ]);
        let parts = read_gpt(disk.as_file(), 512).expect("gpt");
        assert_eq!(choose_root(&parts).expect("root").number, 3);

        let disk = gpt_disk(&[(ESP, "esp"), (GPT_LINUX_DATA, "system")]);
        let parts = read_gpt(disk.as_file(), 512).expect("gpt");
        assert_eq!(choose_root(&parts).expect("root").number, 2);

        let disk = gpt_disk(&[(GPT_LINUX_DATA, "a"), (GPT_LINUX_DATA, "b")]);
        let parts = read_gpt(disk.as_file(), 512).expect("gpt");
        let error = choose_root(&parts).expect_err("ambiguous");
        assert_eq!(error, RootChoiceError::Ambiguous(vec![1, 2]));
        assert_eq!(error.to_string(), "several candidates: partitions 1, 2");

        let disk = gpt_disk(&[(ESP, "esp")]);
        let parts = read_gpt(disk.as_file(), 512).expect("gpt");
        let error = choose_root(&parts).expect_err("no root");
        assert_eq!(
            error.to_string(),
            r#"none typed Linux root (x86-64) or Linux filesystem, nor labelled root/rootfs/cloudimg-rootfs; partitions: 1 "esp""#
        );
    }

    #[test]
    fn no_gpt_is_an_error() {
        let file = tempfile::NamedTempFile::new().expect("temp");
        file.as_file().set_len(4096).expect("len");
        assert!(matches!(
            read_gpt(file.as_file(), 512),
            Err(PartitionTableError::NoGpt)
        ));
    }

    #[test]
    fn partition_names_follow_the_kernel() {
        let empty = tempfile::tempdir().expect("dir");
        assert_eq!(
            partition_device(empty.path(), "vda", 1),
            Path::new("/dev/vda1")
        );
        assert_eq!(
            partition_device(empty.path(), "nvme0n1", 2),
            Path::new("/dev/nvme0n1p2")
        );
        assert_eq!(
            partition_device(empty.path(), "mmcblk0", 1),
            Path::new("/dev/mmcblk0p1")
        );
        // sysfs wins when it knows the partition.
        let part = empty.path().join("sda/sda7");
        fs::create_dir_all(&part).expect("mkdir");
        fs::write(part.join("partition"), "3\n").expect("write");
        assert_eq!(
            partition_device(empty.path(), "sda", 3),
            Path::new("/dev/sda7")
        );
    }

    #[test]
    fn drop_in_is_0600_and_names_the_seed() {
        use std::os::unix::fs::PermissionsExt;
        let root = tempfile::tempdir().expect("dir");
        let path = write_drop_in(root.path(), "http://10.0.0.1:8080/nocloud/tok/").expect("write");
        let text = fs::read_to_string(&path).expect("read");
        assert!(text.contains("datasource_list: [NoCloud]"));
        assert!(text.contains("seedfrom: http://10.0.0.1:8080/nocloud/tok/"));
        let mode = fs::metadata(&path).expect("meta").permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
    }

    #[test]
    fn long_messages_are_cut_on_a_char_boundary() {
        let text = "é".repeat(1000);
        let cut = truncate(&text, 1024);
        assert!(cut.len() <= 1024 && cut.ends_with("..."));
    }
}
