//! Re-protection's state transfer: the bytes a running primary sends a
//! joining backup on the new logging link before the log, and how the
//! backup reads them. Memory goes first, in pre-copy rounds while the
//! guest runs ([`super::precopy`] decides how many); then the pages
//! written since, the vCPU and the devices, taken in one short pause.
//!
//! ```text
//! primary (the transfer thread)                          backup (cmd/pair join)
//! opening  "VMFT-XFR" | version u32 | generation u64 |
//!          memory bytes u64 | CRC32C of the above u32 ─────▶ read_opening: magic, version,
//!                                                              CRC, memory bound
//! round 0: every non-zero page; round n: the pages written
//!          during round n-1 (KVM's dirty log and the monitor's
//!          own writes); the last round: those written during
//!          the one before, copied in the pause:
//!   batch  b'P' | round u32 | count u32 | CRC32C u32 |
//!          count × page number u64 | count × 4096 bytes ────▶ into the memory image (progress)
//! final    b'F' | console u64 | frames u64 | disk u64 |
//!          state length u64 | CRC32C of the above u32 |
//!          state (a snapshot body up to its memory section)
//!          | CRC32C of the state u32 ──────────────────────▶ snapshot = state ‖ memory image
//! then the log that waited, and the log as it grows ───────▶ ReplayDoor on the same reader
//! ```
//!
//! The offsets in the final record are where the new backup's copies of
//! the output streams begin (console bytes, transmitted-frame records,
//! shared-disk write records): the primary's stream positions at the
//! instant of the pause. A batch's CRC covers its page numbers and pages.
//! The log that follows is an ordinary log whose header carries
//! [`crate::record::config_hash_of_state`] of the final state, so the
//! backup checks it as usual; the memory is checked by the batches' CRCs
//! and, once the backup replays, by the log's memory digests. All
//! integers little-endian.

use std::io::{self, Read, Write};
use std::time::{Duration, Instant};

use thiserror::Error;

use crate::memory::{encode_memory, PAGE};
use crate::snapshot::Encoder;

/// The transfer's magic.
pub const MAGIC: &[u8; 8] = b"VMFT-XFR";
/// The transfer layout's version (2: memory in pre-copy rounds).
pub const VERSION: u32 = 2;
/// Bytes of the opening.
pub const OPENING_LEN: usize = 8 + 4 + 8 + 8 + 4;
/// Largest guest memory accepted.
pub const MAX_MEMORY: u64 = 64 << 30;
/// Largest final state (vCPU and devices) accepted.
pub const MAX_STATE: u64 = 1 << 30;
/// Pages per batch: the unit of progress and of the rate limit.
pub const BATCH_PAGES: usize = 256;
/// Bytes of a batch before its page numbers.
const BATCH_HEAD: usize = 1 + 4 + 4 + 4;
/// Bytes of the final record around its state.
const FINAL_HEAD: usize = 1 + 8 * 4 + 4;
const TAG_PAGES: u8 = b'P';
const TAG_FINAL: u8 = b'F';

/// Where the new backup's copies of the output streams begin.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct StreamOffsets {
    /// Console output offset at the state.
    pub console: u64,
    /// Transmitted-frame stream offset at the state.
    pub frames: u64,
    /// Shared-disk write stream offset at the state.
    pub disk: u64,
}

/// A transfer that cannot be read.
#[derive(Debug, Error)]
pub enum TransferError {
    /// The link ended or failed.
    #[error("the state transfer broke off after {got} bytes: {source}")]
    Io {
        /// Bytes read.
        got: u64,
        /// Why.
        source: io::Error,
    },
    /// Not a transfer, another version, or damaged bytes.
    #[error("not a valid vmft state transfer (at byte {at}): {what}")]
    Invalid {
        /// Offset of the damaged record.
        at: u64,
        /// What is wrong.
        what: String,
    },
}

/// The opening's bytes.
fn encode_opening(generation: u64, memory: u64) -> [u8; OPENING_LEN] {
    let mut b = [0u8; OPENING_LEN];
    b[..8].copy_from_slice(MAGIC);
    b[8..12].copy_from_slice(&VERSION.to_le_bytes());
    b[12..20].copy_from_slice(&generation.to_le_bytes());
    b[20..28].copy_from_slice(&memory.to_le_bytes());
    let crc = crc32c::crc32c(&b[..OPENING_LEN - 4]);
    b[OPENING_LEN - 4..].copy_from_slice(&crc.to_le_bytes());
    b
}

