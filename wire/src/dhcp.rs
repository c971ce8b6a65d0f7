//! The DHCP option filter both ends run on a received datagram before decoding it: netboot's
//! server on clients' requests, stage2's client on the server's replies.
//!
//! The generic decoder (dhcproto 0.12) fails on, stops early at, or (in debug builds) panics on
//! some malformed option lengths; a server must not stop answering, nor a PID 1 die, because of
//! a stray packet. So each end keeps only the options it reads, each with a length it accepts,
//! and decodes that. Which options an end reads is its own business (its `keep` predicate);
//! walking the option area is shared here.

/// Length of the fixed BOOTP header (up to and including `file`) plus the magic cookie: where
/// the options start.
pub const OPTIONS_OFFSET: usize = 240;
/// The DHCP magic cookie, the last four bytes before the options.
pub const MAGIC_COOKIE: [u8; 4] = [99, 130, 83, 99];

const PAD: u8 = 0;
const END: u8 = 255;

/// A datagram reduced to the options an end reads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Filtered {
    /// The header (first [`OPTIONS_OFFSET`] bytes, as received), the kept options in their
    /// order, then END.
    pub packet: Vec<u8>,
    /// An option ran past the end of the datagram (or its length byte was missing): the walk
    /// stopped there. Whether the options kept so far are worth using is the caller's call.
    pub truncated: bool,
}

/// Copies `datagram`'s header and each option for which `keep(code, value_len)` holds; PAD
/// options are dropped, END (or the end of the datagram) stops the walk. A datagram shorter
/// than the header comes back as it is, marked truncated. Never panics.
pub fn filter_options(datagram: &[u8], keep: impl Fn(u8, usize) -> bool) -> Filtered {
    let Some(header) = datagram.get(..OPTIONS_OFFSET) else {
        return Filtered {
            packet: datagram.to_vec(),
            truncated: true,
        };
    };
    let mut packet = Vec::with_capacity(datagram.len());
    packet.extend_from_slice(header);
    let mut truncated = false;
    let mut at = OPTIONS_OFFSET;
    while let Some(&code) = datagram.get(at) {
        match code {
            PAD => at += 1,
            END => break,
            _ => {
                let option = datagram.get(at + 1).and_then(|&len| {
                    let end = at + 2 + usize::from(len);
                    datagram
                        .get(at..end)
                        .map(|option| (option, usize::from(len)))
                });
                let Some((option, len)) = option else {
                    truncated = true;
                    break;
                };
                if keep(code, len) {
                    packet.extend_from_slice(option);
                }
                at += 2 + len;
            }
        }
    }
    packet.push(END);
    Filtered { packet, truncated }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn datagram(options: &[u8]) -> Vec<u8> {
        let mut bytes = vec![0u8; OPTIONS_OFFSET];
        bytes[OPTIONS_OFFSET - 4..].copy_from_slice(&MAGIC_COOKIE);
        bytes.extend_from_slice(options);
        bytes
    }

    fn message_type_only(code: u8, len: usize) -> bool {
        code == 53 && len == 1
    }

    #[test]
    fn keeps_only_accepted_options_and_ends_with_end() {
        // PAD, message type, a 3-byte router (not kept), END, then bytes after END.
        let input = datagram(&[0, 53, 1, 1, 3, 3, 10, 0, 0, 255, 53, 1, 2]);
        let out = filter_options(&input, message_type_only);
        assert!(!out.truncated);
        assert_eq!(out.packet[..OPTIONS_OFFSET], input[..OPTIONS_OFFSET]);
        assert_eq!(out.packet[OPTIONS_OFFSET..], [53, 1, 1, 255]);
    }

    #[test]
    fn a_missing_end_is_added() {
        let out = filter_options(&datagram(&[53, 1, 3]), message_type_only);
        assert_eq!(out.packet[OPTIONS_OFFSET..], [53, 1, 3, 255]);
        assert!(!out.truncated);
    }

    #[test]
    fn an_option_running_past_the_end_stops_the_walk() {
        let out = filter_options(&datagram(&[53, 1, 5, 12, 200, b'x']), message_type_only);
        assert!(out.truncated);
        assert_eq!(out.packet[OPTIONS_OFFSET..], [53, 1, 5, 255]);
        // A code without its length byte.
        let out = filter_options(&datagram(&[53, 1, 5, 12]), message_type_only);
        assert!(out.truncated);
        assert_eq!(out.packet[OPTIONS_OFFSET..], [53, 1, 5, 255]);
    }

    #[test]
    fn every_cut_is_noticed_and_nothing_panics() {
        // Options at 240..243 (message type) and 243..252 (client id), END at 252.
        let full = datagram(&[53, 1, 1, 61, 7, 1, 2, 3, 4, 5, 6, 7, 255]);
        for len in 0..full.len() {
            let cuts_an_option = len < OPTIONS_OFFSET
                || (OPTIONS_OFFSET + 1..OPTIONS_OFFSET + 3).contains(&len)
                || (OPTIONS_OFFSET + 4..OPTIONS_OFFSET + 12).contains(&len);
            let out = filter_options(&full[..len], |_, _| true);
            assert_eq!(out.truncated, cuts_an_option, "cut at {len}");
        }
    }
}
