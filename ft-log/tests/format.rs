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
        snapshot: None,
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
            next: None,
        },
        Entry::Interrupt {
            pos: 3,
            vector: 0x30,
            fingerprint: Fingerprint {
                rip: 0xffff_ffff_8100_0000,
                regs: 42,
            },
        },
        Entry::EpochPages {
            pos: 3,
            index: 0,
            pages: vec![Page {
                gfn: 0xfff,
                delta: true,
                data: vec![0x55; 4096],
            }],
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
    let frame = encode_frame(0, &e).unwrap();
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
        } else if cut < bounds[0] {
            match r {
                Err(LogError::Truncated { offset, .. }) => assert_eq!(offset, cut as u64),
                other => panic!("cut {cut}: expected truncation, got {other:?}"),
            }
        } else {
            let start = bounds[n];
            assert_eq!(
                r,
                Err(LogError::FrameTruncated {
                    seq: n as u64,
                    offset: start as u64,
                    present: (cut - start) as u64,
                }),
                "cut {cut}"
            );
        }
    }
}

fn decode_err(bytes: &[u8]) -> LogError {
    decode_all(bytes).expect_err("damage must be detected")
}

/// Decode `bytes` in chunks of `chunk` bytes: the frames yielded before
/// the first error, and how decoding ended.
fn decode_chunked(bytes: &[u8], chunk: usize) -> (Vec<Frame>, Result<(), LogError>) {
    let mut d = Decoder::new();
    let mut got = Vec::new();
    for c in bytes.chunks(chunk.max(1)) {
        d.push(c);
        loop {
            match d.next_frame() {
                Ok(Some(f)) => got.push(f),
                Ok(None) => break,
                Err(e) => return (got, Err(e)),
            }
        }
    }
    let end = d.finish();
    (got, end)
}

/// The sequence number and offset an error names, if it is about a frame.
fn frame_named(e: &LogError) -> Option<(u64, u64)> {
    match *e {
        LogError::FrameTooLarge { seq, offset, .. }
        | LogError::Checksum { seq, offset, .. }
        | LogError::Payload { seq, offset, .. }
        | LogError::FrameTruncated { seq, offset, .. } => Some((seq, offset)),
        LogError::Sequence {
            expected, offset, ..
        } => Some((expected, offset)),
        _ => None,
    }
}

#[test]
fn every_single_bit_flip_in_every_frame_is_detected_and_named() {
    let (bytes, bounds) = log_bytes();
    let (_, frames) = decode_all(&bytes).unwrap();
    let mut kinds = std::collections::BTreeMap::new();
    for k in 0..frames.len() {
        let (start, end) = (bounds[k], bounds[k + 1]);
        for at in start..end {
            for bit in 0..8 {
                let mut b = bytes.clone();
                b[at] ^= 1 << bit;
                let (got, end) = decode_chunked(&b, 7);
                let e = end.expect_err("a flipped bit must be detected");
                assert_eq!(
                    frame_named(&e),
                    Some((k as u64, start as u64)),
                    "frame {k}, byte {} bit {bit}: {e:?}",
                    at - start
                );
                assert!(
                    matches!(
                        e,
                        LogError::Checksum { .. }
                            | LogError::FrameTooLarge { .. }
                            | LogError::FrameTruncated { .. }
                    ),
                    "frame {k}, byte {} bit {bit}: {e:?}",
                    at - start
                );
                assert_eq!(got, frames[..k], "frames before the damage are intact");
                *kinds
                    .entry(format!("{e:?}").split(' ').next().unwrap().to_string())
                    .or_insert(0) += 1;
            }
        }
    }
    // Length flips of the last frame run past the end of the log, high
    // length bits past the maximum frame size; all else is the checksum.
    assert!(kinds.contains_key("FrameTruncated"), "{kinds:?}");
    assert!(kinds.contains_key("FrameTooLarge"), "{kinds:?}");
    assert!(kinds["Checksum"] > 1000, "{kinds:?}");
}

