//! Checks of values that go into cloud-configs, kubeadm files and Machines: RFC 1123 host
//! names, authorized_keys lines, `host:port` endpoints, Kubernetes versions, `http://` URLs.
//! Kept apart from the renderer and the inventory, which both use them.

use std::net::Ipv4Addr;

/// A value that cannot be used. The reason never quotes a secret.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {reason}")]
pub struct Invalid {
    /// Where the value came from, e.g. `laptop.hostname`.
    pub field: &'static str,
    pub reason: String,
}

pub fn invalid(field: &'static str, reason: impl Into<String>) -> Invalid {
    Invalid {
        field,
        reason: reason.into(),
    }
}

/// An RFC 1123 host name: dot-separated labels of 1-63 letters, digits and hyphens, not
/// starting or ending with a hyphen, 253 characters at most. The Machine CRD's host name
/// pattern says the same (`cluster::crd::HOSTNAME_PATTERN`).
pub fn is_hostname(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        })
}

/// A host name as RFC 1123 allows: dot-separated labels of 1-63 letters, digits and hyphens,
/// not starting or ending with a hyphen, 253 characters at most.
pub fn hostname(field: &'static str, name: &str) -> Result<(), Invalid> {
    if !is_hostname(name) {
        return Err(invalid(
            field,
            format!("{name:?} is not an RFC 1123 host name (letters, digits, '-', dot-separated labels of 1-63)"),
        ));
    }
    Ok(())
}

/// An authorized_keys line: one line, no control characters, with a key type in it (options
/// such as `from="10.0.0.0/8"` may come first).
pub fn ssh_key(key: &str) -> Result<(), Invalid> {
    const FIELD: &str = "cloudInit.sshAuthorizedKeys";
    if key.contains(['\n', '\r']) {
        return Err(invalid(FIELD, "a key must be a single line"));
    }
    if key.chars().any(char::is_control) {
        return Err(invalid(FIELD, "a key contains a control character"));
    }
    if key.len() > 16 * 1024 {
        return Err(invalid(FIELD, "a key is longer than 16 KiB"));
    }
    let has_type = key.split_whitespace().any(|word| {
        word.starts_with("ssh-") || word.starts_with("ecdsa-sha2-") || word.starts_with("sk-")
    });
    if !has_type {
        let start: String = key.chars().take(24).collect();
        return Err(invalid(
            FIELD,
            format!("{start:?}… has no key type (ssh-ed25519, ssh-rsa, ecdsa-sha2-…, sk-…)"),
        ));
    }
    Ok(())
}

/// `host:port` with an IPv4 address, a bracketed IPv6 address or a DNS name, port 1-65535.
pub fn endpoint(field: &'static str, endpoint: &str) -> Result<(), Invalid> {
    let bad = || {
        invalid(
            field,
            format!(
                "{endpoint:?} is not host:port (10.0.0.1:6443, [fd00::1]:6443, api.example:6443)"
            ),
        )
    };
    let (host, port) = endpoint.rsplit_once(':').ok_or_else(bad)?;
    let port: u16 = port.parse().map_err(|_| bad())?;
    if port == 0 {
        return Err(bad());
    }
    if let Some(v6) = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
        return match v6.parse::<std::net::Ipv6Addr>() {
            Ok(_) => Ok(()),
            Err(_) => Err(bad()),
        };
    }
    if host.parse::<Ipv4Addr>().is_ok() {
        return Ok(());
    }
    if is_hostname(host) {
        Ok(())
    } else {
        Err(bad())
    }
}

/// `v1.30.2` (the `v` may be left out; kubeadm also takes labels such as `stable-1.30`, which
/// need the internet and are refused here).
pub fn kubernetes_version(field: &'static str, version: &str) -> Result<(), Invalid> {
    let numbers = version.strip_prefix('v').unwrap_or(version);
    let (core, pre) = match numbers.split_once(['-', '+']) {
        Some((core, rest)) => (core, Some(rest)),
        None => (numbers, None),
    };
    let parts: Vec<&str> = core.split('.').collect();
    let ok = parts.len() == 3
        && parts
            .iter()
            .all(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()))
        && pre.is_none_or(|p| {
            !p.is_empty()
                && p.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-')
        });
    if !ok {
        return Err(invalid(
            field,
            format!("{version:?} is not a Kubernetes version such as v1.30.2"),
        ));
    }
    Ok(())
}

/// `http://HOST[:PORT][/PATH]`, printable ASCII without blanks or quotes (it goes on a unit's
/// command line).
pub fn http_url(field: &'static str, url: &str) -> Result<(), Invalid> {
    let bad = || invalid(field, format!("{url:?} is not an http://HOST:PORT/ URL"));
    if !url
        .bytes()
        .all(|b| b.is_ascii_graphic() && !matches!(b, b'"' | b'\'' | b'\\' | b'%' | b'$'))
    {
        return Err(bad());
    }
    let uri: http::Uri = url.parse().map_err(|_| bad())?;
    if uri.scheme_str() != Some("http") || uri.host().is_none_or(str::is_empty) {
        return Err(bad());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_names() {
        for name in [
            "node2",
            "a",
            "n-1.lab.example",
            "UPPER.case",
            &"a".repeat(63),
        ] {
            assert!(is_hostname(name), "{name}");
        }
        let long_label = "a".repeat(64);
        let too_long = ["a"; 128].join("."); // 255 characters
        for name in [
            "",
            "-a",
            "a-",
            "a..b",
            "a_b",
            "a.",
            "ä",
            &long_label,
            &too_long,
        ] {
            assert!(!is_hostname(name), "{name}");
        }
        assert!(hostname("h", "node 2").is_err_and(|e| e.field == "h"));
    }

    #[test]
    fn endpoints_and_versions() {
        for e in ["10.77.0.1:6443", "[fd00::1]:6443", "api.lab.example:443"] {
            endpoint("e", e).expect(e);
        }
        for e in ["10.77.0.1", "10.77.0.1:0", "a b:6443", "[::1:6443"] {
            assert!(endpoint("e", e).is_err(), "{e}");
        }
        for version in ["v1.30.2", "1.31.0", "v1.32.0-rc.1"] {
            kubernetes_version("v", version).expect(version);
        }
        for version in ["stable-1.30", "v1.30", "v1.30.x", "latest"] {
            assert!(kubernetes_version("v", version).is_err(), "{version}");
        }
    }
}
