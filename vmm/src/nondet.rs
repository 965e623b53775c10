//! The one door for nondeterminism.
//!
//! Every value the monitor hands the guest that does not follow from guest
//! state (time read by the PIT, port 0x61 and the RTC, console input, later
//! disk data and packets), every asynchronous event and every interrupt
//! injection passes through a [`Door`]. Three doors exist:
//!
//! - [`LiveDoor`]: host clocks and the real console (`vmft run`);
//! - [`crate::record::RecordDoor`]: the live door, with each value, event,
//!   exit and injection written to the log with its position (`vmft record`);
//! - [`crate::replay::ReplayDoor`]: values, events and injections taken from
//!   the log, each exit checked against the primary's (`vmft replay`).
//!
//! Nothing else in the monitor may read a host clock or outside input on
//! the guest's behalf.
//!
//! What the door does **not** see: instructions the guest executes without
//! an exit. On these hosts `RDTSC`, `RDRAND`, `RDSEED` and `CPUID` are not
//! intercepted (KVM returns live host values). The guest is configured not
//! to use them (`clearcpuid=tsc,rdrand,rdseed`, `tsc=unstable`,
//! `clocksource=jiffies`, a kernel patch for the entropy pool; see
//! `guest-images/README.md`); CPUID is the same on both sides of a pair
//! running on the same CPU model. Anything that still uses them shows up as
//! a divergence, which the replay detects (every exit and fingerprint is
//! checked) and reports; it does not trust the configuration.

use std::collections::VecDeque;
use std::io::{self, Read};
use std::sync::mpsc::{self, Receiver, Sender};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use ft_log::{Epoch, ExitRecord, Fingerprint, InputCursor, LogError};
use thiserror::Error;

use crate::vcpu::Kicker;

/// Position of an event in the guest's execution: the number of
/// guest-caused exits before it. Both sides count the same exits. (A
/// retired-branch counter would refine it on hosts with a PMU; everything
/// that positions events goes through this type.)
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
pub struct Position {
    /// Guest-caused exits so far.
    pub exit: u64,
}

/// Where positions come from: the one interface every event position goes
/// through. These hosts have no PMU, so positions are counts of
/// guest-caused exits ([`ExitCounter`]); on hosts with one, a source built
/// on a retired-branch counter would implement this trait (and could place
/// interrupts anywhere, making epochs rare).
pub trait PositionSource: Send {
    /// A guest-caused exit happened: the position it defines.
    fn exit(&mut self) -> Position;
    /// The position now (at a boundary).
    fn now(&self) -> Position;
}

/// Positions as guest-caused exit counts.
#[derive(Debug, Default, Clone)]
pub struct ExitCounter {
    pos: Position,
}

impl ExitCounter {
    /// Continue counting from `pos` (after a snapshot restore).
    pub fn starting_at(pos: Position) -> Self {
        ExitCounter { pos }
    }
}

impl PositionSource for ExitCounter {
    fn exit(&mut self) -> Position {
        self.pos.exit += 1;
        self.pos
    }

    fn now(&self) -> Position {
        self.pos
    }
}

/// Why the run loop stopped waiting in [`Door::wait`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wake {
    /// The deadline passed.
    Deadline,
    /// Input arrived.
    Input,
    /// Nothing can ever wake the guest (no deadline, input closed).
    Never,
}

/// Which door.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// No fault tolerance.
    Live,
    /// Primary: executing for real and logging.
    Record,
    /// Backup: executing from the log.
    Replay,
}

/// Outside events due at an exit boundary.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Due {
    /// The timer is due; the guest clock at that moment.
    pub timer_now: Option<u64>,
    /// Console input bytes to hand to the UART.
    pub input: Vec<u8>,
    /// Where the console's input stream goes on after `input` (numbered
    /// input only): logged with it, so a backup going live resumes there.
    pub input_next: Option<InputCursor>,
}

