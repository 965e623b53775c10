//! Large epochs split into frames under the writer's limit, and put back
//! together by the reader.

use ft_log::entry::*;
use ft_log::format::*;
use proptest::prelude::*;

fn header() -> LogHeader {
    LogHeader {
        kernel: "/k".into(),
        initrd: None,
        mem_mib: 64,
        cmdline: "console=ttyS0".into(),
        config_hash: "cd".repeat(32),
        recorder: "test".into(),
        snapshot: None,
    }
}

/// `n` pseudo-random bytes (incompressible) from `seed`.
fn noise(n: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 32) as u8
        })
        .collect()
}

fn epoch(pages: usize, vcpu: usize) -> Epoch {
    Epoch {
        pos: 77,
        index: 5,
        vcpu: noise(vcpu, 99),
        pages: (0..pages as u64)
            .map(|g| Page {
                gfn: g * 3,
                delta: g % 3 == 0,
                data: if g % 2 == 0 {
                    noise(4096, g)
                } else {
                    vec![g as u8; 4096]
                },
            })
            .collect(),
        fingerprint: Fingerprint { rip: 1, regs: 2 },
    }
}

/// Check a log of split epochs: every frame's stored and decompressed
/// payload within `max`, only parts before each epoch, and the epochs as
/// the assembler rebuilds them.
fn read_back(bytes: &[u8], max: usize) -> (Vec<Frame>, Vec<Entry>) {
    let mut d = Decoder::new().with_max_frame(max);
    d.push(bytes);
    let mut frames = Vec::new();
    while let Some(f) = d.next_frame().unwrap() {
        frames.push(f);
    }
    d.finish().unwrap();
    let mut a = EpochAssembler::new();
    let mut out = Vec::new();
    for (i, f) in frames.iter().enumerate() {
        let end = frames.get(i + 1).map_or(bytes.len() as u64, |n| n.offset);
        let stored = (end - f.offset - 16) as usize;
        let encoded = encode_entry(&f.entry).len();
        assert!(stored <= max, "frame {}: stored {stored} > {max}", f.seq);
        assert!(encoded <= max, "frame {}: payload {encoded} > {max}", f.seq);
        if let Some(e) = a.push(f.entry.clone()).unwrap() {
            out.push(e);
        }
    }
    a.finish().unwrap();
    (frames, out)
}

#[test]
fn an_epoch_over_a_small_limit_is_split_into_frames_under_it_and_reassembles_identically() {
    let max = 16 << 10;
    let e = epoch(40, 3000);
    let mut w = LogWriter::new(Vec::new(), &header())
        .unwrap()
        .with_max_frame(max);
    w.append(&Entry::Timer { pos: 1, now_ns: 2 }).unwrap();
    let before = w.bytes();
    let (seqs, n) = w.write_epoch(e.clone()).unwrap();
    w.append(&Entry::Timer { pos: 78, now_ns: 3 }).unwrap();
    assert_eq!(n as u64, w.bytes() - 16 - 3 - before);
    // A page costs 4101 bytes encoded: three fit a 16 KiB part, and three
    // the final epoch next to its 3000-byte vCPU state. 40 pages: 12 full
    // parts, one with the single page left, the epoch.
    assert_eq!(seqs, 1..15);
    let (frames, entries) = read_back(&w.into_inner(), max);
    assert_eq!(frames.len(), 16);
    for f in &frames[1..14] {
        assert!(
            matches!(
                &f.entry,
                Entry::EpochPages {
                    pos: 77,
                    index: 5,
                    ..
                }
            ),
            "{}",
            f.entry.kind()
        );
    }
    match &frames[14].entry {
        Entry::Epoch(last) => assert_eq!(last.pages.len(), 3),
        other => panic!("{}", other.kind()),
    }
    assert_eq!(
        entries,
        vec![
            Entry::Timer { pos: 1, now_ns: 2 },
            Entry::Epoch(Box::new(e)),
            Entry::Timer { pos: 78, now_ns: 3 },
        ]
    );
}

