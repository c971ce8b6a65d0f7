//! `provisioner status [--watch]`: the machines netboot publishes on D-Bus, for people: one line
//! per machine with its phase, progress, last-seen age and message, under netboot's summary.
//! What `busctl tree` / `busctl introspect` show, read the same way (`GetManagedObjects` on the
//! system bus, `DBUS_SYSTEM_BUS_ADDRESS` honoured). `--watch` prints again on every
//! `PropertiesChanged`, `InterfacesAdded` and `InterfacesRemoved` (on a terminal it redraws in
//! place, and every few seconds for the ages).
//!
//! netboot is never started by asking: the name's owner is looked up first (a method call to
//! an activatable name would start netboot.service).

use std::io::IsTerminal;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context};
use futures_util::StreamExt;
use zbus::fdo::{DBusProxy, ManagedObjects, ObjectManagerProxy, PropertiesProxy};
use zbus::names::{BusName, InterfaceName, OwnedInterfaceName};
use zbus::zvariant::OwnedValue;
use zbus::{Connection, MatchRule};

use crate::dbus::{BUS_NAME, MACHINE_INTERFACE, MANAGER_INTERFACE, MANAGER_PATH};

/// One machine as the bus shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Row {
    pub name: String,
    pub mac: String,
    pub ip: String,
    pub phase: String,
    pub progress: u32,
    pub message: String,
    /// Microseconds since the epoch; 0: never.
    pub last_seen_usec: u64,
}

/// What one look at the bus found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct View {
    pub summary: String,
    pub rows: Vec<Row>,
}

fn text(props: &std::collections::HashMap<String, OwnedValue>, key: &str) -> String {
    props
        .get(key)
        .and_then(|v| v.downcast_ref::<&str>().ok().map(str::to_owned))
        .unwrap_or_default()
}

fn number<T: TryFrom<OwnedValue>>(
    props: &std::collections::HashMap<String, OwnedValue>,
    key: &str,
) -> Option<T> {
    props
        .get(key)
        .and_then(|v| v.try_clone().ok())
        .and_then(|v| T::try_from(v).ok())
}

/// The machines of `GetManagedObjects`' answer, by name.
pub fn rows(objects: &ManagedObjects) -> Vec<Row> {
    let iface =
        OwnedInterfaceName::from(InterfaceName::from_static_str_unchecked(MACHINE_INTERFACE));
    let mut rows: Vec<Row> = objects
        .values()
        .filter_map(|interfaces| interfaces.get(&iface))
        .map(|props| Row {
            name: text(props, "Name"),
            mac: text(props, "MacAddress"),
            ip: text(props, "IpAddress"),
            phase: text(props, "Phase"),
            progress: number::<u32>(props, "Progress").unwrap_or(0),
            message: text(props, "Message"),
            last_seen_usec: number::<u64>(props, "LastSeen").unwrap_or(0),
        })
        .collect();
    rows.sort_by(|a, b| a.name.cmp(&b.name));
    rows
}

/// `12s ago`, `3m ago`, `2h ago`, `4d ago`, or `never`.
pub fn age(last_seen_usec: u64, now: SystemTime) -> String {
    if last_seen_usec == 0 {
        return "never".into();
    }
    let now_usec = now
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX));
    let secs = now_usec.saturating_sub(last_seen_usec) / 1_000_000;
    match secs {
        0..=59 => format!("{secs}s ago"),
        60..=3599 => format!("{}m ago", secs / 60),
        3600..=86_399 => format!("{}h ago", secs / 3600),
        _ => format!("{}d ago", secs / 86_400),
    }
}