/// A chunk of console input as it arrived; `seq` when the console
/// endpoint numbered it (`vmft console`), `None` from a plain stdin.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InputChunk {
    /// The console's number for this chunk.
    pub seq: Option<u64>,
    /// The bytes.
    pub bytes: Vec<u8>,
}

/// Where a door's console input comes from. `next_chunk` blocks until
/// input arrives; `Ok(None)` means no more will.
pub trait InputSource: Send {
    /// The next chunk of input.
    fn next_chunk(&mut self) -> io::Result<Option<InputChunk>>;
}

/// Any reader (stdin, the escape filter) as unnumbered input.
pub struct ReadInput<R>(pub R);

impl<R: Read + Send> InputSource for ReadInput<R> {
    fn next_chunk(&mut self) -> io::Result<Option<InputChunk>> {
        let mut buf = [0u8; 256];
        loop {
            match self.0.read(&mut buf) {
                Ok(0) => return Ok(None),
                Ok(n) => {
                    return Ok(Some(InputChunk {
                        seq: None,
                        bytes: buf[..n].to_vec(),
                    }))
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        }
    }
}

/// Input received and not yet handed to the guest, and where the input
/// stream stands: hands out bytes across chunk borders and says which
/// chunk and byte come next.
#[derive(Debug, Default)]
struct InputBuffer {
    chunks: VecDeque<InputChunk>,
    /// Bytes of the front chunk already handed out.
    taken: usize,
    /// The seq of the last chunk handed out completely.
    last_done: Option<u64>,
}

impl InputBuffer {
    fn push(&mut self, chunk: InputChunk) {
        if !chunk.bytes.is_empty() {
            self.chunks.push_back(chunk);
        }
    }

    fn is_empty(&self) -> bool {
        self.chunks.is_empty()
    }

    /// Up to `n` bytes, in order.
    fn take(&mut self, mut n: usize) -> Vec<u8> {
        let mut out = Vec::new();
        while n > 0 {
            let Some(front) = self.chunks.front() else {
                break;
            };
            let k = n.min(front.bytes.len() - self.taken);
            out.extend_from_slice(&front.bytes[self.taken..self.taken + k]);
            self.taken += k;
            n -= k;
            if self.taken == front.bytes.len() {
                self.last_done = front.seq;
                self.taken = 0;
                self.chunks.pop_front();
            }
        }
        out
    }

    /// The next byte of the numbered input stream: inside the front chunk,
    /// or the chunk after the last one handed out.
    fn cursor(&self) -> Option<InputCursor> {
        match self.chunks.front() {
            Some(c) => c.seq.map(|seq| InputCursor {
                seq,
                skip: self.taken as u64,
            }),
            None => self.last_done.map(|seq| InputCursor {
                seq: seq + 1,
                skip: 0,
            }),
        }
    }
}

/// Errors from a door: the log, or a divergence between primary and backup.
#[derive(Debug, Error)]
pub enum DoorError {
    /// The replay differs from the recording.
    #[error("divergence at exit {exit}: the primary {primary}, the backup {backup}")]
    Divergence {
        /// Exit number where it was noticed.
        exit: u64,
        /// What the log says.
        primary: String,
        /// What the replaying guest did.
        backup: String,
    },
    /// The log ended (cleanly, on a frame boundary) without an end entry:
    /// the recording stopped there.
    #[error("the log ends at exit {exit} without an end entry: the recording stopped there")]
    LogEnded {
        /// Exit the replay had reached.
        exit: u64,
    },
    /// The replay reached the recording's end, or its own end, in a
    /// different state.
    #[error("divergence at the end (exit {exit}): the primary ended with {primary}, the backup with {backup}")]
    FinalDivergence {
        /// Exit number of the end.
        exit: u64,
        /// The primary's reason and digest.
        primary: String,
        /// The backup's.
        backup: String,
    },
    /// The backup did not go live: another side won the claim.
    #[error("another side is live: {owner} won the claim for {vm} generation {generation}")]
    LostClaim {
        /// The VM.
        vm: String,
        /// The generation claimed.
        generation: u64,
        /// The winner.
        owner: String,
    },
    /// The side cannot go on (the arbiter refused, the channel failed).
    #[error("{0}")]
    Ft(String),
    /// This side was fenced off a shared resource by a newer side (a
    /// shared disk's fence names another live side): it stops itself.
    #[error("fenced: {0}")]
    Fenced(String),
    /// The log could not be decoded.
    #[error("log {path}: {source}")]
    Log {
        /// Log path.
        path: String,
        /// Format error.
        source: LogError,
    },
    /// Reading or writing the log failed.
    #[error("log {path}: {source}")]
    Io {
        /// Log path.
        path: String,
        /// Underlying error.
        source: std::io::Error,
    },
}

impl DoorError {
    /// The exit status vmft ends with for this error: 3 when another side
    /// is live (a lost claim), 4 for a divergence, 5 when fenced off a
    /// shared disk, 1 for anything else.
    pub fn exit_status(&self) -> u8 {
        match self {
            DoorError::LostClaim { .. } => 3,
            DoorError::Divergence { .. } | DoorError::FinalDivergence { .. } => 4,
            DoorError::Fenced(_) => 5,
            _ => 1,
        }
    }
}

/// The shared-disk reads logged at one exit.
#[derive(Debug, Default)]
pub struct DiskReadsAt {
    /// In order: (disk index, data).
    pub reads: Vec<(u8, Vec<u8>)>,
    /// The log ended within the exit and the door went live.
    pub live: bool,
}

/// The interface through which every nondeterministic value that the
/// monitor hands the guest enters the VM (see the module documentation for
/// what the guest could still read without the monitor).
pub trait Door {
    /// Which door this is.
    fn mode(&self) -> Mode;
    /// Guest-caused exit number `pos` happened (record: trace it; replay: check it).
    fn exit(&mut self, pos: u64, rec: ExitRecord) -> Result<(), DoorError>;
    /// Guest monotonic clock handed to the guest during exit `pos`, in ns.
    fn clock_ns(&mut self, pos: u64) -> Result<u64, DoorError>;
    /// Wall clock (Unix seconds) handed to the guest during exit `pos`.
    fn wall_clock_secs(&mut self, pos: u64) -> Result<i64, DoorError>;
    /// Outside events due at the boundary after exit `pos`: the timer if
    /// its deadline (guest clock) passed, up to `rx_room` input bytes.
    fn due(
        &mut self,
        pos: u64,
        timer_deadline: Option<u64>,
        rx_room: usize,
    ) -> Result<Due, DoorError>;
    /// A network frame to place in the guest's receive queue at the
    /// boundary after exit `pos`, if one waits and `ready` (the queue has
    /// a buffer). Record: logged. Replay: the logged frame, if any.
    fn net_rx(&mut self, _pos: u64, _ready: bool) -> Result<Option<Vec<u8>>, DoorError> {
        Ok(None)
    }
    /// Record/live: whether something is due now (for a kick decision).
    fn pending(&mut self, timer_deadline: Option<u64>) -> bool;
    /// Record: the offered interrupt is injected at `pos` (logged). Replay:
    /// the vector the primary injected at `pos`, checked against the offer.
    /// `offer` is the vector the PIC would deliver now (live/record: only
    /// when the vCPU can take it). Returns the vector to inject, if any.
    fn interrupt(
        &mut self,
        pos: u64,
        offer: Option<u8>,
        fp: &mut dyn FnMut() -> Fingerprint,
    ) -> Result<Option<u8>, DoorError>;
    /// Log a check (record), compare with the primary's check at `pos`
    /// (replay), or nothing (live). `compute` gives the fingerprint and,
    /// when asked for, the memory digest.
    fn check(
        &mut self,
        pos: u64,
        compute: &mut dyn FnMut(bool) -> (Fingerprint, Option<u64>),
    ) -> Result<(), DoorError>;
    /// The run ended after exit `pos` for `reason`: log the end with the
    /// final state digest (record), check that the recording ended here
    /// the same way (replay: a difference is a [`DoorError::Divergence`]),
    /// or nothing (live). `digest` computes the digest when it is needed.
    fn finish(
        &mut self,
        pos: u64,
        reason: &str,
        digest: &mut dyn FnMut() -> String,
    ) -> Result<(), DoorError>;
    /// The guest is idle (HLT): block until `deadline_ns` (guest clock) or
    /// until input arrives. Replay returns at once.
    fn wait(&mut self, deadline_ns: Option<u64>) -> Wake;
    /// Flush buffered log output.
    fn flush(&mut self) -> Result<(), DoorError> {
        Ok(())
    }
    /// The recording role of this door, if it records.
    fn recorder(&mut self) -> Option<&mut dyn Recorder> {
        None
    }
    /// The live door inside this one (live or recording), to go on from
    /// (re-protection); the rest of this door, its log, is dropped.
    fn into_live(self: Box<Self>) -> Option<LiveDoor> {
        None
    }
    /// The replaying role of this door, if it replays.
    fn replayer(&mut self) -> Option<&mut dyn Replayer> {
        None
    }
}

/// What only a recording door does: cut epochs into the log, mark output
/// barriers, and say what the log holds.
pub trait Recorder {
    /// Log an epoch cut after exit `pos`.
    fn log_epoch(&mut self, pos: u64, epoch: Epoch) -> Result<(), DoorError>;
    /// Flush the log through the last exit and return its length: output
    /// written so far is released once the backup acknowledged this much.
    fn barrier(&mut self) -> Result<u64, DoorError>;
    /// Console input bytes logged so far (confirmed to the console once
    /// the backup has them).
    fn input_logged(&self) -> u64;
    /// Log that console output was released up to `offset`.
    fn released(&mut self, offset: u64) -> Result<(), DoorError>;
    /// Log that transmitted frames were written up to `offset` of the
    /// framed transmit stream.
    fn net_released(&mut self, offset: u64) -> Result<(), DoorError>;
    /// Log data the guest read from shared disk `disk` during exit `pos`.
    fn disk_read(&mut self, pos: u64, disk: u8, data: Vec<u8>) -> Result<(), DoorError>;
    /// Log that the shared-disk write stream reached the disk up to
    /// `offset`.
    fn disk_released(&mut self, offset: u64) -> Result<(), DoorError>;
    /// Statistics of the recording.
    fn stats(&self) -> crate::record::RecordStats;
}

/// What only a replaying door does: hand out the primary's epochs, say
/// where the recording stopped, and hand over the live door when the log
/// ended and the backup may go live.
pub trait Replayer {
    /// The next epoch the primary cut after exit `pos`, if any.
    fn next_epoch(&mut self, pos: u64) -> Result<Option<Epoch>, DoorError>;
    /// Whether the recording was stopped on request at `pos` (its end
    /// entry is next, with `reason`).
    fn stopped_at(&mut self, pos: u64, reason: &str) -> Result<bool, DoorError>;
    /// The log ended and the gate let this side go live: the live door to
    /// run on from here (once; the replay is over).
    fn take_live(&mut self) -> Option<LiveDoor>;
    /// The shared-disk reads logged at exit `pos`, in order, and whether
    /// the door went live there (the log ended within the exit: the
    /// devices read the images themselves for the reads it did not log).
    fn disk_reads(&mut self, pos: u64) -> Result<DiskReadsAt, DoorError>;
}

/// Something from outside the VM for the live door.
#[derive(Debug)]
pub enum Incoming {
    /// Console input.
    Console(InputChunk),
    /// The console input ended.
    ConsoleClosed,
    /// A network frame for the guest.
    Frame(Vec<u8>),
}

/// Frames kept for the guest while its receive queue is full; more are
/// dropped (counted), as a full NIC would.
pub const MAX_QUEUED_FRAMES: usize = 256;

/// The live door: host clocks, the real console and the network.
pub struct LiveDoor {
    start: Instant,
    /// Guest clock at `start` (non-zero after a restore).
    base_ns: u64,
    wall_base: i64,
    /// Everything from outside arrives here; `tx` is kept for the tap
    /// reader that may attach later.
    tx: Sender<Incoming>,
    rx: Receiver<Incoming>,
    pending: InputBuffer,
    /// A console input source exists and has not ended.
    console_open: bool,
    /// A network card receives from outside.
    net_attached: bool,
    /// Whether the guest's receive queue had room at the last boundary.
    net_ready: bool,
    frames: VecDeque<Vec<u8>>,
    /// Frames dropped because too many waited.
    pub frames_dropped: u64,
    /// Console input bytes handed to the guest so far.
    input_handed: u64,
}

impl LiveDoor {
    /// Console input bytes handed to the guest through this door (a
    /// recording that continues from it counts on from here).
    pub fn input_handed(&self) -> u64 {
        self.input_handed
    }

    /// A door whose guest clock starts at `base_ns`, with console input
    /// read from `input` (if any) on a helper thread that kicks the vCPU.
    pub fn new(base_ns: u64, input: Option<Box<dyn InputSource>>, kicker: Kicker) -> Self {
        let (tx, rx) = mpsc::channel();
        let console_open = input.is_some();
        if let Some(mut source) = input {
            let tx = tx.clone();
            std::thread::Builder::new()
                .name("vmft-console-in".into())
                .spawn(move || {
                    while let Ok(Some(chunk)) = source.next_chunk() {
                        if tx.send(Incoming::Console(chunk)).is_err() {
                            return;
                        }
                        kicker.kick();
                    }
                    let _ = tx.send(Incoming::ConsoleClosed);
                    kicker.kick();
                })
                .expect("spawn console input thread");
        }
        let wall_base = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs() as i64)
            .unwrap_or(0);
        LiveDoor {
            start: Instant::now(),
            base_ns,
            wall_base: wall_base - (base_ns / 1_000_000_000) as i64,
            tx,
            rx,
            pending: InputBuffer::default(),
            console_open,
            net_attached: false,
            net_ready: false,
            frames: VecDeque::new(),
            frames_dropped: 0,
            input_handed: 0,
        }
    }

    /// Where a network card's receiver sends the frames it reads (each
    /// followed by a kick of the vCPU); marks the network as attached.
    pub fn attach_net(&mut self) -> Sender<Incoming> {
        self.net_attached = true;
        self.tx.clone()
    }

    /// Continue the guest clock from `base_ns` now (a backup going live
    /// continues from the last time the guest saw).
    pub fn rebase(&mut self, base_ns: u64) {
        let wall = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs() as i64)
            .unwrap_or(0);
        self.start = Instant::now();
        self.base_ns = base_ns;
        self.wall_base = wall - (base_ns / 1_000_000_000) as i64;
    }

