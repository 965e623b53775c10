//! The two roles of a live pair, as the run loop sees them: what the
//! primary and the backup add at every boundary ([`crate::vm::PairHooks`]),
//! the primary's log sink (the logging channel), and the backup's gate
//! before it goes live.
//!
//! ```text
//! primary (vCPU thread)                         backup (vCPU thread)
//! exit N ─▶ RecordDoor ─▶ ChannelSink ══ log ══▶ LogReader ─▶ ReplayDoor ─▶ replay exit N
//! boundary: output captured? ─▶ barrier = log      acks "received up to" ◀══ (link threads)
//!           length; HeldOutput releases the bytes
//!           once acked ≥ barrier (releaser thread)
//!           released offset ─▶ Entry::Released ══▶ OutputTail keeps bytes after it
//!           backup failed? ─▶ claim: won ─▶ free    log ended, primary failed? ─▶ claim:
//!                             lost ─▶ halt (3)      won ─▶ re-send tail, go live; lost ─▶ stop (3)
//! ```

use std::io::{self, Write};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arbiter::Decision;
use ft_log::channel::{
    BackupLink, ChannelConfig, ChannelError, EndState, JoinListener, LinkStats, PeerState,
    PrimaryHandle, PrimaryLink,
};
use ft_log::InputCursor;

use super::claim::Claimant;
use super::console_side::{ConsoleSide, InputConfirmer};
use super::output::{HeldOutput, OutputTail, Release, ReleaseMode, MAX_HELD};
use super::precopy::{Outcome, Phase, Plan, Precopy, Written};
use super::status::{State, StatusBoard, TransferStatus};
use super::transfer::StreamOffsets;
use crate::devices::virtio::written::OwnImage;
use crate::memory::GuestMemoryMmap;
use crate::nondet::{Door, DoorError, Recorder};
use crate::replay::LogEnd;
use crate::shared_disk::Fences;
use crate::vm::{HandOver, JoinStep, LogContinues, PairHooks};

/// Note on stderr, prefixed like every vmft message.
fn note(msg: &str) {
    eprintln!("vmft: {msg}");
}

/// Claim (`vm`, `generation`), saying on stderr what the side waits for
/// while the arbiter cannot be reached.
fn claim(claimant: &mut Claimant, vm: &str, generation: u64) -> Result<Decision, DoorError> {
    claimant
        .claim(vm, generation, Duration::from_secs(2), &mut |m| note(m))
        .map_err(|e| DoorError::Ft(e.to_string()))
}

/// Claim (`vm`, `generation`) with a claimant the primary's hooks share
/// (the same identity: a side that already won wins again).
pub fn claim_shared(
    claimant: &Mutex<Claimant>,
    vm: &str,
    generation: u64,
) -> Result<Decision, DoorError> {
    claim(
        &mut claimant.lock().unwrap_or_else(|e| e.into_inner()),
        vm,
        generation,
    )
}

/// The primary's logging link, shared by its log sink, its hooks and its
/// output releasers. Re-protection replaces it: the new link first carries
/// the state transfer (`base` bytes, [`super::transfer`]) and then the
/// log, so a log offset (a barrier) is the link offset minus `base`.
/// While the transfer is sent, the log waits here (`deferred`).
#[derive(Clone)]
pub struct LogLink {
    inner: Arc<Mutex<LinkState>>,
}

struct LinkState {
    /// Where log bytes are written (`None` while a transfer is sent, or
    /// once taken for the clean end).
    link: Option<PrimaryLink>,
    /// The current link's view for other threads (none before the first
    /// backup: a backup that went live).
    handle: Option<PrimaryHandle>,
    /// Link bytes before the log.
    base: u64,
    /// Log bytes waiting for the state transfer to be sent.
    deferred: Option<Vec<u8>>,
    /// The backup is gone and the claim won: log bytes are dropped.
    dropped: bool,
    /// Log bytes written to this link's log so far, sent or waiting.
    written: u64,
}

impl LogLink {
    /// The log goes to `link` from its first byte.
    pub fn new(link: PrimaryLink) -> Self {
        LogLink {
            inner: Arc::new(Mutex::new(LinkState {
                handle: Some(link.handle()),
                link: Some(link),
                base: 0,
                deferred: None,
                dropped: false,
                written: 0,
            })),
        }
    }

    /// No link yet: log bytes are dropped until a backup joins (a backup
    /// that went live and may be re-protected).
    pub fn none() -> Self {
        LogLink {
            inner: Arc::new(Mutex::new(LinkState {
                handle: None,
                link: None,
                base: 0,
                deferred: None,
                dropped: true,
                written: 0,
            })),
        }
    }

