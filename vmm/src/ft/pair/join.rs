//! Re-protection, the primary's side: joining backups accepted on the
//! join listener ([`PrimaryHooks::with_joins`]), the state transfer's
//! steps as the run loop takes them (begin, rounds, the hand-over of the
//! rest, a refusal), and the transfer thread's end (the log follows, the
//! VM is protected again once the backup has it all).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ft_log::channel::{ChannelConfig, JoinListener, PrimaryHandle, PrimaryLink};

use super::loglink::LinkWriter;
use super::{note, PrimaryHooks, Protection, StreamKind};
use crate::devices::virtio::written::OwnImage;
use crate::ft::console_side::InputConfirmer;
use crate::ft::output::ReleaseMode;
use crate::ft::precopy::{Outcome, Phase, Plan, Precopy, Written};
use crate::ft::status::{State, TransferStatus};
use crate::ft::transfer::StreamOffsets;
use crate::memory::GuestMemoryMmap;
use crate::nondet::DoorError;
use crate::vm::{HandOver, JoinStep, LogContinues};

/// Longest wait in the hand-over's pause for the shared-disk writes made
/// before it to reach the images (a fence held by a stopped side makes it
/// wait: the joiner is refused then).
const DISK_DRAIN: Duration = Duration::from_secs(5);

/// A joining backup, accepted and waiting for the state.
pub(super) struct Joiner {
    link: PrimaryLink,
    generation: u64,
}

/// New backups for this primary: accepted by a thread on the join
/// listener, taken at a boundary while the primary runs unprotected.
pub(super) struct Joins {
    pending: Arc<Mutex<Option<Joiner>>>,
    /// Whether `pending` holds a joiner (set and cleared under its lock;
    /// read without it at every boundary).
    waiting: Arc<AtomicBool>,
    /// The current generation: a joiner's is larger.
    floor: Arc<AtomicU64>,
    /// The state transfer of the last backup that joined.
    copy: Option<Copying>,
    /// Set while a transfer is under way: other joiners are refused.
    copying: Arc<AtomicBool>,
    /// Cleared when these hooks go: the accepting thread ends and frees
    /// the address (woken by a connection to it).
    alive: Arc<AtomicBool>,
    addr: Option<std::net::SocketAddr>,
    /// The accepting thread (joined on drop, so the address is free).
    accepter: Option<std::thread::JoinHandle<()>>,
}

impl Drop for Joins {
    fn drop(&mut self) {
        self.alive.store(false, Ordering::Release);
        if let Some(a) = self.addr {
            let _ = std::net::TcpStream::connect_timeout(&a, Duration::from_millis(200));
        }
        if let Some(t) = self.accepter.take() {
            let _ = t.join();
        }
    }
}

/// A state transfer to a joining backup.
pub(super) struct Copying {
    copy: Precopy,
    generation: u64,
    /// The new link's view (its acks), for the log that follows.
    handle: PrimaryHandle,
    started: Instant,
    /// The transfer's length as given to the `LogLink` at the pause (the
    /// log's offsets count from it): the thread checks what it sent.
    announced: Arc<AtomicU64>,
}

/// A generation larger than `floor`: the time in nanoseconds, or one more.
pub fn next_generation(floor: u64) -> u64 {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    now.max(floor + 1)
}

impl PrimaryHooks {
    /// The end offsets of the held streams of `kind`.
    fn stream_end(&self, kind: StreamKind) -> u64 {
        self.streams
            .iter()
            .find(|s| s.kind == kind)
            .map_or(0, |s| s.held.end())
    }

