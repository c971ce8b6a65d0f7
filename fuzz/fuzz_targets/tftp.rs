//! TFTP: a packet is parsed; a read request's options are negotiated for a file whose size
//! comes from the input too. What is accepted must respect the limits.
#![no_main]

use libfuzzer_sys::fuzz_target;
use netboot::tftp::packet::Packet;
use netboot::tftp::{negotiate, TftpSettings, MAX_BLKSIZE, MAX_WINDOWSIZE};

fuzz_target!(|data: &[u8]| {
    let (size, packet) = match data {
        [a, b, c, d, rest @ ..] => (u64::from(u32::from_be_bytes([*a, *b, *c, *d])), rest),
        _ => return,
    };
    let Ok(Packet::Rrq(request) | Packet::Wrq(request)) = Packet::parse(packet) else {
        return;
    };
    let settings = TftpSettings::new("/nonexistent");
    let n = negotiate(&request, size, &settings);
    assert!((8..=usize::from(MAX_BLKSIZE)).contains(&n.blksize) || n.blksize == 512);
    assert!((1..=usize::from(MAX_WINDOWSIZE)).contains(&n.windowsize));
    assert!(n.windowsize == 1 || n.in_flight() <= settings.window_budget);
    assert!(n.timeout <= settings.max_timeout);
    for (i, (name, _)) in n.oack.iter().enumerate() {
        assert!(
            n.oack[..i].iter().all(|(seen, _)| seen != name),
            "option {name} twice in the OACK"
        );
    }
});
