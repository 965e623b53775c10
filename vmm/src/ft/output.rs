//! The output rule, and the backup's copy of output not yet released.
//!
//! The guest's console output is deterministic, so every byte has an offset
//! in the output stream that both sides agree on (counted from the start of
//! this VM process: a boot, or the snapshot both sides restored).
//!
//! - **Primary** ([`HeldOutput`]): bytes the guest writes are captured, not
//!   shown. At the next boundary the run loop flushes the log and marks the
//!   captured bytes with the log offset that covers the exit that wrote them
//!   (the *barrier*). A releaser thread hands a chunk to the console once the
//!   backup has acknowledged the log up to its barrier. The guest never waits
//!   for this; only the output does. When the backup is gone and the primary
//!   won its claim, everything is released at once ([`ReleaseMode::Free`]);
//!   when it lost, nothing more is ([`ReleaseMode::Halt`]).
//! - **Backup** ([`OutputTail`]): replaying, it drops output, but keeps the
//!   bytes from the offset the primary last said it had released (carried
//!   in the log). Going live, it releases those first, so the console, which
//!   drops bytes it already printed, sees no gap.

use std::collections::VecDeque;
use std::io::{self, Write};
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// Where released output goes: the console endpoint, or stdout.
pub trait Release: Send {
    /// Release `bytes`, which start at `offset` of the output stream.
    fn release(&mut self, offset: u64, bytes: &[u8]) -> io::Result<()>;
}

/// Releases into held output (its capture): a backup that went live
/// hands its tail and everything after it to held output, so that a
/// later re-protection can hold it again.
pub struct IntoHeld(pub Capture);

impl Release for IntoHeld {
    fn release(&mut self, _offset: u64, bytes: &[u8]) -> io::Result<()> {
        self.0.write_all(bytes)
    }
}

/// Releases to a plain writer (stdout), ignoring offsets.
pub struct ToWriter<W: Write + Send>(pub W);

impl<W: Write + Send> Release for ToWriter<W> {
    fn release(&mut self, _offset: u64, bytes: &[u8]) -> io::Result<()> {
        self.0.write_all(bytes)?;
        self.0.flush()
    }
}

/// How the releaser treats held output.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReleaseMode {
    /// Release a chunk once the backup acknowledged its barrier.
    Rule = 0,
    /// No backup (it failed and the claim was won): release at once.
    Free = 1,
    /// This side lost its claim: release nothing more.
    Halt = 2,
}

impl ReleaseMode {
    fn from_u8(v: u8) -> Self {
        match v {
            1 => ReleaseMode::Free,
            2 => ReleaseMode::Halt,
            _ => ReleaseMode::Rule,
        }
    }
}

struct Chunk {
    offset: u64,
    bytes: Vec<u8>,
    barrier: u64,
    captured: Instant,
}

#[derive(Default)]
struct Captured {
    /// Offset of the first byte of `bytes`.
    offset: u64,
    /// Captured since the last barrier.
    bytes: Vec<u8>,
}

struct Shared {
    captured: Mutex<Captured>,
    queue: Mutex<VecDeque<Chunk>>,
    wake: Condvar,
    mode: AtomicU8,
    released: AtomicU64,
    delays: Mutex<Vec<Duration>>,
    held_bytes: AtomicU64,
    /// End offset of everything marked for release.
    marked_end: AtomicU64,
}

/// Most release delays kept for statistics.
const MAX_DELAYS: usize = 100_000;

/// Most output held at once before the guest is made to wait (bytes).
pub const MAX_HELD: u64 = 8 << 20;

/// The primary's held output. Clone it to hand the capture side to the
/// serial device ([`HeldOutput::capture`]).
#[derive(Clone)]
pub struct HeldOutput {
    shared: Arc<Shared>,
}

/// The serial device's sink on the primary: captures bytes.
pub struct Capture {
    shared: Arc<Shared>,
}

impl Write for Capture {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let mut c = self
            .shared
            .captured
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        c.bytes.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Statistics of the output rule.
#[derive(Debug, Clone, Default)]
pub struct OutputStats {
    /// Bytes released.
    pub released: u64,
    /// Time from capture to release, one sample per chunk.
    pub delays: Vec<Duration>,
}

impl HeldOutput {
    /// Held output whose stream starts at offset `start`, released to
    /// `sink` by a thread that learns the backup's acknowledged log offset
    /// from `acked` (and may block in it up to the timeout it is given).
    pub fn start(
        start: u64,
        sink: Box<dyn Release>,
        acked: Box<dyn Fn(u64, Duration) -> bool + Send>,
    ) -> HeldOutput {
        Self::spawn(start, sink, acked, false)
    }

