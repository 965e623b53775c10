//! Re-protection's state transfer: the bytes a running primary sends a
//! joining backup on the new logging link before the log, and how the
//! backup reads them. Memory and the writable disk images of the
//! primary's own go first, in pre-copy rounds while the guest runs
//! ([`super::precopy`] decides how many); then the pages and disk chunks
//! written since, the vCPU and the devices, taken in one short pause.
//!
//! ```text
//! primary (the transfer thread)                          backup (cmd/pair join)
//! opening  "VMFT-XFR" | version u32 | generation u64 |
//!          memory bytes u64 | disks u32 | each disk's
//!          bytes u64 | CRC32C of the above u32 ────────────▶ magic, version, CRC, memory bound;
//!                                                              the backup's disks: as many, as
//!                                                              large; emptied (zeros)
//! round 0: every non-zero page; round n: the pages written
//!          during round n-1 (KVM's dirty log and the monitor's
//!          own writes); the last round: those written during
//!          the one before, copied in the pause:
//!   batch  b'P' | round u32 | count u32 | CRC32C u32 |
//!          count × page number u64 | count × 4096 bytes ────▶ into the memory image (progress)
//!   chunks b'D' | disk u32 | round u32 | count u32 | CRC32C u32 |
//!          count × chunk number u64 | their bytes (64 KiB
//!          each, the image's last one may be shorter) ──────▶ into the backup's disk image
//!          (round 0: every chunk that is not all zeros)
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
//! [`crate::record::config_hash_of_transfer`] of the final state, so the
//! backup checks it as usual. Memory and disk chunks are checked in
//! transit by the batches' CRCs; memory again, once the backup replays,
//! by the log's memory digests; a disk chunk the copy missed would not be
//! found (the copy's trackers are what guards that). All integers
//! little-endian.

use std::io::{self, Read, Write};
use std::time::{Duration, Instant};

use thiserror::Error;

use crate::memory::{encode_memory, PAGE};
use crate::snapshot::Encoder;

/// The transfer's magic.
pub const MAGIC: &[u8; 8] = b"VMFT-XFR";
/// The transfer layout's version (3: memory and disks in pre-copy rounds).
pub const VERSION: u32 = 3;
/// Bytes of the opening before the disks' sizes.
const OPENING_FIXED: usize = 8 + 4 + 8 + 8 + 4;
/// Most disks a transfer carries.
pub const MAX_DISKS: usize = 64;
/// Largest guest memory accepted.
pub const MAX_MEMORY: u64 = 64 << 30;
/// Largest final state (vCPU and devices) accepted.
pub const MAX_STATE: u64 = 1 << 30;
/// Pages per batch: the unit of progress and of the rate limit.
pub const BATCH_PAGES: usize = 256;
/// Bytes of a batch before its page numbers.
const BATCH_HEAD: usize = 1 + 4 + 4 + 4;
/// Disk chunks per batch (1 MiB).
pub const DISK_BATCH: usize = 16;
/// Bytes of a disk batch before its chunk numbers.
const DISK_HEAD: usize = 1 + 4 + 4 + 4 + 4;
/// Bytes of the final record around its state.
const FINAL_HEAD: usize = 1 + 8 * 4 + 4;
const TAG_PAGES: u8 = b'P';
const TAG_FINAL: u8 = b'F';
const TAG_DISK: u8 = b'D';