#[test]
fn every_single_bit_flip_in_the_header_is_detected() {
    let (bytes, bounds) = log_bytes();
    for at in 0..bounds[0] {
        for bit in 0..8 {
            let mut b = bytes.clone();
            b[at] ^= 1 << bit;
            let (got, end) = decode_chunked(&b, 5);
            assert!(got.is_empty());
            let e = end.expect_err("a flipped bit must be detected");
            let expected = match at {
                0..=7 => matches!(e, LogError::BadMagic),
                8..=9 => matches!(e, LogError::Version { .. }),
                _ => matches!(e, LogError::Header(_) | LogError::Truncated { .. }),
            };
            assert!(expected, "header byte {at} bit {bit}: {e:?}");
        }
    }
}

/// Bit 31 of the length field of an uncompressed and of a compressed frame.
#[test]
fn flipping_the_compressed_bit_is_detected() {
    let (bytes, bounds) = log_bytes();
    let (_, frames) = decode_all(&bytes).unwrap();
    let mut seen = [false; 2];
    for (k, f) in frames.iter().enumerate() {
        let at = bounds[k] + 3;
        seen[(bytes[at] >> 7) as usize] = true;
        let mut b = bytes.clone();
        b[at] ^= 0x80;
        assert!(
            matches!(decode_all(&b), Err(LogError::Checksum { seq, offset, .. }) if seq == f.seq && offset == f.offset),
            "frame {k}"
        );
    }
    assert_eq!(seen, [true, true], "the log has both kinds of frames");
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

fn arb_fingerprint() -> impl Strategy<Value = Fingerprint> {
    (any::<u64>(), any::<u64>()).prop_map(|(rip, regs)| Fingerprint { rip, regs })
}

/// A buffer of `len` bytes of `fill` with a few bytes changed: compressible.
fn arb_blob(len: std::ops::Range<usize>) -> impl Strategy<Value = Vec<u8>> {
    (
        len,
        any::<u8>(),
        proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..8),
    )
        .prop_map(|(n, fill, pokes)| {
            let mut v = vec![fill; n];
            if n > 0 {
                for (i, b) in pokes {
                    v[i.index(n)] = b;
                }
            }
            v
        })
}

fn arb_entry() -> impl Strategy<Value = Entry> {
    let exit = (0u8..7, any::<u64>(), any::<u64>()).prop_map(|(k, addr, data)| ExitRecord {
        kind: [
            ExitKind::PioIn,
            ExitKind::PioOut,
            ExitKind::MmioRead,
            ExitKind::MmioWrite,
            ExitKind::Hlt,
            ExitKind::IrqWindow,
            ExitKind::Emulated,
        ][k as usize],
        addr,
        data,
    });
    let page =
        || {
            (any::<u64>(), any::<bool>(), arb_blob(4096..4097))
                .prop_map(|(gfn, delta, data)| Page { gfn, delta, data })
        };
    prop_oneof![
        (any::<u64>(), proptest::collection::vec(exit, 0..40))
            .prop_map(|(first, exits)| Entry::Exits { first, exits }),
        (any::<u64>(), any::<bool>(), any::<u64>()).prop_map(|(pos, wall, value)| {
            Entry::Value {
                pos,
                source: if wall {
                    ValueSource::WallClock
                } else {
                    ValueSource::Clock
                },
                value,
            }
        }),
        (any::<u64>(), any::<u64>()).prop_map(|(pos, now_ns)| Entry::Timer { pos, now_ns }),
        (
            any::<u64>(),
            arb_blob(0..3000),
            proptest::option::of((any::<u64>(), any::<u64>()))
        )
            .prop_map(|(pos, bytes, next)| Entry::ConsoleInput {
                pos,
                bytes,
                next: next.map(|(seq, skip)| InputCursor { seq, skip }),
            }),
        (any::<u64>(), arb_blob(0..1600)).prop_map(|(pos, frame)| Entry::NetRx { pos, frame }),
        any::<u64>().prop_map(|offset| Entry::NetReleased { offset }),
        (any::<u64>(), any::<u8>(), arb_blob(0..4096))
            .prop_map(|(pos, disk, data)| Entry::DiskRead { pos, disk, data }),
        any::<u64>().prop_map(|offset| Entry::DiskReleased { offset }),
        (any::<u64>(), any::<u8>(), arb_fingerprint()).prop_map(|(pos, vector, fingerprint)| {
            Entry::Interrupt {
                pos,
                vector,
                fingerprint,
            }
        }),
        (
            any::<u64>(),
            any::<u64>(),
            arb_blob(0..2000),
            proptest::collection::vec(page(), 0..4),
            arb_fingerprint()
        )
            .prop_map(|(pos, index, vcpu, pages, fingerprint)| {
                Entry::Epoch(Box::new(Epoch {
                    pos,
                    index,
                    vcpu,
                    pages,
                    fingerprint,
                }))
            }),
        (any::<u64>(), arb_fingerprint(), any::<Option<u64>>()).prop_map(
            |(pos, fingerprint, memory)| Entry::Check {
                pos,
                fingerprint,
                memory,
            }
        ),
        (
            any::<u64>(),
            any::<u64>(),
            proptest::collection::vec(page(), 0..3)
        )
            .prop_map(|(pos, index, pages)| Entry::EpochPages { pos, index, pages }),
        (any::<u64>(), ".{0,20}", "[0-9a-f]{0,64}").prop_map(|(pos, reason, digest)| Entry::End {
            pos,
            reason,
            digest
        }),
    ]
}

