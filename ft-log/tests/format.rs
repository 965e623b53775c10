//! Log format: round trips, chunked decoding, and every kind of damage.

use ft_log::entry::*;
use ft_log::format::*;
use proptest::prelude::*;

fn header() -> LogHeader {
    LogHeader {
        kernel: "/cache/vmlinux".into(),
        initrd: Some("/cache/initramfs.cpio".into()),
        mem_mib: 128,
        cmdline: "console=ttyS0".into(),
        config_hash: "ab".repeat(32),
        recorder: "test".into(),
    }
}

fn sample_entries() -> Vec<Entry> {
    vec![
        Entry::Exits {
            first: 1,
            exits: vec![
                ExitRecord {
                    kind: ExitKind::PioOut,
                    addr: 0x3f8,
                    data: b'a' as u64,
                },
                ExitRecord {
                    kind: ExitKind::PioIn,
                    addr: 0x40,
                    data: 1,
                },
                ExitRecord {
                    kind: ExitKind::Hlt,
                    addr: 0,
                    data: 0,
                },
            ],
        },
        Entry::Value {
            pos: 2,
            source: ValueSource::Clock,
            value: 123_456_789,
        },
        Entry::Timer {
            pos: 3,
            now_ns: 10_000_000,
        },
        Entry::ConsoleInput {
            pos: 3,
            bytes: b"ls\n".to_vec(),
        },
        Entry::Interrupt {
            pos: 3,
            vector: 0x30,
            fingerprint: Fingerprint {
                rip: 0xffff_ffff_8100_0000,
                regs: 42,
            },
        },
        Entry::Epoch(Box::new(Epoch {
            pos: 3,
            index: 0,
            vcpu: vec![1, 2, 3],
            pages: vec![Page {
                gfn: 0x1000,
                delta: false,
                data: vec![0xaa; 4096],
            }],
            fingerprint: Fingerprint { rip: 1, regs: 2 },
        })),
        Entry::Check {
            pos: 4,
            fingerprint: Fingerprint::default(),
            memory: Some(7),
        },
        Entry::End {
            pos: 5,
            reason: "halted".into(),
            digest: "00ff".into(),
        },
    ]
}

fn log_bytes() -> (Vec<u8>, Vec<usize>) {
    let mut w = LogWriter::new(Vec::new(), &header()).unwrap();
    let mut bounds = vec![w.bytes() as usize];
    for e in sample_entries() {
        w.append(&e).unwrap();
        bounds.push(w.bytes() as usize);
    }
    (w.into_inner(), bounds)
}

#[test]
fn round_trip() {
    let (bytes, _) = log_bytes();
    let (h, frames) = decode_all(&bytes).unwrap();
    assert_eq!(h, header());
    let entries: Vec<Entry> = frames.iter().map(|f| f.entry.clone()).collect();
    assert_eq!(entries, sample_entries());
    assert!(frames.iter().enumerate().all(|(i, f)| f.seq == i as u64));
}

#[test]
fn large_entries_are_compressed_and_round_trip() {
    let mut page = vec![0u8; 4096];
    page[..11].copy_from_slice(b"kernel text");
    let e = Entry::Epoch(Box::new(Epoch {
        pos: 9,
        index: 1,
        vcpu: vec![7; 3000],
        pages: (0..16)
            .map(|g| Page {
                gfn: g,
                delta: g % 2 == 1,
                data: page.clone(),
            })
            .collect(),
        fingerprint: Fingerprint::default(),
    }));
    let frame = encode_frame(0, &e);
    assert!(
        frame.len() < 16 * 4096 / 4,
        "compressed to {} bytes",
        frame.len()
    );
    assert_ne!(
        u32::from_le_bytes(frame[..4].try_into().unwrap()) & (1 << 31),
        0
    );
    let mut bytes = encode_header(&header());
    bytes.extend_from_slice(&frame);
    let (_, frames) = decode_all(&bytes).unwrap();
    assert_eq!(frames[0].entry, e);
    // Damage inside the compressed payload is caught by the checksum.
    let n = bytes.len();
    bytes[n - 10] ^= 0x20;
    assert!(matches!(decode_all(&bytes), Err(LogError::Checksum { .. })));
}

#[test]
fn chunked_input_of_every_size_decodes_the_same() {
    let (bytes, _) = log_bytes();
    for chunk in [1, 2, 3, 7, 16, 17, 100, 4096] {
        let mut d = Decoder::new();
        let mut got = Vec::new();
        for c in bytes.chunks(chunk) {
            d.push(c);
            while let Some(f) = d.next_frame().unwrap() {
                got.push(f.entry);
            }
        }
        d.finish().unwrap();
        assert_eq!(got, sample_entries(), "chunk size {chunk}");
    }
}

