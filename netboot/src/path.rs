//! Confinement of client-supplied file names to a served directory (shared by TFTP and HTTP).
//!
//! A served directory may hold things that are not regular files: a FIFO blocks `open(2)`
//! until a writer appears (forever, taking a blocking thread with it), a device node may act on
//! open. So the type is checked before opening (`lstat` of the resolved path), the open itself
//! never blocks nor follows a symlink swapped in meanwhile (`O_NONBLOCK|O_NOFOLLOW`), and the
//! opened descriptor is checked again (`fstat`) before a byte is read.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Component, Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum PathError {
    #[error("path {0:?} is not allowed (absolute, '..', or not UTF-8 safe)")]
    NotAllowed(String),
    #[error("{0:?} not found")]
    NotFound(String),
    #[error("{0:?} is not a regular file")]
    NotAFile(String),
    #[error("{0:?} resolves outside the served directory")]
    Escapes(String),
    #[error("{0:?}: {1}")]
    Io(String, #[source] io::Error),
}

/// Where distributions install iPXE's loaders, so that the iPXE folder can be the package's own
/// as installed: Debian's `/usr/lib/ipxe/ipxe.efi` is a symlink to `/boot/ipxe.efi`. A symlink
/// in the iPXE folder may resolve to these (an entry ending in `/` is a folder and everything
/// under it, any other a single file); anything else outside the folder stays refused, so a
/// symlink to `/boot/initrd.img` or `/etc/shadow` is never served.
pub const SYSTEM_IPXE_LOADERS: &[&str] = &[
    "/usr/lib/ipxe/",
    "/usr/share/ipxe/",
    "/boot/ipxe.efi",
    "/boot/ipxe.lkrn",
];

/// Opens `requested` as a regular file under `root`.
///
/// Rejects absolute paths, `..` components, NUL bytes, and anything whose real path (after
/// following symlinks) leaves `root`. A leading `/` is tolerated and stripped because PXE
/// firmware and TFTP clients commonly send it; it never means "from the file system root".
pub fn open_confined(root: &Path, requested: &str) -> Result<(File, u64, PathBuf), PathError> {
    open_confined_allowing(root, requested, &[])
}

/// [`open_confined`], except that the real path may also be one of `outside` (absolute; an
/// entry ending in `/` is a folder and everything under it, any other names one file), e.g.
/// [`SYSTEM_IPXE_LOADERS`]. Only the real path after every symlink is compared.
pub fn open_confined_allowing(
    root: &Path,
    requested: &str,
    outside: &[&str],
) -> Result<(File, u64, PathBuf), PathError> {
    let rel = requested.trim_start_matches('/');
    if rel.is_empty() || rel.contains('\0') || rel.contains('\\') {
        return Err(PathError::NotAllowed(requested.to_string()));
    }
    let rel_path = Path::new(rel);
    if !rel_path
        .components()
        .all(|c| matches!(c, Component::Normal(_) | Component::CurDir))
    {
        return Err(PathError::NotAllowed(requested.to_string()));
    }
    let root_real = root
        .canonicalize()
        .map_err(|e| PathError::Io(root.display().to_string(), e))?;
    let real = match root_real.join(rel_path).canonicalize() {
        Ok(real) => real,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Err(PathError::NotFound(requested.to_string()))
        }
        Err(e) => return Err(PathError::Io(requested.to_string(), e)),
    };
    if !real.starts_with(&root_real) && !allowed_outside(&real, outside) {
        return Err(PathError::Escapes(requested.to_string()));
    }
    let file = open_regular(&real).map_err(|e| match e {
        OpenError::NotAFile => PathError::NotAFile(requested.to_string()),
        OpenError::Io(e) if e.kind() == io::ErrorKind::NotFound => {
            PathError::NotFound(requested.to_string())
        }
        OpenError::Io(e) => PathError::Io(requested.to_string(), e),
    })?;
    let len = file
        .metadata()
        .map_err(|e| PathError::Io(requested.to_string(), e))?
        .len();
    Ok((file, len, real))
}

/// Whether the real path `real` is one of `outside` (see [`open_confined_allowing`]).
fn allowed_outside(real: &Path, outside: &[&str]) -> bool {
    outside.iter().any(|entry| match entry.strip_suffix('/') {
        // Path::starts_with compares whole components: /usr/lib/ipxe2 is not under /usr/lib/ipxe.
        Some(folder) => real.starts_with(folder) && real != Path::new(folder),
        None => real == Path::new(entry),
    })
}

/// Why [`open_regular`] failed.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// A FIFO, socket, device, directory or symlink: never opened for reading.
    #[error("not a regular file")]
    NotAFile,
    #[error(transparent)]
    Io(#[from] io::Error),
}