/// How a valid log is damaged.
#[derive(Debug, Clone)]
enum Mutation {
    /// Flip one bit.
    Flip(prop::sample::Index, u8),
    /// Cut the log.
    Truncate(prop::sample::Index),
    /// Insert bytes.
    Insert(prop::sample::Index, Vec<u8>),
    /// Delete bytes.
    Delete(prop::sample::Index, usize),
    /// Overwrite bytes.
    Overwrite(prop::sample::Index, Vec<u8>),
    /// Set a frame's length field.
    SetLength(prop::sample::Index, u32),
    /// Add to a frame's length field.
    AddLength(prop::sample::Index, i32),
}

fn arb_mutation() -> impl Strategy<Value = Mutation> {
    use prop::sample::Index;
    let bytes = || proptest::collection::vec(any::<u8>(), 1..24);
    prop_oneof![
        (any::<Index>(), 0u8..8).prop_map(|(i, b)| Mutation::Flip(i, b)),
        any::<Index>().prop_map(Mutation::Truncate),
        (any::<Index>(), bytes()).prop_map(|(i, b)| Mutation::Insert(i, b)),
        (any::<Index>(), 1usize..24).prop_map(|(i, n)| Mutation::Delete(i, n)),
        (any::<Index>(), bytes()).prop_map(|(i, b)| Mutation::Overwrite(i, b)),
        (any::<Index>(), any::<u32>()).prop_map(|(i, n)| Mutation::SetLength(i, n)),
        (any::<Index>(), -40i32..40).prop_map(|(i, n)| Mutation::AddLength(i, n)),
    ]
}