#[test]
fn an_epoch_that_fits_is_one_frame_as_append_writes_it() {
    let e = epoch(3, 500);
    let mut a = LogWriter::new(Vec::new(), &header()).unwrap();
    a.append(&Entry::Epoch(Box::new(e.clone()))).unwrap();
    let mut b = LogWriter::new(Vec::new(), &header())
        .unwrap()
        .with_max_frame(20_000);
    assert_eq!(b.write_epoch(e.clone()).unwrap().0, 0..1);
    assert_eq!(a.into_inner(), b.into_inner());
}

#[test]
fn an_epoch_over_max_frame_is_split_with_the_default_limit() {
    // 257 MiB of pages: one frame would be over MAX_FRAME decompressed.
    let pages = (MAX_FRAME >> 12) + 256;
    let e = Epoch {
        pos: 1,
        index: 0,
        vcpu: vec![1; 100],
        pages: (0..pages as u64)
            .map(|gfn| Page {
                gfn,
                delta: false,
                data: vec![0; 4096],
            })
            .collect(),
        fingerprint: Fingerprint::default(),
    };
    let mut w = LogWriter::new(Vec::new(), &header()).unwrap();
    match w.append(&Entry::Epoch(Box::new(e.clone()))) {
        Err(WriteError::Log(LogError::EntryTooLarge { kind: "epoch", .. })) => {}
        other => panic!("{other:?}"),
    }
    assert_eq!(w.write_epoch(e.clone()).unwrap().0, 0..2);
    let bytes = w.into_inner();
    let (_, entries) = read_back(&bytes, MAX_FRAME);
    drop(bytes);
    assert_eq!(entries.len(), 1);
    assert!(entries[0] == Entry::Epoch(Box::new(e)));
}

#[test]
fn an_epoch_that_cannot_be_split_is_refused_and_nothing_written() {
    let max = 4096;
    // The vCPU state alone is over the limit.
    let mut w = LogWriter::new(Vec::new(), &header())
        .unwrap()
        .with_max_frame(max);
    let head = w.bytes();
    match w.write_epoch(epoch(0, 5000)) {
        Err(WriteError::Log(LogError::EntryTooLarge {
            seq: 0,
            kind: "epoch",
            size,
            max: m,
        })) => assert!(size > 5000 && m == max as u64, "{size}"),
        other => panic!("{other:?}"),
    }
    // One page does not fit a part: 4096 data bytes plus its header.
    match w.write_epoch(epoch(5, 100)) {
        Err(WriteError::Log(LogError::EntryTooLarge {
            kind: "epoch-pages",
            size,
            ..
        })) => assert!(size > 4096, "{size}"),
        other => panic!("{other:?}"),
    }
    assert_eq!((w.bytes(), w.frames()), (head, 0));
    // The writer goes on.
    w.write_epoch(epoch(0, 100)).unwrap();
    let (_, entries) = read_back(&w.into_inner(), max);
    assert_eq!(entries, [Entry::Epoch(Box::new(epoch(0, 100)))]);
}

fn part(pos: u64, index: u64, gfn: u64) -> Entry {
    Entry::EpochPages {
        pos,
        index,
        pages: vec![Page {
            gfn,
            delta: false,
            data: vec![gfn as u8; 8],
        }],
    }
}

fn small_epoch(pos: u64, index: u64, gfns: &[u64]) -> Epoch {
    Epoch {
        pos,
        index,
        vcpu: vec![9],
        pages: gfns
            .iter()
            .map(|&gfn| Page {
                gfn,
                delta: false,
                data: vec![gfn as u8; 8],
            })
            .collect(),
        fingerprint: Fingerprint::default(),
    }
}

#[test]
fn the_assembler_passes_entries_through_and_joins_parts_in_order() {
    let mut a = EpochAssembler::new();
    let timer = Entry::Timer { pos: 3, now_ns: 4 };
    assert_eq!(a.push(timer.clone()).unwrap(), Some(timer));
    let whole = Entry::Epoch(Box::new(small_epoch(3, 0, &[1, 2])));
    assert_eq!(a.push(whole.clone()).unwrap(), Some(whole));
    assert_eq!(a.push(part(9, 1, 5)).unwrap(), None);
    assert!(a.is_pending());
    assert_eq!(a.push(part(9, 1, 6)).unwrap(), None);
    let last = Entry::Epoch(Box::new(small_epoch(9, 1, &[7])));
    assert_eq!(
        a.push(last).unwrap(),
        Some(Entry::Epoch(Box::new(small_epoch(9, 1, &[5, 6, 7]))))
    );
    assert!(!a.is_pending());
    a.finish().unwrap();
}

