//! Which parts of a disk image this side wrote: fixed-size chunks, set by
//! the block device at every write and taken by a state transfer, which
//! copies an image while the guest runs and then sends the chunks written
//! since (as KVM's dirty log does for memory).

use std::fs::File;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// Bytes per chunk.
pub const CHUNK: u64 = 64 << 10;

/// The written chunks of one image.
#[derive(Debug)]
pub struct WrittenChunks {
    bits: Vec<AtomicU64>,
    size: u64,
}

impl WrittenChunks {
    /// Nothing written yet, for an image of `size` bytes.
    pub fn new(size: u64) -> Self {
        let chunks = size.div_ceil(CHUNK);
        WrittenChunks {
            bits: (0..chunks.div_ceil(64))
                .map(|_| AtomicU64::new(0))
                .collect(),
            size,
        }
    }

    /// The image's size.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Chunks in the image (the last one may be short).
    pub fn chunks(&self) -> u64 {
        self.size.div_ceil(CHUNK)
    }

    /// Bytes `offset..offset + len` were written.
    pub fn mark(&self, offset: u64, len: u64) {
        if len == 0 {
            return;
        }
        let first = offset / CHUNK;
        let last = (offset + len - 1) / CHUNK;
        for c in first..=last.min(self.chunks().saturating_sub(1)) {
            self.bits[(c / 64) as usize].fetch_or(1 << (c % 64), Ordering::AcqRel);
        }
    }

    /// The chunks written since the last call, in order; cleared.
    pub fn take(&self) -> Vec<u64> {
        let mut out = Vec::new();
        for (w, word) in self.bits.iter().enumerate() {
            let mut bits = word.swap(0, Ordering::AcqRel);
            while bits != 0 {
                let b = bits.trailing_zeros() as u64;
                bits &= bits - 1;
                out.push(w as u64 * 64 + b);
            }
        }
        out
    }

    /// Where chunk `c` lies: its offset and length.
    pub fn range(&self, c: u64) -> (u64, u64) {
        let at = c * CHUNK;
        (at, CHUNK.min(self.size.saturating_sub(at)))
    }
}

/// A writable image of this side's own, as a state transfer copies it.
#[derive(Debug)]
pub struct OwnImage {
    /// The image, opened for reading (a second handle).
    pub file: File,
    /// What the device wrote.
    pub written: Arc<WrittenChunks>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_mark_every_chunk_they_touch_once() {
        let w = WrittenChunks::new(10 * CHUNK + 100);
        assert_eq!(w.chunks(), 11);
        w.mark(CHUNK - 1, 2);
        w.mark(5 * CHUNK, CHUNK);
        w.mark(10 * CHUNK + 50, 50);
        w.mark(3 * CHUNK, 0);
        assert_eq!(w.take(), vec![0, 1, 5, 10]);
        assert!(w.take().is_empty());
        assert_eq!(w.range(10), (10 * CHUNK, 100));
        assert_eq!(w.range(2), (2 * CHUNK, CHUNK));
    }

    #[test]
    fn many_chunks_span_words() {
        let w = WrittenChunks::new(200 * CHUNK);
        w.mark(63 * CHUNK, 2 * CHUNK);
        w.mark(199 * CHUNK, CHUNK);
        assert_eq!(w.take(), vec![63, 64, 199]);
    }
}