    fn with<T>(&self, f: impl FnOnce(&mut LinkState) -> T) -> T {
        f(&mut self.inner.lock().unwrap_or_else(|e| e.into_inner()))
    }

    fn view(&self) -> Option<(PrimaryHandle, u64)> {
        self.with(|s| s.handle.clone().map(|h| (h, s.base)))
    }

    /// The log sink writing to this link.
    pub fn sink(&self) -> ChannelSink {
        ChannelSink { link: self.clone() }
    }

    /// Log bytes the backup acknowledged.
    pub fn acked(&self) -> u64 {
        self.view()
            .map_or(0, |(h, base)| h.acked().saturating_sub(base))
    }

    /// Log bytes written so far, including those waiting for a state
    /// transfer: the barrier for everything the guest did up to now.
    pub fn written(&self) -> u64 {
        self.with(|s| s.written)
    }

    /// Wait (up to `timeout`) until a state transfer in progress is sent
    /// and the log goes to the link again, or the backup was given up.
    pub fn wait_transfer(&self, timeout: Duration) -> bool {
        let t0 = Instant::now();
        while t0.elapsed() < timeout {
            if self.with(|s| s.dropped || s.deferred.is_none()) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        false
    }

    /// Log bytes sent.
    pub fn sent(&self) -> u64 {
        self.view()
            .map_or(0, |(h, base)| h.sent().saturating_sub(base))
    }

    /// Wait up to `timeout` for the backup to acknowledge the log up to
    /// `barrier`.
    pub fn wait_acked(&self, barrier: u64, timeout: Duration) -> Result<bool, ChannelError> {
        match self.view() {
            Some((h, base)) => h.wait_acked(base + barrier, timeout),
            None => {
                std::thread::sleep(timeout);
                Ok(false)
            }
        }
    }

    /// The backup's replay position (from acks and heartbeats).
    pub fn backup_applied(&self) -> u64 {
        self.view().map_or(0, |(h, _)| h.backup_applied())
    }

    /// Whether the backup is alive, as far as the link knows.
    pub fn peer_state(&self) -> PeerState {
        self.view().map_or(
            PeerState::Failed {
                reason: "no backup has joined".into(),
            },
            |(h, _)| h.peer_state(),
        )
    }

    /// The primary's position, for heartbeats.
    pub fn set_position(&self, pos: u64) {
        if let Some((h, _)) = self.view() {
            h.set_position(pos)
        }
    }

    /// The link's counters.
    pub fn stats(&self) -> LinkStats {
        self.view().map(|(h, _)| h.stats()).unwrap_or_default()
    }

    /// The backup is gone: drop log bytes from now on.
    pub fn drop_log(&self) {
        self.with(|s| {
            s.dropped = true;
            s.deferred = None;
        })
    }

    /// Whether log bytes are dropped (no backup).
    pub fn is_dropped(&self) -> bool {
        self.with(|s| s.dropped)
    }

    /// Take the link (to end it cleanly).
    pub fn take(&self) -> Option<PrimaryLink> {
        self.with(|s| s.link.take())
    }

    /// A new backup joins on a link whose `handle` is given: log bytes wait
    /// until the first `base` bytes (the state transfer) are sent.
    fn begin(&self, handle: PrimaryHandle, base: u64) {
        self.with(|s| {
            s.handle = Some(handle);
            s.base = base;
            s.link = None;
            s.deferred = Some(Vec::new());
            s.dropped = false;
            s.written = 0;
        })
    }

    /// The state transfer was sent on `link`: send the log that waited and
    /// write the log to it from now on. False if the backup was given up
    /// meanwhile.
    fn complete(&self, mut link: PrimaryLink) -> bool {
        self.with(|s| {
            if s.dropped {
                return false;
            }
            if let Some(d) = s.deferred.take() {
                if let Err(e) = link.write(&d) {
                    tracing::debug!("log bytes not sent: {e}");
                }
            }
            s.link = Some(link);
            true
        })
    }
}

/// The primary's log sink: log bytes go to the current [`LogLink`]. After
/// the backup is gone (and the claim won) the log is dropped: the VM runs
/// unprotected.
pub struct ChannelSink {
    link: LogLink,
}

impl Write for ChannelSink {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.link.with(|s| {
            if s.dropped {
                return;
            }
            s.written += buf.len() as u64;
            if let Some(d) = s.deferred.as_mut() {
                d.extend_from_slice(buf);
            } else if let Some(l) = s.link.as_mut() {
                // A failed backup is handled at the next boundary
                // (PrimaryHooks): the bytes it will never see are dropped.
                if let Err(e) = l.write(buf) {
                    tracing::debug!("log bytes not sent: {e}");
                }
            }
        });
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// A joining backup's link as a byte sink, for the state transfer;
/// counts the bytes written.
struct LinkWriter {
    link: PrimaryLink,
    written: u64,
}

impl LinkWriter {
    fn new(link: PrimaryLink) -> Self {
        LinkWriter { link, written: 0 }
    }
}

impl Write for LinkWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.link.write(buf).map_err(io::Error::other)?;
        self.written += buf.len() as u64;
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Where the primary stands with its backup.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protection {
    /// The backup follows: output waits for its acks.
    Protected,
    /// The backup failed and this side won the claim: no log, output free.
    Unprotected,
}

/// Counters of the primary's side of the pair.
#[derive(Debug, Clone, Default)]
pub struct PrimaryStats {
    /// Times the vCPU waited because the backup lagged too far.
    pub lag_stalls: u64,
    /// Time spent so.
    pub lag_stall_time: Duration,
    /// Exits of lag (primary minus backup), sampled at boundaries.
    pub lag_samples: Vec<u64>,
}

/// The primary's boundary hooks.
pub struct PrimaryHooks {
    vm: String,
    generation: u64,
    link: LogLink,
    held: HeldOutput,
    claimant: Arc<Mutex<Claimant>>,
    protection: Protection,
    logged_released: u64,
    last_released_entry: Instant,
    max_lag_exits: u64,
    stats: Arc<Mutex<PrimaryStats>>,
    sample_at: Instant,
    console: Option<ConsoleSide>,
    inputs: InputConfirmer,
    /// Outputs besides the console (transmitted frames, shared-disk
    /// writes), held like console output.
    streams: Vec<HeldStream>,
    /// The shared disks' fences, claimed when this side wins the VM.
    fences: Option<Fences>,
    /// The operator's view of this side.
    status: Option<StatusBoard>,
    /// New backups waiting to join (re-protection).
    joins: Option<Joins>,
    /// Recording for a joined backup: longest exit-free stretch before an
    /// epoch.
    epoch_bound: Duration,
    /// Most bytes per second a state transfer sends (`None`: as fast as
    /// the link takes them).
    transfer_rate: Option<u64>,
    /// Where the run loop handed the state over last (the new backup's
    /// replay starts there: lag counts from it).
    handover_pos: u64,
    /// [`BREAK_OUTPUT_RULE`] is set: output is released at once.
    rule_broken: bool,
}

/// A test-only switch (an environment variable): a primary with it set
/// releases output without waiting for the backup, breaking the output
/// rule on purpose, so that a drill can be shown to fail.
pub const BREAK_OUTPUT_RULE: &str = "VMFT_TEST_BREAK_OUTPUT_RULE";

/// A joining backup, accepted and waiting for the state.
struct Joiner {
    link: PrimaryLink,
    generation: u64,
}

/// New backups for this primary: accepted by a thread on the join
/// listener, taken at a boundary while the primary runs unprotected.
struct Joins {
    pending: Arc<Mutex<Option<Joiner>>>,
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
struct Copying {
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

/// What a held stream is: says which entry logs how far it was released.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum StreamKind {
    Net,
    Disk,
}

/// An output stream besides the console, held for the output rule.
struct HeldStream {
    kind: StreamKind,
    held: HeldOutput,
    /// The released offset last logged.
    logged: u64,
    last_entry: Instant,
}

impl HeldStream {
    fn new(kind: StreamKind, held: HeldOutput) -> Self {
        HeldStream {
            kind,
            held,
            logged: 0,
            last_entry: Instant::now(),
        }
    }