    /// The guest clock now.
    pub fn now_ns(&self) -> u64 {
        self.base_ns + self.start.elapsed().as_nanos() as u64
    }

    fn take(&mut self, msg: Incoming) {
        match msg {
            Incoming::Console(chunk) => self.pending.push(chunk),
            Incoming::ConsoleClosed => self.console_open = false,
            // The tap reader's "are you still there" probe.
            Incoming::Frame(f) if f.is_empty() => {}
            Incoming::Frame(f) if self.frames.len() < MAX_QUEUED_FRAMES => self.frames.push_back(f),
            Incoming::Frame(_) => self.frames_dropped += 1,
        }
    }

    fn drain_input(&mut self) {
        while let Ok(msg) = self.rx.try_recv() {
            self.take(msg);
        }
    }

    /// Something the guest can take now.
    fn has_input(&self) -> bool {
        !self.pending.is_empty() || (self.net_ready && !self.frames.is_empty())
    }
}

impl Door for LiveDoor {
    fn into_live(self: Box<Self>) -> Option<LiveDoor> {
        Some(*self)
    }

    fn mode(&self) -> Mode {
        Mode::Live
    }

    fn exit(&mut self, _pos: u64, _rec: ExitRecord) -> Result<(), DoorError> {
        Ok(())
    }

