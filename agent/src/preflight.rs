//! What a configuration names on this host, checked before anything is served: the folders, the
//! iPXE loaders and the kernel and initrd it boots, the inventory, the state file's folder.
//! `provisioner check-config` reports these with the configuration's own errors; `netboot`
//! refuses to start on any error (exit 2, the same messages), and while it runs
//! [`watch_boot_files`] notices a boot file that disappears.
//!
//! Files are opened the way the servers open them ([`netboot::path::open_confined_allowing`]), so a file
//! the TFTP or HTTP server would refuse (a symlink out of its folder) is refused here too.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use netboot::path::{open_confined_allowing, PathError, SYSTEM_IPXE_LOADERS};
use tokio_util::sync::CancellationToken;

use crate::config::{Config, ConfigError, Inventory};

/// The loader UEFI HTTP Boot clients are given (`/boot/ipxe.efi`), whatever `uefiLoader` says.
pub const HTTP_BOOT_LOADER: &str = "ipxe.efi";

/// How often a running netboot looks at its boot files again.
pub const BOOT_FILES_RECHECK: Duration = Duration::from_secs(30);

/// One thing found wrong, under the configuration key it is about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    pub key: &'static str,
    pub message: String,
    /// An error makes the configuration unusable; a warning leaves some clients without a
    /// boot file they may not need.
    pub error: bool,
}

impl Finding {
    /// As [`ConfigError::Invalid`] says it: `provisioner.yaml: bootFiles.biosLoader: …`.
    pub fn to_config_error(&self, path: &Path) -> ConfigError {
        ConfigError::Invalid {
            path: path.to_path_buf(),
            key: self.key,
            message: self.message.clone(),
        }
    }
}

fn directory(key: &'static str, dir: &Path) -> Option<Finding> {
    let message = match std::fs::metadata(dir) {
        Ok(meta) if meta.is_dir() => return None,
        Ok(_) => format!("{} is not a directory", dir.display()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            format!("{} does not exist", dir.display())
        }
        Err(e) => format!("{}: {e}", dir.display()),
    };
    Some(Finding {
        key,
        message,
        error: true,
    })
}

/// Why the servers would not serve a boot file.
#[derive(Debug, thiserror::Error)]
enum NotServed {
    #[error("{name:?} not found in {}", dir.display())]
    Missing { name: String, dir: PathBuf },
    #[error(
        "{name:?} in {} resolves outside it (a symlink): netboot serves only files inside the folder (and, from the iPXE folder, the distribution's iPXE files under /usr/lib/ipxe, /usr/share/ipxe or /boot/ipxe.*); copy the file there (cp -L)",
        dir.display()
    )]
    OutsideFolder { name: String, dir: PathBuf },
    #[error("{reason} (in {})", dir.display())]
    Refused { reason: PathError, dir: PathBuf },
}

/// The length of `name` in `dir` if the servers would serve it (a symlink in `dir` may
/// resolve to `outside`, as for the servers); why not otherwise.
fn served_file(dir: &Path, name: &str, outside: &[&str]) -> Result<u64, NotServed> {
    let dir_buf = || dir.to_path_buf();
    match open_confined_allowing(dir, name, outside) {
        Ok((_, len, _)) => Ok(len),
        Err(PathError::NotFound(_)) => Err(NotServed::Missing {
            name: name.to_owned(),
            dir: dir_buf(),
        }),
        Err(PathError::Escapes(_)) => Err(NotServed::OutsideFolder {
            name: name.to_owned(),
            dir: dir_buf(),
        }),
        Err(reason) => Err(NotServed::Refused {
            reason,
            dir: dir_buf(),
        }),
    }
}

