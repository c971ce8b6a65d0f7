//! Per-machine iPXE scripts.
//!
//! The script is plain text that iPXE splits into lines, then into whitespace-separated tokens.
//! iPXE has no quoting: a newline ends a command, a token starting with `#` starts a comment,
//! the tokens `||`, `&&` and `;` chain commands, and `${...}` expands a setting. Values that
//! could produce any of these are rejected with a [`ScriptError`] instead of being written into
//! a script that would do something other than what it says.

use std::fmt::Write as _;

use crate::machine::Machine;
use crate::provisioning::{ImagingOrders, LocalBoot};
use wire::orders::KERNEL_CMDLINE_MAX;

/// What every machine's script boots: files under the HTTP `/assets/` tree and a kernel
/// command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScriptSettings {
    /// Kernel path relative to the assets directory, e.g. `vmlinuz`.
    pub kernel: String,
    /// Initrd path relative to the assets directory, e.g. `initrd.img`.
    pub initrd: String,
    /// Kernel command line. `{name}`, `{mac}`, `{ip}` and `{hostname}` are replaced with the
    /// machine's values (`{mac}` in the colon form, `52:54:00:12:34:56`).
    pub cmdline: String,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ScriptError {
    #[error("{what} {value:?} contains {reason}, which iPXE scripts cannot carry")]
    Unsafe {
        what: &'static str,
        value: String,
        reason: &'static str,
    },
    #[error(
        "{what} {value:?} is not a usable asset path (relative, no '..', only A-Z a-z 0-9 . _ ~ + - /)"
    )]
    BadAssetPath { what: &'static str, value: String },
    #[error("base URL {0:?} must start with http:// or https:// and contain no spaces")]
    BadBaseUrl(String),
    #[error("imaging orders: {0}")]
    Orders(String),
    #[error(
        "the imaging kernel command line takes {len} bytes, more than the {max} the kernel keeps"
    )]
    CommandLineTooLong { len: usize, max: usize },
    #[error(
        "unknown placeholder {{{0}}} in the kernel command line (known: name, mac, ip, hostname)"
    )]
    UnknownPlaceholder(String),
}

/// Renders the iPXE script that boots `machine` with the kernel and initrd of `s`, both fetched
/// from `{base_url}/assets/`.
///
/// ```text
/// #!ipxe
/// # node2 52:54:00:12:34:56
/// kernel http://10.77.0.1:8080/assets/vmlinuz initrd=initrd.img console=ttyS0
/// initrd http://10.77.0.1:8080/assets/initrd.img
/// boot
/// ```
///
/// `initrd=<basename>` on the kernel line is what EFI builds of iPXE need to hand the initrd to
/// the kernel's EFI stub; BIOS kernels ignore it.
pub fn boot_script(
    machine: &Machine,
    base_url: &str,
    s: &ScriptSettings,
) -> Result<String, ScriptError> {
    render(machine, base_url, s, None)
}

/// The script that boots stage2 (the configured kernel and initrd) to image `machine`'s disk:
/// [`boot_script`] with stage2's orders appended to the kernel command line.
pub fn imaging_script(
    machine: &Machine,
    base_url: &str,
    s: &ScriptSettings,
    orders: &ImagingOrders,
) -> Result<String, ScriptError> {
    let args = orders
        .kernel_args(base_url)
        .map_err(|e| ScriptError::Orders(e.to_string()))?;
    render(machine, base_url, s, Some(&args))
}

