//! TFTP wire format (RFC 1350, options per RFC 2347): parsing of what clients send and
//! encoding of what the server sends. Parsing never panics on arbitrary input.

use std::fmt;

pub const OP_RRQ: u16 = 1;
pub const OP_WRQ: u16 = 2;
pub const OP_DATA: u16 = 3;
pub const OP_ACK: u16 = 4;
pub const OP_ERROR: u16 = 5;
pub const OP_OACK: u16 = 6;

/// TFTP error codes (RFC 1350 section 5, RFC 2347 for code 8).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u16)]
#[allow(dead_code)] // the complete table, not all of it is sent by a read-only server
pub enum ErrorCode {
    NotDefined = 0,
    FileNotFound = 1,
    AccessViolation = 2,
    DiskFull = 3,
    IllegalOperation = 4,
    UnknownTid = 5,
    FileExists = 6,
    NoSuchUser = 7,
    OptionRefused = 8,
}

/// Transfer mode named in a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Octet,
    /// Served byte for byte, like octet: boot files are binary, and no PXE client asks for
    /// netascii; converting line endings would only corrupt them.
    Netascii,
}

/// A read or write request with its options in the order the client sent them
/// (names lower-cased, values as sent).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub filename: String,
    pub mode: Mode,
    pub options: Vec<(String, String)>,
}

/// A packet a client may send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Packet {
    Rrq(Request),
    Wrq(Request),
    Data { block: u16, len: usize },
    Ack { block: u16 },
    Error { code: u16, message: String },
    Oack,
}

/// Why a packet could not be parsed; the text goes into the error reply.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    #[error("packet too short")]
    TooShort,
    #[error("unknown opcode {0}")]
    UnknownOpcode(u16),
    #[error("request is missing its file name or mode")]
    Truncated,
    #[error("file name is not valid UTF-8")]
    BadFileName,
    #[error("unsupported transfer mode {0:?} (only octet and netascii)")]
    BadMode(String),
    #[error("malformed option list")]
    BadOptions,
}

impl ParseError {
    /// The TFTP error code to answer a malformed request with.
    pub fn code(&self) -> ErrorCode {
        match self {
            ParseError::BadFileName => ErrorCode::AccessViolation,
            _ => ErrorCode::IllegalOperation,
        }
    }
}

impl Packet {
    pub fn parse(buf: &[u8]) -> Result<Packet, ParseError> {
        let (op, rest) = match buf {
            [a, b, rest @ ..] => (u16::from_be_bytes([*a, *b]), rest),
            _ => return Err(ParseError::TooShort),
        };
        match op {
            OP_RRQ => Ok(Packet::Rrq(parse_request(rest)?)),
            OP_WRQ => Ok(Packet::Wrq(parse_request(rest)?)),
            OP_DATA => {
                let block = be16(rest).ok_or(ParseError::TooShort)?;
                Ok(Packet::Data {
                    block,
                    len: rest.len() - 2,
                })
            }
            OP_ACK => Ok(Packet::Ack {
                block: be16(rest).ok_or(ParseError::TooShort)?,
            }),
            OP_ERROR => {
                let code = be16(rest).ok_or(ParseError::TooShort)?;
                let text = &rest[2..];
                let text = text.split(|b| *b == 0).next().unwrap_or_default();
                Ok(Packet::Error {
                    code,
                    message: String::from_utf8_lossy(text).into_owned(),
                })
            }
            OP_OACK => Ok(Packet::Oack),
            other => Err(ParseError::UnknownOpcode(other)),
        }
    }
}

fn be16(buf: &[u8]) -> Option<u16> {
    match buf {
        [a, b, ..] => Some(u16::from_be_bytes([*a, *b])),
        _ => None,
    }
}

fn parse_request(body: &[u8]) -> Result<Request, ParseError> {
    // Fields are NUL-terminated; some clients pad the packet with extra NULs after the last
    // field, so trailing empty fields are dropped before pairing options.
    let mut fields: Vec<&[u8]> = body.split(|b| *b == 0).collect();
    // `split` yields a final (empty) piece after the last NUL; a request without a final NUL
    // is truncated.
    if body.last() != Some(&0) {
        return Err(ParseError::Truncated);
    }
    fields.pop();
    while fields.len() > 2 && fields.last().is_some_and(|f| f.is_empty()) {
        fields.pop();
    }
    if fields.len() < 2 {
        return Err(ParseError::Truncated);
    }
    let filename = std::str::from_utf8(fields[0]).map_err(|_| ParseError::BadFileName)?;
    if filename.is_empty() {
        return Err(ParseError::Truncated);
    }
    let mode_text = String::from_utf8_lossy(fields[1]).to_ascii_lowercase();
    let mode = match mode_text.as_str() {
        "octet" => Mode::Octet,
        "netascii" => Mode::Netascii,
        _ => return Err(ParseError::BadMode(mode_text)),
    };
    let pairs = fields[2..].chunks_exact(2);
    if !pairs.remainder().is_empty() {
        return Err(ParseError::BadOptions);
    }
    let options = pairs
        .map(|pair| {
            let name = String::from_utf8_lossy(pair[0]).to_ascii_lowercase();
            let value = String::from_utf8_lossy(pair[1]).into_owned();
            (name, value)
        })
        .collect();
    Ok(Request {
        filename: filename.to_string(),
        mode,
        options,
    })
}