#[test]
fn the_assembler_refuses_parts_of_another_epoch() {
    for (pos, index) in [(10, 1), (9, 2)] {
        // A part naming another epoch.
        let mut a = EpochAssembler::new();
        a.push(part(9, 1, 5)).unwrap();
        assert_eq!(
            a.push(part(pos, index, 6)),
            Err(LogError::EpochMismatch {
                pos: 9,
                index: 1,
                found_pos: pos,
                found_index: index
            })
        );
        assert!(!a.is_pending());
        // The final epoch naming another epoch.
        let mut a = EpochAssembler::new();
        a.push(part(9, 1, 5)).unwrap();
        let e = Entry::Epoch(Box::new(small_epoch(pos, index, &[7])));
        assert_eq!(
            a.push(e),
            Err(LogError::EpochMismatch {
                pos: 9,
                index: 1,
                found_pos: pos,
                found_index: index
            })
        );
        assert!(!a.is_pending());
    }
}

#[test]
fn the_assembler_refuses_parts_without_their_epoch() {
    let mut a = EpochAssembler::new();
    a.push(part(9, 1, 5)).unwrap();
    a.push(part(9, 1, 6)).unwrap();
    let e = a.push(Entry::Timer { pos: 9, now_ns: 1 }).unwrap_err();
    assert_eq!(
        e,
        LogError::EpochIncomplete {
            pos: 9,
            index: 1,
            parts: 2,
            found: "a timer entry".into()
        }
    );
    assert!(e.to_string().contains("epoch 1 after exit 9"), "{e}");
    let mut a = EpochAssembler::new();
    a.push(part(9, 1, 5)).unwrap();
    assert_eq!(
        a.finish(),
        Err(LogError::EpochIncomplete {
            pos: 9,
            index: 1,
            parts: 1,
            found: "the end of the log".into()
        })
    );
    a.finish().unwrap();
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    /// Any epoch under any limit is written as frames within the limit that
    /// put back together give the epoch, or refused with nothing written
    /// exactly when its vCPU state or one of its pages cannot fit a frame.
    #[test]
    fn split_epochs_stay_within_any_limit(
        pages in proptest::collection::vec(
            (any::<u64>(), any::<bool>(), 0usize..700, any::<bool>(), any::<u64>()),
            0..40,
        ),
        vcpu in 0usize..400,
        max in 20usize..6000,
    ) {
        let e = Epoch {
            pos: 12,
            index: 3,
            vcpu: noise(vcpu, 5),
            pages: pages
                .iter()
                .map(|&(gfn, delta, n, flat, seed)| Page {
                    gfn,
                    delta,
                    data: if flat { vec![seed as u8; n] } else { noise(n, seed) },
                })
                .collect(),
            fingerprint: Fingerprint { rip: 8, regs: 9 },
        };
        let head_fits = encode_entry(&Entry::Epoch(Box::new(Epoch { pages: vec![], ..e.clone() }))).len() <= max;
        let pages_fit = e.pages.iter().all(|p| {
            encode_entry(&Entry::EpochPages { pos: 12, index: 3, pages: vec![p.clone()] }).len() <= max
        });
        let mut w = LogWriter::new(Vec::new(), &header()).unwrap().with_max_frame(max);
        let head = w.bytes();
        match w.write_epoch(e.clone()) {
            Ok((seqs, n)) => {
                prop_assert!(head_fits && pages_fit);
                prop_assert_eq!(n as u64, w.bytes() - head);
                let (frames, entries) = read_back(&w.into_inner(), max);
                prop_assert_eq!(seqs.end, frames.len() as u64);
                prop_assert_eq!(entries, vec![Entry::Epoch(Box::new(e))]);
            }
            Err(WriteError::Log(LogError::EntryTooLarge { .. })) => {
                prop_assert!(!(head_fits && pages_fit));
                prop_assert_eq!((w.bytes(), w.frames()), (head, 0));
            }
            Err(other) => prop_assert!(false, "{other}"),
        }
    }
}
