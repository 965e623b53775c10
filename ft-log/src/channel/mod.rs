//! The logging channel between primary and backup: TCP, authenticated,
//! with acknowledgements, heartbeats and flow control.
//!
//! The primary dials ([`PrimaryLink::connect`]), the backup listens
//! ([`BackupListener::bind`], [`BackupListener::accept`]); for
//! re-protection a new backup dials a running primary instead
//! ([`BackupLink::join`], [`JoinListener`]), with the same exchange. The log's bytes
//! (what [`crate::LogWriter`] produces: header, then frames) travel as
//! `Data` messages; the backup exposes them as a [`std::io::Read`]
//! ([`LogReader`]) that the replayer reads like a file.
//!
//! # The exchange
//!
//! ```text
//! primary (PrimaryLink::connect)                            backup (BackupListener::accept)
//!   TCP connect, retried until connect_deadline ──────────▶ accept
//!   "VMFT-CHN" version u16 ───────────────────────────────▶ magic? version? (else NotChannel / Version)
//!   ◀─────────────────────────────────────────────────────── "VMFT-CHN" version u16
//!   HELLO {primary, nonce_p, vm, generation, config hash,
//!          max message, blob} ─────────────────────────────▶
//!   ◀─────── HELLO {backup, nonce_b, vm, generation (echoed), config hash, max message, blob}
//!   T = SHA-256(both hellos as sent)
//!   PROOF {HMAC(secret, "primary proof" | T)} ────────────▶ verify, else REFUSE{Auth}   (AuthFailed)
//!                                                           vm name, else REFUSE{VmName} (VmMismatch)
//!                                                           config hash, else REFUSE{ConfigHash}
//!   ◀──────────────────────────────── ACCEPT {HMAC(secret, "backup proof" | T)}
//!   verify, else AuthFailed;  REFUSE → AuthRefused / VmMismatch / ConfigMismatch
//!   both: K = HMAC(secret, "session key" | T); message numbers start at 0 each way
//! ═══ every message from here: len u32 | kind u8 | body | tag (16 bytes) ═══
//!   tag = HMAC-SHA256(K, direction u8 | message number u64 | len | kind | body), first 16 bytes
//!   Data {offset u64, log bytes} ─────────────────────────▶ offset == received? buffer (bounded)
//!   Data ... (offsets contiguous from 0)  ────────────────▶      → LogReader
//!   ◀───────────────────── Ack {received u64, applied u64}  as soon as data is verified
//!   Heartbeat {exit position} when idle for `heartbeat`,
//!     or every `heartbeat` while the position moves ─────▶ primary_position()
//!   ◀──────────────── Heartbeat {applied} when nothing else was sent for `heartbeat`
//!   finish(): End {total} after the last Data ────────────▶ total == received? EndState::Clean
//!   ◀─────────────────────────────── Ack {total, applied}, then FIN
//!   EOF after End and ack of total: done, close             LogReader drains the buffer, then Ok(0)
//! ```
//!
//! Handshake frames are `len u32 | kind u8 | body` (body at most
//! [`MAX_HANDSHAKE`] bytes), unauthenticated except through the proofs,
//! which cover both hellos and so both fresh nonces: a proof or a message
//! captured in one session is worthless in another. A `Data` body is at
//! most 8 + [`MAX_MESSAGE`] bytes (less when either side's
//! [`ChannelConfig::max_message`] is smaller: each hello says what its side
//! accepts), every other body at most 64; a larger length is refused as
//! soon as the head arrives, before anything is allocated. All integers
//! are little-endian. The protocol version ([`PROTOCOL_VERSION`]) changes
//! with any change of a message's layout or meaning; there is no
//! negotiation, both sides must speak the same one.
//!
//! # The primary's states
//!
//! ```text
//! Connecting ──TCP up──▶ Handshaking ──ACCEPT verified──▶ Streaming ──finish()──▶ Ending ──Ack(total)+EOF──▶ Closed
//!     │ connect_deadline        │ REFUSE, bad proof,          │                        │ finish_timeout
//!     ▼                         ▼ timeout, garbage            ▼                        ▼
//!   Err(Connect)              Err(..)                    Failed{reason}           Err(Timeout / PeerFailed)
//! ```
//!
//! - Streaming: [`PrimaryLink::write`] queues bytes (the vCPU thread never
//!   touches the socket) and blocks only while `sent - acked` would exceed
//!   the window; the sender thread sends `Data` and heartbeats, the
//!   receiver thread takes acks and heartbeats.
//! - Failed (socket error, EOF, a bad or unauthenticated message, or
//!   **nothing heard from the backup for `timeout`**): the socket is shut,
//!   blocked writers and waiters return [`ChannelError::PeerFailed`], and
//!   [`ChannelConfig::on_failure`] is called once from the link's thread.
//!
//! # The backup's states
//!
//! ```text
//! Listening ──accept──▶ Handshaking ──proof ok, names and hashes agree──▶ Receiving ──End{total == received}──▶ Ended(Clean)
//!                            │ refuse                                         │
//!                            ▼                                                ▼ EOF without End, socket error, bad or
//!                       Err(..) from accept                              Ended(PrimaryFailed{reason})   unauthenticated message,
//!                                                                                              silence for `timeout`
//! ```
//!
//! - Receiving: verified bytes go to a bounded buffer and are acknowledged
//!   at once (acks mean "received and verified", replay may trail). While
//!   the buffer is full the backup stops reading the socket (TCP carries
//!   the back-pressure to the primary's window) and **its silence clock is
//!   stopped**: a primary cannot be heard through a socket nobody reads.
//! - On silence (nothing from the primary for `timeout` while reading) the
//!   primary is declared failed. Either end, the [`LogReader`] first hands
//!   out every byte already verified, then returns `Ok(0)`;
//!   [`BackupLink::end_state`] tells a clean end (no takeover) from a
//!   failed primary. Nothing of a message that fails authentication, and
//!   nothing after it, is delivered.
//!
//! Silence on either side is judged on bytes received: any byte from the
//! peer counts as hearing from it.

