//! Which boot program a DHCP client gets: a pure decision from the request's options.

use std::net::Ipv4Addr;

use dhcproto::v4::{DhcpOption, Message, OptionCode, UnknownOption};

use super::DhcpSettings;
use crate::Machine;

/// Vendor class (option 60) prefix of PXE firmware and of iPXE.
pub const PXE_CLIENT: &[u8] = b"PXEClient";
/// Vendor class (option 60) prefix of UEFI HTTP Boot clients.
pub const HTTP_CLIENT: &[u8] = b"HTTPClient";

/// The kind of boot client that sent a request, from options 93 (client architecture),
/// 77 (user class) and 60 (vendor class).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BootClient {
    /// iPXE (user class `iPXE`), whatever firmware it runs on; `arch` is its option 93.
    Ipxe { arch: Option<u16> },
    /// Legacy BIOS PXE (architecture 0).
    Bios,
    /// UEFI x86-64 PXE (architecture 7 or 9).
    UefiX64,
    /// UEFI HTTP Boot (architecture 16, or vendor class `HTTPClient`).
    UefiHttp,
    /// A network-boot client of an architecture we have no loader for: plain DHCP only.
    Unknown { arch: Option<u16> },
    /// An ordinary DHCP client (no PXE or HTTP boot signature): plain DHCP only.
    Plain,
}

/// What a reply tells the client to boot, and from where.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BootFile {
    /// The `file` field and option 67: a TFTP path or an HTTP URL. `None`: no boot file.
    pub file: Option<String>,
    /// `siaddr` (next server): where the TFTP file lives.
    pub next_server: Ipv4Addr,
    /// Options that go with this kind of client (60, 66, 175).
    pub options: Vec<DhcpOption>,
}

fn option_bytes(msg: &Message, code: OptionCode) -> Option<&[u8]> {
    match msg.opts().get(code)? {
        DhcpOption::ClassIdentifier(v) | DhcpOption::UserClass(v) => Some(v),
        _ => None,
    }
}

/// True if option 77 names `iPXE`, either as iPXE sends it (the bare string) or in the
/// RFC 3004 form (a list of length-prefixed classes).
fn is_ipxe_user_class(user_class: &[u8]) -> bool {
    if user_class == b"iPXE" {
        return true;
    }
    let mut rest = user_class;
    while let Some((&len, tail)) = rest.split_first() {
        let len = usize::from(len);
        if len == 0 || len > tail.len() {
            return false;
        }
        let (class, tail) = tail.split_at(len);
        if class == b"iPXE" {
            return true;
        }
        rest = tail;
    }
    false
}

/// The architecture inside a vendor class such as `PXEClient:Arch:00007:UNDI:003016`.
fn arch_from_vendor_class(vendor: &[u8]) -> Option<u16> {
    let text = std::str::from_utf8(vendor).ok()?;
    let mut fields = text.split(':');
    while let Some(field) = fields.next() {
        if field == "Arch" {
            return fields.next()?.parse().ok();
        }
    }
    None
}

/// Classifies the client that sent `msg`.
pub fn boot_client(msg: &Message) -> BootClient {
    let arch = match msg.opts().get(OptionCode::ClientSystemArchitecture) {
        Some(DhcpOption::ClientSystemArchitecture(a)) => Some(u16::from(*a)),
        _ => None,
    };
    if option_bytes(msg, OptionCode::UserClass).is_some_and(is_ipxe_user_class) {
        return BootClient::Ipxe { arch };
    }
    let vendor = option_bytes(msg, OptionCode::ClassIdentifier).unwrap_or_default();
    let http = vendor.starts_with(HTTP_CLIENT);
    let pxe = vendor.starts_with(PXE_CLIENT);
    let arch = arch.or_else(|| {
        if http || pxe {
            arch_from_vendor_class(vendor)
        } else {
            None
        }
    });
    match arch {
        Some(16) => BootClient::UefiHttp,
        None | Some(7 | 9) if http => BootClient::UefiHttp,
        _ if http => BootClient::Unknown { arch },
        Some(0) => BootClient::Bios,
        Some(7 | 9) => BootClient::UefiX64,
        Some(_) => BootClient::Unknown { arch },
        None if pxe => BootClient::Unknown { arch: None },
        None => BootClient::Plain,
    }
}

/// The URL of a machine's iPXE script.
pub fn ipxe_script_url(settings: &DhcpSettings, machine: &Machine) -> String {
    format!(
        "{}/ipxe/{}",
        settings.http_base.trim_end_matches('/'),
        machine.mac.to_hyphenated()
    )
}

/// What to boot: iPXE gets its per-machine script over HTTP, BIOS and UEFI PXE get an iPXE
/// binary over TFTP, UEFI HTTP Boot gets `ipxe.efi` over HTTP, anything else no boot file.
pub fn boot_file(client: BootClient, machine: &Machine, settings: &DhcpSettings) -> BootFile {
    let tftp = |file: &str| BootFile {
        file: Some(file.to_string()),
        next_server: settings.server_ip,
        options: vec![
            DhcpOption::ClassIdentifier(PXE_CLIENT.to_vec()),
            // PXE discovery control (vendor option 6) = 8: boot the file named in this offer.
            // With "PXEClient" but no option 43, EDK2 (OVMF) classifies the offer as BINL, asks
            // a boot server on UDP 4011 for the file, gets no answer and fails with PXE-E16.
            DhcpOption::VendorExtensions(vec![6, 1, 8, 255]),
            DhcpOption::TFTPServerName(settings.server_ip.to_string().into_bytes()),
        ],
    };
    match client {
        BootClient::Ipxe { .. } => BootFile {
            file: Some(ipxe_script_url(settings, machine)),
            next_server: settings.server_ip,
            // Encapsulated iPXE option 176 (no-pxedhcp) = 1: do not wait for ProxyDHCP offers.
            options: vec![DhcpOption::Unknown(UnknownOption::new(
                OptionCode::Unknown(175),
                vec![176, 1, 1],
            ))],
        },
        BootClient::Bios => tftp(&settings.bios_loader),
        BootClient::UefiX64 => tftp(&settings.uefi_loader),
        BootClient::UefiHttp => BootFile {
            file: Some(format!(
                "{}/boot/ipxe.efi",
                settings.http_base.trim_end_matches('/')
            )),
            next_server: settings.server_ip,
            options: vec![DhcpOption::ClassIdentifier(HTTP_CLIENT.to_vec())],
        },
        BootClient::Unknown { .. } | BootClient::Plain => BootFile {
            file: None,
            next_server: settings.server_ip,
            options: Vec::new(),
        },
    }
}
