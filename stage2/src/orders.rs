//! stage2's orders, from the kernel command line that netboot writes into the iPXE script.
//!
//! ```text
//! provisioner.url=http://10.77.0.1/              netboot's base URL (reports, user-data)   required
//! provisioner.token=Abc123…                      per-provisioning token, [A-Za-z0-9._~-]   required
//! provisioner.image=http://10.77.0.1/img.zst     image URL (zstd, xz, gzip or raw)          required
//! provisioner.sha256=<64 hex digits>             sha256 of the decompressed image           required
//! provisioner.image_size=2147483648              decompressed size in bytes                 optional
//! provisioner.disk.path=/dev/disk/by-id/…        disk hints: every one given must match     optional
//! provisioner.disk.serial=S123
//! provisioner.disk.model="QEMU HARDDISK"         (quote values with spaces, as the kernel allows)
//! provisioner.disk.min_size=100G                 bytes, or K/M/G/T (powers of 1024); filters
//! ```
//!
//! Only `http://` URLs are accepted (the initrd carries no TLS; integrity comes from the
//! sha256). Other parameters are ignored; an unknown, repeated, missing or malformed
//! `provisioner.` key is an error naming the key, never a guess. The token is never printed.

use std::fmt;
use std::path::PathBuf;

use crate::disk::DiskHints;

/// The per-provisioning token; `Debug` does not show it.
#[derive(Clone, PartialEq, Eq)]
pub struct Token(String);