    /// Log how far the stream was released (at most every 20 ms): a
    /// takeover re-sends from there.
    fn log_released(&mut self, door: &mut dyn Recorder) -> Result<(), DoorError> {
        let sent = self.held.released();
        if sent > self.logged && self.last_entry.elapsed() >= Duration::from_millis(20) {
            match self.kind {
                StreamKind::Net => door.net_released(sent)?,
                StreamKind::Disk => door.disk_released(sent)?,
            }
            self.logged = sent;
            self.last_entry = Instant::now();
        }
        Ok(())
    }
}

impl PrimaryHooks {
    /// Hooks for a primary of (`vm`, `generation`).
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        vm: String,
        generation: u64,
        link: LogLink,
        held: HeldOutput,
        claimant: Arc<Mutex<Claimant>>,
        max_lag_exits: u64,
        stats: Arc<Mutex<PrimaryStats>>,
    ) -> Self {
        PrimaryHooks {
            vm,
            generation,
            link,
            held,
            claimant,
            protection: Protection::Protected,
            logged_released: 0,
            last_released_entry: Instant::now(),
            max_lag_exits,
            stats,
            sample_at: Instant::now(),
            console: None,
            inputs: InputConfirmer::default(),
            streams: Vec::new(),
            fences: None,
            status: None,
            joins: None,
            epoch_bound: Duration::from_millis(10),
            transfer_rate: None,
            handover_pos: 0,
            rule_broken: false,
        }
        .check_rule_switch()
    }

