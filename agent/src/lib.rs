//! The agent's modules as a library: `src/main.rs` is the `provisioner` command line over
//! them, and the fuzz targets (`fuzz/`) reach the configuration and Machine manifest parsers
//! through it.

pub mod check_config;
pub mod cloud_config_cmd;
pub mod cloudinit;
pub mod cluster;
pub mod config;
pub mod daemon;
pub mod dbus;
pub mod imageserver;
pub mod logging;
pub mod machines;
pub mod pod_network;
pub mod preflight;
pub mod provisioning;
pub mod status;
pub mod status_cmd;
pub mod systemd;
pub mod validate;

/// Cancels `token` on SIGTERM (systemd stopping the unit) or SIGINT.
pub async fn cancel_on_signal(token: tokio_util::sync::CancellationToken) {
    use tokio::signal::unix::{signal, SignalKind};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        }
        Err(e) => {
            tracing::warn!("cannot watch SIGTERM: {e}");
            let _ = tokio::signal::ctrl_c().await;
        }
    }
    token.cancel();
}
