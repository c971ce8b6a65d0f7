//! Builds the stage2 initrd: a deterministic, compressed newc cpio archive holding the stage2
//! binary as `/init` and the kernel modules the target hardware needs, with their dependencies
//! and a `modules.dep`/`modules.alias`/`modules.softdep` restricted to what is carried. Modules the
//! kernel has built in are not carried; `modules.builtin` and their aliases go along instead.
//!
//! Deterministic: entries sorted by path, mtime 0, uid/gid 0, inode numbers by position, so two
//! builds from the same inputs are byte-identical (the image manifest can carry its sha256).

use std::collections::BTreeMap;
use std::io::{Cursor, Read, Write};
use std::path::{Path, PathBuf};

use crate::modules::{uncompressed_path, ModuleCompression, ModuleDb, ModulesError};

/// Where the kernel looks for the modprobe helper when it needs a module (request_module()):
/// a symlink to `/init`, which acts as modprobe when called by that name.
pub const MODPROBE_PATH: &str = "sbin/modprobe";

#[derive(Debug, thiserror::Error)]
pub enum InitrdError {
    #[error(transparent)]
    Modules(#[from] ModulesError),
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("decompressing {path}: {source}")]
    Decompress {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is {size} bytes, more than a newc cpio entry can hold")]
    TooLarge { path: String, size: usize },
    #[error("writing the archive: {0}")]
    Write(#[source] std::io::Error),
    #[error("compressed initrd: unknown format (neither zstd nor gzip magic)")]
    UnknownFormat,
}

/// How the cpio archive is compressed. Debian's 6.1 kernel decompresses both
/// (CONFIG_RD_ZSTD=y, CONFIG_RD_GZIP=y); zstd is smaller and faster to unpack.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    Zstd { level: i32 },
    Gzip,
    None,
}

impl Default for Compression {
    fn default() -> Self {
        // Level 9: 5.6 MiB for Debian 6.1's module set in about a second; 19 saves another
        // 0.7 MiB for twenty times the time (measured with zstd(1) on the same archive).
        Compression::Zstd { level: 9 }
    }
}

/// What goes into an initrd.
#[derive(Debug, Clone)]
pub struct InitrdSpec {
    /// `uname -r` of the kernel the initrd is for (names `/lib/modules/VERSION` inside it).
    pub kernel_release: String,
    /// The kernel's module tree, usually `/lib/modules/VERSION`.
    pub modules_dir: PathBuf,
    /// The stage2 binary (static), stored as `/init`.
    pub init: PathBuf,
    /// Modules (names or aliases) to carry; their dependencies are added.
    pub modules: Vec<String>,
    pub compression: Compression,
}

/// What was built.
#[derive(Debug, Clone)]
pub struct InitrdSummary {
    pub compressed_bytes: u64,
    pub cpio_bytes: u64,
    pub entries: usize,
    /// Every module carried, sorted.
    pub modules: Vec<String>,
    /// Modules asked for (or needed by those) that the kernel has built in: not carried.
    pub builtin: Vec<String>,
    /// Sum of the (uncompressed) module files.
    pub module_bytes: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Content {
    Directory,
    File { mode: u32, data: Vec<u8> },
    Symlink(String),
    CharDevice { major: u32, minor: u32 },
}

/// An archive's entries by path (no leading `/`); the map keeps them sorted, and every parent
/// sorts before its children.
#[derive(Debug, Default)]
struct Tree {
    entries: BTreeMap<String, Content>,
}

impl Tree {
    fn add_dirs(&mut self, path: &str) {
        let mut prefix = String::new();
        for part in path.split('/').filter(|p| !p.is_empty()) {
            if !prefix.is_empty() {
                prefix.push('/');
            }
            prefix.push_str(part);
            self.entries
                .entry(prefix.clone())
                .or_insert(Content::Directory);
        }
    }

    fn add(&mut self, path: &str, content: Content) {
        if let Some((parent, _)) = path.rsplit_once('/') {
            self.add_dirs(parent);
        }
        self.entries.insert(path.to_string(), content);
    }