/// Parse an opening: (generation, memory bytes).
fn decode_opening(b: &[u8; OPENING_LEN]) -> Result<(u64, u64), TransferError> {
    let bad = |what: String| TransferError::Invalid { at: 0, what };
    if &b[..8] != MAGIC {
        return Err(bad(format!(
            "magic {:?}, expected {:?}",
            String::from_utf8_lossy(&b[..8]),
            String::from_utf8_lossy(MAGIC)
        )));
    }
    let version = u32::from_le_bytes(b[8..12].try_into().expect("4 bytes"));
    if version != VERSION {
        return Err(bad(format!("version {version}, this vmft reads {VERSION}")));
    }
    let crc = u32::from_le_bytes(b[OPENING_LEN - 4..].try_into().expect("4 bytes"));
    if crc != crc32c::crc32c(&b[..OPENING_LEN - 4]) {
        return Err(bad("the opening's checksum is wrong".into()));
    }
    let generation = u64::from_le_bytes(b[12..20].try_into().expect("8 bytes"));
    let memory = u64::from_le_bytes(b[20..28].try_into().expect("8 bytes"));
    if memory > MAX_MEMORY || memory % PAGE as u64 != 0 {
        return Err(bad(format!(
            "{memory} bytes of memory (whole pages, at most {MAX_MEMORY})"
        )));
    }
    Ok((generation, memory))
}

/// Bytes on the link for `pages` pages sent in full batches.
pub fn pages_len(pages: usize) -> u64 {
    let batches = pages.div_ceil(BATCH_PAGES);
    (batches * BATCH_HEAD + pages * (8 + PAGE)) as u64
}

/// Bytes on the link for the pause's part: its `pages` and a final
/// record with `state_len` bytes of state.
pub fn final_len(pages: usize, state_len: usize) -> u64 {
    pages_len(pages) + (FINAL_HEAD + state_len + 4) as u64
}

/// The sending end: writes the records in order, counts the bytes, and
/// keeps to a rate.
pub struct Sender<'a> {
    w: &'a mut dyn Write,
    sent: u64,
    rate: Option<u64>,
    t0: Instant,
}

impl<'a> Sender<'a> {
    /// Write the opening for `memory` bytes of guest memory, then send at
    /// most `rate` bytes per second if given.
    pub fn open(
        w: &'a mut dyn Write,
        generation: u64,
        memory: u64,
        rate: Option<u64>,
    ) -> io::Result<Self> {
        w.write_all(&encode_opening(generation, memory))?;
        Ok(Sender {
            w,
            sent: OPENING_LEN as u64,
            rate: rate.filter(|r| *r > 0),
            t0: Instant::now(),
        })
    }

    /// Bytes written so far.
    pub fn sent(&self) -> u64 {
        self.sent
    }

    fn write(&mut self, b: &[u8]) -> io::Result<()> {
        self.w.write_all(b)?;
        self.sent += b.len() as u64;
        Ok(())
    }

    fn pace(&self) {
        if let Some(rate) = self.rate {
            let due = Duration::from_secs_f64(self.sent as f64 / rate as f64);
            if let Some(wait) = due.checked_sub(self.t0.elapsed()) {
                std::thread::sleep(wait);
            }
        }
    }

    /// Send round `round`'s pages: `read(page, buf)` fills a page's 4096
    /// bytes. With `skip_zero`, pages that read as zeros are left out (the
    /// backup's memory starts zeroed: round 0 only). `progress` gets the
    /// bytes sent after each batch. Returns the pages sent.
    pub fn pages(
        &mut self,
        round: u32,
        pages: &[u64],
        skip_zero: bool,
        read: &mut dyn FnMut(u64, &mut [u8]) -> io::Result<()>,
        progress: &mut dyn FnMut(u64),
    ) -> io::Result<u64> {
        let mut numbers: Vec<u64> = Vec::with_capacity(BATCH_PAGES);
        let mut data = vec![0u8; BATCH_PAGES * PAGE];
        let mut count = 0u64;
        let mut rest = pages.iter().peekable();
        while rest.peek().is_some() {
            numbers.clear();
            while numbers.len() < BATCH_PAGES {
                let Some(&page) = rest.next() else { break };
                let k = numbers.len();
                let buf = &mut data[k * PAGE..(k + 1) * PAGE];
                read(page, buf)?;
                if skip_zero && buf.iter().all(|&b| b == 0) {
                    continue;
                }
                numbers.push(page);
            }
            if numbers.is_empty() {
                break;
            }
            self.batch(round, &numbers, &data[..numbers.len() * PAGE])?;
            count += numbers.len() as u64;
            progress(self.sent);
            self.pace();
        }
        Ok(count)
    }