mod backup;
mod handshake;
mod join;
mod primary;
mod wire;

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use thiserror::Error;

pub use backup::{BackupLink, BackupListener, LogReader};
pub use join::JoinListener;
pub use primary::{PrimaryHandle, PrimaryLink};
pub use wire::{MAGIC, MAX_HANDSHAKE, MAX_MESSAGE, NONCE_LEN, PROTOCOL_VERSION, TAG_LEN};

/// Largest hello blob a side may attach.
pub const MAX_HELLO_BLOB: usize = 32 << 10;
/// Longest VM name or configuration hash.
pub const MAX_NAME: usize = 1024;

/// The two ends of the channel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Role {
    /// Records and sends the log; dials.
    Primary,
    /// Receives and replays the log; listens.
    Backup,
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Role::Primary => "primary",
            Role::Backup => "backup",
        })
    }
}

/// Called once from a link's thread when the peer is declared failed.
pub type FailureHook = Arc<dyn Fn() + Send + Sync>;

/// Settings of one end of the channel. Both ends take the same type;
/// `generation` is the primary's (the backup learns it in the handshake).
#[derive(Clone)]
pub struct ChannelConfig {
    /// The shared secret ([`load_token_file`]); must not be empty.
    pub secret: Vec<u8>,
    /// The VM's name. The backup refuses a primary with another name,
    /// unless its own is empty (then it takes any).
    pub vm_name: String,
    /// The pair's generation, chosen by the primary.
    pub generation: u64,
    /// Hash of the VM's configuration; the backup refuses a mismatch.
    pub config_hash: String,
    /// Opaque blob for the peer (at most [`MAX_HELLO_BLOB`] bytes).
    pub hello: Vec<u8>,
    /// Send a heartbeat when nothing else was sent for this long.
    pub heartbeat: Duration,
    /// Declare the peer failed when nothing was heard from it for this
    /// long (more than `heartbeat`).
    pub timeout: Duration,
    /// Primary: one TCP connection attempt's timeout.
    pub connect_timeout: Duration,
    /// Primary: keep retrying the connection this long (the backup may
    /// start a moment later).
    pub connect_deadline: Duration,
    /// Each read and write of the handshake.
    pub handshake_timeout: Duration,
    /// Primary: how long [`PrimaryLink::finish`] waits for the backup to
    /// acknowledge the end.
    pub finish_timeout: Duration,
    /// Primary: initial flow-control window (bytes sent and not yet
    /// acknowledged); [`PrimaryLink::set_window`] changes it.
    pub window: u64,
    /// Largest log payload of one `Data` message, at most [`MAX_MESSAGE`]:
    /// what this side sends at most and accepts at most.
    pub max_message: usize,
    /// Backup: bytes received and not yet read that it holds before it
    /// stops reading the socket.
    pub backup_buffer: usize,
    /// Called once, from the link's thread, when the peer is declared
    /// failed (not on a clean end, not when the link is closed locally).
    pub on_failure: Option<FailureHook>,
}