/// Encodes an ERROR packet. The message is cut to keep the packet within 512 bytes.
pub fn error(code: ErrorCode, message: &str) -> Vec<u8> {
    let mut msg = message.replace('\0', " ");
    if msg.len() > 500 {
        let mut end = 500;
        while !msg.is_char_boundary(end) {
            end -= 1;
        }
        msg.truncate(end);
    }
    let mut out = Vec::with_capacity(5 + msg.len());
    out.extend_from_slice(&OP_ERROR.to_be_bytes());
    out.extend_from_slice(&(code as u16).to_be_bytes());
    out.extend_from_slice(msg.as_bytes());
    out.push(0);
    out
}

/// Encodes an OACK with the given accepted options.
pub fn oack(options: &[(&str, String)]) -> Vec<u8> {
    let mut out = OP_OACK.to_be_bytes().to_vec();
    for (name, value) in options {
        out.extend_from_slice(name.as_bytes());
        out.push(0);
        out.extend_from_slice(value.as_bytes());
        out.push(0);
    }
    out
}

/// Starts a DATA packet; the caller appends the payload.
pub fn data_header(block: u16, capacity: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(4 + capacity);
    out.extend_from_slice(&OP_DATA.to_be_bytes());
    out.extend_from_slice(&block.to_be_bytes());
    out
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Mode::Octet => "octet",
            Mode::Netascii => "netascii",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rrq(parts: &[&str]) -> Vec<u8> {
        let mut out = OP_RRQ.to_be_bytes().to_vec();
        for p in parts {
            out.extend_from_slice(p.as_bytes());
            out.push(0);
        }
        out
    }

    #[test]
    fn parses_requests_with_options() {
        let p = Packet::parse(&rrq(&[
            "ipxe.efi", "OCTET", "BlkSize", "1468", "tsize", "0",
        ]));
        let Ok(Packet::Rrq(req)) = p else {
            panic!("not an RRQ: {p:?}")
        };
        assert_eq!(req.filename, "ipxe.efi");
        assert_eq!(req.mode, Mode::Octet);
        assert_eq!(
            req.options,
            vec![
                ("blksize".into(), "1468".into()),
                ("tsize".into(), "0".into())
            ]
        );
        // Trailing NUL padding is tolerated.
        let mut padded = rrq(&["f", "netascii"]);
        padded.extend_from_slice(&[0, 0, 0]);
        let Ok(Packet::Rrq(req)) = Packet::parse(&padded) else {
            panic!("padded RRQ rejected")
        };
        assert_eq!(req.mode, Mode::Netascii);
        assert!(req.options.is_empty());
    }

    #[test]
    fn rejects_malformed_requests() {
        assert_eq!(Packet::parse(&[]), Err(ParseError::TooShort));
        assert_eq!(Packet::parse(&[0]), Err(ParseError::TooShort));
        assert_eq!(Packet::parse(&[0, 99]), Err(ParseError::UnknownOpcode(99)));
        assert_eq!(Packet::parse(&[0, 1]), Err(ParseError::Truncated));
        assert_eq!(
            Packet::parse(&[0, 1, b'f', 0, b'o']),
            Err(ParseError::Truncated)
        );
        assert_eq!(Packet::parse(&rrq(&["f"])), Err(ParseError::Truncated));
        assert_eq!(
            Packet::parse(&rrq(&["", "octet"])),
            Err(ParseError::Truncated)
        );
        assert_eq!(
            Packet::parse(&rrq(&["f", "mail"])),
            Err(ParseError::BadMode("mail".into()))
        );
        assert_eq!(
            Packet::parse(&rrq(&["f", "octet", "blksize"])),
            Err(ParseError::BadOptions)
        );
        assert_eq!(
            Packet::parse(&[0, 1, 0xff, 0xfe, 0, b'o', 0]),
            Err(ParseError::BadFileName)
        );
        assert_eq!(Packet::parse(&[0, 4, 1]), Err(ParseError::TooShort));
        assert_eq!(Packet::parse(&[0, 5, 0]), Err(ParseError::TooShort));
    }

    #[test]
    fn parses_acks_and_errors() {
        assert_eq!(
            Packet::parse(&[0, 4, 0xff, 0xff]),
            Ok(Packet::Ack { block: 65535 })
        );
        assert_eq!(
            Packet::parse(&[0, 5, 0, 8, b'n', b'o', 0]),
            Ok(Packet::Error {
                code: 8,
                message: "no".into()
            })
        );
        // An ERROR without its terminating NUL still parses.
        assert_eq!(
            Packet::parse(&[0, 5, 0, 1]),
            Ok(Packet::Error {
                code: 1,
                message: String::new()
            })
        );
    }

    #[test]
    fn encodes_packets() {
        assert_eq!(
            error(ErrorCode::FileNotFound, "x"),
            vec![0, 5, 0, 1, b'x', 0]
        );
        let long = "é".repeat(400);
        assert!(error(ErrorCode::NotDefined, &long).len() <= 505);
        assert_eq!(
            oack(&[("tsize", "5".into())]),
            b"\0\x06tsize\0\x35\0".to_vec()
        );
        assert_eq!(data_header(0x0102, 0), vec![0, 3, 1, 2]);
    }
}