    fn clock_ns(&mut self, _pos: u64) -> Result<u64, DoorError> {
        Ok(self.now_ns())
    }

    fn wall_clock_secs(&mut self, _pos: u64) -> Result<i64, DoorError> {
        Ok(self.wall_base + (self.now_ns() / 1_000_000_000) as i64)
    }

    fn due(
        &mut self,
        _pos: u64,
        timer_deadline: Option<u64>,
        rx_room: usize,
    ) -> Result<Due, DoorError> {
        let now = self.now_ns();
        self.drain_input();
        let input = self.pending.take(rx_room);
        self.input_handed += input.len() as u64;
        let input_next = if input.is_empty() {
            None
        } else {
            self.pending.cursor()
        };
        Ok(Due {
            timer_now: timer_deadline.filter(|d| now >= *d).map(|_| now),
            input,
            input_next,
        })
    }

    fn net_rx(&mut self, _pos: u64, ready: bool) -> Result<Option<Vec<u8>>, DoorError> {
        self.net_ready = ready;
        self.drain_input();
        Ok(if ready { self.frames.pop_front() } else { None })
    }

    fn pending(&mut self, timer_deadline: Option<u64>) -> bool {
        self.drain_input();
        self.has_input() || timer_deadline.is_some_and(|d| self.now_ns() >= d)
    }

