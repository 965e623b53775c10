//! The operator's view of one monitor: what `vmft status` shows and the
//! Prometheus endpoint exports.
//!
//! A side's hooks write a [`StatusBoard`] as the run goes (at most every
//! 100 ms, and at each change of state); the API server
//! ([`crate::api`]) reads it. The board holds figures, never guest state,
//! so reading it never stops the vCPU.
//!
//! States, per role:
//!
//! ```text
//! primary:  protected ──backup failed, claim won──▶ unprotected
//!               └───────backup failed, claim lost──▶ halted
//! backup:   replaying ──primary failed, claim won──▶ live (unprotected)
//!               └───────primary failed, claim lost──▶ halted
//! either:   ... ──clean end──▶ stopped
//! ```

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

/// Which process this is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// `vmft primary`.
    Primary,
    /// `vmft backup`.
    Backup,
}

/// Where a side is in its life (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum State {
    /// Waiting for the peer (a backup before its primary connects).
    Waiting,
    /// A primary whose backup follows.
    Protected,
    /// A primary whose backup failed: it runs alone.
    Unprotected,
    /// A backup replaying its primary's log.
    Replaying,
    /// A backup that took over: it runs alone.
    Live,
    /// A state transfer to a joining backup runs (re-protection): the
    /// joining backup receives, the primary sends. Not yet protected.
    Transfer,
    /// Lost the claim or was fenced: it releases nothing more.
    Halted,
    /// The run ended.
    Stopped,
}

impl State {
    /// Whether a VM in this state survives the loss of this side.
    pub fn protected(self) -> bool {
        matches!(self, State::Protected | State::Replaying)
    }
}

/// The last failover this side saw.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Failover {
    /// When the claim was won (Unix time, ms).
    pub at_unix_ms: u64,
    /// What failed: "primary" or "backup".
    pub failed: String,
    /// Why the peer was declared failed.
    pub reason: String,
    /// From the failure's detection to the claim won, ms.
    pub claim_ms: u64,
}

/// A state transfer to a joining backup (re-protection).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TransferStatus {
    /// The generation the new pair forms with.
    pub generation: u64,
    /// Bytes of state moved so far.
    pub bytes: u64,
    /// Bytes of state in all.
    pub total: u64,
    /// Rounds of the transfer (1: stop-and-copy).
    pub rounds: u32,
    /// How long the guest was paused for it, ms (the primary's figure).
    pub pause_ms: f64,
    /// Whether it is over (the log follows the state).
    pub done: bool,
}

/// One monitor's status.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MonitorStatus {
    /// The VM's name.
    pub vm: String,
    /// This process.
    pub pid: u32,
    /// Its role.
    pub role: Role,
    /// Its state.
    pub state: State,
    /// Whether the VM survives the loss of this side (a backup follows, or
    /// this is a following backup).
    pub protected: bool,
    /// The pair's generation (0 before the pair formed).
    pub generation: u64,
    /// The peer's address, as given on the command line.
    pub peer: Option<String>,
    /// Guest-caused exits executed (the primary's position, or how far the
    /// backup has replayed).
    pub exits: u64,
    /// Primary: exits the backup trails by (from its acks and heartbeats).
    pub lag_exits: Option<u64>,
    /// Log bytes sent (primary) or received (backup).
    pub log_bytes: u64,
    /// Log rate over the last update interval, bytes per second.
    pub log_bytes_per_s: f64,
    /// Primary: log bytes sent and not yet acknowledged.
    pub unacked_bytes: Option<u64>,
    /// Primary: delay the output rule added to console output, recent
    /// median and 99th percentile, ms.
    pub output_delay_ms: Option<(f64, f64)>,
    /// The last failover, if any.
    pub last_failover: Option<Failover>,
    /// The state transfer running or last done (re-protection).
    pub transfer: Option<TransferStatus>,
    /// Re-protections done by this side (new backups given the state).
    pub reprotections: u64,
    /// Seconds since this process started its VM.
    pub uptime_s: f64,
}

