//! Pre-copy: guest memory goes to a joining backup while the guest runs,
//! in rounds, before the short pause that takes the rest.
//!
//! ```text
//! run loop (vCPU thread, at boundaries)          transfer thread (this module)
//! Begin: dirty tracking on and clean ─▶ start ─▶ opening, round 0: every non-zero page
//! RoundSent? take the pages written since ─▶      (guest memory read while it runs)
//!   Plan::next ─ Round ─▶ next_round(pages) ───▶ round n: those pages
//!              └ Pause ─▶ settle, take the last ─▶ finish: the last pages (copied in
//!                written pages, vCPU, devices         the pause), the final record; then
//!                ─▶ finish(...) ─▶ guest runs on      `after` (the log follows)
//! ```
//!
//! A page written during a round is in the next round's set (KVM's dirty
//! log for the guest's writes, [`crate::memory::take_host_writes`] for the
//! monitor's), so each round sends what the previous one may have read
//! half-written, and the pause's copy is exact. The writable disk images
//! of this side's own go the same way, in 64 KiB chunks that the block
//! device marks at every write ([`crate::devices::virtio::written`]). The
//! wire format is [`super::transfer`]'s.

use std::io::{self, Write};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{channel, Sender as WorkTx};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use std::os::unix::fs::FileExt;

use thiserror::Error;
use vm_memory::{Bytes, GuestAddress};

use super::transfer::{self, DiskPart, Sender, StreamOffsets, CHUNK};
use crate::devices::virtio::written::OwnImage;
use crate::memory::{mem_bytes, GuestMemoryMmap, PAGE};

/// What cannot be copied.
#[derive(Debug, Error)]
pub enum PrecopyError {
    /// A guest page cannot be read.
    #[error("reading guest page {page}: {detail}")]
    Page {
        /// The page number.
        page: u64,
        /// Why.
        detail: String,
    },
    /// A disk chunk cannot be read.
    #[error("reading chunk {chunk} of disk {disk} (at byte {at}): {source}")]
    Chunk {
        /// The disk, among the own writable ones.
        disk: u32,
        /// The chunk.
        chunk: u64,
        /// Its offset.
        at: u64,
        /// Why.
        source: io::Error,
    },
}

impl From<PrecopyError> for io::Error {
    fn from(e: PrecopyError) -> io::Error {
        io::Error::other(e.to_string())
    }
}

/// What was written since a copy round began: guest pages, and each own
/// writable disk's chunks (in `--disk` order).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Written {
    /// Page numbers, in order.
    pub pages: Vec<u64>,
    /// Per disk, chunk numbers in order.
    pub chunks: Vec<Vec<u64>>,
}

impl Written {
    /// Its size in pages (a chunk counts as the pages it holds).
    pub fn weight(&self) -> usize {
        self.pages.len() + self.chunks.iter().map(Vec::len).sum::<usize>() * (CHUNK as usize / PAGE)
    }

    /// Add `more` to this, keeping each list ordered and without repeats.
    pub fn merge(&mut self, more: Written) {
        self.pages.extend(more.pages);
        self.pages.sort_unstable();
        self.pages.dedup();
        if self.chunks.len() < more.chunks.len() {
            self.chunks.resize(more.chunks.len(), Vec::new());
        }
        for (c, m) in self.chunks.iter_mut().zip(more.chunks) {
            c.extend(m);
            c.sort_unstable();
            c.dedup();
        }
    }
}

/// When to stop copying and pause the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Plan {
    /// Most rounds while the guest runs (round 0 included).
    pub max_rounds: u32,
    /// Few enough written pages to take in the pause.
    pub pause_pages: usize,
}

impl Default for Plan {
    /// Up to 8 rounds; pause at 4 MiB of written pages or fewer (copied in
    /// memory during the pause: a few milliseconds; sent after it).
    fn default() -> Self {
        Plan {
            max_rounds: 8,
            pause_pages: 1024,
        }
    }
}

/// What follows a copy round.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Next {
    /// Copy the written pages in another round, guest running.
    Round,
    /// Pause the guest and take the rest.
    Pause,
}

