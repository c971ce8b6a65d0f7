//! Every orders value survives netboot's writer → iPXE → the kernel → stage2's parser, or the
//! writer refuses it naming the key: never a value changed on the way.
//!
//! iPXE splits the script's kernel line into words and re-joins them with single blanks, reads
//! a word starting with `#` as a comment and `||`, `&&`, `;` as command separators; the kernel
//! keeps at most [`KERNEL_CMDLINE_MAX`] bytes. Both are modelled below on the written line.

use proptest::option;
use proptest::prelude::*;
use wire::orders::{
    keys, split_cmdline, DiskHints, ImagingOrders, Orders, OrdersError, Token, KERNEL_CMDLINE_MAX,
};

/// How the orders fare within a script's kernel line.
enum Carried {
    /// What iPXE and the kernel make of them, as stage2 reads it from `/proc/cmdline`.
    AsRead(String),
    /// The whole line (netboot's own parameters and the orders) is longer than the kernel
    /// keeps, so netboot's script check refuses it (`netboot/src/ipxe.rs` tests that refusal):
    /// the kernel never cuts orders.
    RefusedByNetboot,
    /// iPXE would read part of the orders as script syntax.
    Misread,
}

fn through_ipxe_and_kernel(args: &str) -> Carried {
    let words: Vec<&str> = args.split_ascii_whitespace().collect();
    if words
        .iter()
        .any(|w| w.starts_with('#') || matches!(*w, "||" | "&&" | ";"))
    {
        return Carried::Misread;
    }
    let line = format!(
        "initrd=stage2.img console=ttyS0 stage2.reboot_delay=1 {}",
        words.join(" ")
    );
    if line.len() > KERNEL_CMDLINE_MAX {
        return Carried::RefusedByNetboot;
    }
    Carried::AsRead(line)
}

/// The orders as the parser gives them back: netboot's URL without a trailing `/`.
fn normalised(orders: &Orders) -> Orders {
    Orders {
        netboot_url: orders.netboot_url.trim_end_matches('/').to_owned(),
        ..orders.clone()
    }
}

fn token() -> impl Strategy<Value = Token> {
    "[A-Za-z0-9._~-]{16,256}".prop_filter_map("token shape", |t| Token::parse(&t))
}

/// URLs netboot can carry: a host, maybe a port and a path, maybe trailing slashes.
fn good_url() -> impl Strategy<Value = String> {
    "http://[a-z0-9][a-z0-9.-]{0,30}(:[0-9]{1,5})?(/[A-Za-z0-9._~%=&?+-]{0,16}){0,4}/{0,2}"
}

/// Something iPXE, the kernel or the parser would not carry intact.
fn hazard() -> impl Strategy<Value = &'static str> {
    prop::sample::select(vec![
        "#",
        "#c",
        "||",
        "&&",
        ";",
        " ",
        "\"",
        "${",
        "${x}",
        "\t",
        "\n",
        "\r",
        "\u{0}",
        "\u{7f}",
        "\u{e9}",
        "\u{1F600}",
    ])
}

/// Carriable text with one hazard inserted, at a word boundary or inside a word: the writer
/// must refuse it or carry it exactly.
fn near_miss_text() -> impl Strategy<Value = String> {
    (
        good_text(4),
        hazard(),
        any::<prop::sample::Index>(),
        any::<bool>(),
    )
        .prop_map(|(text, hazard, at, as_word)| {
            let boundaries: Vec<usize> = (0..=text.len())
                .filter(|&i| text.is_char_boundary(i))
                .collect();
            let at = boundaries[at.index(boundaries.len())];
            let inserted = if as_word {
                format!(" {hazard} ")
            } else {
                hazard.to_owned()
            };
            format!("{}{inserted}{}", &text[..at], &text[at..])
        })
}

/// Anything at all: blanks, quotes, `=`, `${`, `#`, control and non-ASCII characters, empty.
fn hostile_text() -> impl Strategy<Value = String> {
    prop_oneof![
        1 => any::<String>(),
        4 => near_miss_text(),
        1 => Just(String::new()),
    ]
}

fn maybe_hostile_url() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => good_url(),
        1 => hostile_text(),
        1 => hostile_text().prop_map(|t| format!("http://h/{t}")),
    ]
}

/// A word the writer carries: printable ASCII but `"`, `{`, `$`, `|`, `&`, `;`, not starting
/// with `#`; `=` and other punctuation included.
const WORD: &str =
    "[A-Za-z0-9._=/:,+!*?()<>'@%^~\\[\\]\\\\-][A-Za-z0-9._=/:,+!*?()<>'@%^~#\\[\\]\\\\-]{0,11}";

/// Serial numbers and models the writer carries: words joined by single blanks.
fn good_text(max_words: usize) -> impl Strategy<Value = String> {
    proptest::collection::vec(WORD, 1..=max_words).prop_map(|words| words.join(" "))
}

