//! `limits:`: what bounds netboot's HTTP connections and TFTP transfers (defaults from
//! `netboot`, documented in `provisioner.yaml.example`).

use std::time::Duration;

use netboot::http::limits as http;
use netboot::http::HttpLimits;
use netboot::tftp::TftpSettings;
use serde::Deserialize;

/// `limits:` as written.
#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "camelCase")]
pub(super) struct RawLimits {
    http: RawHttp,
    tftp: RawTftp,
}

#[derive(Debug, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "camelCase")]
struct RawHttp {
    max_connections: usize,
    max_connections_per_peer: usize,
    header_timeout: u64,
    write_timeout: u64,
    min_rate: u64,
    response_slack: u64,
}

impl Default for RawHttp {
    fn default() -> Self {
        RawHttp {
            max_connections: http::DEFAULT_MAX_CONNECTIONS,
            max_connections_per_peer: http::DEFAULT_MAX_CONNECTIONS_PER_PEER,
            header_timeout: http::DEFAULT_HEADER_TIMEOUT.as_secs(),
            write_timeout: http::DEFAULT_WRITE_TIMEOUT.as_secs(),
            min_rate: http::DEFAULT_MIN_RATE,
            response_slack: http::DEFAULT_RESPONSE_SLACK.as_secs(),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "camelCase")]
struct RawTftp {
    max_transfers: usize,
    max_transfers_per_peer: usize,
    max_timeout: u64,
    min_rate: u64,
    transfer_slack: u64,
    window_budget: usize,
    memory_budget: usize,
}

impl Default for RawTftp {
    fn default() -> Self {
        let d = TftpSettings::new("");
        RawTftp {
            max_transfers: d.max_transfers,
            max_transfers_per_peer: d.max_transfers_per_peer,
            max_timeout: d.max_timeout.as_secs(),
            min_rate: d.min_rate,
            transfer_slack: d.transfer_slack.as_secs(),
            window_budget: d.window_budget,
            memory_budget: d.memory_budget,
        }
    }
}

/// TFTP's limits, applied to the server's settings by [`TftpLimits::apply`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TftpLimits {
    pub max_transfers: usize,
    pub max_transfers_per_peer: usize,
    pub max_timeout: Duration,
    pub min_rate: u64,
    pub transfer_slack: Duration,
    pub window_budget: usize,
    pub memory_budget: usize,
}

impl TftpLimits {
    pub fn apply(&self, settings: &mut TftpSettings) {
        settings.max_transfers = self.max_transfers;
        settings.max_transfers_per_peer = self.max_transfers_per_peer;
        settings.max_timeout = self.max_timeout;
        settings.min_rate = self.min_rate;
        settings.transfer_slack = self.transfer_slack;
        settings.window_budget = self.window_budget;
        settings.memory_budget = self.memory_budget;
    }
}

/// The validated `limits:`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    pub http: HttpLimits,
    pub tftp: TftpLimits,
}

impl Default for Limits {
    fn default() -> Self {
        let d = TftpSettings::new("");
        Limits {
            http: HttpLimits::default(),
            tftp: TftpLimits {
                max_transfers: d.max_transfers,
                max_transfers_per_peer: d.max_transfers_per_peer,
                max_timeout: d.max_timeout,
                min_rate: d.min_rate,
                transfer_slack: d.transfer_slack,
                window_budget: d.window_budget,
                memory_budget: d.memory_budget,
            },
        }
    }
}

impl RawLimits {
    /// The limits, or the key that is wrong and why.
    pub(super) fn validate(self) -> Result<Limits, (&'static str, String)> {
        let positive = |key: &'static str, value: u64| {
            if value == 0 {
                Err((key, "must be at least 1".to_string()))
            } else {
                Ok(value)
            }
        };
        let h = self.http;
        positive("limits.http.maxConnections", h.max_connections as u64)?;
        positive(
            "limits.http.maxConnectionsPerPeer",
            h.max_connections_per_peer as u64,
        )?;
        if h.max_connections_per_peer > h.max_connections {
            return Err((
                "limits.http.maxConnectionsPerPeer",
                format!(
                    "{} is more than limits.http.maxConnections ({})",
                    h.max_connections_per_peer, h.max_connections
                ),
            ));
        }
        let http = HttpLimits {
            max_connections: h.max_connections,
            max_connections_per_peer: h.max_connections_per_peer,
            header_timeout: Duration::from_secs(positive(
                "limits.http.headerTimeout",
                h.header_timeout,
            )?),
            write_timeout: Duration::from_secs(positive(
                "limits.http.writeTimeout",
                h.write_timeout,
            )?),
            min_rate: positive("limits.http.minRate", h.min_rate)?,
            response_slack: Duration::from_secs(positive(
                "limits.http.responseSlack",
                h.response_slack,
            )?),
            ..HttpLimits::default()
        };
        let t = self.tftp;
        positive("limits.tftp.maxTransfers", t.max_transfers as u64)?;
        positive(
            "limits.tftp.maxTransfersPerPeer",
            t.max_transfers_per_peer as u64,
        )?;
        if t.max_transfers_per_peer > t.max_transfers {
            return Err((
                "limits.tftp.maxTransfersPerPeer",
                format!(
                    "{} is more than limits.tftp.maxTransfers ({})",
                    t.max_transfers_per_peer, t.max_transfers
                ),
            ));
        }
        if !(1..=255).contains(&t.max_timeout) {
            return Err((
                "limits.tftp.maxTimeout",
                format!("{} seconds: give 1 to 255 (RFC 2349)", t.max_timeout),
            ));
        }
        positive("limits.tftp.windowBudget", t.window_budget as u64)?;
        // One block of the largest size must fit, or such a request could never be served.
        let block = usize::from(netboot::tftp::MAX_BLKSIZE);
        if t.memory_budget < t.window_budget.max(block) {
            return Err((
                "limits.tftp.memoryBudget",
                format!(
                    "{} bytes: give at least limits.tftp.windowBudget and one {block}-byte block",
                    t.memory_budget
                ),
            ));
        }
        let tftp = TftpLimits {
            max_transfers: t.max_transfers,
            max_transfers_per_peer: t.max_transfers_per_peer,
            max_timeout: Duration::from_secs(t.max_timeout),
            min_rate: positive("limits.tftp.minRate", t.min_rate)?,
            transfer_slack: Duration::from_secs(positive(
                "limits.tftp.transferSlack",
                t.transfer_slack,
            )?),
            window_budget: t.window_budget,
            memory_budget: t.memory_budget,
        };
        Ok(Limits { http, tftp })
    }
}
