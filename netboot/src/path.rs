//! Confinement of client-supplied file names to a served directory (shared by TFTP and HTTP).

use std::fs::File;
use std::io;
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

/// Opens `requested` as a regular file under `root`.
///
/// Rejects absolute paths, `..` components, NUL bytes, and anything whose real path (after
/// following symlinks) leaves `root`. A leading `/` is tolerated and stripped because PXE
/// firmware and TFTP clients commonly send it; it never means "from the file system root".
pub fn open_confined(root: &Path, requested: &str) -> Result<(File, u64, PathBuf), PathError> {
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
    if !real.starts_with(&root_real) {
        return Err(PathError::Escapes(requested.to_string()));
    }
    let file = File::open(&real).map_err(|e| match e.kind() {
        io::ErrorKind::NotFound => PathError::NotFound(requested.to_string()),
        _ => PathError::Io(requested.to_string(), e),
    })?;
    let meta = file
        .metadata()
        .map_err(|e| PathError::Io(requested.to_string(), e))?;
    if !meta.is_file() {
        return Err(PathError::NotAFile(requested.to_string()));
    }
    Ok((file, meta.len(), real))
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
}