/// A side's status, shared between its hooks and its API server.
#[derive(Clone)]
pub struct StatusBoard {
    inner: Arc<Mutex<Board>>,
}

struct Board {
    status: MonitorStatus,
    started: Instant,
    /// Log bytes and time of the last rate sample.
    rate_sample: (u64, Instant),
}

/// Least time between two rate samples.
const RATE_INTERVAL: Duration = Duration::from_millis(500);

impl StatusBoard {
    /// The board of a `role` side of `vm`, talking to `peer`.
    pub fn new(vm: &str, role: Role, peer: Option<String>) -> Self {
        // Waiting for the peer until the pair forms.
        let state = State::Waiting;
        StatusBoard {
            inner: Arc::new(Mutex::new(Board {
                status: MonitorStatus {
                    vm: vm.to_string(),
                    pid: std::process::id(),
                    role,
                    state,
                    protected: state.protected(),
                    generation: 0,
                    peer,
                    exits: 0,
                    lag_exits: None,
                    log_bytes: 0,
                    log_bytes_per_s: 0.0,
                    unacked_bytes: None,
                    output_delay_ms: None,
                    last_failover: None,
                    transfer: None,
                    reprotections: 0,
                    uptime_s: 0.0,
                },
                started: Instant::now(),
                rate_sample: (0, Instant::now()),
            })),
        }
    }

