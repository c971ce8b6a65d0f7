//! Logs go to journald (structured fields, upper-cased without prefix: `MACHINE=`, `MAC=`, `IP=`)
//! when our stderr is connected to the journal, as under systemd; to stderr otherwise.

use anyhow::Context;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::EnvFilter;

/// True when stderr is the journal stream systemd gave us (`JOURNAL_STREAM=dev:inode`).
fn stderr_is_journal() -> bool {
    use std::os::unix::fs::MetadataExt;
    let Some(stream) = std::env::var_os("JOURNAL_STREAM") else {
        return false;
    };
    let Some((dev, ino)) = stream.to_str().and_then(|s| s.split_once(':')) else {
        return false;
    };
    let Ok(meta) = std::fs::metadata("/proc/self/fd/2") else {
        return false;
    };
    dev.parse() == Ok(meta.dev()) && ino.parse() == Ok(meta.ino())
}

/// Logs at `level` (an `EnvFilter` directive such as `debug` or `info,netboot=debug`), else as
/// `RUST_LOG` says, else at info. A `level` that is not a filter is an error.
pub fn init(level: Option<&str>) -> anyhow::Result<()> {
    let filter = match level {
        Some(level) => EnvFilter::try_new(level).with_context(|| format!("{level:?}"))?,
        None => EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
    };
    let registry = tracing_subscriber::registry().with(filter);
    if stderr_is_journal() {
        match tracing_journald::layer() {
            Ok(layer) => {
                registry
                    .with(
                        layer
                            .with_field_prefix(None)
                            .with_syslog_identifier("provisioner".into())
                            .with_priority_mappings(priorities()),
                    )
                    .init();
                return Ok(());
            }
            Err(e) => eprintln!("journald unavailable, logging to stderr: {e}"),
        }
    }
    use std::io::IsTerminal;
    let ansi = std::io::stderr().is_terminal();
    registry
        .with(
            tracing_subscriber::fmt::layer()
                .with_ansi(ansi)
                .with_writer(std::io::stderr),
        )
        .init();
    Ok(())
}

/// tracing-journald maps INFO to "notice" and DEBUG to "info"; operators filtering with
/// `journalctl -p info` expect the syslog meaning of each level.
fn priorities() -> tracing_journald::PriorityMappings {
    use tracing_journald::Priority;
    tracing_journald::PriorityMappings {
        error: Priority::Error,
        warn: Priority::Warning,
        info: Priority::Informational,
        debug: Priority::Debug,
        trace: Priority::Debug,
    }
}