impl fmt::Debug for ChannelConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ChannelConfig")
            .field("secret", &format_args!("<{} bytes>", self.secret.len()))
            .field("vm_name", &self.vm_name)
            .field("generation", &self.generation)
            .field("config_hash", &self.config_hash)
            .field("hello", &format_args!("<{} bytes>", self.hello.len()))
            .field("heartbeat", &self.heartbeat)
            .field("timeout", &self.timeout)
            .field("connect_timeout", &self.connect_timeout)
            .field("connect_deadline", &self.connect_deadline)
            .field("handshake_timeout", &self.handshake_timeout)
            .field("finish_timeout", &self.finish_timeout)
            .field("window", &self.window)
            .field("max_message", &self.max_message)
            .field("backup_buffer", &self.backup_buffer)
            .field("on_failure", &self.on_failure.is_some())
            .finish()
    }
}

impl ChannelConfig {
    /// Defaults: heartbeat 100 ms, timeout 2 s, connect attempts of 1 s
    /// retried for 30 s, handshake steps 10 s, finish 10 s, window 64 MiB,
    /// messages up to [`MAX_MESSAGE`], backup buffer 256 MiB, generation 0.
    pub fn new(
        secret: Vec<u8>,
        vm_name: impl Into<String>,
        config_hash: impl Into<String>,
    ) -> Self {
        ChannelConfig {
            secret,
            vm_name: vm_name.into(),
            generation: 0,
            config_hash: config_hash.into(),
            hello: Vec::new(),
            heartbeat: Duration::from_millis(100),
            timeout: Duration::from_secs(2),
            connect_timeout: Duration::from_secs(1),
            connect_deadline: Duration::from_secs(30),
            handshake_timeout: Duration::from_secs(10),
            finish_timeout: Duration::from_secs(10),
            window: 64 << 20,
            max_message: MAX_MESSAGE,
            backup_buffer: 256 << 20,
            on_failure: None,
        }
    }

    /// Set the generation.
    pub fn with_generation(mut self, generation: u64) -> Self {
        self.generation = generation;
        self
    }

    /// Set the hello blob.
    pub fn with_hello(mut self, hello: Vec<u8>) -> Self {
        self.hello = hello;
        self
    }

    /// Set the heartbeat interval and the failure timeout.
    pub fn with_timing(mut self, heartbeat: Duration, timeout: Duration) -> Self {
        self.heartbeat = heartbeat;
        self.timeout = timeout;
        self
    }

    /// Set the hook called when the peer fails.
    pub fn with_on_failure(mut self, hook: impl Fn() + Send + Sync + 'static) -> Self {
        self.on_failure = Some(Arc::new(hook));
        self
    }

    /// Refuse settings the channel cannot work with.
    pub fn validate(&self) -> Result<(), ChannelError> {
        let bad = |m: String| Err(ChannelError::Config(m));
        if self.secret.is_empty() {
            return bad("the secret is empty".into());
        }
        if self.vm_name.len() > MAX_NAME || self.config_hash.len() > MAX_NAME {
            return bad(format!(
                "VM name or configuration hash longer than {MAX_NAME} bytes"
            ));
        }
        if self.hello.len() > MAX_HELLO_BLOB {
            return bad(format!(
                "hello blob of {} bytes exceeds {MAX_HELLO_BLOB}",
                self.hello.len()
            ));
        }
        if self.heartbeat.is_zero() || self.timeout <= self.heartbeat {
            return bad(format!(
                "the timeout ({:?}) must exceed the heartbeat interval ({:?}), which must not be zero",
                self.timeout, self.heartbeat
            ));
        }
        if self.max_message == 0 || self.max_message > MAX_MESSAGE {
            return bad(format!(
                "max_message {} outside 1..={MAX_MESSAGE}",
                self.max_message
            ));
        }
        if self.window == 0 || self.backup_buffer == 0 {
            return bad("the window and the backup buffer must not be zero".into());
        }
        if self.handshake_timeout.is_zero() || self.connect_timeout.is_zero() {
            return bad("handshake and connect timeouts must not be zero".into());
        }
        Ok(())
    }

    /// How often the link threads wake to check for silence and closing.
    pub(crate) fn poll_interval(&self) -> Duration {
        (self.heartbeat.min(self.timeout) / 4)
            .clamp(Duration::from_millis(5), Duration::from_millis(100))
    }
}

