//! stage2's orders: netboot writes them on the kernel command line of the imaging script
//! ([`ImagingOrders::kernel_args`]); stage2 reads them back from `/proc/cmdline`
//! ([`Orders::from_cmdline`]).
//!
//! ```text
//! provisioner.url=http://10.77.0.1               netboot's base URL (reports, user-data)   required
//! provisioner.token=Abc123…                      per-provisioning token, [A-Za-z0-9._~-]   required
//! provisioner.image=http://10.77.0.1/img.zst     image URL (zstd, xz, gzip or raw)          required
//! provisioner.sha256=<64 hex digits>             sha256 of the decompressed image           required
//! provisioner.image_size=2147483648              decompressed size in bytes                 optional
//! provisioner.disk.path=/dev/disk/by-id/…        disk hints: every one given must match     optional
//! provisioner.disk.serial=S123
//! provisioner.disk.model="QEMU HARDDISK"         (quoted when the value has blanks)
//! provisioner.disk.min_size=100G                 bytes, or K/M/G/T (powers of 1024); filters
//! ```
//!
//! Only `http://` URLs are accepted (the initrd carries no TLS; integrity comes from the
//! sha256). The parser ignores other parameters; an unknown, repeated, missing or malformed
//! `provisioner.` key is an error naming the key, never a guess.
//!
//! The writer refuses what would not come back intact through iPXE, the kernel and the parser:
//! anything but printable ASCII, double quotes (the kernel has no escape for them), `${` (iPXE
//! setting expansion), blanks except single inner ones in the disk serial and model, words iPXE
//! reads as syntax (`#…`, `||`, `&&`, `;`), and orders longer than the kernel keeps. So whatever
//! it writes parses back to the same orders (`tests/orders_round_trip.rs` checks it). The token
//! is never printed: not by `Debug`, not in an error.

use std::fmt;
use std::fmt::Write as _;

/// The parameter names.
pub mod keys {
    pub const URL: &str = "provisioner.url";
    pub const TOKEN: &str = "provisioner.token";
    pub const IMAGE: &str = "provisioner.image";
    pub const SHA256: &str = "provisioner.sha256";
    pub const IMAGE_SIZE: &str = "provisioner.image_size";
    pub const DISK_PATH: &str = "provisioner.disk.path";
    pub const DISK_SERIAL: &str = "provisioner.disk.serial";
    pub const DISK_MODEL: &str = "provisioner.disk.model";
    pub const DISK_MIN_SIZE: &str = "provisioner.disk.min_size";
    /// Every key, in the order the writer writes them.
    pub const ALL: &[&str] = &[
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
    /// What every `provisioner.` key starts with.
    pub const PREFIX: &str = "provisioner.";
}

use keys::*;

/// The longest command line the kernel keeps (x86's `COMMAND_LINE_SIZE` is 2048 bytes with
/// the terminating NUL); it cuts the rest silently.
pub const KERNEL_CMDLINE_MAX: usize = 2047;

/// Erroneous values are quoted in errors up to this many characters.
const MAX_QUOTED_VALUE: usize = 80;

const TOKEN_SHAPE: &str = "must be 16 to 256 characters of A-Z a-z 0-9 . _ ~ -";

/// Whether `text` has the token shape: 16 to 256 characters of `[A-Za-z0-9._~-]` (URL- and
/// command-line-safe as is).
pub fn valid_token(text: &str) -> bool {
    (16..=256).contains(&text.len())
        && text
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'~' | b'-'))
}

/// The per-provisioning secret: authenticates stage2's reports and the cloud-init fetch.
/// Always of the [`valid_token`] shape; `Debug` does not show it.
#[derive(Clone, PartialEq, Eq)]
pub struct Token(String);

impl Token {
    /// A token if `text` has the allowed shape (see [`valid_token`]).
    pub fn parse(text: &str) -> Option<Token> {
        valid_token(text).then(|| Token(text.to_owned()))
    }

    /// The token itself, for the `Authorization` header and the seed URL only.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Token(<redacted>)")
    }
}