    fn with<T>(&self, f: impl FnOnce(&mut Board) -> T) -> T {
        f(&mut self.inner.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// What a reader sees now.
    pub fn snapshot(&self) -> MonitorStatus {
        self.with(|b| {
            let mut s = b.status.clone();
            s.uptime_s = b.started.elapsed().as_secs_f64();
            s
        })
    }

    /// A new state.
    pub fn set_state(&self, state: State) {
        self.with(|b| {
            b.status.state = state;
            b.status.protected = state.protected();
        });
    }

    /// Change the state to `to` only if it is `from` now (a thread that
    /// finished a step must not overwrite what the run loop said since,
    /// such as a backup found gone). Says whether it changed.
    pub fn change_state(&self, from: State, to: State) -> bool {
        self.with(|b| {
            let now = b.status.state == from;
            if now {
                b.status.state = to;
                b.status.protected = to.protected();
            }
            now
        })
    }

    /// This side's role changed (a backup that went live hands its state
    /// to a new backup: it is that pair's primary).
    pub fn set_role(&self, role: Role) {
        self.with(|b| b.status.role = role);
    }

    /// The pair formed with `generation`.
    pub fn set_generation(&self, generation: u64) {
        self.with(|b| b.status.generation = generation);
    }

    /// The claim was won after `failed` failed (`reason`), `claim` after
    /// the failure was detected.
    pub fn failover(&self, failed: &str, reason: &str, claim: Duration) {
        let at_unix_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        self.with(|b| {
            b.status.last_failover = Some(Failover {
                at_unix_ms,
                failed: failed.to_string(),
                reason: reason.to_string(),
                claim_ms: claim.as_millis() as u64,
            })
        });
    }

    /// Progress: exits executed and log bytes moved so far.
    pub fn progress(&self, exits: u64, log_bytes: u64) {
        self.with(|b| {
            b.status.exits = exits;
            b.status.log_bytes = log_bytes;
            let (bytes0, t0) = b.rate_sample;
            let dt = t0.elapsed();
            if dt >= RATE_INTERVAL {
                b.status.log_bytes_per_s =
                    log_bytes.saturating_sub(bytes0) as f64 / dt.as_secs_f64();
                b.rate_sample = (log_bytes, Instant::now());
            }
        });
    }

    /// Primary: the backup's lag and the unacknowledged log.
    pub fn follow(&self, lag_exits: u64, unacked_bytes: u64) {
        self.with(|b| {
            b.status.lag_exits = Some(lag_exits);
            b.status.unacked_bytes = Some(unacked_bytes);
        });
    }

    /// Primary: no backup follows any more.
    pub fn unfollow(&self) {
        self.with(|b| {
            b.status.lag_exits = None;
            b.status.unacked_bytes = None;
        });
    }

    /// A state transfer begins (re-protection).
    pub fn transfer(&self, t: TransferStatus) {
        self.with(|b| b.status.transfer = Some(t));
    }

    /// Update the running transfer; once it is done, a primary counts a
    /// re-protection.
    pub fn update_transfer(&self, f: impl FnOnce(&mut TransferStatus)) {
        self.with(|b| {
            if let Some(t) = b.status.transfer.as_mut() {
                let was = t.done;
                f(t);
                if t.done && !was && b.status.role == Role::Primary {
                    b.status.reprotections += 1;
                }
            }
        });
    }

    /// Primary: recent output delays added by the rule.
    pub fn output_delays(&self, delays: &[Duration]) {
        if delays.is_empty() {
            return;
        }
        let mut d: Vec<Duration> = delays.to_vec();
        d.sort();
        let pct = |p: f64| d[((d.len() - 1) as f64 * p) as usize].as_secs_f64() * 1000.0;
        let v = (pct(0.5), pct(0.99));
        self.with(|b| b.status.output_delay_ms = Some(v));
    }
}

/// `s` in the Prometheus text exposition format (metric names
/// `vmft_...`, labels `vm` and `role`).
pub fn prometheus(s: &MonitorStatus) -> String {
    use std::fmt::Write;
    let role = match s.role {
        Role::Primary => "primary",
        Role::Backup => "backup",
    };
    let labels = format!("vm=\"{}\",role=\"{role}\"", escape_label(&s.vm));
    let mut out = String::new();
    let mut metric = |name: &str, kind: &str, help: &str, value: f64| {
        let _ = writeln!(out, "# HELP vmft_{name} {help}");
        let _ = writeln!(out, "# TYPE vmft_{name} {kind}");
        let _ = writeln!(out, "vmft_{name}{{{labels}}} {value}");
    };
    metric(
        "protected",
        "gauge",
        "1 if the VM survives the loss of this side.",
        s.protected as u8 as f64,
    );
    metric(
        "live",
        "gauge",
        "1 if this side runs the VM (a primary, or a backup that took over).",
        (matches!(s.state, State::Protected | State::Unprotected | State::Live)
            || (s.state == State::Transfer && s.role == Role::Primary)) as u8 as f64,
    );
    metric(
        "reprotections_total",
        "counter",
        "New backups given the state by this side.",
        s.reprotections as f64,
    );
    metric(
        "generation",
        "gauge",
        "The pair's generation.",
        s.generation as f64,
    );
    metric(
        "exits_total",
        "counter",
        "Guest-caused exits executed (or replayed).",
        s.exits as f64,
    );
    metric(
        "log_bytes_total",
        "counter",
        "Log bytes sent (primary) or received (backup).",
        s.log_bytes as f64,
    );
    metric(
        "log_bytes_per_second",
        "gauge",
        "Recent log rate.",
        s.log_bytes_per_s,
    );
    if let Some(lag) = s.lag_exits {
        metric(
            "lag_exits",
            "gauge",
            "Exits the backup trails by.",
            lag as f64,
        );
    }
    if let Some(u) = s.unacked_bytes {
        metric(
            "unacked_bytes",
            "gauge",
            "Log bytes sent and not yet acknowledged.",
            u as f64,
        );
    }
    if let Some((p50, p99)) = s.output_delay_ms {
        metric(
            "output_delay_p50_seconds",
            "gauge",
            "Recent median delay the output rule added.",
            p50 / 1000.0,
        );
        metric(
            "output_delay_p99_seconds",
            "gauge",
            "Recent 99th-percentile delay the output rule added.",
            p99 / 1000.0,
        );
    }
    if let Some(f) = &s.last_failover {
        metric(
            "last_failover_timestamp_seconds",
            "gauge",
            "When this side last won a claim after a failure (Unix time).",
            f.at_unix_ms as f64 / 1000.0,
        );
    }
    metric(
        "uptime_seconds",
        "gauge",
        "Seconds since this monitor started its VM.",
        s.uptime_s,
    );
    out
}

fn escape_label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_primary_is_protected_once_the_pair_forms_and_a_failover_is_recorded() {
        let b = StatusBoard::new("db", Role::Primary, Some("10.0.0.2:7000".into()));
        let s = b.snapshot();
        assert_eq!((s.state, s.protected), (State::Waiting, false));
        b.set_generation(42);
        b.set_state(State::Protected);
        let s = b.snapshot();
        assert_eq!(
            (s.state, s.protected, s.generation),
            (State::Protected, true, 42)
        );
        b.follow(5, 10);
        b.set_state(State::Unprotected);
        b.unfollow();
        b.failover(
            "backup",
            "no heartbeat for 2000 ms",
            Duration::from_millis(12),
        );
        let s = b.snapshot();
        assert!(!s.protected);
        assert_eq!((s.lag_exits, s.unacked_bytes), (None, None));
        let f = s.last_failover.unwrap();
        assert_eq!((f.failed.as_str(), f.claim_ms), ("backup", 12));
    }

    #[test]
    fn a_finished_transfer_does_not_overwrite_a_backup_found_gone() {
        let b = StatusBoard::new("db", Role::Primary, None);
        b.set_state(State::Transfer);
        assert!(b.change_state(State::Transfer, State::Protected));
        assert!(b.snapshot().protected);
        // The next transfer: the run loop finds the new backup gone before
        // the copy thread says it has the state.
        b.set_state(State::Transfer);
        b.set_state(State::Unprotected);
        assert!(!b.change_state(State::Transfer, State::Protected));
        let s = b.snapshot();
        assert_eq!((s.state, s.protected), (State::Unprotected, false));
    }

    #[test]
    fn a_backup_is_protected_only_while_it_follows() {
        let b = StatusBoard::new("db", Role::Backup, None);
        assert!(!b.snapshot().protected, "waiting for a primary");
        b.set_state(State::Replaying);
        assert!(b.snapshot().protected);
        b.set_state(State::Live);
        assert!(!b.snapshot().protected);
    }

    #[test]
    fn the_status_round_trips_through_json() {
        let b = StatusBoard::new("db", Role::Primary, None);
        b.set_state(State::Protected);
        b.progress(100, 4096);
        b.follow(3, 512);
        b.output_delays(&[Duration::from_millis(1), Duration::from_millis(3)]);
        let s = b.snapshot();
        let text = serde_json::to_string(&s).unwrap();
        assert!(text.contains("\"role\":\"primary\""), "{text}");
        assert!(text.contains("\"state\":\"protected\""), "{text}");
        let back: MonitorStatus = serde_json::from_str(&text).unwrap();
        assert_eq!(back, s);
    }

    #[test]
    fn prometheus_text_has_help_type_and_labelled_samples() {
        let b = StatusBoard::new("a\"b", Role::Backup, None);
        b.set_state(State::Replaying);
        b.progress(7, 99);
        let text = prometheus(&b.snapshot());
        assert!(text.contains("# TYPE vmft_protected gauge"), "{text}");
        assert!(
            text.contains("vmft_exits_total{vm=\"a\\\"b\",role=\"backup\"} 7"),
            "{text}"
        );
        assert!(text.contains("vmft_protected{vm=\"a\\\"b\",role=\"backup\"} 1"));
        assert!(
            !text.contains("lag_exits"),
            "a backup has no lag of its own"
        );
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let value = line.rsplit(' ').next().unwrap();
            assert!(value.parse::<f64>().is_ok(), "{line}");
        }
    }

    #[test]
    fn the_rate_is_bytes_over_the_interval() {
        let b = StatusBoard::new("db", Role::Primary, None);
        b.with(|x| x.rate_sample = (0, Instant::now() - Duration::from_secs(2)));
        b.progress(1, 2000);
        let r = b.snapshot().log_bytes_per_s;
        assert!((900.0..=1000.0).contains(&r), "{r}");
    }
}