    fn interrupt(
        &mut self,
        _pos: u64,
        offer: Option<u8>,
        _fp: &mut dyn FnMut() -> Fingerprint,
    ) -> Result<Option<u8>, DoorError> {
        Ok(offer)
    }

    fn check(
        &mut self,
        _pos: u64,
        _compute: &mut dyn FnMut(bool) -> (Fingerprint, Option<u64>),
    ) -> Result<(), DoorError> {
        Ok(())
    }

    fn finish(
        &mut self,
        _pos: u64,
        _reason: &str,
        _digest: &mut dyn FnMut() -> String,
    ) -> Result<(), DoorError> {
        Ok(())
    }

    fn wait(&mut self, deadline_ns: Option<u64>) -> Wake {
        self.drain_input();
        loop {
            if self.has_input() {
                return Wake::Input;
            }
            let msg = match deadline_ns {
                Some(d) => {
                    let t = Duration::from_nanos(d.saturating_sub(self.now_ns()));
                    if t.is_zero() {
                        return Wake::Deadline;
                    }
                    match self.rx.recv_timeout(t) {
                        Ok(m) => m,
                        Err(_) => return Wake::Deadline,
                    }
                }
                None if self.console_open || self.net_attached => match self.rx.recv() {
                    Ok(m) => m,
                    Err(_) => return Wake::Never,
                },
                None => return Wake::Never,
            };
            self.take(msg);
        }
    }
}