pub use crate::devices::virtio::written::CHUNK;

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
    /// A disk of the backup cannot take the primary's.
    #[error("disk {disk} (in --disk order): {what}")]
    Disk {
        /// Which disk, from 0.
        disk: usize,
        /// What is wrong.
        what: String,
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
fn encode_opening(generation: u64, memory: u64, disks: &[u64]) -> Vec<u8> {
    let mut b = Vec::with_capacity(OPENING_FIXED + 8 * disks.len());
    b.extend_from_slice(MAGIC);
    b.extend_from_slice(&VERSION.to_le_bytes());
    b.extend_from_slice(&generation.to_le_bytes());
    b.extend_from_slice(&memory.to_le_bytes());
    b.extend_from_slice(&(disks.len() as u32).to_le_bytes());
    for d in disks {
        b.extend_from_slice(&d.to_le_bytes());
    }
    let crc = crc32c::crc32c(&b);
    b.extend_from_slice(&crc.to_le_bytes());
    b
}

/// What the opening says.
struct Opening {
    generation: u64,
    memory: u64,
    disks: Vec<u64>,
}

/// Read and check an opening.
fn read_opening(r: &mut Counted) -> Result<Opening, TransferError> {
    let bad = |what: String| TransferError::Invalid { at: 0, what };
    let mut b = vec![0u8; OPENING_FIXED];
    r.exact(&mut b)?;
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
    let disks = u32::from_le_bytes(b[28..32].try_into().expect("4 bytes")) as usize;
    if disks > MAX_DISKS {
        return Err(bad(format!("{disks} disks (at most {MAX_DISKS})")));
    }
    let mut rest = vec![0u8; 8 * disks + 4];
    r.exact(&mut rest)?;
    b.extend_from_slice(&rest);
    let crc = u32::from_le_bytes(b[b.len() - 4..].try_into().expect("4 bytes"));
    if crc != crc32c::crc32c(&b[..b.len() - 4]) {
        return Err(bad("the opening's checksum is wrong".into()));
    }
    let u = |at: usize| u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"));
    let memory = u(20);
    if memory > MAX_MEMORY || memory % PAGE as u64 != 0 {
        return Err(bad(format!(
            "{memory} bytes of memory (whole pages, at most {MAX_MEMORY})"
        )));
    }
    Ok(Opening {
        generation: u(12),
        memory,
        disks: (0..disks).map(|i| u(OPENING_FIXED + 8 * i)).collect(),
    })
}

/// The bytes of chunk `c` of an image of `size` bytes: offset, length.
fn chunk_range(size: u64, c: u64) -> (u64, u64) {
    let at = c * CHUNK;
    (at, CHUNK.min(size.saturating_sub(at)))
}

/// A disk's part of the pause: the chunks written since the last round,
/// read in the pause.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct DiskPart {
    /// The disk, from 0 among the own writable disks in `--disk` order.
    pub disk: u32,
    /// The image's size.
    pub size: u64,
    /// The chunks, in order.
    pub chunks: Vec<u64>,
    /// Their bytes, one after the other.
    pub data: Vec<u8>,
}

/// Bytes on the link for a disk's `chunks` holding `data` bytes.
fn disk_len(chunks: usize, data: usize) -> u64 {
    (chunks.div_ceil(DISK_BATCH) * DISK_HEAD + chunks * 8 + data) as u64
}

/// Bytes on the link for `pages` pages sent in full batches.
pub fn pages_len(pages: usize) -> u64 {
    let batches = pages.div_ceil(BATCH_PAGES);
    (batches * BATCH_HEAD + pages * (8 + PAGE)) as u64
}

/// Bytes on the link for the pause's part: its `pages`, its `disks`' chunks
/// and a final record with `state_len` bytes of state.
pub fn final_len(pages: usize, disks: &[DiskPart], state_len: usize) -> u64 {
    pages_len(pages)
        + disks
            .iter()
            .map(|d| disk_len(d.chunks.len(), d.data.len()))
            .sum::<u64>()
        + (FINAL_HEAD + state_len + 4) as u64
}

/// The sending end: writes the records in order, counts the bytes, and
/// keeps to a rate.
pub struct Sender<'a> {
    w: &'a mut dyn Write,
    sent: u64,
    rate: Option<u64>,
    /// The rate is kept from here (`t0`, bytes sent by then): an idle
    /// wait between rounds earns no burst after it.
    t0: Instant,
    paced_from: u64,
}