/// What the peer said about itself in the handshake.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerInfo {
    /// Its address, when the socket still knows it.
    pub addr: Option<std::net::SocketAddr>,
    /// Its role.
    pub role: Role,
    /// Its VM name.
    pub vm_name: String,
    /// The generation (the primary's; the backup echoes it).
    pub generation: u64,
    /// Its configuration hash.
    pub config_hash: String,
    /// Its hello blob.
    pub hello: Vec<u8>,
}

/// Whether the peer is alive, as far as this end knows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PeerState {
    /// Heard from within the timeout, socket intact.
    Alive,
    /// Declared failed; the link is shut.
    Failed {
        /// Why, in words.
        reason: String,
    },
}

/// How the backup's stream ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EndState {
    /// The primary sent `End`: the log is complete; no takeover.
    Clean,
    /// The primary is gone (socket broken, silence, a bad message).
    PrimaryFailed {
        /// Why, in words.
        reason: String,
    },
}

/// Number of buckets in an [`RttHistogram`].
pub const RTT_BUCKETS: usize = 24;

/// Ack round-trip times: bucket 0 holds times under 1 µs, bucket `i`
/// (1 ≤ i < 23) times in [2^(i-1), 2^i) µs, bucket 23 everything from
/// 2^22 µs (about 4.2 s) on.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RttHistogram {
    /// Samples.
    pub count: u64,
    /// Sum of the samples.
    pub total: Duration,
    /// Largest sample.
    pub max: Duration,
    /// Counts per bucket.
    pub buckets: [u64; RTT_BUCKETS],
}

impl RttHistogram {
    /// Add a sample.
    pub fn record(&mut self, d: Duration) {
        let us = d.as_micros().min(u64::MAX as u128) as u64;
        let i = ((64 - us.leading_zeros()) as usize).min(RTT_BUCKETS - 1);
        self.buckets[i] += 1;
        self.count += 1;
        self.total += d;
        self.max = self.max.max(d);
    }

    /// Mean, zero without samples.
    pub fn mean(&self) -> Duration {
        if self.count == 0 {
            Duration::ZERO
        } else {
            self.total / self.count.min(u32::MAX as u64) as u32
        }
    }

    /// Upper bound of the bucket holding quantile `q` (0..=1); the last
    /// bucket reports `max`.
    pub fn quantile(&self, q: f64) -> Duration {
        if self.count == 0 {
            return Duration::ZERO;
        }
        let want = ((self.count as f64) * q.clamp(0.0, 1.0)).ceil().max(1.0) as u64;
        let mut seen = 0;
        for (i, n) in self.buckets.iter().enumerate() {
            seen += n;
            if seen >= want {
                return if i == RTT_BUCKETS - 1 {
                    self.max
                } else {
                    Duration::from_micros(1 << i).min(self.max)
                };
            }
        }
        self.max
    }
}

/// The primary's counters.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LinkStats {
    /// Log bytes queued by [`PrimaryLink::write`] (= [`PrimaryLink::sent`]).
    pub bytes_queued: u64,
    /// Log bytes handed to the socket.
    pub bytes_sent: u64,
    /// `Data` messages sent.
    pub data_messages: u64,
    /// Highest `received` acknowledged.
    pub acked: u64,
    /// Acks received.
    pub acks_received: u64,
    /// Writes that had to wait for the window.
    pub stalls: u64,
    /// Time writers spent waiting for the window.
    pub stall_time: Duration,
    /// Heartbeats sent.
    pub heartbeats_sent: u64,
    /// Heartbeats received.
    pub heartbeats_received: u64,
    /// Time from sending a `Data` message to the ack that covers it.
    pub ack_rtt: RttHistogram,
}

/// The backup's counters.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BackupStats {
    /// Log bytes received and verified.
    pub bytes_received: u64,
    /// Log bytes handed to readers.
    pub bytes_delivered: u64,
    /// `Data` messages received.
    pub data_messages: u64,
    /// Acks sent.
    pub acks_sent: u64,
    /// Heartbeats sent.
    pub heartbeats_sent: u64,
    /// Heartbeats received.
    pub heartbeats_received: u64,
    /// Times the buffer was full and the backup stopped reading.
    pub buffer_full: u64,
    /// Time spent not reading because the buffer was full.
    pub buffer_full_time: Duration,
    /// Most bytes buffered at once.
    pub buffered_peak: u64,
}