    /// Apply [`BREAK_OUTPUT_RULE`], loudly.
    fn check_rule_switch(mut self) -> Self {
        if std::env::var_os(BREAK_OUTPUT_RULE).is_some_and(|v| v == "1") {
            note(&format!(
                "WARNING: {BREAK_OUTPUT_RULE}=1: output is released without waiting for the \
                 backup (the output rule is off; for tests only)"
            ));
            self.rule_broken = true;
            self.set_release_mode(ReleaseMode::Rule);
        }
        self
    }

    /// Send a joining backup its state at most `rate` bytes per second.
    pub fn with_transfer_rate(mut self, rate: Option<u64>) -> Self {
        self.transfer_rate = rate;
        self
    }

    /// Record with this epoch bound for a backup that joins.
    pub fn with_epoch_bound(mut self, bound: Duration) -> Self {
        self.epoch_bound = bound;
        self
    }

    /// Start without a backup (a backup that went live): output is free
    /// until a new backup joins. The status board is left as it is.
    pub fn unprotected(mut self) -> Self {
        self.protection = Protection::Unprotected;
        self.set_release_mode(ReleaseMode::Free);
        self
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
        let (p, f, a, c) = (
            pending.clone(),
            floor.clone(),
            alive.clone(),
            copying.clone(),
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
            floor,
            copy: None,
            copying,
            alive,
            addr,
            accepter: Some(accepter),
        });
        self
    }

    /// Keep `status` up to date (state, lag, log rate, output delay).
    pub fn with_status(mut self, status: StatusBoard) -> Self {
        status.set_generation(self.generation);
        if self.protection == Protection::Protected {
            status.set_state(State::Protected);
        }
        self.status = Some(status);
        self
    }

    /// The guest's transmitted frames (the framed stream of
    /// [`crate::netio`]) are held in `net` until the backup acknowledged
    /// the log behind them, as console output is.
    pub fn with_net(mut self, net: HeldOutput) -> Self {
        self.streams.push(HeldStream::new(StreamKind::Net, net));
        self.set_release_mode(self.release_mode());
        self
    }

    /// How held output is released in the current protection.
    fn release_mode(&self) -> ReleaseMode {
        match self.protection {
            Protection::Protected => ReleaseMode::Rule,
            Protection::Unprotected => ReleaseMode::Free,
        }
    }

    /// The guest's writes to shared disks (the write stream of
    /// [`crate::shared_disk`]) are held in `disk` until the backup
    /// acknowledged the log behind them; `fences` are claimed if this
    /// side wins the VM after its backup failed.
    pub fn with_shared_disks(mut self, disk: HeldOutput, fences: Fences) -> Self {
        self.streams.push(HeldStream::new(StreamKind::Disk, disk));
        self.fences = Some(fences);
        self.set_release_mode(self.release_mode());
        self
    }

    fn set_release_mode(&self, mode: ReleaseMode) {
        // The test-only switch: output is never held for the backup.
        let mode = match mode {
            ReleaseMode::Rule if self.rule_broken => ReleaseMode::Free,
            m => m,
        };
        self.held.set_mode(mode);
        for s in &self.streams {
            s.held.set_mode(mode);
        }
    }

    /// Output goes to (and input comes from) this console: the offset
    /// logged as released is what the console acknowledged, and input is
    /// confirmed to it once the backup holds it.
    pub fn with_console(mut self, console: ConsoleSide) -> Self {
        self.console = Some(console);
        self
    }

    /// How far output surely reached the user.
    fn delivered(&self) -> u64 {
        match &self.console {
            Some(c) => c.acked(),
            None => self.held.released(),
        }
    }