/// A door with a fixed clock and scripted input, for device tests.
#[derive(Debug, Default)]
pub struct FixedDoor {
    /// Value returned by `clock_ns`.
    pub now_ns: u64,
    /// Value returned by `wall_clock_secs`.
    pub wall_secs: i64,
    /// Input handed out by `due`.
    pub input: Vec<u8>,
}

impl Door for FixedDoor {
    fn mode(&self) -> Mode {
        Mode::Live
    }
    fn exit(&mut self, _pos: u64, _rec: ExitRecord) -> Result<(), DoorError> {
        Ok(())
    }
    fn clock_ns(&mut self, _pos: u64) -> Result<u64, DoorError> {
        Ok(self.now_ns)
    }
    fn wall_clock_secs(&mut self, _pos: u64) -> Result<i64, DoorError> {
        Ok(self.wall_secs)
    }
    fn due(&mut self, _pos: u64, d: Option<u64>, room: usize) -> Result<Due, DoorError> {
        let n = room.min(self.input.len());
        Ok(Due {
            timer_now: d.filter(|d| self.now_ns >= *d).map(|_| self.now_ns),
            input: self.input.drain(..n).collect(),
            input_next: None,
        })
    }
    fn pending(&mut self, d: Option<u64>) -> bool {
        !self.input.is_empty() || d.is_some_and(|d| self.now_ns >= d)
    }
    fn interrupt(
        &mut self,
        _pos: u64,
        v: Option<u8>,
        _fp: &mut dyn FnMut() -> Fingerprint,
    ) -> Result<Option<u8>, DoorError> {
        Ok(v)
    }
    fn check(
        &mut self,
        _pos: u64,
        _c: &mut dyn FnMut(bool) -> (Fingerprint, Option<u64>),
    ) -> Result<(), DoorError> {
        Ok(())
    }
    fn finish(
        &mut self,
        _pos: u64,
        _reason: &str,
        _digest: &mut dyn FnMut() -> String,
    ) -> Result<(), DoorError> {
        Ok(())
    }
    fn wait(&mut self, deadline_ns: Option<u64>) -> Wake {
        match deadline_ns {
            Some(d) => {
                self.now_ns = self.now_ns.max(d);
                Wake::Deadline
            }
            None if !self.input.is_empty() => Wake::Input,
            None => Wake::Never,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_counter_numbers_exits_from_one_and_resumes() {
        let mut c = ExitCounter::default();
        assert_eq!(c.now().exit, 0);
        assert_eq!(c.exit().exit, 1);
        assert_eq!(c.exit().exit, 2);
        assert_eq!(c.now().exit, 2);
        let mut r = ExitCounter::starting_at(Position { exit: 41 });
        assert_eq!(r.exit().exit, 42);
    }

    fn chunk(seq: Option<u64>, bytes: &[u8]) -> InputChunk {
        InputChunk {
            seq,
            bytes: bytes.to_vec(),
        }
    }

    #[test]
    fn the_input_buffer_says_where_the_numbered_stream_goes_on() {
        let mut b = InputBuffer::default();
        assert_eq!(b.cursor(), None, "nothing seen yet");
        b.push(chunk(Some(7), b"abc"));
        b.push(chunk(Some(8), b""));
        b.push(chunk(Some(9), b"de"));
        assert_eq!(b.take(2), b"ab");
        assert_eq!(b.cursor(), Some(InputCursor { seq: 7, skip: 2 }));
        assert_eq!(b.take(2), b"cd", "across the chunk border");
        assert_eq!(b.cursor(), Some(InputCursor { seq: 9, skip: 1 }));
        assert_eq!(b.take(16), b"e");
        assert!(b.is_empty());
        assert_eq!(b.cursor(), Some(InputCursor { seq: 10, skip: 0 }));
        assert_eq!(b.take(4), b"");
        // Unnumbered input (stdin) has no cursor.
        let mut s = InputBuffer::default();
        s.push(chunk(None, b"xy"));
        assert_eq!(s.take(1), b"x");
        assert_eq!(s.cursor(), None);
    }

    #[test]
    fn fixed_door_reports_due_timer_and_input() {
        let mut d = FixedDoor {
            now_ns: 100,
            input: b"abc".to_vec(),
            ..Default::default()
        };
        let due = d.due(1, Some(50), 2).unwrap();
        assert_eq!(due.timer_now, Some(100));
        assert_eq!(due.input, b"ab");
        assert_eq!(d.due(2, Some(200), 8).unwrap().timer_now, None);
    }
}