/// The script of an imaged machine: boot its local disk (see [`LocalBoot`]). Firmware can keep
/// the network first in its boot order; a failed local boot returns to the firmware.
///
/// ```text
/// #!ipxe
/// # node2 52:54:00:12:34:56: imaged, booting the local disk
/// iseq ${platform} efi && goto uefi || goto bios
/// :uefi
/// exit 1
/// :bios
/// sanboot --no-describe --drive 0x80 || exit 1
/// ```
///
/// Under UEFI the exit status must be non-zero: EDK2's boot manager stops at its menu when a
/// boot option returns success, and goes on to the next option on an error.
pub fn local_boot_script(machine: &Machine, method: LocalBoot) -> Result<String, ScriptError> {
    check_line("machine name", &machine.name)?;
    let mut out = String::with_capacity(192);
    let _ = writeln!(out, "#!ipxe");
    let _ = writeln!(
        out,
        "# {} {}: imaged, booting the local disk",
        machine.name, machine.mac
    );
    let sanboot = "sanboot --no-describe --drive 0x80 || exit 1";
    match method {
        LocalBoot::Auto => {
            let _ = writeln!(out, "iseq ${{platform}} efi && goto uefi || goto bios");
            let _ = writeln!(out, ":uefi");
            let _ = writeln!(out, "exit 1");
            let _ = writeln!(out, ":bios");
            let _ = writeln!(out, "{sanboot}");
        }
        LocalBoot::Exit => {
            let _ = writeln!(out, "exit 1");
        }
        LocalBoot::Sanboot => {
            let _ = writeln!(out, "{sanboot}");
        }
    }
    Ok(out)
}

fn render(
    machine: &Machine,
    base_url: &str,
    s: &ScriptSettings,
    orders: Option<&str>,
) -> Result<String, ScriptError> {
    let base = base_url.trim_end_matches('/');
    let host = base
        .strip_prefix("http://")
        .or_else(|| base.strip_prefix("https://"));
    if !matches!(host, Some(h) if !h.is_empty()) || base.bytes().any(|b| b == b' ') {
        return Err(ScriptError::BadBaseUrl(base_url.to_string()));
    }
    check_line("base URL", base)?;
    check_tokens("base URL", base)?;
    check_asset_path("kernel", &s.kernel)?;
    check_asset_path("initrd", &s.initrd)?;
    check_line("machine name", &machine.name)?;

    let mut cmdline = substitute(&s.cmdline, machine)?;
    check_line("kernel command line", &cmdline)?;
    check_tokens("kernel command line", &cmdline)?;
    if let Some(orders) = orders {
        // Appended after substitution and the checks (kernel_args validated every value):
        // orders are literal values, not templates, and a check error would quote the token.
        cmdline = format!("{} {orders}", cmdline.trim());
    }

    let initrd_name = s.initrd.rsplit('/').next().unwrap_or(&s.initrd);
    if orders.is_some() {
        // The kernel cuts a longer line silently, and stage2 would read cut orders.
        let len = format!("initrd={initrd_name} {}", cmdline.trim()).len();
        if len > KERNEL_CMDLINE_MAX {
            return Err(ScriptError::CommandLineTooLong {
                len,
                max: KERNEL_CMDLINE_MAX,
            });
        }
    }
    let mut out = String::with_capacity(256);
    // Writing to a String cannot fail.
    let _ = writeln!(out, "#!ipxe");
    let _ = writeln!(out, "# {} {}", machine.name, machine.mac);
    let _ = write!(
        out,
        "kernel {base}/assets/{} initrd={initrd_name}",
        s.kernel
    );
    if !cmdline.trim().is_empty() {
        let _ = write!(out, " {}", cmdline.trim());
    }
    out.push('\n');
    let _ = writeln!(out, "initrd {base}/assets/{}", s.initrd);
    let _ = writeln!(out, "boot");
    Ok(out)
}

/// Replaces `{name}`, `{mac}`, `{ip}` and `{hostname}`; any other `{word}` is an error so a typo
/// does not reach the kernel silently. Braces that do not enclose a word are kept.
fn substitute(cmdline: &str, m: &Machine) -> Result<String, ScriptError> {
    let mut out = String::with_capacity(cmdline.len() + 32);
    let mut rest = cmdline;
    while let Some(open) = rest.find('{') {
        out.push_str(&rest[..open]);
        let after = &rest[open + 1..];
        let close = after.find('}');
        let word = close.map(|c| &after[..c]);
        match word {
            Some(w)
                if !w.is_empty() && w.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') =>
            {
                match w {
                    "name" => out.push_str(&m.name),
                    "mac" => out.push_str(&m.mac.to_string()),
                    "ip" => out.push_str(&m.ip.to_string()),
                    "hostname" => out.push_str(m.hostname()),
                    other => return Err(ScriptError::UnknownPlaceholder(other.to_string())),
                }
                rest = &after[w.len() + 1..];
            }
            _ => {
                out.push('{');
                rest = after;
            }
        }
    }
    out.push_str(rest);
    Ok(out)
}