    /// As [`HeldOutput::start`], for a stream whose every chunk must land
    /// (shared-disk writes): a chunk the sink refuses is not counted as
    /// released, and nothing after it is released (the sink says why to
    /// whoever stops the VM; the backup keeps the chunk and writes it).
    pub fn start_strict(
        start: u64,
        sink: Box<dyn Release>,
        acked: Box<dyn Fn(u64, Duration) -> bool + Send>,
    ) -> HeldOutput {
        Self::spawn(start, sink, acked, true)
    }

    fn spawn(
        start: u64,
        mut sink: Box<dyn Release>,
        acked: Box<dyn Fn(u64, Duration) -> bool + Send>,
        strict: bool,
    ) -> HeldOutput {
        let shared = Arc::new(Shared {
            captured: Mutex::new(Captured {
                offset: start,
                bytes: Vec::new(),
            }),
            queue: Mutex::new(VecDeque::new()),
            wake: Condvar::new(),
            mode: AtomicU8::new(ReleaseMode::Rule as u8),
            released: AtomicU64::new(start),
            delays: Mutex::new(Vec::new()),
            held_bytes: AtomicU64::new(0),
            marked_end: AtomicU64::new(start),
        });
        let s = shared.clone();
        std::thread::Builder::new()
            .name("vmft-release".into())
            .spawn(move || loop {
                let chunk = {
                    let mut q = s.queue.lock().unwrap_or_else(|e| e.into_inner());
                    while q.is_empty() {
                        // Nobody can capture or mark any more: done.
                        if Arc::strong_count(&s) == 1 {
                            return;
                        }
                        q = s
                            .wake
                            .wait_timeout(q, Duration::from_millis(100))
                            .unwrap_or_else(|e| e.into_inner())
                            .0;
                    }
                    match q.front() {
                        Some(c) => (c.barrier, c.offset),
                        None => continue,
                    }
                };
                let (barrier, _) = chunk;
                let mode = ReleaseMode::from_u8(s.mode.load(Ordering::Acquire));
                let go = match mode {
                    ReleaseMode::Free => true,
                    ReleaseMode::Halt => {
                        std::thread::sleep(Duration::from_millis(100));
                        false
                    }
                    ReleaseMode::Rule => acked(barrier, Duration::from_millis(50)),
                };
                // The mode may have turned to Halt while waiting for the ack.
                if !go || ReleaseMode::from_u8(s.mode.load(Ordering::Acquire)) == ReleaseMode::Halt
                {
                    continue;
                }
                let Some(c) = s
                    .queue
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .pop_front()
                else {
                    continue;
                };
                if let Err(e) = sink.release(c.offset, &c.bytes) {
                    if strict {
                        tracing::error!(
                            offset = c.offset,
                            "releasing held output failed ({e}): nothing more is released"
                        );
                        s.mode.store(ReleaseMode::Halt as u8, Ordering::Release);
                        s.queue
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .push_front(c);
                        continue;
                    }
                    tracing::warn!("releasing held output failed: {e}");
                }
                s.held_bytes
                    .fetch_sub(c.bytes.len() as u64, Ordering::AcqRel);
                s.released
                    .store(c.offset + c.bytes.len() as u64, Ordering::Release);
                let mut delays = s.delays.lock().unwrap_or_else(|e| e.into_inner());
                // Bounded: the recent past is what figures are made of.
                if delays.len() >= MAX_DELAYS {
                    delays.drain(..MAX_DELAYS / 2);
                }
                delays.push(c.captured.elapsed());
            })
            .expect("spawn the output releaser");
        HeldOutput { shared }
    }

    /// The sink for the serial device.
    pub fn capture(&self) -> Capture {
        Capture {
            shared: self.shared.clone(),
        }
    }

    /// Whether output was captured since the last barrier.
    pub fn has_unmarked(&self) -> bool {
        !self
            .shared
            .captured
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .bytes
            .is_empty()
    }