    fn batch(&mut self, round: u32, numbers: &[u64], data: &[u8]) -> io::Result<()> {
        let mut head = [0u8; BATCH_HEAD];
        head[0] = TAG_PAGES;
        head[1..5].copy_from_slice(&round.to_le_bytes());
        head[5..9].copy_from_slice(&(numbers.len() as u32).to_le_bytes());
        let mut index = Vec::with_capacity(numbers.len() * 8);
        for n in numbers {
            index.extend_from_slice(&n.to_le_bytes());
        }
        let crc = crc32c::crc32c_append(crc32c::crc32c(&index), data);
        head[9..13].copy_from_slice(&crc.to_le_bytes());
        self.write(&head)?;
        self.write(&index)?;
        self.write(data)
    }

    /// Send the pause's part: the pages copied in it (`data` holds them in
    /// the order of `pages`), then the final record. Nothing is left out.
    pub fn finish(
        &mut self,
        round: u32,
        pages: &[u64],
        data: &[u8],
        offsets: &StreamOffsets,
        state: &[u8],
    ) -> io::Result<()> {
        assert_eq!(data.len(), pages.len() * PAGE, "a page's bytes per page");
        for (numbers, data) in pages
            .chunks(BATCH_PAGES)
            .zip(data.chunks(BATCH_PAGES * PAGE))
        {
            self.batch(round, numbers, data)?;
            self.pace();
        }
        let mut head = [0u8; FINAL_HEAD];
        head[0] = TAG_FINAL;
        for (i, v) in [
            offsets.console,
            offsets.frames,
            offsets.disk,
            state.len() as u64,
        ]
        .iter()
        .enumerate()
        {
            head[1 + 8 * i..9 + 8 * i].copy_from_slice(&v.to_le_bytes());
        }
        let crc = crc32c::crc32c(&head[..FINAL_HEAD - 4]);
        head[FINAL_HEAD - 4..].copy_from_slice(&crc.to_le_bytes());
        self.write(&head)?;
        self.write(state)?;
        self.write(&crc32c::crc32c(state).to_le_bytes())?;
        self.w.flush()
    }
}

/// A transfer as the backup received it.
#[derive(Debug)]
pub struct Received {
    /// The generation of the pair it forms.
    pub generation: u64,
    /// Where the output streams begin.
    pub offsets: StreamOffsets,
    /// The state up to its memory (what the log header's hash covers).
    pub state: Vec<u8>,
    /// A snapshot file's bytes of the whole state, memory included.
    pub snapshot: Vec<u8>,
    /// Copy rounds, the pause's included.
    pub rounds: u32,
    /// Pages received, counting a page once per round that sent it.
    pub pages: u64,
    /// Bytes of the transfer.
    pub bytes: u64,
}

/// How far a transfer being received is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Progress {
    /// The round of the last batch.
    pub round: u32,
    /// Bytes received.
    pub bytes: u64,
    /// Guest memory bytes (every round may send part of them).
    pub memory: u64,
}

/// Reads exactly, counting the bytes for errors.
struct Counted<'a> {
    r: &'a mut dyn Read,
    got: u64,
}

impl Counted<'_> {
    fn exact(&mut self, buf: &mut [u8]) -> Result<(), TransferError> {
        self.r.read_exact(buf).map_err(|source| TransferError::Io {
            got: self.got,
            source,
        })?;
        self.got += buf.len() as u64;
        Ok(())
    }

    fn invalid(&self, at: u64, what: impl Into<String>) -> TransferError {
        TransferError::Invalid {
            at,
            what: what.into(),
        }
    }
}

