//! A kernel that builds virtio in (Debian's 6.12 does; `fixtures/modules-virtio-builtin`):
//! `stage2 build-initrd` with the default module set succeeds, carries no file for a built-in
//! module, and PID 1's modalias-driven loader, reading the initrd's own index, never tries to
//! load a built-in module and reports the ones it is asked for as built in.

use std::cell::RefCell;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::rc::Rc;

use stage2::initrd::{self, ListedEntry};
use stage2::modules::{module_name, LoadOutcome, ModuleDb, ModuleLoader, DEFAULT_MODULES};

const FIXTURE: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/fixtures/modules-virtio-builtin"
);
const RELEASE: &str = "6.12.0-virtio-builtin";

/// What the fixture kernel builds in (its modules.builtin, by name).
const BUILTIN: &[&str] = &[
    "nls_base",
    "crc32c_generic",
    "virtio",
    "virtio_ring",
    "virtio_pci_legacy_dev",
    "virtio_pci_modern_dev",
    "virtio_pci",
    "virtio_blk",
    "failover",
    "net_failover",
    "virtio_net",
    "rtc_cmos",
];

/// The fixture's index files plus a small file for every module of its modules.dep (whose
/// content names it), as a kernel's `/lib/modules/VERSION` would hold them.
fn module_tree(dir: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir)?;
    let dep = std::fs::read_to_string(Path::new(FIXTURE).join("modules.dep"))?;
    for path in dep
        .lines()
        .filter(|l| !l.starts_with('#'))
        .flat_map(|l| l.split([':', ' ']))
        .filter(|p| p.ends_with(".ko"))
    {
        let full = dir.join(path);
        if let Some(parent) = full.parent() {
            std::fs::create_dir_all(parent)?;
        }
        std::fs::write(full, format!("\x7fELF fake module {path}\n"))?;
    }
    for name in [
        "modules.dep",
        "modules.alias",
        "modules.softdep",
        "modules.builtin",
        "modules.builtin.modinfo",
    ] {
        std::fs::copy(Path::new(FIXTURE).join(name), dir.join(name))?;
    }
    Ok(())
}

struct Built {
    _dir: tempfile::TempDir,
    stdout: String,
    entries: Vec<ListedEntry>,
}

/// Runs the real `stage2 build-initrd` (default module set) on the fixture tree.
fn build_initrd() -> anyhow::Result<Built> {
    let dir = tempfile::tempdir()?;
    let modules = dir.path().join("modules");
    module_tree(&modules)?;
    let init = dir.path().join("init");
    std::fs::write(&init, b"\x7fELF fake stage2 binary")?;
    let out = dir.path().join("initrd.img");
    let output = Command::new(env!("CARGO_BIN_EXE_stage2"))
        .args(["build-initrd", "--kernel-release", RELEASE, "--modules-dir"])
        .arg(&modules)
        .arg("--init")
        .arg(&init)
        .arg("--out")
        .arg(&out)
        .args(["--zstd-level", "3"])
        .output()?;
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    anyhow::ensure!(
        output.status.success(),
        "build-initrd failed: {}{}",
        stdout,
        String::from_utf8_lossy(&output.stderr)
    );
    let entries = initrd::list(&std::fs::read(&out)?)?;
    Ok(Built {
        _dir: dir,
        stdout,
        entries,
    })
}

fn entry<'a>(entries: &'a [ListedEntry], path: &str) -> anyhow::Result<&'a ListedEntry> {
    entries
        .iter()
        .find(|e| e.path == path)
        .ok_or_else(|| anyhow::anyhow!("{path} missing from the initrd"))
}

/// The initrd's `/lib/modules/RELEASE` written out under `root`, as PID 1 sees it.
fn unpack_modules(entries: &[ListedEntry], root: &Path) -> anyhow::Result<PathBuf> {
    let base = format!("lib/modules/{RELEASE}/");
    for e in entries.iter().filter(|e| e.path.starts_with(&base)) {
        let path = root.join(&e.path);
        if e.mode & 0o170000 == 0o040000 {
            std::fs::create_dir_all(&path)?;
        } else {
            if let Some(parent) = path.parent() {
                std::fs::create_dir_all(parent)?;
            }
            std::fs::write(&path, &e.data)?;
        }
    }
    Ok(root.join(&base))
}

