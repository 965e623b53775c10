//! A side's end of the console stream, as the pair roles use it: released
//! output goes to the console endpoint ([`ConsoleSide`] is a
//! [`Release`]), typed input comes from it (a blocking, numbered
//! [`InputSource`] for the live door), and input is confirmed once the backup holds the log entry
//! that carries it ([`InputConfirmer`]).

use std::collections::VecDeque;
use std::io;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ft_log::InputCursor;

use crate::console::ConsoleLink;
use crate::nondet::{InputChunk, InputSource};

use super::output::Release;

/// The console link shared by the releaser, the input reader and the end.
#[derive(Clone)]
pub struct ConsoleSide {
    /// The link; the mutex is held only to clone or take the `Arc`, never
    /// across a call that may block (`release` waits while the console's
    /// buffer is full).
    link: Arc<Mutex<Option<Arc<ConsoleLink>>>>,
    /// Input seqs read so far and the cumulative input bytes at their end.
    seqs: Arc<Mutex<VecDeque<(u64, u64)>>>,
}

impl ConsoleSide {
    /// Share `link`.
    pub fn new(link: ConsoleLink) -> Self {
        ConsoleSide {
            link: Arc::new(Mutex::new(Some(Arc::new(link)))),
            seqs: Arc::new(Mutex::new(VecDeque::new())),
        }
    }

    fn with<T>(&self, f: impl FnOnce(&ConsoleLink) -> T) -> Option<T> {
        let link = self.link.lock().unwrap_or_else(|e| e.into_inner()).clone();
        link.map(|l| f(&l))
    }

    /// How far the console has acknowledged output (printed it).
    pub fn acked(&self) -> u64 {
        self.with(|l| l.acked_offset()).flatten().unwrap_or(0)
    }

    /// Tell the console this side won the claim for `generation` and is
    /// now the live side (from then on the console follows only it).
    pub fn claimed(&self, generation: u64) {
        self.with(|l| l.announce_claim(generation));
    }

    /// This side is now the primary of a new pair, `generation`
    /// (re-protection): say hello again, so its output counts as the new
    /// pair's.
    pub fn rehello(&self, generation: u64) {
        self.with(|l| l.rehello(generation, crate::console::Role::Primary));
    }

    /// The guest has had the console's input up to `next` (the log says
    /// so): take input from there on, not from where this side began.
    pub fn resume_input(&self, next: InputCursor) {
        self.with(|l| l.resume_input(next.seq, next.skip));
    }

    /// Call `f` when the console asks the pair to stop (its escape in
    /// `vmft ft`).
    pub fn on_stop(&self, f: impl Fn() + Send + Sync + 'static) {
        self.with(|l| l.on_stop(f));
    }

    /// The console input as a byte stream for the live door.
    pub fn input(&self) -> ConsoleInputReader {
        ConsoleInputReader {
            side: self.clone(),
            pending: VecDeque::new(),
            total: 0,
        }
    }

    /// Confirm the input whose bytes are among the first `logged` input
    /// bytes (the backup holds them).
    pub fn confirm_logged(&self, logged: u64) {
        let mut upto = None;
        {
            let mut seqs = self.seqs.lock().unwrap_or_else(|e| e.into_inner());
            while let Some(&(seq, end)) = seqs.front() {
                if end > logged {
                    break;
                }
                upto = Some(seq);
                seqs.pop_front();
            }
        }
        if let Some(seq) = upto {
            self.with(|l| l.confirm_input(seq));
        }
    }

    /// The side is done: tell the console why and with which status, then
    /// close (waits a bounded time for the console to take the rest).
    pub fn done(&self, reason: &str, status: i32) {
        let Some(mut link) = self.link.lock().unwrap_or_else(|e| e.into_inner()).take() else {
            return;
        };
        // Another thread may be in the middle of a call: wait for it.
        let t0 = std::time::Instant::now();
        let link = loop {
            match Arc::try_unwrap(link) {
                Ok(l) => break l,
                Err(shared) if t0.elapsed() < Duration::from_secs(10) => {
                    link = shared;
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err(_) => {
                    tracing::warn!("the console link is busy: closing it without the end");
                    return;
                }
            }
        };
        if let Err(e) = link.done(reason, status) {
            tracing::warn!("the console did not take the end: {e}");
        }
    }
}

impl Release for ConsoleSide {
    fn release(&mut self, offset: u64, bytes: &[u8]) -> io::Result<()> {
        self.with(|l| l.release(offset, bytes));
        Ok(())
    }
}

/// Typed input from the console, numbered chunk by chunk; blocks until
/// some arrives.
pub struct ConsoleInputReader {
    side: ConsoleSide,
    pending: VecDeque<(u64, Vec<u8>)>,
    total: u64,
}

impl InputSource for ConsoleInputReader {
    fn next_chunk(&mut self) -> io::Result<Option<InputChunk>> {
        loop {
            if let Some((seq, bytes)) = self.pending.pop_front() {
                return Ok(Some(InputChunk {
                    seq: Some(seq),
                    bytes,
                }));
            }
            let Some(inputs) = self.side.with(|l| l.take_input()) else {
                return Ok(None);
            };
            if inputs.is_empty() {
                std::thread::sleep(Duration::from_millis(10));
                continue;
            }
            let mut seqs = self.side.seqs.lock().unwrap_or_else(|e| e.into_inner());
            for (seq, bytes) in inputs {
                self.total += bytes.len() as u64;
                seqs.push_back((seq, self.total));
                self.pending.push_back((seq, bytes));
            }
        }
    }
}

/// Confirms console input to the console once the backup has the log
/// entries carrying it: at a boundary, note how many input bytes the log
/// holds and at which log length; once the backup acknowledged that
/// length, those bytes are safe.
#[derive(Default)]
pub struct InputConfirmer {
    noted: u64,
    waiting: VecDeque<(u64, u64)>,
}

impl InputConfirmer {
    /// `logged` input bytes are in the log up to `barrier`.
    pub fn note(&mut self, logged: u64, barrier: u64) {
        if logged > self.noted {
            self.noted = logged;
            self.waiting.push_back((barrier, logged));
        }
    }

    /// Whether input was logged since the last note.
    pub fn has_new(&self, logged: u64) -> bool {
        logged > self.noted
    }

    /// The backup acknowledged the log up to `acked`: the input bytes now
    /// safe, if more than before.
    pub fn safe(&mut self, acked: u64) -> Option<u64> {
        let mut safe = None;
        while let Some(&(barrier, logged)) = self.waiting.front() {
            if barrier > acked {
                break;
            }
            safe = Some(logged);
            self.waiting.pop_front();
        }
        safe
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn input_is_safe_once_its_barrier_is_acknowledged() {
        let mut c = InputConfirmer::default();
        assert!(c.has_new(3));
        c.note(3, 100);
        c.note(3, 150); // nothing new
        c.note(7, 200);
        assert_eq!(c.safe(99), None);
        assert_eq!(c.safe(150), Some(3));
        assert_eq!(c.safe(150), None);
        assert_eq!(c.safe(500), Some(7));
        assert!(!c.has_new(7));
    }
}