/// Read a transfer from `r`, calling `progress` after each batch; `r` is
/// left at the log that follows.
pub fn receive(
    r: &mut dyn Read,
    progress: &mut dyn FnMut(&Progress),
) -> Result<Received, TransferError> {
    let mut r = Counted { r, got: 0 };
    let mut b = [0u8; OPENING_LEN];
    r.exact(&mut b)?;
    let (generation, memory) = decode_opening(&b)?;
    // The image grows page by page as the kernel maps it: a zeroed
    // allocation costs nothing until written.
    let mut image = vec![0u8; memory as usize];
    let pages_in = memory / PAGE as u64;
    let mut rounds = 0u32;
    let mut pages = 0u64;
    loop {
        let at = r.got;
        let mut tag = [0u8; 1];
        r.exact(&mut tag)?;
        match tag[0] {
            TAG_PAGES => {
                let mut h = [0u8; BATCH_HEAD - 1];
                r.exact(&mut h)?;
                let round = u32::from_le_bytes(h[..4].try_into().expect("4"));
                let count = u32::from_le_bytes(h[4..8].try_into().expect("4")) as usize;
                let crc = u32::from_le_bytes(h[8..12].try_into().expect("4"));
                if count == 0 || count > BATCH_PAGES {
                    return Err(r.invalid(at, format!("a batch of {count} pages")));
                }
                let mut index = vec![0u8; count * 8];
                r.exact(&mut index)?;
                let mut data = vec![0u8; count * PAGE];
                r.exact(&mut data)?;
                if crc32c::crc32c_append(crc32c::crc32c(&index), &data) != crc {
                    return Err(
                        r.invalid(at, format!("round {round}: a batch's checksum is wrong"))
                    );
                }
                for (k, n) in index.chunks(8).enumerate() {
                    let page = u64::from_le_bytes(n.try_into().expect("8"));
                    if page >= pages_in {
                        return Err(
                            r.invalid(at, format!("page {page}, the memory has {pages_in}"))
                        );
                    }
                    let p = page as usize * PAGE;
                    image[p..p + PAGE].copy_from_slice(&data[k * PAGE..(k + 1) * PAGE]);
                }
                pages += count as u64;
                rounds = rounds.max(round + 1);
                progress(&Progress {
                    round,
                    bytes: r.got,
                    memory,
                });
            }
            TAG_FINAL => {
                let mut h = [0u8; FINAL_HEAD];
                h[0] = TAG_FINAL;
                r.exact(&mut h[1..])?;
                let crc = u32::from_le_bytes(h[FINAL_HEAD - 4..].try_into().expect("4"));
                if crc != crc32c::crc32c(&h[..FINAL_HEAD - 4]) {
                    return Err(r.invalid(at, "the final record's checksum is wrong"));
                }
                let u =
                    |i: usize| u64::from_le_bytes(h[1 + 8 * i..9 + 8 * i].try_into().expect("8"));
                let offsets = StreamOffsets {
                    console: u(0),
                    frames: u(1),
                    disk: u(2),
                };
                let state_len = u(3);
                if state_len > MAX_STATE {
                    return Err(r.invalid(at, format!("{state_len} bytes of state")));
                }
                let mut state = vec![0u8; state_len as usize];
                r.exact(&mut state)?;
                let mut c = [0u8; 4];
                r.exact(&mut c)?;
                if u32::from_le_bytes(c) != crc32c::crc32c(&state) {
                    return Err(r.invalid(at, "the state's checksum is wrong"));
                }
                let mut e = Encoder::new();
                e.raw(&state);
                encode_memory(&mut e, &image);
                drop(image);
                let snapshot = crate::snapshot::file_bytes(&e.into_bytes());
                return Ok(Received {
                    generation,
                    offsets,
                    state,
                    snapshot,
                    rounds,
                    pages,
                    bytes: r.got,
                });
            }
            t => return Err(r.invalid(at, format!("a record of kind {t:#04x}"))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MEM: usize = 600 * PAGE;

    fn offsets() -> StreamOffsets {
        StreamOffsets {
            console: 1234,
            frames: 55,
            disk: 0,
        }
    }

    fn reader(mem: &[u8]) -> impl FnMut(u64, &mut [u8]) -> io::Result<()> + '_ {
        move |page, buf| {
            let p = page as usize * PAGE;
            buf.copy_from_slice(&mem[p..p + PAGE]);
            Ok(())
        }
    }

    /// A transfer of `mem` in two rounds and a pause, with `mem` changed
    /// in between as a running guest would; returns the wire and the
    /// memory at the pause.
    fn wire() -> (Vec<u8>, Vec<u8>) {
        let mut mem = vec![0u8; MEM];
        for p in (0..600).step_by(3) {
            mem[p * PAGE + 7] = p as u8 | 1;
        }
        let mut w = Vec::new();
        let mut s = Sender::open(&mut w, 9, MEM as u64, None).unwrap();
        let all: Vec<u64> = (0..600).collect();
        let sent = s
            .pages(0, &all, true, &mut reader(&mem), &mut |_| {})
            .unwrap();
        assert_eq!(sent, 200, "zero pages are left out of round 0");
        // The guest writes pages 1 and 300 (and zeroes page 3): round 1.
        mem[PAGE] = 0xaa;
        mem[300 * PAGE + 1] = 0xbb;
        mem[3 * PAGE + 7] = 0;
        s.pages(1, &[1, 3, 300], false, &mut reader(&mem), &mut |_| {})
            .unwrap();
        // Then page 599 in the last round, copied in the pause.
        mem[599 * PAGE] = 0xcc;
        let data = mem[599 * PAGE..].to_vec();
        let before = s.sent();
        s.finish(2, &[599], &data, &offsets(), b"vcpu and devices")
            .unwrap();
        assert_eq!(s.sent() - before, final_len(1, 16));
        (w, mem)
    }

    #[test]
    fn rounds_and_the_pause_rebuild_the_memory_and_leave_the_reader_at_the_log() {
        let (mut w, mem) = wire();
        let total = w.len() as u64;
        w.extend_from_slice(b"LOG");
        let mut r = io::Cursor::new(w);
        let mut seen = Vec::new();
        let got = receive(&mut r, &mut |p| seen.push(*p)).unwrap();
        assert_eq!(got.generation, 9);
        assert_eq!(got.offsets, offsets());
        assert_eq!(got.state, b"vcpu and devices");
        assert_eq!((got.rounds, got.pages, got.bytes), (3, 204, total));
        assert_eq!(seen.last().map(|p| p.round), Some(2));
        let mut e = Encoder::new();
        e.raw(b"vcpu and devices");
        encode_memory(&mut e, &mem);
        assert_eq!(got.snapshot, crate::snapshot::file_bytes(&e.into_bytes()));
        let mut rest = Vec::new();
        r.read_to_end(&mut rest).unwrap();
        assert_eq!(rest, b"LOG");
    }

    #[test]
    fn a_rate_limit_spreads_the_transfer_out() {
        let mem = vec![3u8; 512 * PAGE];
        let pages: Vec<u64> = (0..512).collect();
        let t0 = Instant::now();
        let mut sink = io::sink();
        // 2 MiB at 8 MiB/s: at least a quarter of a second.
        let mut s = Sender::open(&mut sink, 1, mem.len() as u64, Some(8 << 20)).unwrap();
        s.pages(0, &pages, false, &mut reader(&mem), &mut |_| {})
            .unwrap();
        assert!(t0.elapsed() >= Duration::from_millis(240));
    }

    #[test]
    fn a_cut_transfer_says_how_far_it_got() {
        let (mut w, _) = wire();
        w.truncate(OPENING_LEN + 5000);
        let e = receive(&mut io::Cursor::new(w), &mut |_| {}).unwrap_err();
        assert!(
            matches!(&e, TransferError::Io { got, .. } if *got > OPENING_LEN as u64 && *got <= OPENING_LEN as u64 + 5000),
            "{e}"
        );
    }

    #[test]
    fn damaged_or_foreign_bytes_are_refused() {
        let (good, _) = wire();
        let mut flipped = good.clone();
        flipped[14] ^= 1;
        let mut version = good.clone();
        version[8] = 9;
        let mut foreign = good.clone();
        foreign[..8].copy_from_slice(b"VMFT-CHN");
        let mut page = good.clone();
        page[OPENING_LEN + BATCH_HEAD + 256 * 8 + 100] ^= 1;
        let mut tag = good.clone();
        tag[OPENING_LEN] = b'X';
        for (b, want) in [
            (flipped, "checksum"),
            (version, "version 9"),
            (foreign, "magic"),
            (page, "round 0: a batch's checksum"),
            (tag, "kind 0x58"),
        ] {
            let e = receive(&mut io::Cursor::new(b), &mut |_| {}).unwrap_err();
            assert!(e.to_string().contains(want), "{want}: {e}");
        }
        let huge = encode_opening(1, MAX_MEMORY + PAGE as u64);
        let e = receive(&mut io::Cursor::new(huge.to_vec()), &mut |_| {}).unwrap_err();
        assert!(e.to_string().contains("bytes of memory"), "{e}");
    }
}