/// Only printable ASCII: no newline, carriage return, tab, NUL or other control character, and
/// no `${` (setting expansion, which iPXE offers no way to escape).
fn check_line(what: &'static str, value: &str) -> Result<(), ScriptError> {
    let unsafe_ = |reason| {
        Err(ScriptError::Unsafe {
            what,
            value: value.to_string(),
            reason,
        })
    };
    if value.contains(['\n', '\r']) {
        return unsafe_("a line break");
    }
    if value.bytes().any(|b| b.is_ascii_control()) {
        return unsafe_("a control character");
    }
    if !value.is_ascii() {
        return unsafe_("a non-ASCII character");
    }
    if value.contains("${") {
        return unsafe_("\"${\" (iPXE setting expansion)");
    }
    Ok(())
}

/// No token that iPXE treats as syntax: a comment start or a command chain operator.
fn check_tokens(what: &'static str, value: &str) -> Result<(), ScriptError> {
    for token in value.split_ascii_whitespace() {
        let reason = if token.starts_with('#') {
            "a word starting with '#' (iPXE comment)"
        } else if matches!(token, "||" | "&&" | ";") {
            "a command separator (||, && or ;)"
        } else {
            continue;
        };
        return Err(ScriptError::Unsafe {
            what,
            value: value.to_string(),
            reason,
        });
    }
    Ok(())
}