impl Plan {
    /// After round `done` (0 is the first), the guest had written
    /// `written` pages; `before` is the count after the round before.
    pub fn next(&self, done: u32, written: usize, before: Option<usize>) -> Next {
        let last = done + 1 >= self.max_rounds;
        // A guest that writes as fast as the rounds go gains nothing from
        // more of them.
        let stalled = done >= 2 && before.is_some_and(|b| written >= b);
        if written <= self.pause_pages || last || stalled {
            Next::Pause
        } else {
            Next::Round
        }
    }
}

/// Where the copy stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Phase {
    /// A round is being sent.
    Sending,
    /// The last round asked for is sent; the next step is the run loop's.
    RoundSent,
    /// The pause's part is handed over (the thread may still send it).
    Finished,
    /// The link failed or the thread could not run: the copy is over.
    Failed(String),
}

/// How the transfer thread ended.
#[derive(Debug)]
pub enum Outcome {
    /// Everything sent, the final record included.
    Sent,
    /// Given up by the run loop before the end.
    GivenUp,
    /// Writing failed.
    Failed(io::Error),
}

enum Work {
    Round {
        round: u32,
        written: Written,
    },
    Finish {
        round: u32,
        pages: Vec<u64>,
        data: Vec<u8>,
        disks: Vec<DiskPart>,
        offsets: StreamOffsets,
        state: Vec<u8>,
    },
}

#[derive(Default)]
struct Shared {
    /// Bytes written: exact while a round is not being sent.
    sent: AtomicU64,
    round_sent: AtomicBool,
    failed: Mutex<Option<String>>,
}

/// Statistics of a copy.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CopyStats {
    /// Pages asked for in each round while the guest ran (round 0: all
    /// of memory, the zero pages are not sent).
    pub round_pages: Vec<u64>,
    /// Pages copied in the pause.
    pub pause_pages: u64,
    /// Disk chunks asked for in each round (round 0: every chunk).
    pub round_chunks: Vec<u64>,
    /// Disk chunks copied in the pause.
    pub pause_chunks: u64,
}

/// A copy to one joining backup: the run loop's handle on its thread.
pub struct Precopy {
    work: Option<WorkTx<Work>>,
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
    plan: Plan,
    /// Rounds handed to the thread so far.
    rounds: u32,
    before: Option<usize>,
    finished: bool,
    stats: CopyStats,
}