/// Channel errors.
#[derive(Debug, Error)]
pub enum ChannelError {
    /// The token file cannot be read.
    #[error("reading token file {}: {source}", path.display())]
    TokenFile {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The token file holds nothing (after trimming a trailing newline).
    #[error("token file {} is empty", path.display())]
    EmptyToken {
        /// The file.
        path: PathBuf,
    },
    /// A setting the channel cannot work with.
    #[error("invalid channel configuration: {0}")]
    Config(String),
    /// No connection to the backup before the deadline.
    #[error("could not connect to the backup at {addr} within {waited:?}: {source}")]
    Connect {
        /// Address(es) tried.
        addr: String,
        /// How long we tried.
        waited: Duration,
        /// The last attempt's error.
        #[source]
        source: std::io::Error,
    },
    /// A socket operation failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// The peer's first bytes are not the channel's greeting.
    #[error("the peer is not a vmft channel: it sent {found:02x?} instead of the greeting")]
    NotChannel {
        /// The bytes it sent.
        found: Vec<u8>,
    },
    /// The peer speaks another protocol version.
    #[error("the peer speaks channel protocol version {peer}, this vmft speaks {ours}")]
    Version {
        /// Its version.
        peer: u16,
        /// Ours.
        ours: u16,
    },
    /// A malformed or unexpected handshake message.
    #[error("handshake: {0}")]
    Handshake(String),
    /// Waited too long.
    #[error("timed out after {waited:?} waiting for {what}")]
    Timeout {
        /// What for.
        what: String,
        /// How long.
        waited: Duration,
    },
    /// The peer's proof of the secret is wrong.
    #[error("peer failed authentication (wrong token?)")]
    AuthFailed,
    /// The backup found our proof of the secret wrong.
    #[error("the backup refused our authentication (wrong token?)")]
    AuthRefused,
    /// The two sides run different configurations.
    #[error("configuration hash mismatch: primary {primary}, backup {backup}")]
    ConfigMismatch {
        /// The primary's hash.
        primary: String,
        /// The backup's hash.
        backup: String,
    },
    /// The two sides serve different VMs.
    #[error("VM name mismatch: primary {primary:?}, backup {backup:?}")]
    VmMismatch {
        /// The primary's name.
        primary: String,
        /// The backup's name.
        backup: String,
    },
    /// A length read from the wire exceeds its bound (refused before
    /// allocating).
    #[error("{what}: length {len} exceeds the maximum {max}")]
    TooLarge {
        /// Which message.
        what: String,
        /// The length read.
        len: u64,
        /// The bound.
        max: u64,
    },
    /// A message's tag does not verify.
    #[error("message {seq} failed authentication: altered in flight (or replayed, reordered or injected)")]
    Altered {
        /// Its number in its direction.
        seq: u64,
    },
    /// An authenticated message that makes no sense here.
    #[error("message {seq}: {detail}")]
    Protocol {
        /// Its number in its direction.
        seq: u64,
        /// What is wrong.
        detail: String,
    },
    /// The peer closed the connection.
    #[error("the {peer} closed the connection{detail}")]
    Closed {
        /// Who.
        peer: Role,
        /// Where (may be empty).
        detail: String,
    },
    /// Nothing heard from the peer for the timeout.
    #[error("nothing heard from the {peer} for {waited:?} (timeout {timeout:?})")]
    Silence {
        /// Who.
        peer: Role,
        /// Since the last byte.
        waited: Duration,
        /// The configured timeout.
        timeout: Duration,
    },
    /// The peer was declared failed earlier; the link is shut.
    #[error("the peer failed: {reason}")]
    PeerFailed {
        /// Why.
        reason: String,
    },
    /// The link was closed on this side.
    #[error("the link is closed")]
    LocallyClosed,
}

/// Read a channel secret from `path`: its bytes, less one trailing
/// newline (`\n` or `\r\n`). An empty secret is refused.
pub fn load_token_file(path: impl AsRef<Path>) -> Result<Vec<u8>, ChannelError> {
    let path = path.as_ref();
    let mut bytes = std::fs::read(path).map_err(|source| ChannelError::TokenFile {
        path: path.to_path_buf(),
        source,
    })?;
    if bytes.last() == Some(&b'\n') {
        bytes.pop();
        if bytes.last() == Some(&b'\r') {
            bytes.pop();
        }
    }
    if bytes.is_empty() {
        return Err(ChannelError::EmptyToken {
            path: path.to_path_buf(),
        });
    }
    Ok(bytes)
}