/// Opens `path` for reading only if it is a regular file, without blocking and without
/// following a symlink in its last component: `lstat` first (a FIFO or device is not even
/// opened), then `open(O_RDONLY|O_NONBLOCK|O_NOFOLLOW|O_CLOEXEC)`, then `fstat` of the
/// descriptor (the path may have been replaced between the two). `O_NONBLOCK` has no effect on
/// reads of a regular file, so the file is returned as opened.
pub fn open_regular(path: &Path) -> Result<File, OpenError> {
    if !std::fs::symlink_metadata(path)?.file_type().is_file() {
        return Err(OpenError::NotAFile);
    }
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(nix::libc::O_NONBLOCK | nix::libc::O_NOFOLLOW)
        .open(path)
        .map_err(|e| {
            // ELOOP: the last component became a symlink after the lstat.
            if e.raw_os_error() == Some(nix::libc::ELOOP) {
                OpenError::NotAFile
            } else {
                OpenError::Io(e)
            }
        })?;
    if !file.metadata()?.file_type().is_file() {
        return Err(OpenError::NotAFile);
    }
    Ok(file)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tree() -> PathBuf {
        let dir = std::env::temp_dir().join(format!("netboot-path-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("root/sub")).expect("mkdir");
        std::fs::write(dir.join("root/sub/file"), b"hello").expect("write");
        std::fs::write(dir.join("secret"), b"no").expect("write");
        std::os::unix::fs::symlink(dir.join("secret"), dir.join("root/escape")).expect("symlink");
        std::os::unix::fs::symlink("sub/file", dir.join("root/inside")).expect("symlink");
        dir
    }

    #[test]
    fn confines_paths() {
        let dir = tree();
        let root = dir.join("root");
        let (_, len, _) = open_confined(&root, "sub/file").expect("regular file");
        assert_eq!(len, 5);
        assert!(
            open_confined(&root, "/sub/file").is_ok(),
            "leading slash is stripped"
        );
        assert!(
            open_confined(&root, "inside").is_ok(),
            "symlink inside root is fine"
        );
        assert!(matches!(
            open_confined(&root, "../secret"),
            Err(PathError::NotAllowed(_))
        ));
        assert!(matches!(
            open_confined(&root, "sub/../../secret"),
            Err(PathError::NotAllowed(_))
        ));
        assert!(matches!(
            open_confined(&root, "escape"),
            Err(PathError::Escapes(_))
        ));
        assert!(matches!(
            open_confined(&root, "sub"),
            Err(PathError::NotAFile(_))
        ));
        assert!(matches!(
            open_confined(&root, "missing"),
            Err(PathError::NotFound(_))
        ));
        assert!(matches!(
            open_confined(&root, ""),
            Err(PathError::NotAllowed(_))
        ));
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn symlinks_may_resolve_to_listed_files_and_folders_only() {
        let dir = std::env::temp_dir().join(format!("netboot-outside-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        for sub in ["root", "system/ipxe", "system/ipxe2", "boot"] {
            std::fs::create_dir_all(dir.join(sub)).expect("mkdir");
        }
        for file in [
            "system/ipxe/snp.efi",
            "system/ipxe2/x.efi",
            "boot/ipxe.efi",
            "boot/initrd.img",
        ] {
            std::fs::write(dir.join(file), b"loader").expect("write");
        }
        for (link, target) in [
            ("in-folder", "system/ipxe/snp.efi"),
            ("sibling-folder", "system/ipxe2/x.efi"),
            ("listed-file", "boot/ipxe.efi"),
            ("unlisted-file", "boot/initrd.img"),
            ("the-folder", "system/ipxe"),
        ] {
            std::os::unix::fs::symlink(dir.join(target), dir.join("root").join(link))
                .expect("symlink");
        }
        let folder = format!("{}/", dir.join("system/ipxe").display());
        let file = dir.join("boot/ipxe.efi").display().to_string();
        let outside = [folder.as_str(), file.as_str()];
        let root = dir.join("root");
        for allowed in ["in-folder", "listed-file"] {
            assert!(
                open_confined_allowing(&root, allowed, &outside).is_ok(),
                "{allowed} is served"
            );
            assert!(
                matches!(open_confined(&root, allowed), Err(PathError::Escapes(_))),
                "{allowed} is refused without the list"
            );
        }
        for refused in ["sibling-folder", "unlisted-file"] {
            assert!(
                matches!(
                    open_confined_allowing(&root, refused, &outside),
                    Err(PathError::Escapes(_))
                ),
                "{refused} is refused"
            );
        }
        assert!(matches!(
            open_confined_allowing(&root, "the-folder", &outside),
            Err(PathError::Escapes(_))
        ));
        let _ = std::fs::remove_dir_all(dir);
    }

    /// A FIFO with no writer would block `open(2)` forever: refused at once instead, also
    /// through a symlink to it and when opened directly.
    #[test]
    fn fifos_are_refused_without_blocking() {
        let dir = std::env::temp_dir().join(format!("netboot-fifo-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("mkdir");
        nix::unistd::mkfifo(&dir.join("fifo"), nix::sys::stat::Mode::S_IRUSR).expect("mkfifo");
        std::os::unix::fs::symlink("fifo", dir.join("to-fifo")).expect("symlink");
        let started = std::time::Instant::now();
        assert!(matches!(
            open_confined(&dir, "fifo"),
            Err(PathError::NotAFile(_))
        ));
        assert!(matches!(
            open_confined(&dir, "to-fifo"),
            Err(PathError::NotAFile(_))
        ));
        assert!(matches!(
            open_regular(&dir.join("fifo")),
            Err(OpenError::NotAFile)
        ));
        assert!(matches!(
            open_regular(&dir.join("to-fifo")),
            Err(OpenError::NotAFile)
        ));
        assert!(
            started.elapsed() < std::time::Duration::from_secs(5),
            "returned, did not wait for a writer"
        );
        let _ = std::fs::remove_dir_all(dir);
    }
}
