//! The initrd builder: deterministic bytes, the expected entries with neutral metadata, every
//! module's dependencies carried, compressed module files unpacked, a consistent modules.dep.

use std::collections::BTreeSet;
use std::io::Write;
use std::path::{Path, PathBuf};

use stage2::initrd::{self, Compression, InitrdSpec, ListedEntry};
use stage2::modules::{ModuleDb, DEFAULT_MODULES};

const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/modules");
const RELEASE: &str = "6.1.0-test";

/// A module tree from the fixture index: every module in modules.dep gets a small file whose
/// content names it; ext4 is stored xz-compressed and jbd2 zstd-compressed, as distributions
/// that compress modules do.
fn module_tree(dir: &Path) -> anyhow::Result<()> {
    let dep = std::fs::read_to_string(Path::new(FIXTURES).join("modules.dep"))?;
    let mut rewritten = String::new();
    for line in dep.lines() {
        let mut out_line = line.to_string();
        for path in line.split([':', ' ']).filter(|p| p.ends_with(".ko")) {
            let content = format!("\x7fELF fake module {path}\n").into_bytes();
            let (stored, bytes) = if path.ends_with("/ext4.ko") {
                let mut encoder = liblzma::write::XzEncoder::new(Vec::new(), 6);
                encoder.write_all(&content)?;
                (format!("{path}.xz"), encoder.finish()?)
            } else if path.ends_with("/jbd2.ko") {
                (
                    format!("{path}.zst"),
                    zstd::stream::encode_all(content.as_slice(), 3)?,
                )
            } else {
                (path.to_string(), content)
            };
            let full = dir.join(&stored);
            if let Some(parent) = full.parent() {
                std::fs::create_dir_all(parent)?;
            }
            std::fs::write(full, bytes)?;
            if stored != path {
                out_line = out_line.replace(path, &stored);
            }
        }
        rewritten.push_str(&out_line);
        rewritten.push('\n');
    }
    std::fs::write(dir.join("modules.dep"), rewritten)?;
    for name in ["modules.alias", "modules.softdep"] {
        std::fs::copy(Path::new(FIXTURES).join(name), dir.join(name))?;
    }
    std::fs::write(
        dir.join("modules.builtin"),
        "kernel/drivers/builtin/thing.ko\n",
    )?;
    Ok(())
}

fn spec(modules_dir: &Path, init: &Path, compression: Compression) -> InitrdSpec {
    InitrdSpec {
        kernel_release: RELEASE.into(),
        modules_dir: modules_dir.to_path_buf(),
        init: init.to_path_buf(),
        modules: ["virtio_net", "virtio_blk", "virtio_pci", "ext4", "nvme"]
            .iter()
            .map(|s| s.to_string())
            .collect(),
        compression,
    }
}

fn setup() -> anyhow::Result<(tempfile::TempDir, PathBuf, PathBuf)> {
    let dir = tempfile::tempdir()?;
    let modules = dir.path().join("modules");
    module_tree(&modules)?;
    let init = dir.path().join("stage2");
    std::fs::write(&init, b"\x7fELF fake stage2 binary")?;
    Ok((dir, modules, init))
}

fn build(spec: &InitrdSpec) -> anyhow::Result<Vec<u8>> {
    let mut out = Vec::new();
    let summary = initrd::build(spec, &mut out)?;
    anyhow::ensure!(
        summary.compressed_bytes == out.len() as u64,
        "size reported wrong"
    );
    Ok(out)
}

fn entry<'a>(entries: &'a [ListedEntry], path: &str) -> anyhow::Result<&'a ListedEntry> {
    entries
        .iter()
        .find(|e| e.path == path)
        .ok_or_else(|| anyhow::anyhow!("{path} missing from the initrd"))
}

#[test]
fn two_builds_are_byte_identical() -> anyhow::Result<()> {
    let (_dir, modules, init) = setup()?;
    for compression in [
        Compression::Zstd { level: 3 },
        Compression::Gzip,
        Compression::None,
    ] {
        let first = build(&spec(&modules, &init, compression))?;
        let second = build(&spec(&modules, &init, compression))?;
        assert!(first == second, "{compression:?}: builds differ");
        assert!(
            first.len() > 512,
            "{compression:?}: suspiciously small ({} bytes)",
            first.len()
        );
    }
    // The module list order does not matter either.
    let mut reversed = spec(&modules, &init, Compression::None);
    reversed.modules.reverse();
    assert!(build(&reversed)? == build(&spec(&modules, &init, Compression::None))?);
    Ok(())
}

#[test]
fn entries_are_sorted_with_neutral_metadata_and_the_init_binary() -> anyhow::Result<()> {
    let (_dir, modules, init) = setup()?;
    let bytes = build(&spec(&modules, &init, Compression::Zstd { level: 3 }))?;
    assert_eq!(&bytes[..4], &[0x28, 0xb5, 0x2f, 0xfd], "zstd magic");
    let entries = initrd::list(&bytes)?;
    let paths: Vec<&str> = entries.iter().map(|e| e.path.as_str()).collect();
    let mut sorted = paths.clone();
    sorted.sort_unstable();
    assert_eq!(paths, sorted, "entries not sorted");
    for e in &entries {
        assert_eq!((e.uid, e.gid, e.mtime), (0, 0, 0), "{}", e.path);
    }
    let init_entry = entry(&entries, "init")?;
    assert_eq!(init_entry.mode, 0o100755);
    assert_eq!(init_entry.data, std::fs::read(&init)?);
    assert_eq!(entry(&entries, "dev/console")?.mode, 0o020600);
    let modprobe = entry(&entries, "sbin/modprobe")?;
    assert_eq!(
        (modprobe.mode, modprobe.data.as_slice()),
        (0o120777, &b"/init"[..])
    );
    for dir in [
        "dev",
        "proc",
        "sys",
        "run",
        "lib/modules",
        "lib/modules/6.1.0-test",
    ] {
        assert_eq!(entry(&entries, dir)?.mode, 0o040755, "{dir}");
    }
    // Every parent directory comes before its children.
    let mut seen_dirs = BTreeSet::from([""]);
    for e in &entries {
        let parent = e.path.rsplit_once('/').map(|(p, _)| p).unwrap_or("");
        assert!(
            seen_dirs.contains(parent),
            "{} before its directory",
            e.path
        );
        if e.mode & 0o170000 == 0o040000 {
            seen_dirs.insert(e.path.as_str());
        }
    }
    Ok(())
}