    /// The log up to `barrier` covers every exit that wrote the captured
    /// bytes: queue them for release once the backup has acknowledged it.
    pub fn mark(&self, barrier: u64) {
        let chunk = {
            let mut c = self
                .shared
                .captured
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            if c.bytes.is_empty() {
                return;
            }
            let bytes = std::mem::take(&mut c.bytes);
            let offset = c.offset;
            c.offset += bytes.len() as u64;
            Chunk {
                offset,
                bytes,
                barrier,
                captured: Instant::now(),
            }
        };
        self.shared
            .held_bytes
            .fetch_add(chunk.bytes.len() as u64, Ordering::AcqRel);
        self.shared
            .marked_end
            .store(chunk.offset + chunk.bytes.len() as u64, Ordering::Release);
        self.shared
            .queue
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push_back(chunk);
        self.shared.wake.notify_all();
    }

    /// Start the stream at `offset` instead (a backup that went live
    /// learns where its stream stands only then). Only before anything
    /// was captured; false otherwise.
    pub fn rebase(&self, offset: u64) -> bool {
        let mut c = self
            .shared
            .captured
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if !c.bytes.is_empty() || c.offset != self.shared.marked_end.load(Ordering::Acquire) {
            return false;
        }
        if self.released() != c.offset || self.held() != 0 {
            return false;
        }
        c.offset = offset;
        self.shared.released.store(offset, Ordering::Release);
        self.shared.marked_end.store(offset, Ordering::Release);
        true
    }

    /// The stream's end: the offset after every byte captured so far.
    pub fn end(&self) -> u64 {
        let c = self
            .shared
            .captured
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        c.offset + c.bytes.len() as u64
    }

    /// Bytes queued and not yet released.
    pub fn held(&self) -> u64 {
        self.shared.held_bytes.load(Ordering::Acquire)
    }

    /// The end offset of what has been released.
    pub fn released(&self) -> u64 {
        self.shared.released.load(Ordering::Acquire)
    }

    /// Change how held output is treated.
    pub fn set_mode(&self, mode: ReleaseMode) {
        self.shared.mode.store(mode as u8, Ordering::Release);
        self.shared.wake.notify_all();
    }

    /// How held output is treated now.
    pub fn mode(&self) -> ReleaseMode {
        ReleaseMode::from_u8(self.shared.mode.load(Ordering::Acquire))
    }