impl<'a> Sender<'a> {
    /// Write the opening for `memory` bytes of guest memory and disks of
    /// `disks` bytes, then send at most `rate` bytes per second if given.
    pub fn open(
        w: &'a mut dyn Write,
        generation: u64,
        memory: u64,
        disks: &[u64],
        rate: Option<u64>,
    ) -> io::Result<Self> {
        let opening = encode_opening(generation, memory, disks);
        w.write_all(&opening)?;
        Ok(Sender {
            w,
            sent: opening.len() as u64,
            rate: rate.filter(|r| *r > 0),
            t0: Instant::now(),
            paced_from: opening.len() as u64,
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

    /// Keep the rate from now on (the start of a round, after a wait).
    pub fn repace(&mut self) {
        self.t0 = Instant::now();
        self.paced_from = self.sent;
    }

    fn pace(&self) {
        if let Some(rate) = self.rate {
            let bytes = self.sent - self.paced_from;
            let due = Duration::from_secs_f64(bytes as f64 / rate as f64);
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

    /// Send round `round`'s `chunks` of disk `disk` (an image of `size`
    /// bytes): `read(offset, buf)` fills a chunk's bytes. With `skip_zero`,
    /// chunks of zeros are left out (the backup's image starts zeroed:
    /// round 0 only). Returns the chunks sent.
    #[allow(clippy::too_many_arguments)]
    pub fn chunks(
        &mut self,
        disk: u32,
        size: u64,
        round: u32,
        chunks: &[u64],
        skip_zero: bool,
        read: &mut dyn FnMut(u64, &mut [u8]) -> io::Result<()>,
        progress: &mut dyn FnMut(u64),
    ) -> io::Result<u64> {
        let mut numbers: Vec<u64> = Vec::with_capacity(DISK_BATCH);
        let mut data: Vec<u8> = Vec::with_capacity(DISK_BATCH * CHUNK as usize);
        let mut count = 0u64;
        let mut rest = chunks.iter().peekable();
        while rest.peek().is_some() {
            numbers.clear();
            data.clear();
            while numbers.len() < DISK_BATCH {
                let Some(&c) = rest.next() else { break };
                let (at, len) = chunk_range(size, c);
                let start = data.len();
                data.resize(start + len as usize, 0);
                read(at, &mut data[start..])?;
                if skip_zero && data[start..].iter().all(|&b| b == 0) {
                    data.truncate(start);
                    continue;
                }
                numbers.push(c);
            }
            if numbers.is_empty() {
                break;
            }
            self.disk_batch(disk, round, &numbers, &data)?;
            count += numbers.len() as u64;
            progress(self.sent);
            self.pace();
        }
        Ok(count)
    }

    fn disk_batch(
        &mut self,
        disk: u32,
        round: u32,
        numbers: &[u64],
        data: &[u8],
    ) -> io::Result<()> {
        let mut head = [0u8; DISK_HEAD];
        head[0] = TAG_DISK;
        head[1..5].copy_from_slice(&disk.to_le_bytes());
        head[5..9].copy_from_slice(&round.to_le_bytes());
        head[9..13].copy_from_slice(&(numbers.len() as u32).to_le_bytes());
        let mut index = Vec::with_capacity(numbers.len() * 8);
        for n in numbers {
            index.extend_from_slice(&n.to_le_bytes());
        }
        let crc = crc32c::crc32c_append(crc32c::crc32c(&index), data);
        head[13..17].copy_from_slice(&crc.to_le_bytes());
        self.write(&head)?;
        self.write(&index)?;
        self.write(data)
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
    /// the order of `pages`), the disks' chunks, then the final record.
    /// Nothing is left out.
    pub fn finish(
        &mut self,
        round: u32,
        pages: &[u64],
        data: &[u8],
        disks: &[DiskPart],
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
        for d in disks {
            let mut at = 0;
            for numbers in d.chunks.chunks(DISK_BATCH) {
                let len: u64 = numbers.iter().map(|&c| chunk_range(d.size, c).1).sum();
                let bytes = d.data.get(at..at + len as usize).ok_or_else(|| {
                    io::Error::other(format!("disk {}: fewer bytes than chunks", d.disk))
                })?;
                self.disk_batch(d.disk, round, numbers, bytes)?;
                at += len as usize;
                self.pace();
            }
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
    /// Disk chunks received, likewise.
    pub chunks: u64,
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

/// Read a transfer from `r` into memory and `disks` (the backup's images,
/// in `--disk` order: its own writable ones, as many and as large as the
/// primary's; they are emptied first), calling `progress` after each
/// batch; `r` is left at the log that follows.
pub fn receive(
    r: &mut dyn Read,
    disks: &[std::fs::File],
    progress: &mut dyn FnMut(&Progress),
) -> Result<Received, TransferError> {
    let mut r = Counted { r, got: 0 };
    let Opening {
        generation,
        memory,
        disks: sizes,
    } = read_opening(&mut r)?;
    if sizes.len() != disks.len() {
        return Err(TransferError::Disk {
            disk: sizes.len().min(disks.len()),
            what: format!(
                "the primary has {} writable disks of its own, this backup {}",
                sizes.len(),
                disks.len()
            ),
        });
    }
    for (i, (f, &size)) in disks.iter().zip(&sizes).enumerate() {
        let disk_err = |what: String| TransferError::Disk { disk: i, what };
        let have = f
            .metadata()
            .map_err(|e| disk_err(format!("cannot measure it: {e}")))?
            .len();
        if have != size {
            return Err(disk_err(format!(
                "{have} bytes here, the primary's has {size}"
            )));
        }
        // Emptied: round 0 leaves out the chunks of zeros.
        f.set_len(0)
            .and_then(|()| f.set_len(size))
            .map_err(|e| disk_err(format!("cannot empty it for the copy: {e}")))?;
    }
    let mut chunks = 0u64;

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
            TAG_DISK => {
                let mut h = [0u8; DISK_HEAD - 1];
                r.exact(&mut h)?;
                let u32_at = |i: usize| u32::from_le_bytes(h[i..i + 4].try_into().expect("4"));
                let (disk, round, count, crc) = (
                    u32_at(0) as usize,
                    u32_at(4),
                    u32_at(8) as usize,
                    u32_at(12),
                );
                if count == 0 || count > DISK_BATCH {
                    return Err(r.invalid(at, format!("a batch of {count} disk chunks")));
                }
                let Some(&size) = sizes.get(disk) else {
                    return Err(r.invalid(at, format!("disk {disk} of {}", sizes.len())));
                };
                let mut index = vec![0u8; count * 8];
                r.exact(&mut index)?;
                let numbers: Vec<u64> = index
                    .chunks(8)
                    .map(|n| u64::from_le_bytes(n.try_into().expect("8")))
                    .collect();
                if let Some(c) = numbers.iter().find(|&&c| c >= size.div_ceil(CHUNK)) {
                    return Err(r.invalid(at, format!("disk {disk}: chunk {c} past its end")));
                }
                let len: u64 = numbers.iter().map(|&c| chunk_range(size, c).1).sum();
                let mut data = vec![0u8; len as usize];
                r.exact(&mut data)?;
                if crc32c::crc32c_append(crc32c::crc32c(&index), &data) != crc {
                    return Err(r.invalid(
                        at,
                        format!("round {round}: disk {disk}: a batch's checksum is wrong"),
                    ));
                }
                let mut off = 0usize;
                for &c in &numbers {
                    let (pos, n) = chunk_range(size, c);
                    std::os::unix::fs::FileExt::write_all_at(
                        &disks[disk],
                        &data[off..off + n as usize],
                        pos,
                    )
                    .map_err(|e| TransferError::Disk {
                        disk,
                        what: format!("writing chunk {c}: {e}"),
                    })?;
                    off += n as usize;
                }
                chunks += count as u64;
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
                for (i, f) in disks.iter().enumerate() {
                    f.sync_data().map_err(|e| TransferError::Disk {
                        disk: i,
                        what: format!("syncing it: {e}"),
                    })?;
                }
                return Ok(Received {
                    generation,
                    offsets,
                    state,
                    snapshot,
                    rounds,
                    pages,
                    chunks,
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
    /// The disk: 5 chunks and a short one.
    const DISK: u64 = 5 * CHUNK + 4096;
    /// Bytes of the opening with one disk.
    const OPENING: usize = OPENING_FIXED + 8 + 4;

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

    fn disk_reader(disk: &[u8]) -> impl FnMut(u64, &mut [u8]) -> io::Result<()> + '_ {
        move |at, buf| {
            buf.copy_from_slice(&disk[at as usize..at as usize + buf.len()]);
            Ok(())
        }
    }

    /// A transfer of `mem` and one disk in two rounds and a pause, with
    /// both changed in between as a running guest would; returns the wire
    /// and the memory and disk at the pause.
    fn wire() -> (Vec<u8>, Vec<u8>, Vec<u8>) {
        let mut mem = vec![0u8; MEM];
        for p in (0..600).step_by(3) {
            mem[p * PAGE + 7] = p as u8 | 1;
        }
        let mut disk = vec![0u8; DISK as usize];
        disk[CHUNK as usize + 3] = 0x11;
        disk[5 * CHUNK as usize + 4095] = 0x22;
        let mut w = Vec::new();
        let mut s = Sender::open(&mut w, 9, MEM as u64, &[DISK], None).unwrap();
        let all: Vec<u64> = (0..600).collect();
        let sent = s
            .pages(0, &all, true, &mut reader(&mem), &mut |_| {})
            .unwrap();
        assert_eq!(sent, 200, "zero pages are left out of round 0");
        let sent = s
            .chunks(
                0,
                DISK,
                0,
                &[0, 1, 2, 3, 4, 5],
                true,
                &mut disk_reader(&disk),
                &mut |_| {},
            )
            .unwrap();
        assert_eq!(sent, 2, "zero chunks are left out of round 0");
        // The guest writes pages 1 and 300 (and zeroes page 3), and
        // chunks 1 (zeroed) and 3: round 1.
        mem[PAGE] = 0xaa;
        mem[300 * PAGE + 1] = 0xbb;
        mem[3 * PAGE + 7] = 0;
        disk[CHUNK as usize + 3] = 0;
        disk[3 * CHUNK as usize] = 0x33;
        s.pages(1, &[1, 3, 300], false, &mut reader(&mem), &mut |_| {})
            .unwrap();
        s.chunks(
            0,
            DISK,
            1,
            &[1, 3],
            false,
            &mut disk_reader(&disk),
            &mut |_| {},
        )
        .unwrap();
        // Then page 599 and chunk 5 (the short one) in the pause.
        mem[599 * PAGE] = 0xcc;
        disk[5 * CHUNK as usize] = 0x44;
        let data = mem[599 * PAGE..].to_vec();
        let part = DiskPart {
            disk: 0,
            size: DISK,
            chunks: vec![5],
            data: disk[5 * CHUNK as usize..].to_vec(),
        };
        let before = s.sent();
        s.finish(
            2,
            &[599],
            &data,
            std::slice::from_ref(&part),
            &offsets(),
            b"vcpu and devices",
        )
        .unwrap();
        assert_eq!(s.sent() - before, final_len(1, &[part], 16));
        (w, mem, disk)
    }

    fn image(bytes: &[u8]) -> tempfile::NamedTempFile {
        let f = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(f.path(), bytes).unwrap();
        f
    }

    #[test]
    fn rounds_and_the_pause_rebuild_memory_and_disk_and_leave_the_reader_at_the_log() {
        let (mut w, mem, disk) = wire();
        let total = w.len() as u64;
        w.extend_from_slice(b"LOG");
        // The backup's image holds other bytes: all of them go.
        let img = image(&vec![0x5a; DISK as usize]);
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(img.path())
            .unwrap();
        let mut r = io::Cursor::new(w);
        let mut seen = Vec::new();
        let got = receive(&mut r, &[f], &mut |p| seen.push(*p)).unwrap();
        assert_eq!(got.generation, 9);
        assert_eq!(got.offsets, offsets());
        assert_eq!(got.state, b"vcpu and devices");
        assert_eq!(
            (got.rounds, got.pages, got.chunks, got.bytes),
            (3, 204, 5, total)
        );
        assert_eq!(seen.last().map(|p| p.round), Some(2));
        let mut e = Encoder::new();
        e.raw(b"vcpu and devices");
        encode_memory(&mut e, &mem);
        assert_eq!(got.snapshot, crate::snapshot::file_bytes(&e.into_bytes()));
        assert!(
            std::fs::read(img.path()).unwrap() == disk,
            "the disk differs"
        );
        let mut rest = Vec::new();
        r.read_to_end(&mut rest).unwrap();
        assert_eq!(rest, b"LOG");
    }

    #[test]
    fn a_backup_disk_of_another_size_or_count_is_refused_before_it_is_touched() {
        let (w, _, _) = wire();
        let img = image(&vec![7u8; DISK as usize - 512]);
        let f = std::fs::File::open(img.path()).unwrap();
        let e = receive(&mut io::Cursor::new(w.clone()), &[f], &mut |_| {}).unwrap_err();
        assert!(e.to_string().contains("disk 0 (in --disk order)"), "{e}");
        assert!(e.to_string().contains("the primary's has"), "{e}");
        assert_eq!(
            std::fs::read(img.path()).unwrap(),
            vec![7u8; DISK as usize - 512]
        );
        let e = receive(&mut io::Cursor::new(w), &[], &mut |_| {}).unwrap_err();
        assert!(
            e.to_string()
                .contains("1 writable disks of its own, this backup 0"),
            "{e}"
        );
    }

    #[test]
    fn a_rate_limit_spreads_the_transfer_out() {
        let mem = vec![3u8; 512 * PAGE];
        let pages: Vec<u64> = (0..512).collect();
        let t0 = Instant::now();
        let mut sink = io::sink();
        // 2 MiB at 8 MiB/s: at least a quarter of a second.
        let mut s = Sender::open(&mut sink, 1, mem.len() as u64, &[], Some(8 << 20)).unwrap();
        s.pages(0, &pages, false, &mut reader(&mem), &mut |_| {})
            .unwrap();
        assert!(t0.elapsed() >= Duration::from_millis(240));
    }

    #[test]
    fn a_wait_between_rounds_earns_no_burst_after_it() {
        let mem = vec![3u8; 512 * PAGE];
        let pages: Vec<u64> = (0..512).collect();
        let mut sink = io::sink();
        let mut s = Sender::open(&mut sink, 1, mem.len() as u64, &[], Some(8 << 20)).unwrap();
        s.pages(0, &pages[..256], false, &mut reader(&mem), &mut |_| {})
            .unwrap();
        // Idle (the run loop deciding), then the next round: its 2 MiB
        // still take a quarter of a second at 8 MiB/s.
        std::thread::sleep(Duration::from_millis(400));
        s.repace();
        let t0 = Instant::now();
        s.pages(1, &pages, false, &mut reader(&mem), &mut |_| {})
            .unwrap();
        assert!(
            t0.elapsed() >= Duration::from_millis(240),
            "{:?}",
            t0.elapsed()
        );
    }

    fn receive_no_disk(w: Vec<u8>) -> Result<Received, TransferError> {
        let img = image(&vec![0u8; DISK as usize]);
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(img.path())
            .unwrap();
        receive(&mut io::Cursor::new(w), &[f], &mut |_| {})
    }

    #[test]
    fn a_cut_transfer_says_how_far_it_got() {
        let (mut w, _, _) = wire();
        w.truncate(OPENING + 5000);
        let e = receive_no_disk(w).unwrap_err();
        assert!(
            matches!(&e, TransferError::Io { got, .. } if *got > OPENING as u64 && *got <= OPENING as u64 + 5000),
            "{e}"
        );
    }

    #[test]
    fn damaged_or_foreign_bytes_are_refused() {
        let (good, _, _) = wire();
        let mut flipped = good.clone();
        flipped[14] ^= 1;
        let mut version = good.clone();
        version[8] = 9;
        let mut foreign = good.clone();
        foreign[..8].copy_from_slice(b"VMFT-CHN");
        let mut page = good.clone();
        page[OPENING + BATCH_HEAD + 256 * 8 + 100] ^= 1;
        let mut tag = good.clone();
        tag[OPENING] = b'X';
        // The disk batch of round 0 follows the page batches (200 pages).
        let disk_at = OPENING + (BATCH_HEAD + 256 * (8 + PAGE)) - 56 * (8 + PAGE);
        let mut chunk = good.clone();
        chunk[disk_at + DISK_HEAD + 2 * 8 + 10] ^= 1;
        for (b, want) in [
            (flipped, "checksum"),
            (version, "version 9"),
            (foreign, "magic"),
            (page, "round 0: a batch's checksum"),
            (tag, "kind 0x58"),
            (chunk, "round 0: disk 0: a batch's checksum"),
        ] {
            let e = receive_no_disk(b).unwrap_err();
            assert!(e.to_string().contains(want), "{want}: {e}");
        }
        let huge = encode_opening(1, MAX_MEMORY + PAGE as u64, &[]);
        let e = receive(&mut io::Cursor::new(huge), &[], &mut |_| {}).unwrap_err();
        assert!(e.to_string().contains("bytes of memory"), "{e}");
    }
}