#[test]
fn build_initrd_succeeds_and_carries_no_builtin_module() -> anyhow::Result<()> {
    let built = build_initrd()?;
    let carried: BTreeSet<String> = built
        .entries
        .iter()
        .filter(|e| e.path.ends_with(".ko"))
        .map(|e| module_name(&e.path))
        .collect();
    for builtin in BUILTIN {
        assert!(
            !carried.contains(*builtin),
            "{builtin} is built in, yet carried"
        );
    }
    // Every default module that is not built in is carried, with its dependencies.
    for module in DEFAULT_MODULES
        .iter()
        .filter(|m| !BUILTIN.contains(m))
        .chain(&[
            "scsi_mod",
            "scsi_common",
            "fat",
            "jbd2",
            "mlxfw",
            "crc32c_intel",
        ])
    {
        assert!(carried.contains(*module), "{module} not carried");
    }
    // The command says what it left to the kernel.
    let builtin_line = built
        .stdout
        .lines()
        .find_map(|l| l.strip_prefix("built into the kernel: "))
        .ok_or_else(|| anyhow::anyhow!("no built-in line in: {}", built.stdout))?;
    let reported: BTreeSet<&str> = builtin_line.split_whitespace().collect();
    assert_eq!(
        reported,
        BTreeSet::from([
            "virtio_pci",
            "virtio_net",
            "virtio_blk",
            // softdep ext4/jbd2 pre: crypto-crc32c, provided by crc32c_generic (built in) and
            // crc32c_intel (carried)
            "crc32c_generic",
        ])
    );

    // The index PID 1 reads: modules.dep names no built-in module, modules.builtin lists them
    // all, and the built-in aliases came along (and nothing else of modinfo).
    let base = format!("lib/modules/{RELEASE}");
    let text = |name: &str| -> anyhow::Result<String> {
        Ok(String::from_utf8(
            entry(&built.entries, &format!("{base}/{name}"))?
                .data
                .clone(),
        )?)
    };
    let dep = text("modules.dep")?;
    assert!(
        !dep.contains("virtio_pci") && !dep.contains("/virtio.ko"),
        "{dep}"
    );
    let builtin: BTreeSet<String> = text("modules.builtin")?.lines().map(module_name).collect();
    assert_eq!(
        builtin,
        BUILTIN
            .iter()
            .map(|s| s.to_string())
            .collect::<BTreeSet<_>>()
    );
    let modinfo = text("modules.builtin.modinfo")?;
    let records: Vec<&str> = modinfo.split_terminator('\0').collect();
    assert_eq!(
        records,
        [
            "crc32c_generic.alias=crypto-crc32c-generic",
            "crc32c_generic.alias=crc32c-generic",
            "crc32c_generic.alias=crypto-crc32c",
            "crc32c_generic.alias=crc32c",
            "rtc_cmos.alias=platform:rtc_cmos",
        ]
    );
    Ok(())
}

#[test]
fn boot_loader_never_loads_builtin_modules() -> anyhow::Result<()> {
    let built = build_initrd()?;
    let root = tempfile::tempdir()?;
    let modules_dir = unpack_modules(&built.entries, root.path())?;
    let db = ModuleDb::load(&modules_dir)?;
    assert_eq!(db.builtin_count(), BUILTIN.len());

    // A QEMU machine with virtio NIC, disk and SCSI controller (drivers built in, except
    // virtio_scsi), the PC's RTC (built in, matched by a built-in alias), an Intel e1000.
    let sys = root.path().join("sys");
    let sys_devices = sys.join("devices");
    for (device, modalias) in [
        (
            "pci0000:00/0000:00:03.0",
            "pci:v00001AF4d00001000sv00001AF4sd00000001bc02sc00i00",
        ),
        (
            "pci0000:00/0000:00:03.0/virtio0",
            "virtio:d00000001v00001AF4",
        ),
        (
            "pci0000:00/0000:00:04.0",
            "pci:v00001AF4d00001001sv00001AF4sd00000002bc01sc00i00",
        ),
        (
            "pci0000:00/0000:00:04.0/virtio1",
            "virtio:d00000002v00001AF4",
        ),
        (
            "pci0000:00/0000:00:05.0/virtio2",
            "virtio:d00000008v00001AF4",
        ),
        ("platform/rtc_cmos", "platform:rtc_cmos"),
        (
            "pci0000:00/0000:00:06.0",
            "pci:v00008086d0000100Esv00001AF4sd00001100bc02sc00i00",
        ),
    ] {
        let dir = sys_devices.join(device);
        std::fs::create_dir_all(&dir)?;
        std::fs::write(dir.join("modalias"), format!("{modalias}\n"))?;
    }
    let sys_module = sys.join("module");
    std::fs::create_dir_all(&sys_module)?;

    let inserted: Rc<RefCell<Vec<PathBuf>>> = Rc::default();
    let record = Rc::clone(&inserted);
    let mut loader = ModuleLoader::new(db, modules_dir.clone()).with_kernel(
        sys_module,
        Box::new(move |path, _file| {
            record.borrow_mut().push(path.to_path_buf());
            Ok(())
        }),
    );
    // As from `stage2.modules=virtio_net,crc32c` on the command line.
    let extra = ["virtio_net".to_string(), "crc32c".to_string()];
    let reports = stage2::init::load_hardware_modules(&mut loader, &extra, &sys_devices);

    let inserted: BTreeSet<String> = inserted
        .borrow()
        .iter()
        .map(|p| {
            let relative = p.strip_prefix(&modules_dir).unwrap_or(p);
            module_name(&relative.to_string_lossy())
        })
        .collect();
    for builtin in BUILTIN {
        assert!(
            !inserted.contains(*builtin),
            "tried to load built-in {builtin}"
        );
    }
    for needed in [
        "virtio_scsi",
        "scsi_mod",
        "scsi_common",
        "e1000",
        "ext4",
        "jbd2",
        "vfat",
        "fat",
        "nls_utf8",
        "crc32c_intel",
    ] {
        assert!(
            inserted.contains(needed),
            "{needed} not loaded: {inserted:?}"
        );
    }
    let outcome = |module: &str| {
        reports
            .iter()
            .find(|r| r.module == module)
            .map(|r| r.outcome.as_ref().map_err(|e| e.to_string()).cloned())
    };
    for builtin in ["virtio_net", "rtc_cmos", "crc32c_generic"] {
        assert_eq!(
            outcome(builtin),
            Some(Ok(LoadOutcome::BuiltIn)),
            "{builtin}: {reports:?}"
        );
    }
    assert_eq!(outcome("virtio_scsi"), Some(Ok(LoadOutcome::Loaded)));
    let failed: Vec<_> = reports.iter().filter(|r| r.outcome.is_err()).collect();
    assert!(failed.is_empty(), "{failed:?}");
    // Each module is reported once, so nothing was tried twice either.
    let names: Vec<&str> = reports.iter().map(|r| r.module.as_str()).collect();
    let unique: BTreeSet<&str> = names.iter().copied().collect();
    assert_eq!(unique.len(), names.len(), "{names:?}");
    Ok(())
}
