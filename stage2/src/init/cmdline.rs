//! The kernel command line as PID 1 reads it: `key=value` words (values may be double-quoted,
//! as the kernel allows) and the `stage2.*` options that tune booting.

use std::time::Duration;

/// Splits a command line into `(key, value)` words; a word without `=` has no value. Double
/// quotes group spaces and are removed, as the kernel does for its own parameters.
pub fn split(cmdline: &str) -> Vec<(String, Option<String>)> {
    let words = wire::orders::split_cmdline_lenient(cmdline);
    words
        .into_iter()
        .map(|w| match w.split_once('=') {
            Some((k, v)) => (k.to_string(), Some(v.to_string())),
            None => (w, None),
        })
        .collect()
}

/// How PID 1 boots, from `stage2.*` words.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BootOptions {
    /// `stage2.modules=a,b`: modules (or aliases) to load besides those the devices ask for.
    pub extra_modules: Vec<String>,
    /// `stage2.iface=NAME`: use only this interface for DHCP.
    pub interface: Option<String>,
    /// `stage2.reboot_delay=SECONDS`: pause before rebooting after a fatal error (default 30).
    pub reboot_delay: Duration,
    /// `stage2.dhcp_attempts=N`: DISCOVERs per interface and round (default 6).
    pub dhcp_attempts: u32,
    /// `stage2.carrier_timeout=SECONDS`: how long to wait for a link with carrier (default 15).
    pub carrier_timeout: Duration,
}

impl Default for BootOptions {
    fn default() -> Self {
        BootOptions {
            extra_modules: Vec::new(),
            interface: None,
            reboot_delay: Duration::from_secs(30),
            dhcp_attempts: 6,
            carrier_timeout: Duration::from_secs(15),
        }
    }
}

impl BootOptions {
    /// Reads the `stage2.*` words; returns the options and a message per word it could not use
    /// (the default is kept for those).
    pub fn from_cmdline(cmdline: &str) -> (Self, Vec<String>) {
        let mut options = BootOptions::default();
        let mut problems = Vec::new();
        for (key, value) in split(cmdline) {
            let Some(name) = key.strip_prefix("stage2.") else {
                continue;
            };
            let value = value.unwrap_or_default();
            let seconds = |v: &str| v.parse::<u64>().ok().map(Duration::from_secs);
            match name {
                "modules" => options.extra_modules.extend(
                    value
                        .split(',')
                        .filter(|m| !m.is_empty())
                        .map(str::to_string),
                ),
                "iface" if !value.is_empty() => options.interface = Some(value),
                "reboot_delay" => match seconds(&value) {
                    Some(d) => options.reboot_delay = d,
                    None => problems.push(format!("{key}={value}: not a number of seconds")),
                },
                "carrier_timeout" => match seconds(&value) {
                    Some(d) => options.carrier_timeout = d,
                    None => problems.push(format!("{key}={value}: not a number of seconds")),
                },
                "dhcp_attempts" => match value.parse::<u32>() {
                    Ok(n) if n > 0 => options.dhcp_attempts = n,
                    _ => problems.push(format!("{key}={value}: not a positive number")),
                },
                // Other stage2.* words are the imaging orders, read elsewhere.
                _ => {}
            }
        }
        (options, problems)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_handles_quotes_flags_and_repeated_spaces() {
        let words = split("console=ttyS0  quiet stage2.x=\"a b\" \"stage2.y=c d\" k=v=w\n");
        let expect = |k: &str, v: Option<&str>| (k.to_string(), v.map(str::to_string));
        assert_eq!(
            words,
            vec![
                expect("console", Some("ttyS0")),
                expect("quiet", None),
                expect("stage2.x", Some("a b")),
                expect("stage2.y", Some("c d")),
                expect("k", Some("v=w")),
            ]
        );
        assert!(split("   ").is_empty());
    }

    #[test]
    fn boot_options_read_their_words_and_report_bad_ones() {
        let (options, problems) = BootOptions::from_cmdline(
            "console=ttyS0 stage2.modules=e1000,,igb stage2.modules=mlx5_core stage2.iface=eth1 \
             stage2.reboot_delay=2 stage2.dhcp_attempts=0 stage2.carrier_timeout=x stage2.url=u",
        );
        assert_eq!(options.extra_modules, vec!["e1000", "igb", "mlx5_core"]);
        assert_eq!(options.interface.as_deref(), Some("eth1"));
        assert_eq!(options.reboot_delay, Duration::from_secs(2));
        assert_eq!(options.dhcp_attempts, 6, "bad value keeps the default");
        assert_eq!(options.carrier_timeout, Duration::from_secs(15));
        assert_eq!(problems.len(), 2, "{problems:?}");
        assert!(problems[0].contains("stage2.dhcp_attempts=0"));
    }

    #[test]
    fn empty_command_line_gives_defaults() {
        assert_eq!(
            BootOptions::from_cmdline(""),
            (BootOptions::default(), Vec::new())
        );
    }
}