#[test]
fn truncation_at_every_boundary_and_inside_every_frame() {
    let (bytes, bounds) = log_bytes();
    for cut in 0..bytes.len() {
        let mut d = Decoder::new();
        d.push(&bytes[..cut]);
        let mut n = 0;
        loop {
            match d.next_frame() {
                Ok(Some(_)) => n += 1,
                Ok(None) => break,
                Err(e) => panic!("cut {cut}: unexpected {e}"),
            }
        }
        let r = d.finish();
        if bounds.contains(&cut) {
            assert!(r.is_ok(), "cut at frame boundary {cut}: {r:?}");
            assert_eq!(n, bounds.iter().position(|&b| b == cut).unwrap());
        } else {
            match r {
                Err(LogError::Truncated { .. }) => {}
                other => panic!("cut {cut}: expected truncation, got {other:?}"),
            }
        }
    }
}

fn decode_err(bytes: &[u8]) -> LogError {
    decode_all(bytes).expect_err("damage must be detected")
}

#[test]
fn one_bit_flips_are_detected() {
    let (bytes, bounds) = log_bytes();
    let first = bounds[0];
    // Header: magic, version, length, body, checksum.
    for (at, what) in [
        (0, "magic"),
        (8, "version"),
        (10, "length"),
        (20, "body"),
        (first - 1, "crc"),
    ] {
        let mut b = bytes.clone();
        b[at] ^= 0x04;
        let e = decode_err(&b);
        assert!(
            matches!(
                e,
                LogError::BadMagic
                    | LogError::Version { .. }
                    | LogError::Header(_)
                    | LogError::Truncated { .. }
            ),
            "{what}: {e:?}"
        );
    }
    // A frame: length, sequence, checksum, payload.
    let f = bounds[3];
    for (at, what) in [
        (f, "length"),
        (f + 5, "sequence"),
        (f + 13, "checksum"),
        (f + 17, "payload"),
    ] {
        let mut b = bytes.clone();
        b[at] ^= 0x01;
        let e = decode_err(&b);
        assert!(
            matches!(
                e,
                LogError::Checksum { seq: 3, .. }
                    | LogError::FrameTooLarge { .. }
                    | LogError::Truncated { .. }
            ),
            "{what}: {e:?}"
        );
    }
}

#[test]
fn wrong_version_and_foreign_files() {
    let (mut bytes, _) = log_bytes();
    bytes[8] = 9;
    assert_eq!(
        decode_err(&bytes),
        LogError::Version {
            found: 9,
            supported: VERSION
        }
    );
    assert_eq!(
        decode_err(b"\x7fELF\x02\x01\x01\x00........"),
        LogError::BadMagic
    );
    assert!(matches!(
        decode_err(b""),
        LogError::Truncated { offset: 0, .. }
    ));
}

#[test]
fn dropped_or_repeated_frames_break_the_sequence() {
    let (bytes, bounds) = log_bytes();
    // Remove frame 2.
    let mut b = bytes[..bounds[2]].to_vec();
    b.extend_from_slice(&bytes[bounds[3]..]);
    assert!(matches!(
        decode_err(&b),
        LogError::Sequence {
            expected: 2,
            found: 3,
            ..
        }
    ));
    // Repeat frame 1.
    let mut b = bytes[..bounds[2]].to_vec();
    b.extend_from_slice(&bytes[bounds[1]..]);
    assert!(matches!(
        decode_err(&b),
        LogError::Sequence {
            expected: 2,
            found: 1,
            ..
        }
    ));
}