/// The view as a table: the summary, then one line per machine (columns as wide as their
/// longest value; the message last, whole).
pub fn render(view: &View, now: SystemTime) -> String {
    let header = [
        "NAME",
        "PHASE",
        "PROGRESS",
        "MAC",
        "IP",
        "LAST SEEN",
        "MESSAGE",
    ];
    let lines: Vec<[String; 7]> = view
        .rows
        .iter()
        .map(|r| {
            [
                r.name.clone(),
                r.phase.clone(),
                format!("{}%", r.progress),
                r.mac.clone(),
                r.ip.clone(),
                age(r.last_seen_usec, now),
                r.message.replace('\n', " "),
            ]
        })
        .collect();
    let mut widths = header.map(str::len);
    for line in &lines {
        for (w, cell) in widths.iter_mut().zip(line.iter()) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let format_line = |cells: [&str; 7]| {
        let mut out = String::new();
        for (i, cell) in cells.iter().enumerate() {
            if i == cells.len() - 1 {
                out.push_str(cell);
            } else {
                out.push_str(&format!("{cell:<width$}  ", width = widths[i]));
            }
        }
        out.trim_end().to_string() + "\n"
    };
    let mut out = format!("{}\n", view.summary);
    if view.rows.is_empty() {
        out.push_str("no machines\n");
        return out;
    }
    out.push_str(&format_line(header));
    for line in &lines {
        out.push_str(&format_line(line.each_ref().map(String::as_str)));
    }
    out
}

async fn connect() -> anyhow::Result<Connection> {
    let conn = zbus::connection::Builder::system()
        .context("the system bus address")?
        .build()
        .await
        .context("cannot connect to the system bus (netboot publishes machine status there)")?;
    let owned = DBusProxy::new(&conn)
        .await?
        .name_has_owner(BusName::try_from(BUS_NAME)?)
        .await?;
    if !owned {
        bail!("{BUS_NAME} is not on the system bus: netboot is not running (systemctl status netboot), or it cannot reach the bus");
    }
    Ok(conn)
}

async fn look(conn: &Connection) -> anyhow::Result<View> {
    let objects = ObjectManagerProxy::builder(conn)
        .destination(BUS_NAME)?
        .path("/")?
        .build()
        .await?
        .get_managed_objects()
        .await
        .context("GetManagedObjects")?;
    let manager = PropertiesProxy::builder(conn)
        .destination(BUS_NAME)?
        .path(MANAGER_PATH)?
        .build()
        .await?;
    let summary = manager
        .get(
            InterfaceName::from_static_str_unchecked(MANAGER_INTERFACE),
            "Summary",
        )
        .await
        .ok()
        .and_then(|v| String::try_from(v).ok())
        .unwrap_or_default();
    Ok(View {
        summary,
        rows: rows(&objects),
    })
}

/// Prints the machines once, or (`watch`) on every change until SIGINT/SIGTERM.
pub async fn run(watch: bool) -> anyhow::Result<()> {
    let conn = connect().await?;
    if !watch {
        print!("{}", render(&look(&conn).await?, SystemTime::now()));
        return Ok(());
    }
    // Subscribed before the first look, so no change between the two is missed.
    let rule = MatchRule::builder()
        .msg_type(zbus::message::Type::Signal)
        .sender(BUS_NAME)?
        .build();
    let mut signals = zbus::MessageStream::for_match_rule(rule, &conn, Some(64)).await?;
    let terminal = std::io::stdout().is_terminal();
    let mut ages = tokio::time::interval(Duration::from_secs(5));
    let shutdown = tokio_util::sync::CancellationToken::new();
    tokio::spawn(crate::cancel_on_signal(shutdown.clone()));
    let mut last = None;
    loop {
        let view = look(&conn).await?;
        if terminal {
            // Redraw in place: home, clear.
            print!("\x1b[H\x1b[2J{}", render(&view, SystemTime::now()));
        } else if last.as_ref() != Some(&view) {
            let stamp = httpdate::fmt_http_date(SystemTime::now());
            print!("--- {stamp}\n{}", render(&view, SystemTime::now()));
        }
        use std::io::Write as _;
        let _ = std::io::stdout().flush();
        last = Some(view);
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            signal = signals.next() => {
                if signal.is_none() {
                    bail!("the D-Bus connection closed");
                }
                // A burst (a phase change is several signals) makes one redraw.
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            _ = ages.tick(), if terminal => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(name: &str, phase: &str, progress: u32, seen: u64, message: &str) -> Row {
        Row {
            name: name.into(),
            mac: "52:54:00:00:00:02".into(),
            ip: "10.77.0.2".into(),
            phase: phase.into(),
            progress,
            message: message.into(),
            last_seen_usec: seen,
        }
    }

    #[test]
    fn ages_read_like_people_say_them() {
        let now = UNIX_EPOCH + Duration::from_secs(1_000_000);
        let usec = |s: u64| s * 1_000_000;
        assert_eq!(age(0, now), "never");
        assert_eq!(age(usec(1_000_000 - 12), now), "12s ago");
        assert_eq!(age(usec(1_000_000 - 180), now), "3m ago");
        assert_eq!(age(usec(1_000_000 - 7300), now), "2h ago");
        assert_eq!(age(usec(1_000_000 - 4 * 86_400), now), "4d ago");
        // A clock that went back: not a negative age.
        assert_eq!(age(usec(1_000_010), now), "0s ago");
    }

    #[test]
    fn the_table_lines_up_with_the_message_last() {
        let now = UNIX_EPOCH + Duration::from_secs(1_000_000);
        let view = View {
            summary: "2 machines: 1 imaging 42%, 1 failed".into(),
            rows: vec![
                row("node2", "Imaging", 42, 999_990_000_000, "writing the image"),
                row("node-10", "Failed", 0, 0, "sha256 mismatch\nsecond line"),
            ],
        };
        assert_eq!(
            render(&view, now),
            "2 machines: 1 imaging 42%, 1 failed\n\
             NAME     PHASE    PROGRESS  MAC                IP         LAST SEEN  MESSAGE\n\
             node2    Imaging  42%       52:54:00:00:00:02  10.77.0.2  10s ago    writing the image\n\
             node-10  Failed   0%        52:54:00:00:00:02  10.77.0.2  never      sha256 mismatch second line\n"
        );
        let empty = View {
            summary: "0 machines".into(),
            rows: vec![],
        };
        assert_eq!(render(&empty, now), "0 machines\nno machines\n");
    }
}