#[test]
fn modules_and_their_dependencies_are_carried_uncompressed() -> anyhow::Result<()> {
    let (_dir, modules, init) = setup()?;
    let bytes = build(&spec(&modules, &init, Compression::Gzip))?;
    let entries = initrd::list(&bytes)?;
    let base = format!("lib/modules/{RELEASE}");
    let text = |name: &str| -> anyhow::Result<String> {
        Ok(String::from_utf8(
            entry(&entries, &format!("{base}/{name}"))?.data.clone(),
        )?)
    };
    let db = ModuleDb::parse(
        &text("modules.dep")?,
        &text("modules.alias")?,
        &text("modules.softdep")?,
    )?;
    let carried: BTreeSet<String> = entries
        .iter()
        .filter(|e| e.path.ends_with(".ko"))
        .map(|e| stage2::modules::module_name(&e.path))
        .collect();
    let expected: BTreeSet<String> = [
        // roots
        "virtio_net",
        "virtio_blk",
        "virtio_pci",
        "ext4",
        "nvme",
        // hard dependencies
        "virtio",
        "virtio_ring",
        "net_failover",
        "failover",
        "virtio_pci_legacy_dev",
        "virtio_pci_modern_dev",
        "jbd2",
        "mbcache",
        "crc16",
        "nvme_core",
        "t10_pi",
        "crc64_rocksoft",
        "crc_t10dif",
        "crc64",
        "crct10dif_common",
        // soft dependency of ext4 and jbd2 (crypto-crc32c)
        "crc32c_generic",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    assert_eq!(carried, expected);
    assert_eq!(
        db.module_count(),
        expected.len(),
        "modules.dep lists exactly what is carried"
    );
    // Each modules.dep line points at a carried file, and each dependency is carried too.
    for name in &expected {
        let module = db
            .module(name)
            .ok_or_else(|| anyhow::anyhow!("{name} not in modules.dep"))?;
        assert!(
            module.path.ends_with(".ko"),
            "{}: compressed suffix kept",
            module.path
        );
        let file = entry(&entries, &format!("{base}/{}", module.path))?;
        assert!(
            file.data.starts_with(b"\x7fELF fake module"),
            "{} not unpacked",
            module.path
        );
        for dep in &module.deps {
            assert!(expected.contains(dep), "{name} needs {dep}, not carried");
        }
    }
    // The filtered alias file only names carried modules and still matches devices.
    assert_eq!(
        db.match_modalias("virtio:d00000001v00001AF4"),
        vec!["virtio_net".to_string()]
    );
    assert!(!text("modules.alias")?.contains(" e1000\n"));
    assert!(text("modules.builtin")?.contains("thing.ko"));
    Ok(())
}

#[test]
fn unknown_module_names_fail_the_build() -> anyhow::Result<()> {
    let (_dir, modules, init) = setup()?;
    let mut bad = spec(&modules, &init, Compression::None);
    bad.modules.push("no_such_driver".into());
    let err = initrd::build(&bad, Vec::new()).err().map(|e| e.to_string());
    assert!(
        err.as_deref().is_some_and(|e| e.contains("no_such_driver")),
        "{err:?}"
    );
    Ok(())
}

/// The real module tree of the installed Debian kernel, if there is one: every default module
/// resolves and the uncompressed archive stays well under the 16 MiB target before compression
/// of the modules alone.
#[test]
fn installed_kernel_modules_resolve() -> anyhow::Result<()> {
    let Some(release) = std::fs::read_dir("/lib/modules").ok().and_then(|d| {
        d.flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .max()
    }) else {
        eprintln!("no /lib/modules on this host: skipped");
        return Ok(());
    };
    let dir = PathBuf::from("/lib/modules").join(&release);
    if !dir.join("modules.dep").exists() {
        eprintln!("no modules.dep for {release}: skipped");
        return Ok(());
    }
    let tmp = tempfile::tempdir()?;
    let init = tmp.path().join("init");
    std::fs::write(&init, b"fake")?;
    let spec = InitrdSpec {
        kernel_release: release.clone(),
        modules_dir: dir,
        init,
        modules: DEFAULT_MODULES.iter().map(|s| s.to_string()).collect(),
        compression: Compression::None,
    };
    let (cpio, summary) = initrd::build_cpio(&spec)?;
    eprintln!(
        "{release}: {} modules, {} bytes of modules, {} bytes cpio",
        summary.modules.len(),
        summary.module_bytes,
        cpio.len()
    );
    for needed in [
        "virtio_net",
        "virtio_blk",
        "ext4",
        "vfat",
        "fat",
        "jbd2",
        "mlx5_core",
        "nvme_core",
    ] {
        assert!(
            summary.modules.iter().any(|m| m == needed),
            "{needed} missing"
        );
    }
    Ok(())
}