impl Precopy {
    /// Start copying `mem` and `disks` to `link` for `generation`: the
    /// thread sends the opening and round 0 at once, at most `rate` bytes
    /// per second. `progress` gets the bytes sent after each batch;
    /// `after` gets the link back and the outcome when the thread ends.
    #[allow(clippy::too_many_arguments)]
    pub fn start<W: Write + Send + 'static>(
        link: W,
        mem: GuestMemoryMmap,
        disks: Vec<OwnImage>,
        generation: u64,
        rate: Option<u64>,
        plan: Plan,
        progress: Box<dyn FnMut(u64) + Send>,
        after: Box<dyn FnOnce(W, Outcome) + Send>,
    ) -> io::Result<Precopy> {
        let shared = Arc::new(Shared::default());
        let (tx, rx) = channel::<Work>();
        let sh = shared.clone();
        let len = mem_len(&mem);
        let pages = len / PAGE as u64;
        let sizes: Vec<u64> = disks.iter().map(|d| d.written.size()).collect();
        let all_chunks: u64 = disks.iter().map(|d| d.written.chunks()).sum();
        let thread = std::thread::Builder::new()
            .name("vmft-transfer".into())
            .spawn(move || {
                let mut link = link;
                let mut progress = progress;
                let mut read = |page: u64, buf: &mut [u8]| -> io::Result<()> {
                    Ok(read_page(&mem, page, buf)?)
                };
                let outcome = (|| -> io::Result<bool> {
                    let mut s = Sender::open(&mut link, generation, len, &sizes, rate)?;
                    let mut report = |n: u64| {
                        sh.sent.store(n, Ordering::Release);
                        progress(n);
                    };
                    // Round 0: everything (zeros left out).
                    let all = Written {
                        pages: (0..pages).collect(),
                        chunks: disks
                            .iter()
                            .map(|d| (0..d.written.chunks()).collect())
                            .collect(),
                    };
                    send_round(&mut s, 0, &all, true, &mut read, &disks, &mut report)?;
                    drop(all);
                    sh.sent.store(s.sent(), Ordering::Release);
                    sh.round_sent.store(true, Ordering::Release);
                    while let Ok(work) = rx.recv() {
                        match work {
                            Work::Round { round, written } => {
                                s.repace();
                                send_round(
                                    &mut s,
                                    round,
                                    &written,
                                    false,
                                    &mut read,
                                    &disks,
                                    &mut report,
                                )?;
                                sh.sent.store(s.sent(), Ordering::Release);
                                sh.round_sent.store(true, Ordering::Release);
                            }
                            Work::Finish {
                                round,
                                pages,
                                data,
                                disks,
                                offsets,
                                state,
                            } => {
                                s.repace();
                                s.finish(round, &pages, &data, &disks, &offsets, &state)?;
                                report(s.sent());
                                return Ok(true);
                            }
                        }
                    }
                    Ok(false)
                })();
                let outcome = match outcome {
                    Ok(true) => Outcome::Sent,
                    Ok(false) => Outcome::GivenUp,
                    Err(e) => {
                        *sh.failed.lock().unwrap_or_else(|p| p.into_inner()) = Some(e.to_string());
                        Outcome::Failed(e)
                    }
                };
                after(link, outcome);
            })?;
        Ok(Precopy {
            work: Some(tx),
            shared,
            thread: Some(thread),
            plan,
            rounds: 1,
            before: None,
            finished: false,
            stats: CopyStats {
                round_pages: vec![pages],
                pause_pages: 0,
                round_chunks: vec![all_chunks],
                pause_chunks: 0,
            },
        })
    }

    /// Where the copy stands.
    pub fn phase(&self) -> Phase {
        if self.finished {
            return Phase::Finished;
        }
        // Atomics only while it runs: the run loop asks at every exit.
        if self.thread.as_ref().is_none_or(|t| t.is_finished()) {
            // It says why before it ends; without a word, it panicked.
            let why = self
                .shared
                .failed
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone();
            Phase::Failed(why.unwrap_or_else(|| "the transfer thread ended unexpectedly".into()))
        } else if self.shared.round_sent.load(Ordering::Acquire) {
            Phase::RoundSent
        } else {
            Phase::Sending
        }
    }

    /// Whether the pause's part was handed over.
    pub fn is_finished(&self) -> bool {
        self.finished
    }

    /// Rounds so far (the pause's counts once finished).
    pub fn rounds(&self) -> u32 {
        self.rounds
    }

    /// Bytes sent so far.
    pub fn sent(&self) -> u64 {
        self.shared.sent.load(Ordering::Acquire)
    }

    /// The copy's statistics.
    pub fn stats(&self) -> &CopyStats {
        &self.stats
    }

    /// With the round sent, the guest wrote `written` since: copy it in
    /// another round (`None`), or give it back to take in the pause.
    pub fn next_round(&mut self, written: Written) -> Option<Written> {
        debug_assert_eq!(self.phase(), Phase::RoundSent);
        let weight = written.weight();
        let next = self.plan.next(self.rounds - 1, weight, self.before);
        if next == Next::Pause {
            return Some(written);
        }
        self.before = Some(weight);
        self.stats.round_pages.push(written.pages.len() as u64);
        self.stats
            .round_chunks
            .push(written.chunks.iter().map(|c| c.len() as u64).sum());
        self.shared.round_sent.store(false, Ordering::Release);
        let round = self.rounds;
        self.rounds += 1;
        if let Some(tx) = &self.work {
            // A closed channel: the thread failed, which `phase` shows.
            let _ = tx.send(Work::Round { round, written });
        }
        None
    }

    /// Hand over the pause's part: the `pages` written since the last
    /// round with their bytes (`data`, copied in the pause), the disks'
    /// chunks likewise, the streams' offsets and the state up to memory.
    /// Returns the transfer's total length: the log follows it on the
    /// link.
    pub fn finish(
        &mut self,
        pages: Vec<u64>,
        data: Vec<u8>,
        disks: Vec<DiskPart>,
        offsets: StreamOffsets,
        state: Vec<u8>,
    ) -> u64 {
        debug_assert_eq!(self.phase(), Phase::RoundSent);
        let total = self.total_with(pages.len(), &disks, state.len());
        self.stats.pause_pages = pages.len() as u64;
        self.stats.pause_chunks = disks.iter().map(|d| d.chunks.len() as u64).sum();
        let round = self.rounds;
        self.rounds += 1;
        self.finished = true;
        if let Some(tx) = self.work.take() {
            let _ = tx.send(Work::Finish {
                round,
                pages,
                data,
                disks,
                offsets,
                state,
            });
        }
        total
    }

    /// The transfer's length once a pause's part of `pages` pages, `disks`
    /// and `state_len` bytes of state is sent.
    pub fn total_with(&self, pages: usize, disks: &[DiskPart], state_len: usize) -> u64 {
        self.sent() + transfer::final_len(pages, disks, state_len)
    }

    /// Give the copy up (the thread ends after its batch) and wait for it.
    pub fn give_up(&mut self) {
        self.work = None;
        self.join();
    }

    /// Wait for the thread (which, finished, waits for the new backup).
    pub fn join(&mut self) {
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Precopy {
    fn drop(&mut self) {
        self.work = None;
    }
}

/// Send one round: `written`'s pages (read by `read`), then each disk's
/// chunks; with `skip_zero` (round 0) what reads as zeros is left out.
fn send_round(
    s: &mut Sender,
    round: u32,
    written: &Written,
    skip_zero: bool,
    read: &mut dyn FnMut(u64, &mut [u8]) -> io::Result<()>,
    disks: &[OwnImage],
    report: &mut dyn FnMut(u64),
) -> io::Result<()> {
    s.pages(round, &written.pages, skip_zero, read, report)?;
    for (i, (d, chunks)) in disks.iter().zip(&written.chunks).enumerate() {
        let mut read = |at: u64, buf: &mut [u8]| read_chunk(i as u32, d, at, buf);
        s.chunks(
            i as u32,
            d.written.size(),
            round,
            chunks,
            skip_zero,
            &mut read,
            report,
        )?;
    }
    Ok(())
}

/// Bytes of guest memory (the VM's one region).
fn mem_len(mem: &GuestMemoryMmap) -> u64 {
    mem_bytes(mem).len() as u64
}

/// Read `chunks` of the disk `image` into one buffer, in order (in the
/// pause): disk `disk`'s part of the pause.
pub fn copy_chunks(
    disk: u32,
    image: &OwnImage,
    chunks: Vec<u64>,
) -> Result<DiskPart, PrecopyError> {
    let size = image.written.size();
    let mut data = Vec::new();
    for &c in &chunks {
        let (at, len) = image.written.range(c);
        let start = data.len();
        data.resize(start + len as usize, 0);
        image
            .file
            .read_exact_at(&mut data[start..], at)
            .map_err(|source| PrecopyError::Chunk {
                disk,
                chunk: c,
                at,
                source,
            })?;
    }
    Ok(DiskPart {
        disk,
        size,
        chunks,
        data,
    })
}

/// Copy `pages` of `mem` into one buffer, in order (in the pause).
pub fn copy_pages(mem: &GuestMemoryMmap, pages: &[u64]) -> Result<Vec<u8>, PrecopyError> {
    let mut data = vec![0u8; pages.len() * PAGE];
    for (k, &p) in pages.iter().enumerate() {
        read_page(mem, p, &mut data[k * PAGE..(k + 1) * PAGE])?;
    }
    Ok(data)
}

/// Read guest page `page` into `buf` (4096 bytes).
fn read_page(mem: &GuestMemoryMmap, page: u64, buf: &mut [u8]) -> Result<(), PrecopyError> {
    mem.read_slice(buf, GuestAddress(page * PAGE as u64))
        .map_err(|e| PrecopyError::Page {
            page,
            detail: e.to_string(),
        })
}

/// Read the bytes of disk `disk`'s image at `at` into `buf` (a chunk).
fn read_chunk(disk: u32, image: &OwnImage, at: u64, buf: &mut [u8]) -> io::Result<()> {
    image.file.read_exact_at(buf, at).map_err(|source| {
        PrecopyError::Chunk {
            disk,
            chunk: at / CHUNK,
            at,
            source,
        }
        .into()
    })
}

#[cfg(test)]
mod tests {
    use std::sync::mpsc;
    use std::time::Duration;

    use super::*;
    use crate::devices::virtio::written::WrittenChunks;
    use crate::ft::transfer::receive;
    use crate::memory::{encode_memory, pages_of, take_host_writes};
    use crate::snapshot::Encoder;

    #[test]
    fn the_plan_pauses_when_little_is_left_or_nothing_is_gained() {
        let p = Plan {
            max_rounds: 5,
            pause_pages: 10,
        };
        assert_eq!(p.next(0, 10, None), Next::Pause);
        assert_eq!(p.next(0, 500, None), Next::Round);
        assert_eq!(p.next(1, 400, Some(500)), Next::Round);
        // Not shrinking after the third round: pause.
        assert_eq!(p.next(2, 450, Some(400)), Next::Pause);
        assert_eq!(p.next(2, 300, Some(400)), Next::Round);
        // The round limit.
        assert_eq!(p.next(4, 200, Some(300)), Next::Pause);
    }

    /// A writer whose bytes the test reads afterwards.
    #[derive(Clone, Default)]
    struct Wire(Arc<Mutex<Vec<u8>>>);

    impl Write for Wire {
        fn write(&mut self, b: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    fn wait_round(c: &Precopy) {
        for _ in 0..500 {
            if c.phase() == Phase::RoundSent {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        panic!("the round was not sent: {:?}", c.phase());
    }

    /// A disk image of `chunks` chunks, tracked as the block device
    /// tracks its writes.
    fn disk(chunks: u64) -> (tempfile::NamedTempFile, OwnImage) {
        let f = tempfile::NamedTempFile::new().unwrap();
        f.as_file().set_len(chunks * CHUNK).unwrap();
        let image = OwnImage {
            file: f.reopen().unwrap(),
            written: Arc::new(WrittenChunks::new(chunks * CHUNK)),
        };
        (f, image)
    }

    /// Write `byte` at `at` of the image, as the block device does.
    fn disk_write(f: &tempfile::NamedTempFile, w: &WrittenChunks, at: u64, byte: u8) {
        w.mark(at, 1);
        f.as_file().write_all_at(&[byte], at).unwrap();
    }

    /// The guest's writes between rounds (here the test's, tracked as the
    /// monitor's are) reach the backup: its rebuilt memory and disk are
    /// those at the pause, byte for byte.
    #[test]
    fn memory_and_disk_written_during_the_rounds_arrive_as_they_were_at_the_pause() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 2048 * PAGE)]).unwrap();
        for p in (0..2048u64).step_by(5) {
            mem.write_obj(p | 1, GuestAddress(p * PAGE as u64)).unwrap();
        }
        take_host_writes(&mem);
        let (img, image) = disk(40);
        let tracker = image.written.clone();
        disk_write(&img, &tracker, 7 * CHUNK + 9, 0x77);
        tracker.take();
        let wire = Wire::default();
        let (done_tx, done_rx) = mpsc::channel();
        let plan = Plan {
            max_rounds: 8,
            pause_pages: 3 + 16,
        };
        let mut c = Precopy::start(
            wire.clone(),
            mem.clone(),
            vec![image],
            42,
            None,
            plan,
            Box::new(|_| {}),
            Box::new(move |_, o| done_tx.send(matches!(o, Outcome::Sent)).unwrap()),
        )
        .unwrap();
        wait_round(&c);
        // Written during round 0: 300 pages and 2 chunks, then 3 pages and
        // a chunk during round 1.
        for p in 0..300u64 {
            mem.write_obj(0xdead_0000 + p, GuestAddress(p * 6 * PAGE as u64))
                .unwrap();
        }
        disk_write(&img, &tracker, 7 * CHUNK + 9, 0);
        disk_write(&img, &tracker, 30 * CHUNK, 0x30);
        let written = Written {
            pages: pages_of(&take_host_writes(&mem)),
            chunks: vec![tracker.take()],
        };
        assert_eq!((written.pages.len(), written.chunks[0].len()), (300, 2));
        assert!(c.next_round(written).is_none(), "another round");
        wait_round(&c);
        for p in [1u64, 2, 2047] {
            mem.write_obj(0xbeefu64, GuestAddress(p * PAGE as u64 + 8))
                .unwrap();
        }
        disk_write(&img, &tracker, 39 * CHUNK + 5, 0x39);
        let written = Written {
            pages: pages_of(&take_host_writes(&mem)),
            chunks: vec![tracker.take()],
        };
        let last = c.next_round(written).expect("3 pages and a chunk: pause");
        let data = copy_pages(&mem, &last.pages).unwrap();
        let reader = OwnImage {
            file: img.reopen().unwrap(),
            written: tracker.clone(),
        };
        let part = copy_chunks(0, &reader, last.chunks[0].clone()).unwrap();
        let offsets = StreamOffsets {
            console: 5,
            frames: 6,
            disk: 7,
        };
        let total = c.finish(last.pages, data, vec![part], offsets, b"state".to_vec());
        assert!(done_rx.recv_timeout(Duration::from_secs(10)).unwrap());
        c.join();
        assert_eq!(c.stats().round_pages, vec![2048, 300]);
        assert_eq!(c.stats().round_chunks, vec![40, 2]);
        assert_eq!(
            (c.stats().pause_pages, c.stats().pause_chunks, c.rounds()),
            (3, 1, 3)
        );
        let bytes = wire.0.lock().unwrap().clone();
        assert_eq!(bytes.len() as u64, total);
        let got = assert_rebuilt(bytes, b"state", &mem, &img, 40);
        assert_eq!((got.generation, got.offsets, got.rounds), (42, offsets, 3));
    }

    /// Receive `bytes` into a backup disk of `chunks` chunks that holds
    /// other bytes, and check that the backup has `mem` and `img` exactly,
    /// with `state`.
    fn assert_rebuilt(
        bytes: Vec<u8>,
        state: &[u8],
        mem: &GuestMemoryMmap,
        img: &tempfile::NamedTempFile,
        chunks: u64,
    ) -> transfer::Received {
        let (copy, _) = disk(chunks);
        std::fs::write(copy.path(), vec![0xee; (chunks * CHUNK) as usize]).unwrap();
        let target = copy.reopen().unwrap();
        let got = receive(&mut io::Cursor::new(bytes), &[target], &mut |_| {}).unwrap();
        let mut e = Encoder::new();
        e.raw(state);
        encode_memory(&mut e, mem_bytes(mem));
        assert!(
            got.snapshot == crate::snapshot::file_bytes(&e.into_bytes()),
            "the rebuilt memory differs from the memory at the pause"
        );
        assert!(
            std::fs::read(copy.path()).unwrap() == std::fs::read(img.path()).unwrap(),
            "the backup's disk differs from the primary's at the pause"
        );
        got
    }

    /// The race the trackers are for: a writer changes memory and the
    /// disk while the copy thread reads them (round 0 and round 1). What
    /// the backup rebuilds is still exactly the state at the pause.
    #[test]
    fn writes_racing_the_copy_thread_are_caught_by_the_next_round() {
        use std::sync::atomic::AtomicBool;
        const PAGES: u64 = 8192;
        let mem =
            GuestMemoryMmap::from_ranges(&[(GuestAddress(0), PAGES as usize * PAGE)]).unwrap();
        for p in 0..PAGES {
            mem.write_obj(p + 1, GuestAddress(p * PAGE as u64)).unwrap();
        }
        take_host_writes(&mem);
        let (img, image) = disk(64);
        let tracker = image.written.clone();
        let wire = Wire::default();
        let (done_tx, done_rx) = mpsc::channel();
        let mut c = Precopy::start(
            wire.clone(),
            mem.clone(),
            vec![image],
            7,
            // Slow enough that the writer races every batch.
            Some(64 << 20),
            Plan {
                max_rounds: 8,
                pause_pages: 64,
            },
            Box::new(|_| {}),
            Box::new(move |_, o| done_tx.send(matches!(o, Outcome::Sent)).unwrap()),
        )
        .unwrap();
        // The writer: pages and disk bytes all over, until stopped.
        let stop = Arc::new(AtomicBool::new(false));
        let writer = {
            let (mem, stop, tracker) = (mem.clone(), stop.clone(), tracker.clone());
            let file = img.reopen().unwrap();
            std::thread::spawn(move || {
                let mut n = 0u64;
                while !stop.load(Ordering::Acquire) {
                    let p = (n * 7919) % PAGES;
                    mem.write_obj(n, GuestAddress(p * PAGE as u64 + 8)).unwrap();
                    let at = (n * 104_729) % (64 * CHUNK - 8);
                    tracker.mark(at, 8);
                    file.write_all_at(&n.to_le_bytes(), at).unwrap();
                    n += 1;
                }
                n
            })
        };
        let mut writer = Some(writer);
        let mut wrote = 0;
        let mut round = 0;
        let last = loop {
            wait_round(&c);
            // Rounds 0 and 1 race the writer; then it stops (the guest
            // pauses, as far as this test goes) and the copy converges.
            if round >= 1 {
                if let Some(w) = writer.take() {
                    stop.store(true, Ordering::Release);
                    wrote = w.join().unwrap();
                }
            }
            let written = Written {
                pages: pages_of(&take_host_writes(&mem)),
                chunks: vec![tracker.take()],
            };
            round += 1;
            if let Some(last) = c.next_round(written) {
                break last;
            }
        };
        if let Some(w) = writer.take() {
            stop.store(true, Ordering::Release);
            wrote = w.join().unwrap();
        }
        assert!(wrote > 1000, "the writer wrote {wrote} times: no race");
        // What the writer did after the last take goes in the pause too.
        let mut last = last;
        last.merge(Written {
            pages: pages_of(&take_host_writes(&mem)),
            chunks: vec![tracker.take()],
        });
        let data = copy_pages(&mem, &last.pages).unwrap();
        let reader = OwnImage {
            file: img.reopen().unwrap(),
            written: tracker.clone(),
        };
        let part = copy_chunks(0, &reader, last.chunks[0].clone()).unwrap();
        c.finish(
            last.pages,
            data,
            vec![part],
            StreamOffsets::default(),
            b"s".to_vec(),
        );
        assert!(done_rx.recv_timeout(Duration::from_secs(30)).unwrap());
        c.join();
        assert!(c.rounds() >= 3, "{} rounds", c.rounds());
        let bytes = wire.0.lock().unwrap().clone();
        assert_rebuilt(bytes, b"s", &mem, &img, 64);
    }

    /// A link that fails shows as a failed phase; the thread ends.
    #[test]
    fn a_failed_link_fails_the_copy() {
        struct Broken;
        impl Write for Broken {
            fn write(&mut self, _: &[u8]) -> io::Result<usize> {
                Err(io::Error::new(io::ErrorKind::BrokenPipe, "gone"))
            }
            fn flush(&mut self) -> io::Result<()> {
                Ok(())
            }
        }
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 16 * PAGE)]).unwrap();
        let mut c = Precopy::start(
            Broken,
            mem,
            Vec::new(),
            1,
            None,
            Plan::default(),
            Box::new(|_| {}),
            Box::new(|_, o| assert!(matches!(o, Outcome::Failed(_)))),
        )
        .unwrap();
        c.join();
        assert!(matches!(c.phase(), Phase::Failed(w) if w.contains("gone")));
    }
}
