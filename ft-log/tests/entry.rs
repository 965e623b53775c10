//! Entry encoding: byte blobs stay compact.

use ft_log::entry::*;
use ft_log::format::{decode_entry, encode_entry};

/// Byte vectors are encoded as one length-prefixed blob: a 4096-byte page
/// costs 4096 bytes plus its gfn, flag and a two-byte length.
#[test]
fn byte_blobs_are_length_prefixed_not_sequences() {
    let page = Page {
        gfn: 5,
        delta: true,
        data: vec![0xab; 4096],
    };
    let e = Entry::Epoch(Box::new(Epoch {
        pos: 1,
        index: 2,
        vcpu: vec![7; 300],
        pages: vec![page.clone()],
        fingerprint: Fingerprint { rip: 3, regs: 4 },
    }));
    let b = encode_entry(&e);
    let mut want = vec![5u8, 1, 2]; // variant Epoch, pos, index
    want.extend_from_slice(&[0xac, 0x02]); // vcpu length 300
    want.extend_from_slice(&[7; 300]);
    want.push(1); // one page
    want.extend_from_slice(&[5, 1, 0x80, 0x20]); // gfn, delta, length 4096
    want.extend_from_slice(&[0xab; 4096]);
    want.extend_from_slice(&[3, 4]); // fingerprint
    assert_eq!(b, want);
    assert_eq!(decode_entry(&b).unwrap(), e);

    let c = Entry::ConsoleInput {
        pos: 9,
        bytes: b"ls\n".to_vec(),
    };
    let b = encode_entry(&c);
    assert_eq!(b, [3, 9, 3, b'l', b's', b'\n']);
    assert_eq!(decode_entry(&b).unwrap(), c);
}