impl Token {
    /// A token if `text` has the allowed shape: 16 to 256 characters of `[A-Za-z0-9._~-]`.
    pub fn parse(text: &str) -> Option<Token> {
        let valid = (16..=256).contains(&text.len())
            && text
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "._~-".contains(c));
        valid.then(|| Token(text.to_owned()))
    }

    /// The token itself, for the `Authorization` header only.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Token(<redacted>)")
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Orders {
    pub netboot_url: String,
    pub token: Token,
    pub image_url: String,
    pub sha256: [u8; 32],
    pub image_size: Option<u64>,
    pub disk: DiskHints,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OrdersError {
    #[error("kernel command line: {key} is missing")]
    Missing { key: &'static str },
    #[error("kernel command line: {key}={value:?} is invalid: {reason}")]
    Invalid {
        key: String,
        /// The offending value (`<redacted>` for the token).
        value: String,
        reason: String,
    },
    #[error("kernel command line: {key} is given more than once")]
    Repeated { key: String },
    #[error("kernel command line: unknown key {key} (known: {known})")]
    Unknown { key: String, known: String },
    #[error("kernel command line: unbalanced double quote")]
    UnbalancedQuote,
}

const URL: &str = "provisioner.url";
const TOKEN: &str = "provisioner.token";
const IMAGE: &str = "provisioner.image";
const SHA256: &str = "provisioner.sha256";
const IMAGE_SIZE: &str = "provisioner.image_size";
const DISK_PATH: &str = "provisioner.disk.path";
const DISK_SERIAL: &str = "provisioner.disk.serial";
const DISK_MODEL: &str = "provisioner.disk.model";
const DISK_MIN_SIZE: &str = "provisioner.disk.min_size";
const KNOWN: &[&str] = &[
    URL,
    TOKEN,
    IMAGE,
    SHA256,
    IMAGE_SIZE,
    DISK_PATH,
    DISK_SERIAL,
    DISK_MODEL,
    DISK_MIN_SIZE,
];

/// Splits a command line into parameters the way the kernel does: blanks separate, double
/// quotes group (and are removed), e.g. `a="b c"` is one parameter `a=b c`.
pub fn split_cmdline(cmdline: &str) -> Result<Vec<String>, OrdersError> {
    let (params, unbalanced) = lex_cmdline(cmdline);
    if unbalanced {
        return Err(OrdersError::UnbalancedQuote);
    }
    Ok(params)
}

/// As [`split_cmdline`], but an unbalanced quote runs to the end of the line, as the kernel
/// itself treats it: for options that must never stop a boot.
pub fn split_cmdline_lenient(cmdline: &str) -> Vec<String> {
    lex_cmdline(cmdline).0
}

/// The parameters, and whether a quote was left open.
fn lex_cmdline(cmdline: &str) -> (Vec<String>, bool) {
    let mut params = Vec::new();
    let mut current = String::new();
    let mut in_quotes = false;
    let mut started = false;
    for c in cmdline.chars() {
        match c {
            '"' => {
                in_quotes = !in_quotes;
                started = true;
            }
            c if c.is_whitespace() && !in_quotes => {
                if started {
                    params.push(std::mem::take(&mut current));
                    started = false;
                }
            }
            c => {
                current.push(c);
                started = true;
            }
        }
    }
    if started {
        params.push(current);
    }
    (params, in_quotes)
}

fn invalid(key: &str, value: &str, reason: impl Into<String>) -> OrdersError {
    OrdersError::Invalid {
        key: key.to_owned(),
        value: if key == TOKEN {
            "<redacted>".to_owned()
        } else {
            value.to_owned()
        },
        reason: reason.into(),
    }
}

fn parse_http_url(key: &str, value: &str) -> Result<String, OrdersError> {
    let Some(rest) = value.strip_prefix("http://") else {
        return Err(invalid(key, value, "must start with http://"));
    };
    let host = rest.split('/').next().unwrap_or_default();
    if host.is_empty() {
        return Err(invalid(key, value, "has no host"));
    }
    if value.chars().any(|c| c.is_control() || c.is_whitespace()) {
        return Err(invalid(key, value, "contains blanks or control characters"));
    }
    Ok(value.to_owned())
}

/// Bytes, optionally with a K/M/G/T suffix (powers of 1024, `KiB`-style spellings accepted).
pub fn parse_size(text: &str) -> Option<u64> {
    let text = text.trim();
    let digits_end = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (digits, suffix) = text.split_at(digits_end);
    let number: u64 = digits.parse().ok()?;
    let shift = match suffix.to_ascii_uppercase().as_str() {
        "" | "B" => 0,
        "K" | "KB" | "KIB" => 10,
        "M" | "MB" | "MIB" => 20,
        "G" | "GB" | "GIB" => 30,
        "T" | "TB" | "TIB" => 40,
        _ => return None,
    };
    number.checked_mul(1u64 << shift)
}

impl Orders {
    /// Parses `/proc/cmdline` content.
    pub fn from_cmdline(cmdline: &str) -> Result<Orders, OrdersError> {
        let mut values: Vec<(&'static str, String)> = Vec::new();
        for param in split_cmdline(cmdline)? {
            let (key, value) = param.split_once('=').unwrap_or((param.as_str(), ""));
            if !key.starts_with("provisioner.") {
                continue;
            }
            let Some(&known) = KNOWN.iter().find(|&&k| k == key) else {
                return Err(OrdersError::Unknown {
                    key: key.to_owned(),
                    known: KNOWN.join(", "),
                });
            };
            if values.iter().any(|(k, _)| *k == known) {
                return Err(OrdersError::Repeated {
                    key: key.to_owned(),
                });
            }
            if value.is_empty() {
                return Err(invalid(key, value, "is empty"));
            }
            values.push((known, value.to_owned()));
        }
        let get = |key: &'static str| {
            values
                .iter()
                .find(|(k, _)| *k == key)
                .map(|(_, v)| v.as_str())
        };
        let require = |key: &'static str| get(key).ok_or(OrdersError::Missing { key });

        let netboot_url = parse_http_url(URL, require(URL)?)?;
        let token_text = require(TOKEN)?;
        let token = Token::parse(token_text).ok_or_else(|| {
            invalid(
                TOKEN,
                token_text,
                "must be 16 to 256 characters of A-Z a-z 0-9 . _ ~ -",
            )
        })?;
        let image_url = parse_http_url(IMAGE, require(IMAGE)?)?;
        let sha256_text = require(SHA256)?;
        let sha256 = crate::image::parse_sha256(sha256_text)
            .ok_or_else(|| invalid(SHA256, sha256_text, "must be 64 hexadecimal digits"))?;
        let image_size = get(IMAGE_SIZE)
            .map(|v| {
                v.parse::<u64>()
                    .map_err(|_| invalid(IMAGE_SIZE, v, "must be a number of bytes"))
            })
            .transpose()?;
        let disk = DiskHints {
            path: get(DISK_PATH)
                .map(|v| {
                    if v.starts_with("/dev/") {
                        Ok(PathBuf::from(v))
                    } else {
                        Err(invalid(DISK_PATH, v, "must be a path under /dev/"))
                    }
                })
                .transpose()?,
            serial: get(DISK_SERIAL).map(str::to_owned),
            model: get(DISK_MODEL).map(str::to_owned),
            min_size: get(DISK_MIN_SIZE)
                .map(|v| {
                    parse_size(v).ok_or_else(|| {
                        invalid(DISK_MIN_SIZE, v, "must be bytes or a size like 100G")
                    })
                })
                .transpose()?,
        };
        Ok(Orders {
            netboot_url,
            token,
            image_url,
            sha256,
            image_size,
            disk,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HASH: &str = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08";
    const TOKEN_VALUE: &str = "tok-0123456789abcdef";

    fn minimal() -> String {
        format!(
            "BOOT_IMAGE=vmlinuz console=ttyS0 provisioner.url=http://10.77.0.1/ \
             provisioner.token={TOKEN_VALUE} provisioner.image=http://10.77.0.1:8080/node.raw.zst \
             provisioner.sha256={HASH} quiet"
        )
    }

    #[test]
    fn minimal_orders() {
        let orders = Orders::from_cmdline(&minimal()).expect("ok");
        assert_eq!(orders.netboot_url, "http://10.77.0.1/");
        assert_eq!(orders.token.expose(), TOKEN_VALUE);
        assert_eq!(orders.image_url, "http://10.77.0.1:8080/node.raw.zst");
        assert_eq!(hex::encode(orders.sha256), HASH);
        assert_eq!(orders.image_size, None);
        assert_eq!(orders.disk, DiskHints::default());
    }

    #[test]
    fn all_orders_with_quoted_model() {
        let cmdline = format!(
            "{} provisioner.image_size=2147483648 provisioner.disk.path=/dev/disk/by-id/virtio-S1 \
             provisioner.disk.serial=S1 provisioner.disk.model=\"QEMU HARDDISK\" \
             provisioner.disk.min_size=100G\n",
            minimal()
        );
        let orders = Orders::from_cmdline(&cmdline).expect("ok");
        assert_eq!(orders.image_size, Some(2 << 30));
        assert_eq!(
            orders.disk,
            DiskHints {
                path: Some("/dev/disk/by-id/virtio-S1".into()),
                serial: Some("S1".into()),
                model: Some("QEMU HARDDISK".into()),
                min_size: Some(100 << 30),
            }
        );
    }

    #[test]
    fn each_missing_key_is_named() {
        for key in [URL, TOKEN, IMAGE, SHA256] {
            let cmdline: Vec<String> = split_cmdline(&minimal())
                .expect("ok")
                .into_iter()
                .filter(|p| !p.starts_with(&format!("{key}=")))
                .collect();
            let error = Orders::from_cmdline(&cmdline.join(" ")).expect_err("must fail");
            assert_eq!(error, OrdersError::Missing { key });
            assert!(error.to_string().contains(key));
        }
    }

    fn error_for(extra_or_replacement: &str) -> OrdersError {
        let (key, _) = extra_or_replacement.split_once('=').expect("ok");
        let mut params: Vec<String> = split_cmdline(&minimal())
            .expect("ok")
            .into_iter()
            .filter(|p| !p.starts_with(&format!("{key}=")))
            .collect();
        params.push(extra_or_replacement.to_owned());
        Orders::from_cmdline(&params.join(" ")).expect_err("must fail")
    }

    #[test]
    fn malformed_values_name_the_key() {
        for (param, key) in [
            ("provisioner.sha256=abc", SHA256),
            (&format!("provisioner.sha256={}", "g".repeat(64)), SHA256),
            ("provisioner.url=https://10.0.0.1/", URL),
            ("provisioner.url=http:///path", URL),
            ("provisioner.image=ftp://x/y", IMAGE),
            ("provisioner.image_size=2G", IMAGE_SIZE),
            ("provisioner.disk.min_size=lots", DISK_MIN_SIZE),
            ("provisioner.disk.path=vda", DISK_PATH),
            ("provisioner.token=short", TOKEN),
            ("provisioner.token=has/slash/in/it/0123456789", TOKEN),
            ("provisioner.disk.serial=", DISK_SERIAL),
        ] {
            let error = error_for(param);
            let OrdersError::Invalid { key: named, .. } = &error else {
                panic!("{param}: unexpected {error:?}");
            };
            assert_eq!(named, key, "{param}");
            assert!(error.to_string().contains(key));
        }
    }

    #[test]
    fn the_token_never_appears_in_errors_or_debug() {
        let bad = "provisioner.token=secret-but-has-a-slash/0123";
        let error = error_for(bad);
        assert!(!error.to_string().contains("secret"), "{error}");
        let orders = Orders::from_cmdline(&minimal()).expect("ok");
        assert!(!format!("{orders:?}").contains(TOKEN_VALUE));
    }

    #[test]
    fn unknown_and_repeated_keys_are_refused() {
        let error = error_for("provisioner.imgae=http://x/y");
        assert!(
            matches!(&error, OrdersError::Unknown { key, .. } if key == "provisioner.imgae"),
            "{error:?}"
        );
        let error = Orders::from_cmdline(&format!("{} provisioner.url=http://x/", minimal()))
            .expect_err("must fail");
        assert_eq!(
            error,
            OrdersError::Repeated {
                key: URL.to_owned()
            }
        );
    }

    #[test]
    fn kernel_style_splitting() {
        assert_eq!(
            split_cmdline("  a=1 b=\"x y\" \"c=z w\"\td ").expect("ok"),
            vec!["a=1", "b=x y", "c=z w", "d"]
        );
        assert_eq!(
            split_cmdline("a=\"open").expect_err("must fail"),
            OrdersError::UnbalancedQuote
        );
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("512"), Some(512));
        assert_eq!(parse_size("4K"), Some(4096));
        assert_eq!(parse_size("100G"), Some(100 << 30));
        assert_eq!(parse_size("2TiB"), Some(2 << 40));
        assert_eq!(parse_size("1.5G"), None);
        assert_eq!(parse_size("G"), None);
        assert_eq!(parse_size("99999999999T"), None);
    }
}