    /// The thread's end of a copy: once all is sent, the log follows on
    /// the link, and the VM is protected when the backup has the state.
    fn after_copy(
        &self,
        generation: u64,
        announced: Arc<AtomicU64>,
    ) -> Box<dyn FnOnce(LinkWriter, Outcome) + Send> {
        let loglink = self.link.clone();
        let status = self.status.clone();
        let copying = self.joins.as_ref().map(|j| j.copying.clone());
        let t0 = Instant::now();
        Box::new(move |w, outcome| {
            if let Some(c) = &copying {
                c.store(false, Ordering::Release);
            }
            let total = w.written;
            let link = w.link;
            let handle = link.handle();
            let said = announced.load(Ordering::Acquire);
            if matches!(outcome, Outcome::Sent) && total != said {
                // The log's barriers would be off: output could go before
                // the backup has the log behind it. Give the backup up.
                note(&format!(
                    "the state transfer sent {total} bytes, not the {said} it announced: \
                     the new backup is given up"
                ));
                loglink.drop_log();
                return;
            }
            match outcome {
                Outcome::Sent if loglink.complete(link) => {
                    // Protected once the backup has the whole state.
                    loop {
                        match handle.wait_acked(total, Duration::from_millis(200)) {
                            Ok(true) if loglink.is_dropped() => return,
                            Ok(true) => break,
                            Ok(false) => continue,
                            Err(e) => {
                                note(&format!(
                                    "the new backup failed before it had the state: {e}"
                                ));
                                return;
                            }
                        }
                    }
                    if let Some(s) = &status {
                        s.update_transfer(|t| {
                            t.bytes = total;
                            t.total = total;
                            t.done = true;
                        });
                        // Unless the run loop found the backup gone since.
                        s.change_state(State::Transfer, State::Protected);
                    }
                    note(&format!(
                        "state sent to the new backup ({} MB in {:.1} s): the VM is PROTECTED again (generation {generation})",
                        total >> 20,
                        t0.elapsed().as_secs_f64(),
                    ));
                }
                Outcome::Sent => note("the new backup was given up before its state was sent"),
                Outcome::GivenUp => note("the state transfer to the new backup was given up"),
                // The run loop sees the copy failed (before the pause) or
                // the link failed (after it: the boundary sees the backup
                // gone and claims the new generation).
                Outcome::Failed(e) => {
                    note(&format!("the state transfer to the new backup failed: {e}"))
                }
            }
        })
    }

    /// Accept new backups on `listener` (re-protection): each is given the
    /// state when this side runs unprotected. `cfg` is the channel's
    /// configuration for joins (its generation is chosen per joiner).
    pub fn with_joins(mut self, listener: JoinListener, cfg: ChannelConfig) -> Self {
        let pending: Arc<Mutex<Option<Joiner>>> = Arc::default();
        let floor = Arc::new(AtomicU64::new(self.generation));
        let alive = Arc::new(AtomicBool::new(true));
        let addr = listener.local_addr().ok();
        let copying = Arc::new(AtomicBool::new(false));
        let waiting = Arc::new(AtomicBool::new(false));
        let (p, f, a, c, w) = (
            pending.clone(),
            floor.clone(),
            alive.clone(),
            copying.clone(),
            waiting.clone(),
        );
        let spawned = std::thread::Builder::new()
            .name("vmft-join".into())
            .spawn(move || loop {
                let generation = next_generation(f.load(Ordering::Acquire));
                let cfg = cfg.clone().with_generation(generation);
                let accepted = listener.accept(&cfg);
                if !a.load(Ordering::Acquire) {
                    return;
                }
                match accepted {
                    Ok(link) => {
                        if let Some(why) = link.peer().hello.strip_prefix(b"repair: ") {
                            note(&format!(
                                "the backup asks for a fresh state after a divergence ({})",
                                String::from_utf8_lossy(why)
                            ));
                        }
                        let mut slot = p.lock().unwrap_or_else(|e| e.into_inner());
                        if slot.is_some() || c.load(Ordering::Acquire) {
                            note("a second backup asked to join while one joins: refused");
                            continue;
                        }
                        note(&format!(
                            "a new backup joins (generation {generation}): the state goes to it at the next boundary"
                        ));
                        f.store(generation, Ordering::Release);
                        *slot = Some(Joiner { link, generation });
                        w.store(true, Ordering::Release);
                    }
                    Err(e) => note(&format!("refused a joining backup: {e}")),
                }
            });
        let accepter = match spawned {
            Ok(t) => t,
            Err(e) => {
                note(&format!("cannot accept joining backups: {e}"));
                return self;
            }
        };
        self.joins = Some(Joins {
            pending,
            waiting,
            floor,
            copy: None,
            copying,
            alive,
            addr,
            accepter: Some(accepter),
        });
        self
    }

