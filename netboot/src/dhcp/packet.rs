//! Wire format: a defensive decoder for requests and an encoder that controls option order.

use dhcproto::v4::{DhcpOption, DhcpOptions, Message, OptionCode};
use dhcproto::{Decodable, Decoder, Encodable, Encoder};
use wire::dhcp::{filter_options, MAGIC_COOKIE, OPTIONS_OFFSET};

/// Replies are padded to the BOOTP minimum: some PXE ROMs drop shorter packets.
const MIN_REPLY_LEN: usize = 300;
/// IP (20) and UDP (8) headers, counted in option 57 (maximum DHCP message size).
const IP_UDP_HEADERS: usize = 28;
/// RFC 2131: every client accepts 576-byte datagrams.
const MIN_DATAGRAM: usize = 576;

/// Why a datagram is not a request we can read.
#[derive(Debug, thiserror::Error)]
pub enum PacketError {
    #[error("packet too short for BOOTP ({0} bytes)")]
    TooShort(usize),
    #[error("not a BOOTREQUEST (op {0})")]
    NotRequest(u8),
    #[error("unsupported hardware type {htype} / length {hlen}: only Ethernet is served")]
    NotEthernet { htype: u8, hlen: u8 },
    #[error("missing DHCP magic cookie")]
    NoMagic,
    #[error("undecodable: {0}")]
    Decode(#[from] dhcproto::error::DecodeError),
    #[error("cannot encode reply: {0}")]
    Encode(#[from] dhcproto::error::EncodeError),
}

/// Whether option `code` with `len` value bytes is one the server reads and is well formed.
/// Everything else is dropped before the packet reaches the generic decoder ([`wire::dhcp`]):
/// the server needs none of it, and some malformed options would make that decoder fail or
/// stop early.
fn keep_option(code: u8, len: usize) -> bool {
    match code {
        53 => len == 1,                     // message type
        50 | 54 => len == 4,                // requested address, server id
        57 => len == 2,                     // max message size
        93 => len >= 2 && len & 1 == 0,     // client architecture(s): the first one counts
        55 | 60 | 61 | 77 | 97 => len >= 1, // PRL, vendor class, client id, user class, UUID
        _ => false,
    }
}

/// Decodes a client's datagram. Only Ethernet BOOTREQUESTs with the DHCP cookie pass; options
/// the server does not use, and malformed ones, are dropped; an option cut short ends the
/// options (those before it still count). Never panics.
pub fn decode_request(bytes: &[u8]) -> Result<Message, PacketError> {
    if bytes.len() < OPTIONS_OFFSET {
        return Err(PacketError::TooShort(bytes.len()));
    }
    if bytes[0] != 1 {
        return Err(PacketError::NotRequest(bytes[0]));
    }
    let (htype, hlen) = (bytes[1], bytes[2]);
    if htype != 1 || hlen != 6 {
        return Err(PacketError::NotEthernet { htype, hlen });
    }
    if bytes[OPTIONS_OFFSET - 4..OPTIONS_OFFSET] != MAGIC_COOKIE {
        return Err(PacketError::NoMagic);
    }
    let clean = filter_options(bytes, keep_option).packet;
    Ok(Message::decode(&mut Decoder::new(&clean))?)
}

/// The largest DHCP payload the client accepts: option 57 less IP/UDP headers, at least the
/// RFC 2131 minimum, at most what fits an Ethernet frame.
pub fn max_payload(request: &Message) -> usize {
    let asked = match request.opts().get(OptionCode::MaxMessageSize) {
        Some(DhcpOption::MaxMessageSize(n)) => usize::from(*n),
        _ => MIN_DATAGRAM,
    };
    asked.clamp(MIN_DATAGRAM, 1500) - IP_UDP_HEADERS
}

/// Encodes `msg` with its options in `order` (any options not named there follow in numeric
/// order), then END, padded to the BOOTP minimum length.
pub fn encode_ordered(msg: &Message, order: &[OptionCode]) -> Result<Vec<u8>, PacketError> {
    let mut header = msg.clone();
    header.set_opts(DhcpOptions::new());
    let mut buf = Vec::with_capacity(MIN_REPLY_LEN + 64);
    header.encode(&mut Encoder::new(&mut buf))?;
    let mut rest: Vec<(&OptionCode, &DhcpOption)> = msg
        .opts()
        .iter()
        .filter(|(code, _)| !order.contains(code))
        .collect();
    rest.sort_by_key(|(code, _)| u8::from(**code));
    let ordered = order.iter().filter_map(|code| msg.opts().get(*code));
    // An Encoder writes from the start of its buffer: options get their own.
    let mut options = Vec::with_capacity(256);
    let mut e = Encoder::new(&mut options);
    for option in ordered.chain(rest.into_iter().map(|(_, o)| o)) {
        option.encode(&mut e)?;
    }
    buf.extend_from_slice(&options);
    buf.push(255);
    if buf.len() < MIN_REPLY_LEN {
        buf.resize(MIN_REPLY_LEN, 0);
    }
    Ok(buf)
}