fn good_orders() -> impl Strategy<Value = Orders> {
    (
        good_url(),
        token(),
        good_url(),
        any::<[u8; 32]>(),
        option::of(any::<u64>()),
        option::of("/dev/[A-Za-z0-9/._:-]{1,40}"),
        option::of(prop_oneof![good_text(6), good_text(50)]),
        option::of(prop_oneof![good_text(6), good_text(50)]),
        option::of(any::<u64>()),
    )
        .prop_map(
            |(netboot_url, token, image_url, sha256, image_size, path, serial, model, min_size)| {
                Orders {
                    netboot_url,
                    imaging: ImagingOrders {
                        token,
                        image_url,
                        sha256,
                        image_size,
                        disk: DiskHints {
                            path,
                            serial,
                            model,
                            min_size,
                        },
                    },
                }
            },
        )
}

fn any_orders() -> impl Strategy<Value = Orders> {
    (
        good_orders(),
        maybe_hostile_url(),
        maybe_hostile_url(),
        option::of(prop_oneof![
            "/dev/[A-Za-z0-9/._:-]{1,40}",
            hostile_text(),
            hostile_text().prop_map(|t| format!("/dev/{t}"))
        ]),
        option::of(prop_oneof![
            2 => good_text(4),
            4 => hostile_text(),
            1 => "[A-Z0-9]{1,8}( [A-Z0-9]{1,8}){100,300}"
        ]),
        option::of(prop_oneof![2 => good_text(4), 4 => hostile_text(), 1 => "[A-Z0-9]{2000,3000}"]),
    )
        .prop_map(|(mut orders, url, image, path, serial, model)| {
            orders.netboot_url = url;
            orders.imaging.image_url = image;
            orders.imaging.disk.path = path;
            orders.imaging.disk.serial = serial;
            orders.imaging.disk.model = model;
            orders
        })
}

/// The keys whose values are free text the writer may have to refuse; the token, the sha256 and
/// the sizes are typed and always carried.
const CHECKED_KEYS: &[&str] = &[
    keys::URL,
    keys::IMAGE,
    keys::DISK_PATH,
    keys::DISK_SERIAL,
    keys::DISK_MODEL,
];

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// Orders netboot can express always write, and come back unchanged.
    #[test]
    fn carriable_orders_round_trip(orders in good_orders()) {
        let args = orders.kernel_args().map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert!(args.len() <= KERNEL_CMDLINE_MAX);
        match through_ipxe_and_kernel(&args) {
            Carried::AsRead(cmdline) => {
                prop_assert_eq!(Orders::from_cmdline(&cmdline), Ok(normalised(&orders)));
            }
            Carried::RefusedByNetboot => prop_assert!(false, "netboot would refuse {}", args),
            Carried::Misread => prop_assert!(false, "iPXE would misread {}", args),
        }
    }

    /// Any orders, hostile values included: either written and read back unchanged, or
    /// refused by the writer with the key of a free-text value (or as too long).
    #[test]
    fn any_orders_round_trip_or_are_refused(orders in any_orders()) {
        match orders.kernel_args() {
            Ok(args) => {
                prop_assert!(args.len() <= KERNEL_CMDLINE_MAX);
                match through_ipxe_and_kernel(&args) {
                    Carried::AsRead(cmdline) => {
                        prop_assert_eq!(Orders::from_cmdline(&cmdline), Ok(normalised(&orders)));
                    }
                    // Refused whole, never cut: nothing reaches stage2.
                    Carried::RefusedByNetboot => {}
                    Carried::Misread => prop_assert!(false, "iPXE would misread {}", args),
                }
                // Exactly the nine keys at most, each once.
                let params = split_cmdline(&args).map_err(|e| TestCaseError::fail(e.to_string()))?;
                let known = |p: &String| {
                    p.split_once('=').is_some_and(|(key, _)| keys::ALL.contains(&key))
                };
                prop_assert!(params.iter().all(known), "{:?}", params);
            }
            Err(OrdersError::TooLong { len }) => prop_assert!(len > KERNEL_CMDLINE_MAX),
            Err(e) => {
                let key = e.key().unwrap_or_default();
                prop_assert!(CHECKED_KEYS.contains(&key), "{}", e);
                // The error quotes the value without the token.
                prop_assert!(!e.to_string().contains(orders.imaging.token.expose()));
            }
        }
    }

    /// Whatever the command line, the parser answers (orders or an error) without panicking.
    #[test]
    fn the_parser_takes_any_command_line(cmdline in any::<String>(), extra in any_orders()) {
        let _ = Orders::from_cmdline(&cmdline);
        if let Ok(args) = extra.kernel_args() {
            let _ = Orders::from_cmdline(&format!("{cmdline} {args}"));
        }
    }
}

#[test]
fn very_long_values_are_refused_not_cut() {
    let orders = Orders {
        netboot_url: "http://10.77.0.1".into(),
        imaging: ImagingOrders {
            token: Token::parse("0123456789abcdef").unwrap_or_else(|| panic!("token")),
            image_url: "http://10.77.0.1/img".into(),
            sha256: [7; 32],
            image_size: None,
            disk: DiskHints {
                model: Some("M".repeat(KERNEL_CMDLINE_MAX)),
                ..DiskHints::default()
            },
        },
    };
    assert!(matches!(
        orders.kernel_args(),
        Err(OrdersError::TooLong { len }) if len > KERNEL_CMDLINE_MAX
    ));
}