fn check_asset_path(what: &'static str, value: &str) -> Result<(), ScriptError> {
    let bad = || ScriptError::BadAssetPath {
        what,
        value: value.to_string(),
    };
    if value.is_empty() || value.starts_with('/') || value.ends_with('/') {
        return Err(bad());
    }
    if !value
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'~' | b'+' | b'-' | b'/'))
    {
        return Err(bad());
    }
    if value
        .split('/')
        .any(|seg| seg.is_empty() || seg == "." || seg == "..")
    {
        return Err(bad());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::machine::MacAddr;
    use std::net::Ipv4Addr;

    fn node2() -> Machine {
        Machine {
            name: "node2".into(),
            mac: MacAddr([0x52, 0x54, 0, 0x12, 0x34, 0x56]),
            ip: Ipv4Addr::new(10, 77, 0, 20),
            hostname: None,
        }
    }

    fn settings(cmdline: &str) -> ScriptSettings {
        ScriptSettings {
            kernel: "vmlinuz".into(),
            initrd: "initrd.img".into(),
            cmdline: cmdline.into(),
        }
    }

    #[test]
    fn renders_exact_script() {
        let script = boot_script(
            &node2(),
            "http://10.77.0.1:8080/",
            &settings("console=ttyS0"),
        );
        assert_eq!(
            script.as_deref(),
            Ok("#!ipxe\n\
                # node2 52:54:00:12:34:56\n\
                kernel http://10.77.0.1:8080/assets/vmlinuz initrd=initrd.img console=ttyS0\n\
                initrd http://10.77.0.1:8080/assets/initrd.img\n\
                boot\n")
        );
    }

    #[test]
    fn empty_cmdline_has_no_trailing_space() {
        let script = boot_script(&node2(), "http://h", &settings("")).expect("valid");
        assert!(
            script.contains("\nkernel http://h/assets/vmlinuz initrd=initrd.img\n"),
            "{script}"
        );
    }

    #[test]
    fn initrd_name_is_the_basename() {
        let mut s = settings("quiet");
        s.kernel = "debian/vmlinuz-6.1".into();
        s.initrd = "stage2/initrd-v1.gz".into();
        let script = boot_script(&node2(), "http://h:80", &s).expect("valid");
        assert!(script
            .contains("kernel http://h:80/assets/debian/vmlinuz-6.1 initrd=initrd-v1.gz quiet\n"));
        assert!(script.contains("initrd http://h:80/assets/stage2/initrd-v1.gz\n"));
    }

    #[test]
    fn substitutes_placeholders() {
        let mut m = node2();
        let s = settings("host={hostname} n={name} mac={mac} ip={ip} {x keep} {} {");
        let script = boot_script(&m, "http://h", &s).expect("valid");
        assert!(
            script.contains(
                " host=node2 n=node2 mac=52:54:00:12:34:56 ip=10.77.0.20 {x keep} {} {\n"
            ),
            "{script}"
        );
        m.hostname = Some("n2.lab".into());
        let script = boot_script(&m, "http://h", &s).expect("valid");
        assert!(script.contains(" host=n2.lab n=node2 "), "{script}");
    }

    #[test]
    fn rejects_unknown_placeholder() {
        let err = boot_script(&node2(), "http://h", &settings("a={nmae}")).expect_err("typo");
        assert_eq!(err, ScriptError::UnknownPlaceholder("nmae".into()));
        assert!(err.to_string().contains("{nmae}"), "{err}");
    }

    #[test]
    fn rejects_script_breaking_cmdlines() {
        for bad in [
            "console=ttyS0\nshell",
            "a\rb",
            "a\tb",
            "a\0b",
            "x=${net0/mac}",
            "quiet #comment",
            "quiet || shell",
            "quiet && shell",
            "quiet ; shell",
            "caf\u{e9}",
        ] {
            let err = boot_script(&node2(), "http://h", &settings(bad));
            assert!(
                matches!(err, Err(ScriptError::Unsafe { .. })),
                "{bad:?} gave {err:?}"
            );
        }
        // Harmless look-alikes stay.
        let ok = boot_script(&node2(), "http://h", &settings("a=#b c=$d e=x||y f;"));
        assert!(ok.is_ok(), "{ok:?}");
    }

    #[test]
    fn rejects_values_injected_through_placeholders() {
        let mut m = node2();
        m.hostname = Some("evil\nchain http://x/".into());
        let err = boot_script(&m, "http://h", &settings("h={hostname}"));
        assert!(matches!(err, Err(ScriptError::Unsafe { .. })), "{err:?}");
        let mut m = node2();
        m.name = "node\n2".into();
        let err = boot_script(&m, "http://h", &settings(""));
        assert!(
            matches!(
                err,
                Err(ScriptError::Unsafe {
                    what: "machine name",
                    ..
                })
            ),
            "{err:?}"
        );
    }

    #[test]
    fn rejects_bad_asset_paths_and_urls() {
        for bad in [
            "",
            "/vmlinuz",
            "../vmlinuz",
            "a/../b",
            "a//b",
            "dir/",
            "vm linuz",
            "a?b",
            "a%20b",
            "a\nb",
        ] {
            let mut s = settings("");
            s.kernel = bad.into();
            let err = boot_script(&node2(), "http://h", &s);
            assert!(
                matches!(err, Err(ScriptError::BadAssetPath { what: "kernel", .. })),
                "{bad:?}: {err:?}"
            );
            let mut s = settings("");
            s.initrd = bad.into();
            let err = boot_script(&node2(), "http://h", &s);
            assert!(
                matches!(err, Err(ScriptError::BadAssetPath { what: "initrd", .. })),
                "{bad:?}: {err:?}"
            );
        }
        for bad in [
            "",
            "10.77.0.1",
            "ftp://h",
            "http://",
            "http://h x",
            "http://h\n",
            "http://${ip}",
        ] {
            let err = boot_script(&node2(), bad, &settings(""));
            assert!(err.is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn imaging_lines_the_kernel_would_cut_are_refused() {
        let orders = crate::provisioning::ImagingOrders {
            token: crate::provisioning::Token::parse("0123456789abcdef0123")
                .unwrap_or_else(|| panic!("token")),
            image_url: "http://10.77.0.1:8080/node.raw.zst".into(),
            sha256: [0xab; 32],
            image_size: None,
            disk: crate::provisioning::DiskHints::default(),
        };
        let script = imaging_script(&node2(), "http://h", &settings("console=ttyS0"), &orders)
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(script.contains(" provisioner.sha256=abab"), "{script}");
        // The operator's own parameters leave too little room for the orders.
        let long = settings(&format!("console=ttyS0 {}", "quiet ".repeat(330)));
        let err = imaging_script(&node2(), "http://h", &long, &orders);
        assert!(
            matches!(err, Err(ScriptError::CommandLineTooLong { len, .. }) if len > 2047),
            "{err:?}"
        );
        // Without orders nothing is cut that stage2 needs: the configured line is as it was.
        assert!(boot_script(&node2(), "http://h", &long).is_ok());
    }
}
