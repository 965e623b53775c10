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
        next: None,
    };
    let b = encode_entry(&c);
    assert_eq!(b, [3, 9, 3, b'l', b's', b'\n', 0]);
    assert_eq!(decode_entry(&b).unwrap(), c);

    // With the console's input cursor: chunk 300, 2 bytes in.
    let c = Entry::ConsoleInput {
        pos: 9,
        bytes: b"ls\n".to_vec(),
        next: Some(InputCursor { seq: 300, skip: 2 }),
    };
    let b = encode_entry(&c);
    assert_eq!(b, [3, 9, 3, b'l', b's', b'\n', 1, 0xac, 0x02, 2]);
    assert_eq!(decode_entry(&b).unwrap(), c);
}

fn page(gfn: u64) -> Page {
    Page {
        gfn,
        delta: false,
        data: vec![0; 4096],
    }
}

#[test]
fn page_byte_range_inside_memory() {
    assert_eq!(PAGE_SIZE, 4096);
    assert_eq!(page(0).byte_range(4096), Some(0..4096));
    assert_eq!(page(1).byte_range(8192), Some(4096..8192));
    assert_eq!(page(1).byte_range(8191), None, "one byte short");
    assert_eq!(page(2).byte_range(8192), None, "just past the end");
    assert_eq!(page(0).byte_range(0), None, "no memory");
}

#[test]
fn page_byte_range_at_the_u64_edge() {
    // The last whole page below 2^64 ends at 2^64 - 4096.
    let last = u64::MAX / 4096 - 1;
    assert_eq!(
        page(last).byte_range(u64::MAX),
        Some(u64::MAX - 8191..u64::MAX - 4095)
    );
    // Its end is 2^64, which does not fit.
    assert_eq!(page(u64::MAX / 4096).byte_range(u64::MAX), None);
    // gfn * 4096 itself overflows.
    assert_eq!(page(u64::MAX / 4096 + 1).byte_range(u64::MAX), None);
    assert_eq!(page(1 << 52).byte_range(u64::MAX), None);
    assert_eq!(page(u64::MAX).byte_range(u64::MAX), None);
    // Wrapping arithmetic would have made this 0..4096 inside 8 KiB.
    assert_eq!(page(1 << 52).byte_range(8192), None);
}