    pub(super) fn next_join_step(&mut self) -> JoinStep {
        let protection = self.protection;
        let Some(j) = self.joins.as_mut() else {
            return JoinStep::Idle;
        };
        let phase = j.copy.as_ref().map(|c| c.copy.phase());
        match phase {
            Some(Phase::Sending) => JoinStep::Idle,
            Some(Phase::RoundSent) => JoinStep::RoundSent,
            Some(Phase::Failed(why)) => {
                j.copy = None;
                j.copying.store(false, Ordering::Release);
                if let Some(s) = &self.status {
                    s.set_state(State::Unprotected);
                }
                note(&format!(
                    "the new backup is refused ({why}): the VM goes on UNPROTECTED"
                ));
                JoinStep::Idle
            }
            Some(Phase::Finished) | None => {
                let waits =
                    protection == Protection::Unprotected && j.waiting.load(Ordering::Acquire);
                if waits {
                    JoinStep::Begin
                } else {
                    JoinStep::Idle
                }
            }
        }
    }

    pub(super) fn start_copy(
        &mut self,
        mem: GuestMemoryMmap,
        disks: Vec<OwnImage>,
    ) -> Result<(), DoorError> {
        let joins = self
            .joins
            .as_mut()
            .ok_or_else(|| DoorError::Ft("no backup joins this primary".into()))?;
        let joiner = {
            // Taken and marked under one lock: no other joiner slips in.
            let mut pending = joins.pending.lock().unwrap_or_else(|e| e.into_inner());
            joins.waiting.store(false, Ordering::Release);
            let joiner = pending
                .take()
                .ok_or_else(|| DoorError::Ft("no joining backup waits".into()))?;
            joins.copying.store(true, Ordering::Release);
            joiner
        };
        // The last backup's thread ends with its link, which failed.
        if let Some(mut old) = joins.copy.take() {
            old.copy.join();
        }
        let generation = joiner.generation;
        let handle = joiner.link.handle();
        let memory = crate::memory::mem_bytes(&mem).len() as u64;
        let status = self.status.clone();
        let mut last = Instant::now();
        let progress = Box::new(move |n: u64| {
            if let Some(s) = &status {
                if last.elapsed() >= Duration::from_millis(100) {
                    last = Instant::now();
                    s.update_transfer(|t| t.bytes = n);
                }
            }
        });
        let announced = Arc::new(AtomicU64::new(0));
        let after = self.after_copy(generation, announced.clone());
        let joins = self.joins.as_mut().expect("checked above");
        let disk_bytes: u64 = disks.iter().map(|d| d.written.size()).sum();
        let ndisks = disks.len();
        let copy = Precopy::start(
            LinkWriter::new(joiner.link),
            mem,
            disks,
            generation,
            self.transfer_rate,
            Plan::default(),
            progress,
            after,
        )
        .map_err(|e| {
            joins.copying.store(false, Ordering::Release);
            DoorError::Ft(format!("cannot start the state transfer: {e}"))
        })?;
        joins.copy = Some(Copying {
            copy,
            generation,
            handle,
            started: Instant::now(),
            announced,
        });
        if let Some(s) = &self.status {
            s.set_state(State::Transfer);
            s.transfer(TransferStatus {
                generation,
                bytes: 0,
                total: memory + disk_bytes,
                rounds: 1,
                pause_ms: 0.0,
                done: false,
            });
        }
        let disks = match ndisks {
            0 => String::new(),
            n => format!(" and {n} disk image(s) of {} MB", disk_bytes >> 20),
        };
        note(&format!(
            "copying {} MB of memory{disks} to the new backup while the guest runs (generation {generation})",
            memory >> 20
        ));
        Ok(())
    }

    pub(super) fn next_copy_round(&mut self, written: Written) -> Option<Written> {
        let c = self.joins.as_mut()?.copy.as_mut()?;
        let n = written.pages.len();
        let chunks: usize = written.chunks.iter().map(Vec::len).sum();
        let rest = c.copy.next_round(written);
        if rest.is_none() {
            let round = c.copy.rounds() - 1;
            if let Some(s) = &self.status {
                s.update_transfer(|t| t.rounds = round + 1);
            }
            note(&format!(
                "copy round {round}: {n} pages and {chunks} disk chunks written during the round before"
            ));
        }
        rest
    }