/// The boot files: the loaders in `bootFiles.ipxeDir`, the kernel and initrd in
/// `bootFiles.assetsDir`. What [`watch_boot_files`] looks at again and again.
pub fn boot_files(config: &Config) -> Vec<Finding> {
    let mut findings = Vec::new();
    let files = &config.boot_files;
    match directory("bootFiles.ipxeDir", &files.ipxe_dir) {
        Some(finding) => findings.push(finding),
        None => {
            let uefi = files.uefi_loader.file_name();
            for (key, name) in [
                ("bootFiles.biosLoader", files.bios_loader.as_str()),
                ("bootFiles.uefiLoader", uefi),
            ] {
                if let Err(why) = served_file(&files.ipxe_dir, name, SYSTEM_IPXE_LOADERS) {
                    findings.push(Finding {
                        key,
                        message: why.to_string(),
                        error: true,
                    });
                }
            }
            if uefi != HTTP_BOOT_LOADER {
                if let Err(why) =
                    served_file(&files.ipxe_dir, HTTP_BOOT_LOADER, SYSTEM_IPXE_LOADERS)
                {
                    findings.push(Finding {
                        key: "bootFiles.ipxeDir",
                        message: format!("UEFI HTTP Boot clients get no loader: {why}"),
                        error: false,
                    });
                }
            }
        }
    }
    match directory("bootFiles.assetsDir", &files.assets_dir) {
        Some(finding) => findings.push(finding),
        None => {
            for (key, name) in [
                ("boot.kernel", &config.boot.kernel),
                ("boot.initrd", &config.boot.initrd),
            ] {
                if let Err(why) = served_file(&files.assets_dir, name, &[]) {
                    findings.push(Finding {
                        key,
                        message: why.to_string(),
                        error: true,
                    });
                }
            }
        }
    }
    findings
}

/// Everything [`boot_files`] checks, and the inventory and the state file's folder.
pub fn check(config: &Config) -> Vec<Finding> {
    let mut findings = boot_files(config);
    match &config.inventory {
        Inventory::Directory(dir) => findings.extend(directory("inventory.directory", dir)),
        Inventory::Kubernetes {
            kubeconfig: Some(file),
        } => {
            if let Err(e) = std::fs::File::open(file) {
                findings.push(Finding {
                    key: "inventory.kubeconfig",
                    message: format!("cannot read {}: {e}", file.display()),
                    error: true,
                });
            }
        }
        Inventory::Kubernetes { kubeconfig: None } => {}
    }
    if let Some(parent) = config
        .state_file
        .as_deref()
        .and_then(Path::parent)
        .filter(|p| !p.as_os_str().is_empty())
    {
        if let Some(mut finding) = directory("stateFile", parent) {
            finding.message = format!("its folder {}", finding.message);
            findings.push(finding);
        }
    }
    findings
}

/// The boot files found missing now, as `STATUS=` shows them (empty: none).
#[derive(Debug, Default)]
pub struct BootFilesState {
    missing: Mutex<Vec<String>>,
    recheck: tokio::sync::Notify,
}

impl BootFilesState {
    /// Has [`watch_boot_files`] look now (SIGHUP), not at its next tick.
    pub fn recheck(&self) {
        self.recheck.notify_one();
    }

    /// `boot files missing: bootFiles.biosLoader: "undionly.kpxe" not found in …`, or nothing.
    pub fn status(&self) -> Option<String> {
        let missing = self.missing.lock().unwrap_or_else(|p| p.into_inner());
        (!missing.is_empty()).then(|| format!("boot files missing: {}", missing.join("; ")))
    }

    /// Records what is missing now; logs each change (a file gone at WARN, all back at INFO).
    fn update(&self, now: Vec<String>) {
        let mut missing = self.missing.lock().unwrap_or_else(|p| p.into_inner());
        if *missing == now {
            return;
        }
        for problem in now.iter().filter(|p| !missing.contains(p)) {
            tracing::warn!("boot file missing, machines asking for it get none: {problem}");
        }
        if now.is_empty() {
            tracing::info!("every boot file is back");
        }
        *missing = now;
    }
}

/// The boot files' errors now, as `key: message`.
fn missing_now(config: &Config) -> Vec<String> {
    boot_files(config)
        .into_iter()
        .filter(|f| f.error)
        .map(|f| format!("{}: {}", f.key, f.message))
        .collect()
}

/// Looks at the boot files every `every`, and when asked ([`BootFilesState::recheck`]), until
/// `shutdown`, keeping `state` current.
pub async fn watch_boot_files(
    config: Arc<Config>,
    state: Arc<BootFilesState>,
    every: Duration,
    shutdown: CancellationToken,
) {
    let mut ticker = tokio::time::interval(every);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = ticker.tick() => {}
            _ = state.recheck.notified() => {}
        }
        let config = config.clone();
        // Blocking file system calls, off the runtime's threads.
        match tokio::task::spawn_blocking(move || missing_now(&config)).await {
            Ok(now) => state.update(now),
            Err(e) => tracing::warn!("cannot check the boot files: {e}"),
        }
    }
}

