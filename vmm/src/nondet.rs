//! The one door for nondeterminism.
//!
//! Every value the monitor hands the guest that does not follow from guest
//! state (time read by the PIT, port 0x61 and the RTC, console input, later
//! disk data and packets) and every interrupt injection passes through a
//! [`Door`]. The live door reads the host; the recorder (issue 4) wraps it
//! and logs each value with its position; the replayer returns the logged
//! values instead. Nothing else in the monitor may read a host clock or an
//! outside input on the guest's behalf.

use std::io::Read;
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::vcpu::Kicker;

/// Position of an event in the guest's execution: the number of
/// guest-caused exits before it. Both sides count the same exits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
pub struct Position {
    /// Guest-caused exits so far.
    pub exit: u64,
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

/// The interface through which every nondeterministic value enters the VM.
pub trait Door {
    /// The guest-caused exit the vCPU is at (called once per such exit).
    fn at(&mut self, pos: Position);
    /// Guest monotonic clock, nanoseconds since the VM was first booted.
    fn clock_ns(&mut self) -> u64;
    /// Wall clock for the RTC, seconds since the Unix epoch.
    fn wall_clock_secs(&mut self) -> i64;
    /// Console input available now, at most `room` bytes.
    fn console_input(&mut self, room: usize) -> Vec<u8>;
    /// An interrupt with `vector` is being injected now.
    fn interrupt(&mut self, vector: u8);
    /// The guest is idle (HLT): block until `deadline_ns` (guest clock) or
    /// until input arrives.
    fn wait(&mut self, deadline_ns: Option<u64>) -> Wake;
}

/// The live door: host clocks and the real console.
pub struct LiveDoor {
    start: Instant,
    /// Guest clock at `start` (non-zero after a restore).
    base_ns: u64,
    wall_base: i64,
    input: Option<Receiver<Vec<u8>>>,
    pending: Vec<u8>,
    input_closed: bool,
}

impl LiveDoor {
    /// A door whose guest clock starts at `base_ns`, with console input
    /// read from `input` (if any) on a helper thread that kicks the vCPU.
    pub fn new(base_ns: u64, input: Option<Box<dyn Read + Send>>, kicker: Kicker) -> Self {
        let rx = input.map(|mut reader| {
            let (tx, rx) = mpsc::channel();
            std::thread::Builder::new()
                .name("vmft-console-in".into())
                .spawn(move || {
                    let mut buf = [0u8; 256];
                    loop {
                        match reader.read(&mut buf) {
                            Ok(0) | Err(_) => break,
                            Ok(n) => {
                                if tx.send(buf[..n].to_vec()).is_err() {
                                    break;
                                }
                                kicker.kick();
                            }
                        }
                    }
                })
                .expect("spawn console input thread");
            rx
        });
        let wall_base = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs() as i64)
            .unwrap_or(0);
        LiveDoor {
            start: Instant::now(),
            base_ns,
            wall_base: wall_base - (base_ns / 1_000_000_000) as i64,
            input: rx,
            pending: Vec::new(),
            input_closed: false,
        }
    }

    fn drain_input(&mut self) {
        if let Some(rx) = &self.input {
            loop {
                match rx.try_recv() {
                    Ok(bytes) => self.pending.extend(bytes),
                    Err(mpsc::TryRecvError::Empty) => break,
                    Err(mpsc::TryRecvError::Disconnected) => {
                        self.input_closed = true;
                        break;
                    }
                }
            }
        } else {
            self.input_closed = true;
        }
    }
}

impl Door for LiveDoor {
    fn at(&mut self, _pos: Position) {}

    fn clock_ns(&mut self) -> u64 {
        self.base_ns + self.start.elapsed().as_nanos() as u64
    }

    fn wall_clock_secs(&mut self) -> i64 {
        self.wall_base + (self.clock_ns() / 1_000_000_000) as i64
    }

    fn console_input(&mut self, room: usize) -> Vec<u8> {
        self.drain_input();
        let n = room.min(self.pending.len());
        self.pending.drain(..n).collect()
    }

    fn interrupt(&mut self, _vector: u8) {}

    fn wait(&mut self, deadline_ns: Option<u64>) -> Wake {
        self.drain_input();
        if !self.pending.is_empty() {
            return Wake::Input;
        }
        let timeout = deadline_ns.map(|d| Duration::from_nanos(d.saturating_sub(self.clock_ns())));
        match (&self.input, timeout) {
            (Some(rx), Some(t)) if !self.input_closed => match rx.recv_timeout(t) {
                Ok(bytes) => {
                    self.pending.extend(bytes);
                    Wake::Input
                }
                Err(RecvTimeoutError::Timeout) => Wake::Deadline,
                Err(RecvTimeoutError::Disconnected) => {
                    self.input_closed = true;
                    std::thread::sleep(t);
                    Wake::Deadline
                }
            },
            (Some(rx), None) if !self.input_closed => match rx.recv() {
                Ok(bytes) => {
                    self.pending.extend(bytes);
                    Wake::Input
                }
                Err(_) => {
                    self.input_closed = true;
                    Wake::Never
                }
            },
            (_, Some(t)) => {
                std::thread::sleep(t);
                Wake::Deadline
            }
            (_, None) => Wake::Never,
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
    /// Input handed out by `console_input`.
    pub input: Vec<u8>,
    /// Vectors injected.
    pub injected: Vec<u8>,
}

impl Door for FixedDoor {
    fn at(&mut self, _pos: Position) {}
    fn clock_ns(&mut self) -> u64 {
        self.now_ns
    }
    fn wall_clock_secs(&mut self) -> i64 {
        self.wall_secs
    }
    fn console_input(&mut self, room: usize) -> Vec<u8> {
        let n = room.min(self.input.len());
        self.input.drain(..n).collect()
    }
    fn interrupt(&mut self, vector: u8) {
        self.injected.push(vector);
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