    /// Wait (up to `timeout`) until everything marked is released (handed
    /// to the sink, not merely taken off the queue). False at once when
    /// nothing more will be released ([`ReleaseMode::Halt`]: the claim
    /// was lost, or a strict sink failed).
    pub fn drain(&self, timeout: Duration) -> bool {
        let t0 = Instant::now();
        loop {
            if self.released() >= self.shared.marked_end.load(Ordering::Acquire) {
                return true;
            }
            if self.mode() == ReleaseMode::Halt || t0.elapsed() >= timeout {
                return false;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// The delays of the last `n` released chunks.
    pub fn recent_delays(&self, n: usize) -> Vec<Duration> {
        let d = self.shared.delays.lock().unwrap_or_else(|e| e.into_inner());
        d[d.len().saturating_sub(n)..].to_vec()
    }

    /// Statistics so far.
    pub fn stats(&self) -> OutputStats {
        OutputStats {
            released: self.released(),
            delays: self
                .shared
                .delays
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone(),
        }
    }
}

/// The backup's output: dropped while replaying except for what the
/// primary may not have released yet; released live after going live.
#[derive(Clone)]
pub struct OutputTail {
    inner: Arc<Mutex<Tail>>,
}

struct Tail {
    /// The primary released everything before this offset.
    released: u64,
    /// Offset of the next byte the guest writes.
    next: u64,
    /// Bytes from `max(released, next - buf.len())` to `next`.
    buf: VecDeque<u8>,
    /// After going live: where output goes.
    live: Option<Box<dyn Release>>,
    /// A stream of records (frames, disk writes): never cut, since a cut
    /// record cannot be decoded and a lost disk write is lost data.
    records: bool,
    /// Said that a record tail grew past [`MAX_TAIL`].
    warned: bool,
}

/// Largest tail kept (bytes): more than this unreleased means the primary
/// has not released output for a long time.
pub const MAX_TAIL: usize = 64 << 20;

impl OutputTail {
    /// A tail for the console's byte stream starting at `start`.
    pub fn new(start: u64) -> Self {
        Self::build(start, false)
    }

    /// A tail for a stream of records (transmitted frames, shared-disk
    /// writes) starting at `start`: kept whole however long it gets (the
    /// primary's held output is bounded, so this only grows if the
    /// primary stops logging what it released).
    pub fn for_records(start: u64) -> Self {
        Self::build(start, true)
    }

    fn build(start: u64, records: bool) -> Self {
        OutputTail {
            inner: Arc::new(Mutex::new(Tail {
                released: start,
                next: start,
                buf: VecDeque::new(),
                live: None,
                records,
                warned: false,
            })),
        }
    }

    /// The primary says it released everything before `offset`.
    pub fn set_released(&self, offset: u64) {
        let mut t = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        if offset > t.released {
            t.released = offset;
            t.trim();
        }
    }

    /// The bytes kept, and the offset of the first.
    pub fn kept(&self) -> (u64, Vec<u8>) {
        let t = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        (t.next - t.buf.len() as u64, t.buf.iter().copied().collect())
    }

    /// Go live: release the kept bytes to `sink` first, then everything the
    /// guest writes from now on. Returns the offset re-sent from.
    pub fn go_live(&self, mut sink: Box<dyn Release>) -> io::Result<u64> {
        let mut t = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let from = t.next - t.buf.len() as u64;
        let kept: Vec<u8> = t.buf.drain(..).collect();
        if !kept.is_empty() {
            sink.release(from, &kept)?;
        }
        t.live = Some(sink);
        Ok(from)
    }
}

impl Tail {
    fn trim(&mut self) {
        let first = self.next - self.buf.len() as u64;
        if self.released > first {
            let drop = ((self.released - first) as usize).min(self.buf.len());
            self.buf.drain(..drop);
        }
        if self.buf.len() > MAX_TAIL && self.records {
            if !std::mem::replace(&mut self.warned, true) {
                tracing::warn!(
                    "the backup keeps {} bytes of records the primary has not said it released",
                    self.buf.len()
                );
            }
        } else if self.buf.len() > MAX_TAIL {
            let extra = self.buf.len() - MAX_TAIL;
            tracing::error!(
                "the primary released no console output for {} bytes: dropping the oldest {extra} \
                 bytes of the backup's copy (a takeover now would leave a gap)",
                self.buf.len()
            );
            self.buf.drain(..extra);
        }
    }
}

impl Write for OutputTail {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let mut t = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let offset = t.next;
        t.next += buf.len() as u64;
        if let Some(live) = t.live.as_mut() {
            live.release(offset, buf)?;
        } else {
            t.buf.extend(buf.iter().copied());
            t.trim();
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Released chunks: (offset, bytes).
    type Chunks = Vec<(u64, Vec<u8>)>;

    #[derive(Clone, Default)]
    struct Collect(Arc<Mutex<Chunks>>);

    impl Release for Collect {
        fn release(&mut self, offset: u64, bytes: &[u8]) -> io::Result<()> {
            self.0.lock().unwrap().push((offset, bytes.to_vec()));
            Ok(())
        }
    }

    impl Collect {
        fn text(&self) -> String {
            let v = self.0.lock().unwrap();
            v.iter()
                .map(|(_, b)| String::from_utf8_lossy(b).into_owned())
                .collect()
        }
    }

    fn wait_until(f: impl Fn() -> bool) -> bool {
        let t0 = Instant::now();
        while t0.elapsed() < Duration::from_secs(10) {
            if f() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        false
    }

    #[test]
    fn output_waits_for_the_ack_of_its_barrier() {
        let acked = Arc::new(AtomicU64::new(0));
        let a = acked.clone();
        let out = Collect::default();
        let held = HeldOutput::start(
            0,
            Box::new(out.clone()),
            Box::new(move |b, t| {
                std::thread::sleep(t.min(Duration::from_millis(2)));
                a.load(Ordering::Acquire) >= b
            }),
        );
        let mut cap = held.capture();
        cap.write_all(b"hello ").unwrap();
        assert!(held.has_unmarked());
        held.mark(100);
        cap.write_all(b"world").unwrap();
        held.mark(200);
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(out.text(), "", "released before the ack");
        assert!(
            !held.drain(Duration::from_millis(20)),
            "drained before release"
        );
        acked.store(150, Ordering::Release);
        assert!(wait_until(|| out.text() == "hello "));
        std::thread::sleep(Duration::from_millis(30));
        assert_eq!(out.text(), "hello ");
        acked.store(200, Ordering::Release);
        assert!(held.drain(Duration::from_secs(10)));
        assert_eq!(
            out.text(),
            "hello world",
            "drain returned before the release"
        );
        assert_eq!(held.released(), 11);
        assert_eq!(out.0.lock().unwrap()[1].0, 6, "offsets travel with chunks");
        assert_eq!(held.stats().delays.len(), 2);
    }

    #[test]
    fn free_releases_at_once_and_halt_releases_nothing() {
        let out = Collect::default();
        let held = HeldOutput::start(
            10,
            Box::new(out.clone()),
            Box::new(|_, t| {
                std::thread::sleep(t.min(Duration::from_millis(2)));
                false
            }),
        );
        held.capture().write_all(b"a").unwrap();
        held.mark(5);
        std::thread::sleep(Duration::from_millis(30));
        assert_eq!(out.text(), "");
        held.set_mode(ReleaseMode::Free);
        assert!(wait_until(|| out.text() == "a"));
        assert_eq!(out.0.lock().unwrap()[0].0, 10);
        held.set_mode(ReleaseMode::Halt);
        held.capture().write_all(b"b").unwrap();
        held.mark(6);
        std::thread::sleep(Duration::from_millis(150));
        assert_eq!(out.text(), "a", "a halted side released output");
    }

    #[test]
    fn a_strict_stream_does_not_count_a_refused_chunk_as_released() {
        struct Refuse(Arc<Mutex<Vec<u64>>>);
        impl Release for Refuse {
            fn release(&mut self, offset: u64, _bytes: &[u8]) -> io::Result<()> {
                self.0.lock().unwrap().push(offset);
                if offset >= 3 {
                    return Err(io::Error::other("disk full"));
                }
                Ok(())
            }
        }
        let tried = Arc::new(Mutex::new(Vec::new()));
        let held =
            HeldOutput::start_strict(0, Box::new(Refuse(tried.clone())), Box::new(|_, _| true));
        let mut cap = held.capture();
        cap.write_all(b"abc").unwrap();
        held.mark(1);
        assert!(wait_until(|| held.released() == 3));
        cap.write_all(b"def").unwrap();
        held.mark(2);
        cap.write_all(b"ghi").unwrap();
        held.mark(3);
        assert!(wait_until(|| tried.lock().unwrap().contains(&3)));
        std::thread::sleep(Duration::from_millis(300));
        assert_eq!(held.released(), 3, "the refused chunk is not released");
        assert_eq!(
            *tried.lock().unwrap(),
            vec![0, 3],
            "nothing after it is tried"
        );
        // Halted: a drain says so at once instead of waiting it out.
        assert_eq!(held.mode(), ReleaseMode::Halt);
        let t = Instant::now();
        assert!(!held.drain(Duration::from_secs(30)));
        assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    }

    #[test]
    fn a_record_tail_is_never_cut() {
        let mut tail = OutputTail::for_records(0);
        let chunk = vec![7u8; 1 << 20];
        for _ in 0..(MAX_TAIL >> 20) + 2 {
            tail.write_all(&chunk).unwrap();
        }
        let (from, kept) = tail.kept();
        assert_eq!(from, 0);
        assert_eq!(kept.len(), MAX_TAIL + (2 << 20));
        tail.set_released(1 << 20);
        assert_eq!(tail.kept().0, 1 << 20);
        // The console's tail is cut past the limit instead.
        let mut console = OutputTail::new(0);
        for _ in 0..(MAX_TAIL >> 20) + 2 {
            console.write_all(&chunk).unwrap();
        }
        assert_eq!(console.kept().1.len(), MAX_TAIL);
    }

    #[test]
    fn the_tail_keeps_what_was_not_released_and_resends_it_going_live() {
        let mut tail = OutputTail::new(0);
        tail.write_all(b"line 1\nline 2\n").unwrap();
        tail.set_released(7);
        assert_eq!(tail.kept(), (7, b"line 2\n".to_vec()));
        tail.write_all(b"line 3\n").unwrap();
        // The released mark may run ahead of the backup's own output.
        tail.set_released(30);
        assert_eq!(tail.kept().1, b"");
        tail.write_all(b"line 4\nline 5\n").unwrap(); // offsets 21..35
        assert_eq!(tail.kept(), (30, b"ne 5\n".to_vec()));
        let out = Collect::default();
        assert_eq!(tail.go_live(Box::new(out.clone())).unwrap(), 30);
        tail.write_all(b"line 6\n").unwrap();
        let v = out.0.lock().unwrap().clone();
        assert_eq!(
            v,
            vec![(30, b"ne 5\n".to_vec()), (35, b"line 6\n".to_vec())]
        );
    }
}