    pub(super) fn hand_over_rest(
        &mut self,
        pos: u64,
        rest: HandOver,
    ) -> Result<LogContinues, DoorError> {
        // What the guest wrote before the state is the unprotected run's:
        // free. The new backup's copies start where the streams are now.
        if self.held.has_unmarked() {
            self.held.mark(0);
        }
        for s in self.streams.iter().filter(|s| s.held.has_unmarked()) {
            s.held.mark(0);
        }
        // Shared-disk writes before the state must be on the images first:
        // the new backup's copy of the write stream starts after them, so
        // a failure of this side just after the pause would lose them.
        for s in self.streams.iter().filter(|s| s.kind == StreamKind::Disk) {
            if !s.held.drain(DISK_DRAIN) {
                return Err(DoorError::Ft(format!(
                    "the shared-disk writes before the state were not written within {} s",
                    DISK_DRAIN.as_secs()
                )));
            }
        }
        let offsets = StreamOffsets {
            console: self.held.end(),
            frames: self.stream_end(StreamKind::Net),
            disk: self.stream_end(StreamKind::Disk),
        };
        let joins = self
            .joins
            .as_mut()
            .ok_or_else(|| DoorError::Ft("no backup joins this primary".into()))?;
        let c = joins
            .copy
            .as_mut()
            .filter(|c| c.copy.phase() == Phase::RoundSent)
            .ok_or_else(|| DoorError::Ft("no state transfer waits for its pause".into()))?;
        let generation = c.generation;
        // Shared disks: this side's writes are of the new pair from now on;
        // either side of it may claim the disks (see `Fence::advance`).
        if let Some(f) = &self.fences {
            f.advance(generation)
                .map_err(|e| DoorError::Ft(e.to_string()))?;
        }
        joins.floor.fetch_max(generation, Ordering::AcqRel);
        let pause_pages = rest.pages.len();
        let total = c
            .copy
            .total_with(pause_pages, &rest.disks, rest.state.len());
        let pause_chunks: usize = rest.disks.iter().map(|d| d.chunks.len()).sum();
        // The log waits on the link until the thread has sent the rest.
        c.announced.store(total, Ordering::Release);
        self.link.begin(c.handle.clone(), total);
        // The side is the new pair's primary, in transfer, before the
        // thread sends the rest: it says the VM is protected as soon as
        // the backup has it all, which may come before this thread goes
        // on (and the console must hear of the new generation from this
        // side before the new backup says hello).
        if let Some(s) = &self.status {
            s.set_role(crate::ft::status::Role::Primary);
            s.set_generation(generation);
            s.set_state(State::Transfer);
            s.update_transfer(|t| t.total = total);
        }
        if let Some(console) = &self.console {
            console.rehello(generation);
        }
        c.copy
            .finish(rest.pages, rest.data, rest.disks, offsets, rest.state);
        let rounds = c.copy.rounds();
        let copied = c.started.elapsed();
        let asked = {
            let st = c.copy.stats();
            let list = |v: &[u64]| {
                v.iter()
                    .map(|n| n.to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            };
            format!(
                "pages asked per round {}; disk chunks {}",
                list(&st.round_pages),
                list(&st.round_chunks)
            )
        };
        self.generation = generation;
        self.protection = Protection::Protected;
        self.handover_pos = pos;
        self.inputs = InputConfirmer::default();
        // Output from here on waits for the new backup's acks.
        self.set_release_mode(ReleaseMode::Rule);
        if let Some(s) = &self.status {
            s.update_transfer(|t| t.rounds = rounds);
        }
        note(&format!(
            "handing the state at exit {pos} to the new backup after {rounds} rounds in {:.1} s: \
             {pause_pages} pages and {pause_chunks} disk chunks in the pause, {} MB in all, \
             generation {generation} ({asked})",
            copied.as_secs_f64(),
            total >> 20
        ));
        Ok(LogContinues {
            sink: Box::new(self.link.sink()),
            name: "the channel to the joining backup".into(),
            epoch_bound: self.epoch_bound,
        })
    }

    pub(super) fn refuse_joiner(&mut self, why: &str) {
        if let Some(j) = self.joins.as_mut() {
            {
                let mut pending = j.pending.lock().unwrap_or_else(|e| e.into_inner());
                pending.take();
                j.waiting.store(false, Ordering::Release);
            }
            // A copy under way is given up: what it had taken of the
            // written pages is gone with it.
            if let Some(mut c) = j.copy.take_if(|c| !c.copy.is_finished()) {
                c.copy.give_up();
            }
            j.copying.store(false, Ordering::Release);
        }
        if let Some(s) = &self.status {
            if self.protection == Protection::Unprotected {
                s.set_state(State::Unprotected);
            }
        }
        note(&format!(
            "the state could not be handed to the joining backup ({why}): it is refused; \
             the VM goes on UNPROTECTED"
        ));
    }
}