/// Operator hints for the disk to image (from the Machine spec). `path`, `serial` and `model`
/// identify a disk (every one given must match); `min_size` only filters.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DiskHints {
    /// `/dev/NAME` or a symlink to it (`/dev/disk/by-id/…`).
    pub path: Option<String>,
    pub serial: Option<String>,
    /// Compared case-insensitively by stage2, surrounding blanks ignored (sysfs pads models).
    pub model: Option<String>,
    /// Bytes.
    pub min_size: Option<u64>,
}

impl fmt::Display for DiskHints {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut parts = Vec::new();
        if let Some(path) = &self.path {
            parts.push(format!("path={path}"));
        }
        if let Some(serial) = &self.serial {
            parts.push(format!("serial={serial:?}"));
        }
        if let Some(model) = &self.model {
            parts.push(format!("model={model:?}"));
        }
        if let Some(min_size) = self.min_size {
            parts.push(format!("min_size={min_size}"));
        }
        if parts.is_empty() {
            f.write_str("none")
        } else {
            f.write_str(&parts.join(", "))
        }
    }
}

/// What the agent decides for one provisioning: everything stage2 is told but where netboot
/// is, which netboot adds when it writes the script.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImagingOrders {
    pub token: Token,
    pub image_url: String,
    /// sha256 of the decompressed image.
    pub sha256: [u8; 32],
    /// Decompressed size in bytes, when known.
    pub image_size: Option<u64>,
    pub disk: DiskHints,
}