    fn backup_failed(&mut self, reason: &str) -> Result<(), DoorError> {
        let detected = Instant::now();
        note(&format!(
            "the backup is gone ({reason}): claiming {} generation {} at the arbiter",
            self.vm, self.generation
        ));
        let decision = claim_shared(&self.claimant, &self.vm, self.generation)?;
        match decision {
            Decision::Won => {
                self.link.drop_log();
                // Shared disks: fence the backup off before writing freely.
                if let Some(f) = &self.fences {
                    if let Err(e) = f.claim() {
                        self.set_release_mode(ReleaseMode::Halt);
                        return Err(DoorError::Fenced(e.to_string()));
                    }
                }
                self.set_release_mode(ReleaseMode::Free);
                self.protection = Protection::Unprotected;
                if let Some(s) = &self.status {
                    s.set_state(State::Unprotected);
                    s.unfollow();
                    s.failover("backup", reason, detected.elapsed());
                }
                note("claim won: the VM continues here, UNPROTECTED (no backup)");
                Ok(())
            }
            Decision::Lost { owner } => {
                self.set_release_mode(ReleaseMode::Halt);
                if let Some(s) = &self.status {
                    s.set_state(State::Halted);
                }
                note(&format!(
                    "claim lost to {owner}: another side is live; halting without releasing output"
                ));
                Err(DoorError::LostClaim {
                    vm: self.vm.clone(),
                    generation: self.generation,
                    owner,
                })
            }
        }
    }
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
                        s.set_state(State::Protected);
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
}

impl PairHooks for PrimaryHooks {
    fn join_step(&mut self) -> JoinStep {
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
                let waits = protection == Protection::Unprotected
                    && j.pending
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .is_some();
                if waits {
                    JoinStep::Begin
                } else {
                    JoinStep::Idle
                }
            }
        }
    }

    fn begin_copy(&mut self, mem: GuestMemoryMmap, disks: Vec<OwnImage>) -> Result<(), DoorError> {
        let joins = self
            .joins
            .as_mut()
            .ok_or_else(|| DoorError::Ft("no backup joins this primary".into()))?;
        let joiner = {
            // Taken and marked under one lock: no other joiner slips in.
            let mut pending = joins.pending.lock().unwrap_or_else(|e| e.into_inner());
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

    fn copy_round(&mut self, written: Written) -> Option<Written> {
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

    fn hand_over(&mut self, pos: u64, rest: HandOver) -> Result<LogContinues, DoorError> {
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
        joins.floor.fetch_max(generation, Ordering::AcqRel);
        // What the guest wrote before the state is the unprotected run's:
        // free. The new backup's copies start where the streams are now.
        if self.held.has_unmarked() {
            self.held.mark(0);
        }
        for s in self.streams.iter().filter(|s| s.held.has_unmarked()) {
            s.held.mark(0);
        }
        let pause_pages = rest.pages.len();
        let total = c
            .copy
            .total_with(pause_pages, &rest.disks, rest.state.len());
        let pause_chunks: usize = rest.disks.iter().map(|d| d.chunks.len()).sum();
        // The log waits on the link until the thread has sent the rest.
        c.announced.store(total, Ordering::Release);
        self.link.begin(c.handle.clone(), total);
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
        if let Some(c) = &self.console {
            c.rehello(generation);
        }
        if let Some(s) = &self.status {
            s.set_role(super::status::Role::Primary);
            s.set_generation(generation);
            s.set_state(State::Transfer);
            s.update_transfer(|t| {
                t.total = total;
                t.rounds = rounds;
            });
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

    fn join_failed(&mut self, why: &str) {
        if let Some(j) = self.joins.as_mut() {
            j.pending.lock().unwrap_or_else(|e| e.into_inner()).take();
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

    fn resumed(&mut self, pause: Duration) {
        if let Some(s) = &self.status {
            s.update_transfer(|t| t.pause_ms = pause.as_secs_f64() * 1000.0);
        }
        note(&format!(
            "the guest ran on after a pause of {:.0} ms for the state",
            pause.as_secs_f64() * 1000.0
        ));
    }

    fn boundary(&mut self, door: &mut dyn Door, pos: u64) -> Result<(), DoorError> {
        if self.protection == Protection::Unprotected {
            if let Some(s) = self.status.as_ref() {
                if self.sample_at.elapsed() >= Duration::from_millis(100) {
                    self.sample_at = Instant::now();
                    s.progress(pos, self.link.sent());
                }
            }
            // No backup: output is released at once (ReleaseMode::Free) and
            // input is safe as soon as it is handed to the guest.
            if self.held.has_unmarked() {
                self.held.mark(0);
            }
            for s in self.streams.iter().filter(|s| s.held.has_unmarked()) {
                s.held.mark(0);
            }
            if let Some(console) = &self.console {
                // Live without a log (a backup that went live): input is
                // safe once the guest has it.
                let logged = door.recorder().map_or(u64::MAX, |r| r.input_logged());
                console.confirm_logged(logged);
            }
            return Ok(());
        }
        let Some(door) = door.recorder() else {
            return Err(DoorError::Ft("the primary's door does not record".into()));
        };
        self.link.set_position(pos);
        // The output rule: output of this exit waits for the log through it.
        for s in self.streams.iter().filter(|s| s.held.has_unmarked()) {
            let barrier = door.barrier()?;
            s.held.mark(barrier);
        }
        if self.held.has_unmarked() {
            let barrier = door.barrier()?;
            self.held.mark(barrier);
        }
        // Held output is bounded, each stream: past MAX_HELD the guest waits
        // for the releaser (back-pressure, never a silent drop).
        while self.held.held() > MAX_HELD || self.streams.iter().any(|s| s.held.held() > MAX_HELD) {
            if let PeerState::Failed { reason } = self.link.peer_state() {
                return self.backup_failed(&reason);
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        // Input typed at the console is confirmed once the backup has it.
        if let Some(console) = &self.console {
            let logged = door.input_logged();
            if self.inputs.has_new(logged) {
                let barrier = door.barrier()?;
                self.inputs.note(logged, barrier);
            }
            if let Some(safe) = self.inputs.safe(self.link.acked()) {
                console.confirm_logged(safe);
            }
        }
        // Tell the backup how far output reached the user, so a takeover
        // re-sends from there (at most every 20 ms: the console drops what
        // it already has, so this only bounds the backup's copy).
        let released = self.delivered();
        if released > self.logged_released
            && self.last_released_entry.elapsed() >= Duration::from_millis(20)
        {
            door.released(released)?;
            self.logged_released = released;
            self.last_released_entry = Instant::now();
        }
        // Likewise for frames and shared-disk writes.
        for s in &mut self.streams {
            s.log_released(door)?;
        }
        if let PeerState::Failed { reason } = self.link.peer_state() {
            return self.backup_failed(&reason);
        }
        // Execution lag bound: the backup must not fall too far behind
        // (a joining backup is not bound before it starts replaying).
        let applied = self.link.backup_applied();
        if applied < self.handover_pos || applied == 0 {
            // The backup has not reported a position yet.
            return Ok(());
        }
        let lag = pos.saturating_sub(applied);
        if self.sample_at.elapsed() >= Duration::from_millis(100) {
            self.sample_at = Instant::now();
            if let Some(s) = &self.status {
                let sent = self.link.sent();
                s.progress(pos, sent);
                s.follow(lag, sent.saturating_sub(self.link.acked()));
                s.output_delays(&self.held.recent_delays(1000));
            }
            self.stats
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .lag_samples
                .push(lag);
        }
        if lag > self.max_lag_exits {
            let t0 = Instant::now();
            door.barrier()?;
            while pos.saturating_sub(self.link.backup_applied()) > self.max_lag_exits / 2 {
                if let PeerState::Failed { reason } = self.link.peer_state() {
                    return self.backup_failed(&reason);
                }
                std::thread::sleep(Duration::from_micros(500));
            }
            let mut s = self.stats.lock().unwrap_or_else(|e| e.into_inner());
            s.lag_stalls += 1;
            s.lag_stall_time += t0.elapsed();
        }
        Ok(())
    }
}

/// The backup's boundary hooks: report the replay position (carried in
/// acks and heartbeats: the primary's lag bound and its failover estimate).
pub struct BackupHooks {
    link: Arc<BackupLink>,
    /// The console, and whether this side went live: a live side with no
    /// backup confirms console input as soon as it has it (nothing more
    /// can keep it), or the console would stop taking keys.
    console: Option<(ConsoleSide, Arc<AtomicBool>)>,
    /// The operator's view of this side, and when it was last updated.
    status: Option<(StatusBoard, Instant)>,
    /// What this side is once it went live (the flag): a primary without
    /// a backup, which a new backup may join.
    then: Option<(PrimaryHooks, Arc<AtomicBool>)>,
}

impl BackupHooks {
    /// Hooks reporting to `link`.
    pub fn new(link: Arc<BackupLink>) -> Self {
        BackupHooks {
            link,
            console: None,
            status: None,
            then: None,
        }
    }

    /// Once `live` is set (the claim won), be `primary` (built
    /// [`PrimaryHooks::unprotected`]): a new backup may join.
    pub fn then_primary(mut self, primary: PrimaryHooks, live: Arc<AtomicBool>) -> Self {
        self.then = Some((primary, live));
        self
    }

    fn primary_mut(&mut self) -> Option<&mut PrimaryHooks> {
        self.then
            .as_mut()
            .filter(|(_, live)| live.load(Ordering::Acquire))
            .map(|(p, _)| p)
    }

    /// Keep `status`'s progress up to date (its state is the gate's).
    pub fn with_status(mut self, status: StatusBoard) -> Self {
        self.status = Some((status, Instant::now()));
        self
    }

    /// Once `live` is set, confirm the console's input as it arrives.
    pub fn with_console(mut self, console: ConsoleSide, live: Arc<AtomicBool>) -> Self {
        self.console = Some((console, live));
        self
    }
}

impl PairHooks for BackupHooks {
    fn join_step(&mut self) -> JoinStep {
        self.primary_mut().map_or(JoinStep::Idle, |p| p.join_step())
    }

    fn begin_copy(&mut self, mem: GuestMemoryMmap, disks: Vec<OwnImage>) -> Result<(), DoorError> {
        match self.primary_mut() {
            Some(p) => p.begin_copy(mem, disks),
            None => Err(DoorError::Ft(
                "a replaying backup hands no state over".into(),
            )),
        }
    }

    fn copy_round(&mut self, written: Written) -> Option<Written> {
        match self.primary_mut() {
            Some(p) => p.copy_round(written),
            None => Some(written),
        }
    }

    fn hand_over(&mut self, pos: u64, rest: HandOver) -> Result<LogContinues, DoorError> {
        match self.primary_mut() {
            Some(p) => p.hand_over(pos, rest),
            None => Err(DoorError::Ft(
                "a replaying backup hands no state over".into(),
            )),
        }
    }

    fn resumed(&mut self, pause: Duration) {
        if let Some(p) = self.primary_mut() {
            p.resumed(pause);
        }
    }

    fn join_failed(&mut self, why: &str) {
        if let Some(p) = self.primary_mut() {
            p.join_failed(why);
        }
    }

    fn boundary(&mut self, door: &mut dyn Door, pos: u64) -> Result<(), DoorError> {
        if let Some(p) = self.primary_mut() {
            return p.boundary(door, pos);
        }
        self.link.set_applied(pos);
        if let Some((status, at)) = &mut self.status {
            if at.elapsed() >= Duration::from_millis(100) {
                *at = Instant::now();
                status.progress(pos, self.link.stats().bytes_received);
            }
        }
        if let Some((console, live)) = &self.console {
            if live.load(Ordering::Acquire) {
                console.confirm_logged(u64::MAX);
            }
        }
        Ok(())
    }
}

/// What the backup's gate needs to decide and to go live.
pub struct TakeOver {
    /// The VM.
    pub vm: String,
    /// The pair's generation.
    pub generation: u64,
    /// The channel (why did the log end?).
    pub link: Arc<BackupLink>,
    /// The claimant (shared with the hooks this side has once live).
    pub claimant: Arc<Mutex<Claimant>>,
    /// The backup's copy of unreleased output.
    pub tail: OutputTail,
    /// Where output goes once live.
    pub sink: Option<Box<dyn Release>>,
    /// Called once the claim is won, before output is re-sent (announce
    /// the claim to the console, and where its input resumes).
    pub on_won: Option<OnWon>,
    /// The backup's copy of transmitted frames not known to be sent, and
    /// its own tap to send them on once live.
    pub net: Option<(OutputTail, Box<dyn Release>)>,
    /// The backup's copy of shared-disk writes not known to be written,
    /// the sink that writes them once live, and the disks' fences (claimed
    /// first, so a primary that wakes up can no longer write).
    pub disk: Option<(OutputTail, Box<dyn Release>, Fences)>,
    /// The operator's view of this side.
    pub status: Option<StatusBoard>,
    /// Held output that the console output goes into once live (the sink
    /// is [`super::output::IntoHeld`]): started where the tail stands.
    pub held: Option<HeldOutput>,
    /// Likewise for transmitted frames.
    pub net_held: Option<HeldOutput>,
    /// Set once the claim is won: the side's hooks become a primary's.
    pub live: Option<Arc<AtomicBool>>,
}

/// Told, once the backup won its claim, where the console's input stream
/// goes on (what the primary handed the guest is in the log).
pub type OnWon = Box<dyn FnOnce(Option<InputCursor>) + Send>;

impl TakeOver {
    /// The gate: the log ended at `end.pos`. Clean end without an end
    /// entry is an error; a failed primary means claim, and go live only
    /// if the claim is won.
    pub fn gate(&mut self, end: LogEnd) -> Result<(), DoorError> {
        let pos = end.pos;
        let why = match self.link.wait_end(Duration::from_secs(60)) {
            Some(EndState::PrimaryFailed { reason }) => reason,
            Some(EndState::Clean) => {
                return Err(DoorError::Ft(format!(
                    "the primary ended the log cleanly at exit {pos} without an end entry"
                )))
            }
            None => {
                return Err(DoorError::Ft(
                    "the log ended but the channel did not".into(),
                ))
            }
        };
        note(&format!(
            "the primary is gone ({why}); replayed everything received (exit {pos}): claiming {} generation {}",
            self.vm, self.generation
        ));
        let detected = Instant::now();
        let decision = claim_shared(&self.claimant, &self.vm, self.generation)?;
        let claimed = detected.elapsed();
        if let (Some(s), Decision::Lost { .. }) = (&self.status, &decision) {
            s.set_state(State::Halted);
        }
        match decision {
            Decision::Won => {
                if let Some((tail, sink, fences)) = self.disk.take() {
                    fences
                        .claim()
                        .map_err(|e| DoorError::Fenced(e.to_string()))?;
                    let from = tail
                        .go_live(sink)
                        .map_err(|e| DoorError::Ft(format!("writing shared-disk writes: {e}")))?;
                    tracing::info!(
                        from,
                        "shared-disk writes the primary may not have made written"
                    );
                }
                if let Some(f) = self.on_won.take() {
                    f(end.input_next);
                }
                if let Some(h) = &self.held {
                    h.rebase(self.tail.kept().0);
                }
                if let (Some(h), Some((tail, _))) = (&self.net_held, &self.net) {
                    h.rebase(tail.kept().0);
                }
                if let Some(l) = &self.live {
                    l.store(true, Ordering::Release);
                }
                let sink = self
                    .sink
                    .take()
                    .ok_or_else(|| DoorError::Ft("going live twice".into()))?;
                let from = self
                    .tail
                    .go_live(sink)
                    .map_err(|e| DoorError::Ft(format!("re-sending console output: {e}")))?;
                if let Some(s) = &self.status {
                    s.set_state(State::Live);
                    s.failover("primary", &why, claimed);
                }
                note(&format!(
                    "claim won: the backup is LIVE from exit {pos} (console output re-sent from byte {from})"
                ));
                if let Some((tail, sink)) = self.net.take() {
                    let from = tail
                        .go_live(sink)
                        .map_err(|e| DoorError::Ft(format!("re-sending frames: {e}")))?;
                    tracing::info!(from, "frames the primary may not have sent re-sent");
                }
                Ok(())
            }
            Decision::Lost { owner } => Err(DoorError::LostClaim {
                vm: self.vm.clone(),
                generation: self.generation,
                owner,
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ft_log::channel::{BackupListener, ChannelConfig};
    use std::io::Read;

    fn cfg() -> ChannelConfig {
        let mut c = ChannelConfig::new(b"log link test secret".to_vec(), "vm", "hash")
            .with_timing(Duration::from_millis(50), Duration::from_secs(5));
        c.handshake_timeout = Duration::from_secs(5);
        c
    }

    /// A primary's link and its backup, on loopback.
    fn pair() -> (PrimaryLink, BackupLink) {
        let l = BackupListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let t = std::thread::spawn(move || l.accept(&cfg()).unwrap());
        let p = PrimaryLink::connect(addr, &cfg()).unwrap();
        (p, t.join().unwrap())
    }

    /// Read exactly `n` bytes of what the backup received.
    fn read(b: &BackupLink, n: usize) -> Vec<u8> {
        let mut v = vec![0u8; n];
        b.log_reader().read_exact(&mut v).unwrap();
        v
    }

    #[test]
    fn after_a_hand_over_the_log_follows_the_state_and_barriers_count_from_the_log() {
        let (p1, _b1) = pair();
        let link = LogLink::new(p1);
        let mut sink = link.sink();
        sink.write_all(b"old log").unwrap();
        assert_eq!(link.written(), 7);
        // The backup is lost; a new one joins: 5 bytes of "state" first.
        link.drop_log();
        sink.write_all(b"dropped").unwrap();
        let (p2, b2) = pair();
        link.begin(p2.handle(), 5);
        assert_eq!(link.written(), 0, "the new log counts from its first byte");
        sink.write_all(b"new log").unwrap();
        assert_eq!(link.written(), 7);
        // The log waits for the state: nothing of it is sent yet.
        assert!(!link.wait_transfer(Duration::from_millis(50)));
        assert_eq!(link.sent(), 0);
        let mut w = LinkWriter::new(p2);
        w.write_all(b"STATE").unwrap();
        assert_eq!(w.written, 5);
        assert!(link.complete(w.link));
        assert!(link.wait_transfer(Duration::from_millis(50)));
        sink.write_all(b" more").unwrap();
        assert_eq!(read(&b2, 17), b"STATEnew log more");
        // Acks count in log bytes: the state's 5 are not log.
        assert!(link.wait_acked(12, Duration::from_secs(5)).unwrap());
        assert_eq!(link.acked(), 12);
        assert!(!link.wait_acked(13, Duration::from_millis(100)).unwrap());
    }

    #[test]
    fn a_backup_given_up_during_the_transfer_gets_no_log() {
        let (p, b) = pair();
        let link = LogLink::none();
        assert!(link.is_dropped());
        let mut sink = link.sink();
        link.begin(p.handle(), 3);
        sink.write_all(b"log").unwrap();
        link.drop_log();
        assert!(!link.complete(p), "a dropped backup's link is not taken");
        assert!(link.wait_transfer(Duration::from_millis(10)));
        assert!(link.take().is_none());
        let mut v = Vec::new();
        let _ = b.log_reader().read_to_end(&mut v);
        assert!(v.is_empty(), "{v:?}");
    }
}
