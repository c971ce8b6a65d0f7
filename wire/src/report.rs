//! stage2's progress reports: the JSON body of `POST {provisioner.url}/report/{mac}`, sent
//! with `Authorization: Bearer {token}`. stage2 writes them ([`ProgressReport::to_json`]);
//! netboot reads them ([`ProgressReport::parse`]) and passes them to the agent.

use serde::{Deserialize, Serialize};

/// Largest report body accepted; a report is a few dozen bytes.
pub const MAX_REPORT_BODY: usize = 16 * 1024;
/// Longest message kept from a report; longer ones are refused rather than cut silently.
pub const MAX_MESSAGE_LEN: usize = 1024;

/// stage2's report, the JSON body of `POST /report/{mac}`:
///
/// ```json
/// {"phase":"imaging","progress":42,"bytes":901775360,"rate":118000000,"message":"…"}
/// {"phase":"imaged"}
/// {"phase":"failed","message":"sha256 mismatch: expected 9f86…, got 1c2e…"}
/// {"phase":"joining","message":"cloud-init is configuring the node"}
/// ```
///
/// `joining` comes from the imaged machine's cloud-init (its user-data carries the token), not
/// from stage2; so may a `failed` when `kubeadm join` fails.
///
/// `progress` is a percentage (0-100), `bytes` the decompressed bytes written so far, `rate`
/// bytes per second; every field but `phase` (and `message` for `failed`) may be left out.
/// Unknown fields are ignored, so stage2 may send more than this netboot understands.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "phase", rename_all = "lowercase")]
pub enum ProgressReport {
    Imaging {
        #[serde(default)]
        progress: u8,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        bytes: Option<u64>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        rate: Option<u64>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        message: Option<String>,
    },
    Imaged {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        message: Option<String>,
    },
    Failed {
        message: String,
    },
    Joining {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        message: Option<String>,
    },
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ReportParseError {
    #[error("report is not valid JSON of the expected shape: {0}")]
    Json(String),
    #[error("progress {0} is not a percentage (0-100)")]
    Progress(u8),
    #[error("message is longer than {MAX_MESSAGE_LEN} bytes")]
    MessageTooLong,
}

impl ProgressReport {
    pub fn parse(body: &[u8]) -> Result<ProgressReport, ReportParseError> {
        let report: ProgressReport =
            serde_json::from_slice(body).map_err(|e| ReportParseError::Json(e.to_string()))?;
        let message = match &report {
            ProgressReport::Imaging {
                progress, message, ..
            } => {
                if *progress > 100 {
                    return Err(ReportParseError::Progress(*progress));
                }
                message.as_deref()
            }
            ProgressReport::Imaged { message } | ProgressReport::Joining { message } => {
                message.as_deref()
            }
            ProgressReport::Failed { message } => Some(message.as_str()),
        };
        if message.is_some_and(|m| m.len() > MAX_MESSAGE_LEN) {
            return Err(ReportParseError::MessageTooLong);
        }
        Ok(report)
    }

    pub fn to_json(&self) -> String {
        // Serialising these plain fields cannot fail.
        serde_json::to_string(self).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_reports() {
        assert_eq!(
            ProgressReport::parse(br#"{"phase":"imaging","progress":42,"rate":1000,"extra":1}"#),
            Ok(ProgressReport::Imaging {
                progress: 42,
                bytes: None,
                rate: Some(1000),
                message: None
            })
        );
        assert_eq!(
            ProgressReport::parse(br#"{"phase":"imaged"}"#),
            Ok(ProgressReport::Imaged { message: None })
        );
        assert_eq!(
            ProgressReport::parse(br#"{"phase":"failed","message":"no disk"}"#),
            Ok(ProgressReport::Failed {
                message: "no disk".into()
            })
        );
        assert_eq!(
            ProgressReport::parse(br#"{"phase":"joining","message":"cloud-init"}"#),
            Ok(ProgressReport::Joining {
                message: Some("cloud-init".into())
            })
        );
        for bad in [
            &br#"{"phase":"failed"}"#[..],
            br#"{"phase":"done"}"#,
            br#"{"progress":5}"#,
            br#"{"phase":"imaging","progress":-1}"#,
            br#"{"phase":"imaging","progress":"5"}"#,
            b"not json",
            b"",
        ] {
            assert!(
                matches!(ProgressReport::parse(bad), Err(ReportParseError::Json(_))),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
        assert_eq!(
            ProgressReport::parse(br#"{"phase":"imaging","progress":101}"#),
            Err(ReportParseError::Progress(101))
        );
        let long = format!(r#"{{"phase":"failed","message":"{}"}}"#, "x".repeat(2000));
        assert_eq!(
            ProgressReport::parse(long.as_bytes()),
            Err(ReportParseError::MessageTooLong)
        );
    }

    #[test]
    fn reports_round_trip() {
        let report = ProgressReport::Imaging {
            progress: 7,
            bytes: Some(1 << 20),
            rate: None,
            message: Some("writing".into()),
        };
        let json = report.to_json();
        assert_eq!(
            json,
            r#"{"phase":"imaging","progress":7,"bytes":1048576,"message":"writing"}"#
        );
        assert_eq!(ProgressReport::parse(json.as_bytes()), Ok(report));
    }
}