/// The folder a relative boot path is looked for in, for messages.
pub fn served_path(dir: &Path, name: &str) -> PathBuf {
    dir.join(name.trim_start_matches('/'))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(dir: &Path, extra: &str) -> Config {
        let text = format!(
            "serverAddress: 10.77.0.1\nsubnet: 10.77.0.0/24\nbootFiles:\n  ipxeDir: {d}/ipxe\n  assetsDir: {d}/assets\nboot: {{kernel: vmlinuz, initrd: initrd.img}}\ninventory: {{directory: {d}/machines}}\n{extra}",
            d = dir.display()
        );
        Config::parse(Path::new("p.yaml"), &text).expect("valid config")
    }

    fn keys(findings: &[Finding]) -> Vec<(&str, bool)> {
        findings.iter().map(|f| (f.key, f.error)).collect()
    }

    #[test]
    fn each_missing_file_or_folder_is_named_by_its_key() {
        let dir = tempfile::tempdir().expect("tempdir");
        let d = dir.path();
        let c = config(d, "stateFile: /nonexistent/state.yaml\n");
        assert_eq!(
            keys(&check(&c)),
            [
                ("bootFiles.ipxeDir", true),
                ("bootFiles.assetsDir", true),
                ("inventory.directory", true),
                ("stateFile", true)
            ]
        );
        for sub in ["ipxe", "assets", "machines"] {
            std::fs::create_dir(d.join(sub)).expect("mkdir");
        }
        let findings = check(&config(d, ""));
        assert_eq!(
            keys(&findings),
            [
                ("bootFiles.biosLoader", true),
                ("bootFiles.uefiLoader", true),
                ("bootFiles.ipxeDir", false),
                ("boot.kernel", true),
                ("boot.initrd", true)
            ]
        );
        assert_eq!(
            findings[0].message,
            format!(
                "\"undionly.kpxe\" not found in {}",
                d.join("ipxe").display()
            )
        );
        for file in ["ipxe/undionly.kpxe", "ipxe/snponly.efi", "assets/vmlinuz"] {
            std::fs::write(d.join(file), b"x").expect("write");
        }
        // A symlink out of the folder is what the servers refuse: refused here too.
        std::fs::write(d.join("ipxe.efi"), b"x").expect("write");
        std::os::unix::fs::symlink(d.join("ipxe.efi"), d.join("ipxe/ipxe.efi")).expect("ln");
        std::fs::create_dir(d.join("assets/initrd.img")).expect("mkdir");
        let findings = check(&config(d, ""));
        assert_eq!(
            keys(&findings),
            [("bootFiles.ipxeDir", false), ("boot.initrd", true)]
        );
        assert!(findings[0].message.contains("cp -L"), "{findings:?}");
        std::fs::remove_dir(d.join("assets/initrd.img")).expect("rmdir");
        std::fs::write(d.join("assets/initrd.img"), b"x").expect("write");
        assert_eq!(keys(&check(&config(d, ""))), [("bootFiles.ipxeDir", false)]);
    }

    #[test]
    fn a_missing_file_shows_in_the_status_until_it_is_back() {
        let dir = tempfile::tempdir().expect("tempdir");
        let d = dir.path();
        for sub in ["ipxe", "assets", "machines"] {
            std::fs::create_dir(d.join(sub)).expect("mkdir");
        }
        for file in [
            "ipxe/undionly.kpxe",
            "ipxe/snponly.efi",
            "ipxe/ipxe.efi",
            "assets/vmlinuz",
            "assets/initrd.img",
        ] {
            std::fs::write(d.join(file), b"x").expect("write");
        }
        let c = config(d, "");
        let state = BootFilesState::default();
        state.update(missing_now(&c));
        assert_eq!(state.status(), None);
        std::fs::remove_file(d.join("ipxe/undionly.kpxe")).expect("rm");
        state.update(missing_now(&c));
        assert_eq!(
            state.status(),
            Some(format!(
                "boot files missing: bootFiles.biosLoader: \"undionly.kpxe\" not found in {}",
                d.join("ipxe").display()
            ))
        );
        std::fs::write(d.join("ipxe/undionly.kpxe"), b"x").expect("write");
        state.update(missing_now(&c));
        assert_eq!(state.status(), None);
    }
}