    fn write_cpio(&self) -> Result<Vec<u8>, InitrdError> {
        let inputs = self.entries.iter().map(|(path, content)| {
            let builder = cpio::NewcBuilder::new(path).uid(0).gid(0).mtime(0);
            match content {
                Content::Directory => (builder.mode(0o040755).nlink(2), Cursor::new(&[][..])),
                Content::File { mode, data } => {
                    (builder.mode(0o100000 | mode), Cursor::new(data.as_slice()))
                }
                Content::Symlink(target) => {
                    (builder.mode(0o120777), Cursor::new(target.as_bytes()))
                }
                Content::CharDevice { major, minor } => (
                    builder.mode(0o020600).rdev_major(*major).rdev_minor(*minor),
                    Cursor::new(&[][..]),
                ),
            }
        });
        for (path, content) in &self.entries {
            if let Content::File { data, .. } = content {
                if u32::try_from(data.len()).is_err() {
                    return Err(InitrdError::TooLarge {
                        path: path.clone(),
                        size: data.len(),
                    });
                }
            }
        }
        cpio::write_cpio(inputs, Vec::new()).map_err(InitrdError::Write)
    }
}

fn read_file(path: &Path) -> Result<Vec<u8>, InitrdError> {
    std::fs::read(path).map_err(|source| InitrdError::Read {
        path: path.to_path_buf(),
        source,
    })
}

/// A module file's bytes, decompressed: the kernel here has no in-kernel module decompression
/// (CONFIG_MODULE_DECOMPRESS is off in Debian's 6.1), so finit_module needs a plain ELF.
fn module_bytes(path: &Path, relative: &str) -> Result<Vec<u8>, InitrdError> {
    let raw = read_file(path)?;
    let decompress_error = |source| InitrdError::Decompress {
        path: path.to_path_buf(),
        source,
    };
    let mut out = Vec::new();
    match ModuleCompression::of(relative) {
        ModuleCompression::None => return Ok(raw),
        ModuleCompression::Xz => {
            liblzma::read::XzDecoder::new(raw.as_slice())
                .read_to_end(&mut out)
                .map_err(decompress_error)?;
        }
        ModuleCompression::Zstd => {
            out = zstd::stream::decode_all(raw.as_slice()).map_err(decompress_error)?;
        }
        ModuleCompression::Gzip => {
            flate2::read::GzDecoder::new(raw.as_slice())
                .read_to_end(&mut out)
                .map_err(decompress_error)?;
        }
    }
    Ok(out)
}

/// Builds the uncompressed cpio archive; returns it and the sorted module list.
pub fn build_cpio(spec: &InitrdSpec) -> Result<(Vec<u8>, InitrdSummary), InitrdError> {
    let db = ModuleDb::load(&spec.modules_dir)?;
    let keep = db.closure(&spec.modules)?;
    let builtin = db.builtin_needed(&spec.modules)?;
    let mut tree = Tree::default();
    for dir in ["dev", "proc", "sys", "run", "tmp", "sbin"] {
        tree.add_dirs(dir);
    }
    // The kernel opens /dev/console for PID 1's stdin/stdout/stderr before /init runs, so it
    // must exist in the archive (devtmpfs is mounted later).
    tree.add("dev/console", Content::CharDevice { major: 5, minor: 1 });
    tree.add(
        "init",
        Content::File {
            mode: 0o755,
            data: read_file(&spec.init)?,
        },
    );
    tree.add(MODPROBE_PATH, Content::Symlink("/init".into()));

    let base = format!("lib/modules/{}", spec.kernel_release);
    let mut module_bytes_total = 0u64;
    for name in &keep {
        let Some(entry) = db.module(name) else {
            continue; // the closure holds modules of modules.dep only; kept for safety
        };
        let data = module_bytes(&spec.modules_dir.join(&entry.path), &entry.path)?;
        module_bytes_total += data.len() as u64;
        tree.add(
            &format!("{base}/{}", uncompressed_path(&entry.path)),
            Content::File { mode: 0o644, data },
        );
    }
    let text_file = |text: String| Content::File {
        mode: 0o644,
        data: text.into_bytes(),
    };
    tree.add(
        &format!("{base}/modules.dep"),
        text_file(db.render_dep(&keep, uncompressed_path)),
    );
    tree.add(
        &format!("{base}/modules.alias"),
        text_file(db.render_alias(&keep)),
    );
    tree.add(
        &format!("{base}/modules.softdep"),
        text_file(db.render_softdep(&keep)),
    );
    // modules.builtin and the built-in aliases let PID 1 (and the kernel's modprobe calls) tell
    // a built-in driver from a missing one, and take it as present.
    tree.add(
        &format!("{base}/modules.builtin"),
        text_file(db.render_builtin()),
    );
    tree.add(
        &format!("{base}/modules.builtin.modinfo"),
        Content::File {
            mode: 0o644,
            data: db.render_builtin_modinfo(),
        },
    );
    let entries = tree.entries.len();
    let cpio = tree.write_cpio()?;
    let summary = InitrdSummary {
        compressed_bytes: 0,
        cpio_bytes: cpio.len() as u64,
        entries,
        modules: keep.into_iter().collect(),
        builtin: builtin.into_iter().collect(),
        module_bytes: module_bytes_total,
    };
    Ok((cpio, summary))
}

/// Builds the compressed initrd into `out`.
pub fn build(spec: &InitrdSpec, out: impl Write) -> Result<InitrdSummary, InitrdError> {
    let (cpio, mut summary) = build_cpio(spec)?;
    let mut counter = CountingWriter {
        inner: out,
        count: 0,
    };
    match spec.compression {
        Compression::Zstd { level } => {
            let mut encoder =
                zstd::stream::Encoder::new(&mut counter, level).map_err(InitrdError::Write)?;
            // The kernel's zstd unpacker checks the frame checksum when present.
            encoder.include_checksum(true).map_err(InitrdError::Write)?;
            encoder.write_all(&cpio).map_err(InitrdError::Write)?;
            encoder.finish().map_err(InitrdError::Write)?;
        }
        Compression::Gzip => {
            let mut encoder =
                flate2::write::GzEncoder::new(&mut counter, flate2::Compression::best());
            encoder.write_all(&cpio).map_err(InitrdError::Write)?;
            encoder.finish().map_err(InitrdError::Write)?;
        }
        Compression::None => counter.write_all(&cpio).map_err(InitrdError::Write)?,
    }
    counter.flush().map_err(InitrdError::Write)?;
    summary.compressed_bytes = counter.count;
    Ok(summary)
}

struct CountingWriter<W> {
    inner: W,
    count: u64,
}

impl<W: Write> Write for CountingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.count += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// One entry of an archive, as listed by [`list`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListedEntry {
    pub path: String,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub mtime: u32,
    pub size: u32,
    /// Content of regular files and symlinks.
    pub data: Vec<u8>,
}

/// Decompresses an initrd (zstd, gzip, or a plain cpio) by its magic bytes.
pub fn decompress(bytes: &[u8]) -> Result<Vec<u8>, InitrdError> {
    let decompress_error = |source| InitrdError::Decompress {
        path: PathBuf::from("initrd"),
        source,
    };
    if bytes.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        zstd::stream::decode_all(bytes).map_err(decompress_error)
    } else if bytes.starts_with(&[0x1f, 0x8b]) {
        let mut out = Vec::new();
        flate2::read::GzDecoder::new(bytes)
            .read_to_end(&mut out)
            .map_err(decompress_error)?;
        Ok(out)
    } else if bytes.starts_with(b"070701") {
        Ok(bytes.to_vec())
    } else {
        Err(InitrdError::UnknownFormat)
    }
}

/// Lists the entries of an initrd (compressed or not), in archive order.
pub fn list(bytes: &[u8]) -> Result<Vec<ListedEntry>, InitrdError> {
    let cpio = decompress(bytes)?;
    let mut rest: &[u8] = &cpio;
    let mut entries = Vec::new();
    loop {
        let mut reader = cpio::NewcReader::new(rest).map_err(InitrdError::Write)?;
        if reader.entry().is_trailer() {
            break;
        }
        let entry = reader.entry();
        let mut listed = ListedEntry {
            path: entry.name().to_string(),
            mode: entry.mode(),
            uid: entry.uid(),
            gid: entry.gid(),
            mtime: entry.mtime(),
            size: entry.file_size(),
            data: Vec::new(),
        };
        reader
            .read_to_end(&mut listed.data)
            .map_err(InitrdError::Write)?;
        entries.push(listed);
        rest = reader.finish().map_err(InitrdError::Write)?;
    }
    Ok(entries)
}