#[test]
fn oversized_length_is_refused() {
    let (mut bytes, bounds) = log_bytes();
    let f = bounds[0];
    bytes[f..f + 4].copy_from_slice(&u32::MAX.to_le_bytes());
    assert!(matches!(
        decode_err(&bytes),
        LogError::FrameTooLarge { seq: 0, .. }
    ));
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    /// Random bytes never panic the decoder.
    #[test]
    fn random_input_never_panics(data in proptest::collection::vec(any::<u8>(), 0..512)) {
        let mut d = Decoder::new();
        d.push(&data);
        while let Ok(Some(_)) = d.next_frame() {}
        let _ = d.finish();
    }

    /// A valid header followed by random bytes never panics either.
    #[test]
    fn random_frames_never_panic(data in proptest::collection::vec(any::<u8>(), 0..1024), chunk in 1usize..64) {
        let mut bytes = encode_header(&header());
        bytes.extend_from_slice(&data);
        let mut d = Decoder::new();
        for c in bytes.chunks(chunk) {
            d.push(c);
            while let Ok(Some(_)) = d.next_frame() {}
        }
        let _ = d.finish();
    }

    /// A valid log with random bit flips is rejected or decodes to
    /// something, but never panics.
    #[test]
    fn bit_flips_never_panic(pos in 0usize..2000, bit in 0u8..8) {
        let (mut bytes, _) = log_bytes();
        let pos = pos % bytes.len();
        bytes[pos] ^= 1 << bit;
        let _ = decode_all(&bytes);
    }
}

/// A log with one uncompressed and one compressed frame, and their offsets.
fn plain_and_compressed() -> (Vec<u8>, u64, u64) {
    let mut w = LogWriter::new(Vec::new(), &header()).unwrap();
    let plain = w.bytes();
    w.append(&Entry::Timer { pos: 1, now_ns: 2 }).unwrap();
    let packed = w.bytes();
    w.append(&Entry::ConsoleInput {
        pos: 2,
        bytes: vec![b'x'; 4000],
    })
    .unwrap();
    (w.into_inner(), plain, packed)
}

#[test]
fn the_compressed_bit_is_covered_by_the_checksum() {
    let (bytes, plain, packed) = plain_and_compressed();
    let len = |b: &[u8], at: u64| u32::from_le_bytes(b[at as usize..][..4].try_into().unwrap());
    assert_eq!(len(&bytes, plain) >> 31, 0, "frame 0 is stored as is");
    assert_eq!(len(&bytes, packed) >> 31, 1, "frame 1 is compressed");
    for (seq, at) in [(0, plain), (1, packed)] {
        let mut b = bytes.clone();
        b[at as usize + 3] ^= 0x80;
        match decode_all(&b) {
            Err(LogError::Checksum { seq: s, offset, .. }) => {
                assert_eq!((s, offset), (seq, at))
            }
            other => panic!("frame {seq}: compressed bit flipped: {other:?}"),
        }
    }
}

/// A frame built by hand as the module doc draws it.
fn raw_frame(len_field: u32, seq: u64, stored: &[u8]) -> Vec<u8> {
    let mut f = len_field.to_le_bytes().to_vec();
    f.extend_from_slice(&seq.to_le_bytes());
    let crc = crc32c::crc32c_append(crc32c::crc32c(&f), stored);
    f.extend_from_slice(&crc.to_le_bytes());
    f.extend_from_slice(stored);
    f
}

#[test]
fn frames_built_from_the_format_picture_decode() {
    let timer = Entry::Timer { pos: 7, now_ns: 9 };
    let console = Entry::ConsoleInput {
        pos: 8,
        bytes: vec![b'y'; 3000],
    };
    let mut bytes = encode_header(&header());
    let p = encode_entry(&timer);
    bytes.extend(raw_frame(p.len() as u32, 0, &p));
    let p = lz4_flex::compress_prepend_size(&encode_entry(&console));
    bytes.extend(raw_frame(p.len() as u32 | 1 << 31, 1, &p));
    // The writer produces exactly these bytes.
    let mut w = LogWriter::new(Vec::new(), &header()).unwrap();
    w.append(&timer).unwrap();
    w.append(&console).unwrap();
    assert_eq!(w.into_inner(), bytes);
    let (_, frames) = decode_all(&bytes).unwrap();
    assert_eq!(frames[0].entry, timer);
    assert_eq!(frames[1].entry, console);
}

#[test]
fn a_compressed_payload_declaring_more_than_max_frame_is_refused() {
    let start = encode_header(&header()).len() as u64;
    for declared in [MAX_FRAME as u32 + 1, u32::MAX] {
        let mut stored = declared.to_le_bytes().to_vec();
        stored.extend_from_slice(&[0x1f, 0, 0, 0, 0]);
        let mut bytes = encode_header(&header());
        bytes.extend(raw_frame(stored.len() as u32 | 1 << 31, 0, &stored));
        match decode_all(&bytes) {
            Err(LogError::Payload {
                seq: 0,
                offset,
                detail,
            }) => {
                assert_eq!(offset, start);
                assert!(detail.contains(&declared.to_string()), "{detail}");
            }
            other => panic!("declared {declared}: {other:?}"),
        }
    }
}