/// What stage2 reads: the imaging orders and netboot's base URL (a trailing `/` dropped, by
/// the writer and the parser alike).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Orders {
    pub netboot_url: String,
    pub imaging: ImagingOrders,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OrdersError {
    #[error("kernel command line: {key} is missing")]
    Missing { key: &'static str },
    #[error("kernel command line: {key}={value:?} is invalid: {reason}")]
    Invalid {
        key: String,
        /// The offending value (`<redacted>` for the token, cut when long).
        value: String,
        reason: String,
    },
    #[error("kernel command line: {key} is given more than once")]
    Repeated { key: String },
    #[error("kernel command line: unknown key {key} (known: {known})")]
    Unknown { key: String, known: String },
    #[error("kernel command line: unbalanced double quote")]
    UnbalancedQuote,
    #[error("kernel command line: the orders take {len} bytes, more than the {KERNEL_CMDLINE_MAX} the kernel keeps")]
    TooLong { len: usize },
}

impl OrdersError {
    /// The key an error is about, if one.
    pub fn key(&self) -> Option<&str> {
        match self {
            OrdersError::Missing { key } => Some(key),
            OrdersError::Invalid { key, .. }
            | OrdersError::Repeated { key }
            | OrdersError::Unknown { key, .. } => Some(key),
            OrdersError::UnbalancedQuote | OrdersError::TooLong { .. } => None,
        }
    }
}

fn invalid(key: &str, value: &str, reason: impl Into<String>) -> OrdersError {
    let value = if key == TOKEN {
        "<redacted>".to_owned()
    } else if value.chars().count() > MAX_QUOTED_VALUE {
        let cut: String = value.chars().take(MAX_QUOTED_VALUE).collect();
        format!("{cut}…")
    } else {
        value.to_owned()
    };
    OrdersError::Invalid {
        key: key.to_owned(),
        value,
        reason: reason.into(),
    }
}

// ---- the writer (netboot) ----

/// A value the writer can carry: printable ASCII, no `"` or `${`, and blanks only where
/// `blanks_allowed` (single, inner ones: iPXE re-joins a line's words with single blanks), none
/// of them starting a word iPXE reads as syntax.
fn check_value(key: &str, value: &str, blanks_allowed: bool) -> Result<(), OrdersError> {
    let refuse = |reason: &str| Err(invalid(key, value, reason));
    if value.is_empty() {
        return refuse("is empty");
    }
    if !value.bytes().all(|b| (0x20..0x7f).contains(&b)) {
        return refuse("must be printable ASCII");
    }
    if value.contains('"') || value.contains("${") {
        return refuse("must not contain '\"' or '${'");
    }
    if value.contains(' ') && !blanks_allowed {
        return refuse("must not contain blanks");
    }
    if value.contains("  ") || value.starts_with(' ') || value.ends_with(' ') {
        return refuse("must not have leading, trailing or double blanks");
    }
    if value
        .split(' ')
        .any(|word| word.starts_with('#') || matches!(word, "||" | "&&" | ";"))
    {
        return refuse("must not have a word iPXE reads as a comment or command separator");
    }
    Ok(())
}

fn check_url(key: &str, value: &str) -> Result<(), OrdersError> {
    check_value(key, value, false)?;
    match value.strip_prefix("http://") {
        Some(rest) if !rest.is_empty() && !rest.starts_with('/') => Ok(()),
        _ => Err(invalid(key, value, "must be an http:// URL with a host")),
    }
}

impl ImagingOrders {
    /// The `provisioner.*` parameters for netboot at `netboot_url` (a trailing `/` is dropped),
    /// as one line for the kernel command line: `provisioner.url=… provisioner.token=…
    /// provisioner.image=… provisioner.sha256=…` and, when set, `provisioner.image_size=` and
    /// `provisioner.disk.{path,serial,model,min_size}=`. Refuses (naming the key) any value
    /// that would not come back intact.
    pub fn kernel_args(&self, netboot_url: &str) -> Result<String, OrdersError> {
        let url = netboot_url.trim_end_matches('/');
        check_url(URL, url)?;
        check_url(IMAGE, &self.image_url)?;
        let mut out = format!(
            "{URL}={url} {TOKEN}={} {IMAGE}={} {SHA256}={}",
            self.token.expose(),
            self.image_url,
            hex::encode(self.sha256),
        );
        // Writing to a String cannot fail.
        if let Some(size) = self.image_size {
            let _ = write!(out, " {IMAGE_SIZE}={size}");
        }
        if let Some(path) = &self.disk.path {
            check_value(DISK_PATH, path, false)?;
            if !path.starts_with("/dev/") {
                return Err(invalid(DISK_PATH, path, "must be a path under /dev/"));
            }
            let _ = write!(out, " {DISK_PATH}={path}");
        }
        for (key, value) in [
            (DISK_SERIAL, &self.disk.serial),
            (DISK_MODEL, &self.disk.model),
        ] {
            if let Some(value) = value {
                check_value(key, value, true)?;
                if value.contains(' ') {
                    let _ = write!(out, " {key}=\"{value}\"");
                } else {
                    let _ = write!(out, " {key}={value}");
                }
            }
        }
        if let Some(min) = self.disk.min_size {
            let _ = write!(out, " {DISK_MIN_SIZE}={min}");
        }
        if out.len() > KERNEL_CMDLINE_MAX {
            return Err(OrdersError::TooLong { len: out.len() });
        }
        Ok(out)
    }
}

impl Orders {
    /// [`ImagingOrders::kernel_args`] for these orders' netboot.
    pub fn kernel_args(&self) -> Result<String, OrdersError> {
        self.imaging.kernel_args(&self.netboot_url)
    }
}

// ---- the parser (stage2) ----

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

/// 64 hexadecimal digits (either case) as the 32 bytes of a sha256.
pub fn parse_sha256(text: &str) -> Option<[u8; 32]> {
    let mut digest = [0u8; 32];
    if text.len() != 64 {
        return None;
    }
    hex::decode_to_slice(text, &mut digest).ok()?;
    Some(digest)
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
            if !key.starts_with(PREFIX) {
                continue;
            }
            let Some(&known) = ALL.iter().find(|&&k| k == key) else {
                return Err(OrdersError::Unknown {
                    key: key.to_owned(),
                    known: ALL.join(", "),
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

        let netboot_url = parse_http_url(URL, require(URL)?.trim_end_matches('/'))?;
        let token_text = require(TOKEN)?;
        let token =
            Token::parse(token_text).ok_or_else(|| invalid(TOKEN, token_text, TOKEN_SHAPE))?;
        let image_url = parse_http_url(IMAGE, require(IMAGE)?)?;
        let sha256_text = require(SHA256)?;
        let sha256 = parse_sha256(sha256_text)
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
                        Ok(v.to_owned())
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
            imaging: ImagingOrders {
                token,
                image_url,
                sha256,
                image_size,
                disk,
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HASH: &str = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08";
    const TOKEN_VALUE: &str = "tok-0123456789abcdef";

    fn token(text: &str) -> Token {
        Token::parse(text).unwrap_or_else(|| panic!("{text:?} is not a token"))
    }

    fn hash() -> [u8; 32] {
        parse_sha256(HASH).unwrap_or_else(|| panic!("bad test hash"))
    }

    fn imaging() -> ImagingOrders {
        ImagingOrders {
            token: token("0123456789abcdef0123"),
            image_url: "http://10.77.0.1:8080/node.raw.zst".into(),
            sha256: hash(),
            image_size: None,
            disk: DiskHints::default(),
        }
    }

    fn minimal() -> String {
        format!(
            "BOOT_IMAGE=vmlinuz console=ttyS0 provisioner.url=http://10.77.0.1/ \
             provisioner.token={TOKEN_VALUE} provisioner.image=http://10.77.0.1:8080/node.raw.zst \
             provisioner.sha256={HASH} quiet"
        )
    }

    fn parse(cmdline: &str) -> Orders {
        Orders::from_cmdline(cmdline).unwrap_or_else(|e| panic!("{cmdline}: {e}"))
    }

    // ---- writer ----

    #[test]
    fn kernel_args_carry_the_orders() {
        assert_eq!(
            imaging().kernel_args("http://10.77.0.1/").as_deref(),
            Ok(format!(
                "provisioner.url=http://10.77.0.1 provisioner.token=0123456789abcdef0123 \
                 provisioner.image=http://10.77.0.1:8080/node.raw.zst provisioner.sha256={HASH}"
            )
            .as_str())
        );
        let mut o = imaging();
        o.image_size = Some(2 << 30);
        o.disk = DiskHints {
            path: Some("/dev/disk/by-id/virtio-S1".into()),
            serial: Some("S1".into()),
            model: Some("QEMU HARDDISK".into()),
            min_size: Some(100 << 30),
        };
        let args = o.kernel_args("http://h").unwrap_or_else(|e| panic!("{e}"));
        assert!(
            args.ends_with(
                " provisioner.image_size=2147483648 provisioner.disk.path=/dev/disk/by-id/virtio-S1 \
                 provisioner.disk.serial=S1 provisioner.disk.model=\"QEMU HARDDISK\" \
                 provisioner.disk.min_size=107374182400"
            ),
            "{args}"
        );
    }

    #[test]
    fn kernel_args_refuse_what_stage2_or_ipxe_cannot_take() {
        let with_disk = |disk: DiskHints| ImagingOrders { disk, ..imaging() };
        let cases: Vec<(ImagingOrders, &str)> = vec![
            (
                ImagingOrders {
                    image_url: "https://x/y".into(),
                    ..imaging()
                },
                IMAGE,
            ),
            (
                ImagingOrders {
                    image_url: "http://x/${y}".into(),
                    ..imaging()
                },
                IMAGE,
            ),
            (
                with_disk(DiskHints {
                    path: Some("vda".into()),
                    ..DiskHints::default()
                }),
                DISK_PATH,
            ),
            (
                with_disk(DiskHints {
                    model: Some("a\"b".into()),
                    ..DiskHints::default()
                }),
                DISK_MODEL,
            ),
            (
                with_disk(DiskHints {
                    model: Some("Über disk".into()),
                    ..DiskHints::default()
                }),
                DISK_MODEL,
            ),
            (
                with_disk(DiskHints {
                    serial: Some(String::new()),
                    ..DiskHints::default()
                }),
                DISK_SERIAL,
            ),
            (
                // iPXE would end the kernel line at " #2" and treat the rest as a comment.
                with_disk(DiskHints {
                    serial: Some("disk #2".into()),
                    ..DiskHints::default()
                }),
                DISK_SERIAL,
            ),
            (
                with_disk(DiskHints {
                    model: Some("a || reboot".into()),
                    ..DiskHints::default()
                }),
                DISK_MODEL,
            ),
            (
                with_disk(DiskHints {
                    model: Some("two  blanks".into()),
                    ..DiskHints::default()
                }),
                DISK_MODEL,
            ),
        ];
        for (o, key) in cases {
            let err = o.kernel_args("http://h").expect_err(key);
            assert_eq!(err.key(), Some(key), "{err}");
        }
        assert_eq!(
            imaging()
                .kernel_args("https://h")
                .map_err(|e| e.key().map(str::to_owned)),
            Err(Some(URL.to_owned()))
        );
        let long = with_disk(DiskHints {
            serial: Some("s".repeat(KERNEL_CMDLINE_MAX)),
            ..DiskHints::default()
        });
        assert!(matches!(
            long.kernel_args("http://h"),
            Err(OrdersError::TooLong { len }) if len > KERNEL_CMDLINE_MAX
        ));
    }

    #[test]
    fn debug_hides_the_token() {
        assert!(!format!("{:?}", imaging()).contains("0123456789abcdef0123"));
        let orders = parse(&minimal());
        assert!(!format!("{orders:?}").contains(TOKEN_VALUE));
    }

    // ---- parser ----

    #[test]
    fn minimal_orders() {
        let orders = parse(&minimal());
        assert_eq!(orders.netboot_url, "http://10.77.0.1");
        assert_eq!(orders.imaging.token.expose(), TOKEN_VALUE);
        assert_eq!(
            orders.imaging.image_url,
            "http://10.77.0.1:8080/node.raw.zst"
        );
        assert_eq!(orders.imaging.sha256, hash());
        assert_eq!(orders.imaging.image_size, None);
        assert_eq!(orders.imaging.disk, DiskHints::default());
    }

    #[test]
    fn all_orders_with_quoted_model() {
        let cmdline = format!(
            "{} provisioner.image_size=2147483648 provisioner.disk.path=/dev/disk/by-id/virtio-S1 \
             provisioner.disk.serial=S1 provisioner.disk.model=\"QEMU HARDDISK\" \
             provisioner.disk.min_size=100G\n",
            minimal()
        );
        let orders = parse(&cmdline);
        assert_eq!(orders.imaging.image_size, Some(2 << 30));
        assert_eq!(
            orders.imaging.disk,
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
                .unwrap_or_else(|e| panic!("{e}"))
                .into_iter()
                .filter(|p| !p.starts_with(&format!("{key}=")))
                .collect();
            let error = Orders::from_cmdline(&cmdline.join(" ")).expect_err("must fail");
            assert_eq!(error, OrdersError::Missing { key });
            assert!(error.to_string().contains(key));
        }
    }

    fn error_for(extra_or_replacement: &str) -> OrdersError {
        let (key, _) = extra_or_replacement
            .split_once('=')
            .unwrap_or_else(|| panic!("no '=' in {extra_or_replacement}"));
        let mut params: Vec<String> = split_cmdline(&minimal())
            .unwrap_or_else(|e| panic!("{e}"))
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
            assert!(
                matches!(&error, OrdersError::Invalid { key: named, .. } if named == key),
                "{param}: unexpected {error:?}"
            );
            assert!(error.to_string().contains(key));
        }
    }

    #[test]
    fn the_token_never_appears_in_errors() {
        let error = error_for("provisioner.token=secret-but-has-a-slash/0123");
        assert!(!error.to_string().contains("secret"), "{error}");
    }

    #[test]
    fn long_values_are_cut_in_errors() {
        let error = error_for(&format!("provisioner.disk.path={}", "x".repeat(5000)));
        assert!(error.to_string().len() < 300, "{error}");
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
            split_cmdline("  a=1 b=\"x y\" \"c=z w\"\td ").ok(),
            Some(vec![
                "a=1".to_owned(),
                "b=x y".to_owned(),
                "c=z w".to_owned(),
                "d".to_owned()
            ])
        );
        assert_eq!(split_cmdline("a=\"open"), Err(OrdersError::UnbalancedQuote));
        assert_eq!(split_cmdline_lenient("a=\"open b"), vec!["a=open b"]);
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

    #[test]
    fn tokens() {
        assert!(Token::parse("0123456789abcdef").is_some());
        assert!(Token::parse(&"a".repeat(256)).is_some());
        for bad in [
            "0123456789abcde",
            "has/slash/0123456789",
            "spa ce_0123456789",
            "",
        ] {
            assert!(Token::parse(bad).is_none(), "{bad}");
        }
        assert!(Token::parse(&"a".repeat(257)).is_none());
        assert_eq!(format!("{:?}", token(TOKEN_VALUE)), "Token(<redacted>)");
    }
}
