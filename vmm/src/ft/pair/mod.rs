//! The two roles of a live pair, as the run loop sees them: what the
//! primary and the backup add at every boundary ([`crate::vm::PairHooks`]),
//! the primary's log sink (the logging channel, `loglink.rs`), joining
//! backups and the state transfer's steps (`join.rs`), and the backup's
//! gate before it goes live.
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

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arbiter::Decision;
use ft_log::channel::{BackupLink, EndState, PeerState};
use ft_log::InputCursor;

use super::claim::Claimant;
use super::console_side::{ConsoleSide, InputConfirmer};
use super::output::{HeldOutput, IntoHeld, OutputTail, Release, ReleaseMode, MAX_HELD};
use super::precopy::Written;
use super::status::{State, StatusBoard};
use crate::devices::virtio::written::OwnImage;
use crate::memory::GuestMemoryMmap;
use crate::nondet::{Door, DoorError, Recorder};
use crate::replay::LogEnd;
use crate::shared_disk::{FencedFlag, Fences};
use crate::vm::{HandOver, JoinStep, LogContinues, PairHooks};

mod join;
mod loglink;

pub use join::next_generation;
use join::Joins;
pub use loglink::{ChannelSink, LogLink};

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
    /// The shared disks' fences, claimed when this side wins the VM and
    /// moved to a new pair's generation when a backup joins.
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

    /// Whether a held stream is past [`MAX_HELD`]: the guest waits for its
    /// releaser. A halted stream holds nobody (nothing more will be
    /// released): the run loop stops the VM for what halted it.
    fn held_full(&self) -> bool {
        let full = |h: &HeldOutput| h.held() > MAX_HELD && h.mode() != ReleaseMode::Halt;
        full(&self.held) || self.streams.iter().any(|s| full(&s.held))
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

impl PairHooks for PrimaryHooks {
    fn join_step(&mut self) -> JoinStep {
        self.next_join_step()
    }

    fn begin_copy(&mut self, mem: GuestMemoryMmap, disks: Vec<OwnImage>) -> Result<(), DoorError> {
        self.start_copy(mem, disks)
    }

    fn copy_round(&mut self, written: Written) -> Option<Written> {
        self.next_copy_round(written)
    }

    fn hand_over(&mut self, pos: u64, rest: HandOver) -> Result<LogContinues, DoorError> {
        self.hand_over_rest(pos, rest)
    }

    fn join_failed(&mut self, why: &str) {
        self.refuse_joiner(why)
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
            // Bounded here too: a guest that writes (its shared disks,
            // say) faster than the sink takes it waits for the releaser.
            while self.held_full() {
                std::thread::sleep(Duration::from_millis(1));
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
        while self.held_full() {
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
    /// Held output that the shared-disk writes go into once live (a side
    /// that may take a new backup; `disk`'s sink is not used then): the
    /// tail is written through it before the guest goes on, what the guest
    /// writes after it is held, free until a backup joins.
    pub disk_held: Option<(HeldOutput, FencedFlag)>,
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

/// Longest wait at a takeover for the shared-disk writes the primary may
/// not have made to be written through held output.
const DISK_TAIL_WRITTEN: Duration = Duration::from_secs(30);

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
                    let failed = |e| DoorError::Ft(format!("writing shared-disk writes: {e}"));
                    let from = match &self.disk_held {
                        // Through held output (free: no backup yet), and
                        // written before the guest goes on: it reads the
                        // images from now on.
                        Some((held, fenced)) => {
                            let fresh = held.rebase(tail.kept().0);
                            debug_assert!(fresh, "shared-disk writes held before going live");
                            let from = tail
                                .go_live(Box::new(IntoHeld(held.capture())))
                                .map_err(failed)?;
                            held.mark(0);
                            if !held.drain(DISK_TAIL_WRITTEN) {
                                return Err(match fenced.get() {
                                    Some(f) if f.fenced => DoorError::Fenced(f.message),
                                    Some(f) => failed(std::io::Error::other(f.message)),
                                    None => DoorError::Ft(format!(
                                        "the shared-disk writes the primary may not have made \
                                         were not written within {} s",
                                        DISK_TAIL_WRITTEN.as_secs()
                                    )),
                                });
                            }
                            from
                        }
                        None => tail.go_live(sink).map_err(failed)?,
                    };
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
