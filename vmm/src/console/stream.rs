//! The console's bookkeeping, without sockets: where the printed output
//! stands ([`OutputCursor`]) and which typed input is not yet confirmed
//! ([`InputQueue`]).

use std::collections::VecDeque;
use std::ops::Range;

/// Where a chunk of output goes.
#[derive(Debug, PartialEq, Eq)]
pub struct Placement<'a> {
    /// The bytes to print now (may be empty).
    pub print: &'a [u8],
    /// Bytes of the chunk already printed (dropped).
    pub duplicate: u64,
    /// Offsets that were never received: the chunk starts past the next
    /// expected byte.
    pub gap: Option<Range<u64>>,
}

/// The printed position in the guest's output stream.
#[derive(Debug, Default, Clone)]
pub struct OutputCursor {
    next: Option<u64>,
}

impl OutputCursor {
    /// The offset after the last byte printed; `None` before any chunk.
    pub fn next(&self) -> Option<u64> {
        self.next
    }

    /// Place a chunk (and advance past it): the first chunk ever sets the
    /// base offset; an overlap with what was printed is trimmed; a chunk
    /// starting past the next offset leaves a gap.
    pub fn place<'a>(&mut self, offset: u64, bytes: &'a [u8]) -> Placement<'a> {
        let end = offset + bytes.len() as u64;
        let next = *self.next.get_or_insert(offset);
        if end <= next {
            return Placement {
                print: &[],
                duplicate: bytes.len() as u64,
                gap: None,
            };
        }
        if offset > next {
            self.next = Some(end);
            return Placement {
                print: bytes,
                duplicate: 0,
                gap: Some(next..offset),
            };
        }
        let skip = (next - offset) as usize;
        self.next = Some(end);
        Placement {
            print: &bytes[skip..],
            duplicate: skip as u64,
            gap: None,
        }
    }
}

/// One typed chunk waiting for confirmation.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Pending {
    seq: u64,
    bytes: Vec<u8>,
    /// Sent to some side under this seq.
    sent: bool,
}

/// What adopting a new live side changed.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Adopted {
    /// Bytes dropped because the side already has them.
    pub freed: usize,
    /// Bytes dropped that had been sent under numbers the pair never
    /// used (only after a console restart met a pair further on): lost.
    pub lost: usize,
}

/// Typed input numbered in sequence and kept until the live side
/// confirms that its backup logged it.
///
/// Numbering: seqs start at 1 and are contiguous. Until a live side has
/// been seen, the numbers are provisional: the first live side's
/// `input_resume_seq` renumbers them (a console that restarts meets a
/// pair that already used some numbers).
#[derive(Debug, Clone)]
pub struct InputQueue {
    pending: VecDeque<Pending>,
    next_seq: u64,
    anchored: bool,
    bytes: usize,
}

impl Default for InputQueue {
    fn default() -> Self {
        InputQueue {
            pending: VecDeque::new(),
            next_seq: 1,
            anchored: false,
            bytes: 0,
        }
    }
}

impl InputQueue {
    /// An empty queue; the first seq is 1.
    pub fn new() -> Self {
        Self::default()
    }

    /// Bytes held (unconfirmed).
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Chunks held.
    pub fn len(&self) -> usize {
        self.pending.len()
    }

    /// Nothing held.
    pub fn is_empty(&self) -> bool {
        self.pending.is_empty()
    }

    /// The seq the next typed chunk gets.
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    /// Number a typed chunk and keep it; returns its seq.
    pub fn push(&mut self, bytes: Vec<u8>) -> u64 {
        let seq = self.next_seq;
        self.next_seq += 1;
        self.bytes += bytes.len();
        self.pending.push_back(Pending {
            seq,
            bytes,
            sent: false,
        });
        seq
    }

    /// The live side confirmed every seq up to `upto`: drop them.
    /// Returns the bytes freed.
    pub fn confirm(&mut self, upto: u64) -> usize {
        let mut freed = 0;
        while let Some(p) = self.pending.front() {
            if p.seq > upto {
                break;
            }
            freed += p.bytes.len();
            self.pending.pop_front();
        }
        self.bytes -= freed;
        freed
    }

    /// A new live side expects `resume` next (it has every seq below).
    /// Drops what it has; renumbers provisional input to follow on.
    pub fn adopt(&mut self, resume: u64) -> Adopted {
        let resume = resume.max(1);
        let mut out = Adopted::default();
        if !self.anchored || resume > self.next_seq {
            // Renumber unsent input from `resume`; input sent under
            // numbers below `resume` reached a side that will skip it.
            let mut seq = resume;
            let mut kept = VecDeque::with_capacity(self.pending.len());
            for mut p in self.pending.drain(..) {
                if p.sent && self.anchored {
                    out.lost += p.bytes.len();
                    continue;
                }
                p.seq = seq;
                p.sent = false;
                seq += 1;
                kept.push_back(p);
            }
            self.pending = kept;
            self.next_seq = seq;
            self.anchored = true;
        }
        while let Some(p) = self.pending.front() {
            if p.seq >= resume {
                break;
            }
            out.freed += p.bytes.len();
            self.pending.pop_front();
        }
        self.bytes -= out.freed + out.lost;
        out
    }