/// Apply `m` to `b`; `frames` are the frame offsets of the valid log.
fn mutate(b: &mut Vec<u8>, frames: &[u64], m: &Mutation) {
    let at = |i: &prop::sample::Index, n: usize| if n == 0 { 0 } else { i.index(n) };
    match m {
        Mutation::Flip(i, bit) => {
            if !b.is_empty() {
                let p = at(i, b.len());
                b[p] ^= 1 << bit;
            }
        }
        Mutation::Truncate(i) => b.truncate(at(i, b.len())),
        Mutation::Insert(i, v) => {
            let p = at(i, b.len() + 1);
            b.splice(p..p, v.iter().copied());
        }
        Mutation::Delete(i, n) => {
            let p = at(i, b.len());
            let e = (p + n).min(b.len());
            b.drain(p..e);
        }
        Mutation::Overwrite(i, v) => {
            let p = at(i, b.len());
            for (k, x) in v.iter().enumerate() {
                if let Some(y) = b.get_mut(p + k) {
                    *y = *x;
                }
            }
        }
        Mutation::SetLength(i, _) | Mutation::AddLength(i, _) => {
            let p = frames[at(i, frames.len())] as usize;
            if let Some(field) = b.get_mut(p..p + 4) {
                let old = u32::from_le_bytes(field.try_into().unwrap());
                let new = match m {
                    Mutation::SetLength(_, n) => *n,
                    Mutation::AddLength(_, d) => old.wrapping_add(*d as u32),
                    _ => unreachable!(),
                };
                field.copy_from_slice(&new.to_le_bytes());
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    /// Random bytes never panic the decoder (and never make a log).
    #[test]
    fn random_input_never_panics(data in proptest::collection::vec(any::<u8>(), 0..512)) {
        let (got, end) = decode_chunked(&data, 64);
        prop_assert!(got.is_empty());
        prop_assert!(end.is_err());
    }

    /// A valid header followed by random bytes never panics and never
    /// yields a frame.
    #[test]
    fn random_frames_never_panic(data in proptest::collection::vec(any::<u8>(), 0..1024), chunk in 1usize..64) {
        let mut bytes = encode_header(&header());
        bytes.extend_from_slice(&data);
        let (got, end) = decode_chunked(&bytes, chunk);
        prop_assert!(got.is_empty(), "{got:?}");
        prop_assert_eq!(end.is_ok(), data.is_empty());
    }

    /// Damage to a valid log never panics the decoder and never yields a
    /// frame that differs from the one written: the frames before the
    /// damage come out intact, then an error names the damaged frame (or
    /// the header); a log accepted whole is a prefix of the valid one,
    /// cut at a frame boundary.
    #[test]
    fn damaged_logs_yield_only_frames_as_written(
        entries in proptest::collection::vec(arb_entry(), 1..8),
        mutations in proptest::collection::vec(arb_mutation(), 1..4),
        chunk in prop_oneof![1usize..32, Just(1 << 20)],
    ) {
        let mut w = LogWriter::new(Vec::new(), &header()).unwrap();
        let mut bounds = vec![w.bytes() as usize];
        for e in &entries {
            w.append(e).unwrap();
            bounds.push(w.bytes() as usize);
        }
        let valid = w.into_inner();
        let (_, frames) = decode_all(&valid).unwrap();
        let offsets: Vec<u64> = frames.iter().map(|f| f.offset).collect();
        let mut b = valid.clone();
        for m in &mutations {
            mutate(&mut b, &offsets, m);
        }
        let (got, end) = decode_chunked(&b, chunk);
        prop_assert!(got.len() <= frames.len());
        prop_assert_eq!(&got[..], &frames[..got.len()]);
        match end {
            Ok(()) => prop_assert_eq!(&b[..], &valid[..bounds[got.len()]]),
            Err(e) => match frame_named(&e) {
                Some(named) => prop_assert_eq!(
                    named,
                    (got.len() as u64, bounds[got.len()] as u64),
                    "{:?}", e
                ),
                None => prop_assert!(got.is_empty(), "{:?}", e),
            },
        }
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
        next: None,
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
        next: None,
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

#[test]
fn the_writer_refuses_an_entry_over_max_frame() {
    let mut w = LogWriter::new(Vec::new(), &header()).unwrap();
    assert_eq!(w.max_frame(), MAX_FRAME);
    let head = w.bytes();
    // Zeros compress to almost nothing: the decompressed size is what is over.
    let big = Entry::ConsoleInput {
        pos: 1,
        bytes: vec![0; MAX_FRAME],
        next: None,
    };
    match w.append(&big) {
        Err(WriteError::Log(LogError::EntryTooLarge {
            seq: 0,
            kind: "console-input",
            size,
            max,
        })) => {
            assert_eq!(size, MAX_FRAME as u64 + 1 + 1 + 5 + 1);
            assert_eq!(max, MAX_FRAME as u64);
        }
        other => panic!("wrote {other:?}"),
    }
    drop(big);
    // Nothing was written: the log goes on with frame 0 and stays valid.
    assert_eq!((w.bytes(), w.frames()), (head, 0));
    let small = Entry::Timer { pos: 1, now_ns: 2 };
    assert_eq!(w.append(&small).unwrap().0, 0);
    let (_, frames) = decode_all(&w.into_inner()).unwrap();
    assert_eq!(frames.len(), 1);
    assert_eq!(frames[0].entry, small);
}

/// A console entry whose payload is exactly `size` bytes (size >= 132).
fn console_of(size: usize, compressible: bool) -> Entry {
    let n = size - 1 - 1 - 2 - 1; // variant, pos, two-byte length, no cursor
    let bytes = if compressible {
        vec![b'z'; n]
    } else {
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x >> 32) as u8
            })
            .collect()
    };
    let e = Entry::ConsoleInput {
        pos: 1,
        bytes,
        next: None,
    };
    assert_eq!(encode_entry(&e).len(), size);
    e
}

#[test]
fn a_smaller_frame_limit_bounds_stored_and_decompressed_sizes() {
    let limit = 4096;
    for compressible in [false, true] {
        let mut w = LogWriter::new(Vec::new(), &header())
            .unwrap()
            .with_max_frame(limit);
        let head = w.bytes();
        for size in [limit + 1, 3 * limit] {
            match w.append(&console_of(size, compressible)) {
                Err(WriteError::Log(LogError::EntryTooLarge {
                    seq: 0,
                    size: s,
                    max,
                    ..
                })) => {
                    assert_eq!((s, max), (size as u64, limit as u64))
                }
                other => panic!("size {size} compressible {compressible}: {other:?}"),
            }
            assert_eq!(w.bytes(), head, "nothing written");
        }
        let fits = console_of(limit, compressible);
        let (_, n) = w.append(&fits).unwrap();
        let stored = n - 16;
        if compressible {
            assert!(stored < limit / 4, "stored {stored}");
        } else {
            assert_eq!(stored, limit);
        }
        let bytes = w.into_inner();
        // A decoder with the same limit takes it, one with less refuses it.
        let mut d = Decoder::new().with_max_frame(limit);
        d.push(&bytes);
        assert_eq!(d.next_frame().unwrap().unwrap().entry, fits);
        d.finish().unwrap();
        let mut d = Decoder::new().with_max_frame(limit - 1);
        d.push(&bytes);
        let e = d.next_frame().unwrap_err();
        if compressible {
            assert!(
                matches!(&e, LogError::Payload { seq: 0, detail, .. } if detail.contains("4096 bytes decompressed")),
                "{e:?}"
            );
        } else {
            assert_eq!(
                e,
                LogError::FrameTooLarge {
                    seq: 0,
                    offset: head,
                    len: limit as u64,
                    max: limit as u64 - 1
                }
            );
        }
    }
}

#[test]
fn frame_limits_never_exceed_max_frame() {
    let w = LogWriter::new(Vec::new(), &header()).unwrap();
    assert_eq!(w.with_max_frame(usize::MAX).max_frame(), MAX_FRAME);
    // MAX_FRAME leaves bit 31 of the length field to the compressed flag.
    const { assert!(MAX_FRAME < 1 << 31) };
}

#[test]
fn the_writer_refuses_a_header_the_decoder_would_refuse() {
    let mut h = header();
    h.cmdline = "x".repeat(MAX_HEADER);
    let mut out = Vec::new();
    let e = LogWriter::new(&mut out, &h).err().expect("refused");
    assert_eq!(e.kind(), std::io::ErrorKind::InvalidInput);
    let inner = e.get_ref().and_then(|i| i.downcast_ref::<LogError>());
    assert!(matches!(inner, Some(LogError::Header(_))), "{e:?}");
    assert!(out.is_empty());
    // Just under the limit is written and read back.
    let over = encode_header(&h).len() - 18 - MAX_HEADER;
    h.cmdline.truncate(MAX_HEADER - over);
    let bytes = LogWriter::new(Vec::new(), &h).unwrap().into_inner();
    assert_eq!(decode_all(&bytes).unwrap().0, h);
}