    /// Every held chunk from `from` on, marked sent: what a new live side
    /// is sent.
    pub fn send_from(&mut self, from: u64) -> Vec<(u64, Vec<u8>)> {
        self.pending
            .iter_mut()
            .filter(|p| p.seq >= from)
            .map(|p| {
                p.sent = true;
                (p.seq, p.bytes.clone())
            })
            .collect()
    }

    /// The chunk `seq` (just pushed), marked sent.
    pub fn send_one(&mut self, seq: u64) -> Option<(u64, Vec<u8>)> {
        let p = self.pending.iter_mut().rev().find(|p| p.seq == seq)?;
        p.sent = true;
        Some((p.seq, p.bytes.clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_chunk_sets_the_base_and_overlaps_are_trimmed() {
        let mut c = OutputCursor::default();
        assert_eq!(c.next(), None);
        let p = c.place(1000, b"hello");
        assert_eq!((p.print, p.duplicate, p.gap), (&b"hello"[..], 0, None));
        assert_eq!(c.next(), Some(1005));
        let p = c.place(1003, b"lo world");
        assert_eq!((p.print, p.duplicate, p.gap), (&b" world"[..], 2, None));
        let p = c.place(990, b"0123456789hello");
        assert_eq!((p.print, p.duplicate), (&b""[..], 15));
        assert_eq!(c.next(), Some(1011));
    }

    #[test]
    fn a_chunk_past_the_next_offset_is_a_gap_and_printing_goes_on() {
        let mut c = OutputCursor::default();
        c.place(0, b"abc");
        let p = c.place(10, b"xyz");
        assert_eq!(p.gap, Some(3..10));
        assert_eq!(p.print, b"xyz");
        assert_eq!(c.next(), Some(13));
        // Late bytes from inside the gap are old now.
        let p = c.place(5, b"12");
        assert_eq!((p.print, p.duplicate), (&b""[..], 2));
    }

    #[test]
    fn confirmed_input_is_dropped_and_the_rest_resent_from_resume() {
        let mut q = InputQueue::new();
        assert_eq!(q.adopt(1), Adopted::default());
        assert_eq!(q.push(b"ls\r".to_vec()), 1);
        assert_eq!(q.push(b"a".to_vec()), 2);
        assert_eq!(q.push(b"b".to_vec()), 3);
        assert_eq!(q.send_one(3), Some((3, b"b".to_vec())));
        assert_eq!(q.confirm(1), 3);
        assert_eq!(q.bytes(), 2);
        // A new live side that already has seq 2.
        assert_eq!(q.adopt(3), Adopted { freed: 1, lost: 0 });
        assert_eq!(q.send_from(3), vec![(3, b"b".to_vec())]);
        // One that has nothing gets everything still held.
        assert_eq!(q.adopt(1), Adopted::default());
        assert_eq!(q.send_from(1), vec![(3, b"b".to_vec())]);
        assert_eq!(q.push(b"c".to_vec()), 4);
    }

    #[test]
    fn input_typed_before_any_side_follows_the_pairs_numbers() {
        let mut q = InputQueue::new();
        q.push(b"x".to_vec());
        q.push(b"y".to_vec());
        q.push(b"z".to_vec());
        // A restarted console meets a pair that has seen seqs 1..=1.
        assert_eq!(q.adopt(2), Adopted::default());
        assert_eq!(
            q.send_from(2),
            vec![(2, b"x".to_vec()), (3, b"y".to_vec()), (4, b"z".to_vec())]
        );
        assert_eq!(q.next_seq(), 5);
        assert_eq!(q.bytes(), 3);
    }

    #[test]
    fn a_pair_further_on_than_the_console_renumbers_unsent_input() {
        let mut q = InputQueue::new();
        q.adopt(1);
        q.push(b"a".to_vec());
        q.send_from(1);
        q.push(b"b".to_vec());
        // The next live side expects 10: seq 1 was sent to a side that
        // will skip it (lost), "b" was never sent and becomes 10.
        assert_eq!(q.adopt(10), Adopted { freed: 0, lost: 1 });
        assert_eq!(q.send_from(1), vec![(10, b"b".to_vec())]);
        assert_eq!(q.bytes(), 1);
        assert_eq!(q.next_seq(), 11);
    }
}
