//! The channel's bytes: greeting, handshake frames, authenticated
//! messages, and the reading loop that watches for silence.
//!
//! See the [module documentation](super) for the exchange.

use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::{ChannelError, Role};

type HmacSha256 = Hmac<Sha256>;

/// First bytes each side sends, before its protocol version.
pub const MAGIC: &[u8; 8] = b"VMFT-CHN";
/// Channel protocol version spoken by this code. Change it whenever a
/// message's layout or meaning changes; both sides must speak the same.
pub const PROTOCOL_VERSION: u16 = 1;
/// Largest log payload one `Data` message may carry (and the largest a
/// [`ChannelConfig`](super::ChannelConfig) may set).
pub const MAX_MESSAGE: usize = 16 << 20;
/// Largest handshake frame body.
pub const MAX_HANDSHAKE: usize = 64 << 10;
/// Bytes of the HMAC-SHA256 tag kept on each message.
pub const TAG_LEN: usize = 16;
/// Bytes of each side's handshake nonce.
pub const NONCE_LEN: usize = 32;
/// Greeting: magic and version.
pub(crate) const GREETING_LEN: usize = MAGIC.len() + 2;
/// Frame head: length u32 and kind u8.
pub(crate) const HEAD_LEN: usize = 5;
/// Largest body of a message other than `Data`.
const MAX_SMALL_BODY: usize = 64;

/// Message kinds (the byte after the length).
pub(crate) mod kind {
    /// Handshake: each side's hello.
    pub const HELLO: u8 = 0x10;
    /// Handshake: the primary's proof of the secret.
    pub const PROOF: u8 = 0x11;
    /// Handshake: the backup accepts and proves the secret.
    pub const ACCEPT: u8 = 0x12;
    /// Handshake: the backup refuses, with a reason.
    pub const REFUSE: u8 = 0x13;
    /// Primary → backup: log bytes at an offset.
    pub const DATA: u8 = 0x01;
    /// Backup → primary: received and applied.
    pub const ACK: u8 = 0x02;
    /// Both ways: the sender's position.
    pub const HEARTBEAT: u8 = 0x03;
    /// Primary → backup: the log is complete.
    pub const END: u8 = 0x04;
}

/// Direction byte covered by every message tag.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Dir {
    ToBackup = 0,
    ToPrimary = 1,
}

/// One side's hello (postcard-encoded in a `HELLO` frame).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Hello {
    pub role: Role,
    pub nonce: [u8; NONCE_LEN],
    pub vm_name: String,
    pub generation: u64,
    pub config_hash: String,
    /// Largest `Data` payload this side accepts.
    pub max_message: u32,
    #[serde(with = "serde_bytes")]
    pub blob: Vec<u8>,
}

/// Why the backup refused a handshake (postcard-encoded in a `REFUSE`
/// frame; not authenticated, so it is only ever a reason to stop).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) enum Refusal {
    Auth,
    VmName { primary: String, backup: String },
    ConfigHash { primary: String, backup: String },
}

impl Refusal {
    pub(crate) fn into_error(self) -> ChannelError {
        match self {
            Refusal::Auth => ChannelError::AuthRefused,
            Refusal::VmName { primary, backup } => ChannelError::VmMismatch { primary, backup },
            Refusal::ConfigHash { primary, backup } => {
                ChannelError::ConfigMismatch { primary, backup }
            }
        }
    }
}

/// A message after the handshake.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Message {
    Data { offset: u64, bytes: Vec<u8> },
    Ack { received: u64, applied: u64 },
    Heartbeat { position: u64 },
    End { total: u64 },
}

impl Message {
    pub(crate) fn name(&self) -> &'static str {
        match self {
            Message::Data { .. } => "data",
            Message::Ack { .. } => "ack",
            Message::Heartbeat { .. } => "heartbeat",
            Message::End { .. } => "end",
        }
    }
}

pub(crate) fn io_err(context: impl Into<String>, source: std::io::Error) -> ChannelError {
    ChannelError::Io {
        context: context.into(),
        source,
    }
}

/// Fresh random nonce.
pub(crate) fn nonce() -> Result<[u8; NONCE_LEN], ChannelError> {
    let mut n = [0u8; NONCE_LEN];
    getrandom::fill(&mut n)
        .map_err(|e| ChannelError::Handshake(format!("no randomness for a nonce: {e}")))?;
    Ok(n)
}

/// The greeting: magic and version.
pub(crate) fn greeting() -> [u8; GREETING_LEN] {
    let mut g = [0u8; GREETING_LEN];
    g[..MAGIC.len()].copy_from_slice(MAGIC);
    g[MAGIC.len()..].copy_from_slice(&PROTOCOL_VERSION.to_le_bytes());
    g
}

/// Check the peer's greeting.
pub(crate) fn check_greeting(g: &[u8; GREETING_LEN]) -> Result<(), ChannelError> {
    if &g[..MAGIC.len()] != MAGIC {
        return Err(ChannelError::NotChannel { found: g.to_vec() });
    }
    let peer = u16::from_le_bytes([g[MAGIC.len()], g[MAGIC.len() + 1]]);
    if peer != PROTOCOL_VERSION {
        return Err(ChannelError::Version {
            peer,
            ours: PROTOCOL_VERSION,
        });
    }
    Ok(())
}

/// Map an I/O error during the handshake (the socket has the handshake
/// timeout as its read and write timeouts).
pub(crate) fn handshake_io(
    e: std::io::Error,
    what: &str,
    peer: Role,
    timeout: Duration,
) -> ChannelError {
    match e.kind() {
        ErrorKind::WouldBlock | ErrorKind::TimedOut => ChannelError::Timeout {
            what: format!("{what} from the {peer} during the handshake"),
            waited: timeout,
        },
        ErrorKind::UnexpectedEof => ChannelError::Closed {
            peer,
            detail: format!(" during the handshake (while reading {what})"),
        },
        _ => io_err(format!("handshake with the {peer} ({what})"), e),
    }
}

/// Write one handshake frame: `len u32 | kind u8 | body`.
pub(crate) fn write_handshake(
    s: &mut TcpStream,
    kind: u8,
    body: &[u8],
    peer: Role,
    timeout: Duration,
) -> Result<(), ChannelError> {
    debug_assert!(body.len() <= MAX_HANDSHAKE);
    let mut out = Vec::with_capacity(HEAD_LEN + body.len());
    out.extend_from_slice(&(body.len() as u32).to_le_bytes());
    out.push(kind);
    out.extend_from_slice(body);
    s.write_all(&out)
        .and_then(|_| s.flush())
        .map_err(|e| handshake_io(e, "sending", peer, timeout))
}

/// Read one handshake frame, refusing a length over [`MAX_HANDSHAKE`]
/// before allocating.
pub(crate) fn read_handshake(
    s: &mut TcpStream,
    peer: Role,
    timeout: Duration,
) -> Result<(u8, Vec<u8>), ChannelError> {
    let mut head = [0u8; HEAD_LEN];
    s.read_exact(&mut head)
        .map_err(|e| handshake_io(e, "a handshake message", peer, timeout))?;
    let len = u32::from_le_bytes(head[..4].try_into().expect("4 bytes"));
    if len as usize > MAX_HANDSHAKE {
        return Err(ChannelError::TooLarge {
            what: format!("handshake message (kind {:#04x})", head[4]),
            len: len as u64,
            max: MAX_HANDSHAKE as u64,
        });
    }
    let mut body = vec![0u8; len as usize];
    s.read_exact(&mut body)
        .map_err(|e| handshake_io(e, "a handshake message", peer, timeout))?;
    Ok((head[4], body))
}

/// SHA-256 over both hellos as sent (each carries its side's nonce).
pub(crate) fn transcript(primary_hello: &[u8], backup_hello: &[u8]) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(b"vmft-channel v1 transcript");
    h.update((primary_hello.len() as u64).to_le_bytes());
    h.update(primary_hello);
    h.update((backup_hello.len() as u64).to_le_bytes());
    h.update(backup_hello);
    h.finalize().into()
}

fn keyed(secret: &[u8]) -> HmacSha256 {
    HmacSha256::new_from_slice(secret).expect("HMAC takes keys of any length")
}

fn derive(secret: &[u8], label: &[u8], transcript: &[u8; 32]) -> HmacSha256 {
    let mut m = keyed(secret);
    m.update(label);
    m.update(transcript);
    m
}

const PRIMARY_PROOF: &[u8] = b"vmft-channel v1 primary proof";
const BACKUP_PROOF: &[u8] = b"vmft-channel v1 backup proof";
const SESSION_KEY: &[u8] = b"vmft-channel v1 session key";

/// The proof that `role` knows the secret, bound to this transcript.
pub(crate) fn proof(secret: &[u8], role: Role, transcript: &[u8; 32]) -> Vec<u8> {
    let label = match role {
        Role::Primary => PRIMARY_PROOF,
        Role::Backup => BACKUP_PROOF,
    };
    derive(secret, label, transcript)
        .finalize()
        .into_bytes()
        .to_vec()
}

/// Check `role`'s proof in constant time.
pub(crate) fn verify_proof(secret: &[u8], role: Role, transcript: &[u8; 32], proof: &[u8]) -> bool {
    let label = match role {
        Role::Primary => PRIMARY_PROOF,
        Role::Backup => BACKUP_PROOF,
    };
    derive(secret, label, transcript)
        .verify_slice(proof)
        .is_ok()
}

/// The session key: HMAC-SHA256(secret, label | transcript).
pub(crate) fn session_key(secret: &[u8], transcript: &[u8; 32]) -> [u8; 32] {
    derive(secret, SESSION_KEY, transcript)
        .finalize()
        .into_bytes()
        .into()
}

/// The MAC over (direction, sequence number, frame head and body) with the
/// session key, ready for the body's parts.
fn message_mac(proto: &HmacSha256, dir: Dir, seq: u64, head: &[u8; HEAD_LEN]) -> HmacSha256 {
    let mut m = proto.clone();
    m.update(&[dir as u8]);
    m.update(&seq.to_le_bytes());
    m.update(head);
    m
}

fn head(kind: u8, len: usize) -> [u8; HEAD_LEN] {
    let mut h = [0u8; HEAD_LEN];
    h[..4].copy_from_slice(&(len as u32).to_le_bytes());
    h[4] = kind;
    h
}

/// Seals outgoing messages: numbers them and appends the tag.
pub(crate) struct Sealer {
    mac: HmacSha256,
    dir: Dir,
    seq: u64,
}

impl Sealer {
    pub(crate) fn new(key: &[u8; 32], dir: Dir) -> Self {
        Sealer {
            mac: keyed(key),
            dir,
            seq: 0,
        }
    }

    /// The whole frame `len | kind | body | tag` for a body given in parts.
    pub(crate) fn seal(&mut self, kind: u8, parts: &[&[u8]]) -> Vec<u8> {
        let len: usize = parts.iter().map(|p| p.len()).sum();
        let h = head(kind, len);
        let mut m = message_mac(&self.mac, self.dir, self.seq, &h);
        let mut out = Vec::with_capacity(HEAD_LEN + len + TAG_LEN);
        out.extend_from_slice(&h);
        for p in parts {
            m.update(p);
            out.extend_from_slice(p);
        }
        out.extend_from_slice(&m.finalize().into_bytes()[..TAG_LEN]);
        self.seq += 1;
        out
    }

    pub(crate) fn message(&mut self, msg: &Message) -> Vec<u8> {
        match msg {
            Message::Data { offset, bytes } => {
                self.seal(kind::DATA, &[&offset.to_le_bytes(), bytes])
            }
            Message::Ack { received, applied } => self.seal(
                kind::ACK,
                &[&received.to_le_bytes(), &applied.to_le_bytes()],
            ),
            Message::Heartbeat { position } => {
                self.seal(kind::HEARTBEAT, &[&position.to_le_bytes()])
            }
            Message::End { total } => self.seal(kind::END, &[&total.to_le_bytes()]),
        }
    }
}

/// What the reading loop is told after each read attempt: whether bytes
/// arrived. It returns an error to stop (silence past the timeout, or the
/// link closing locally).
pub(crate) type Watch<'a> = dyn FnMut(bool) -> Result<(), ChannelError> + 'a;

/// Reads, checks and numbers incoming messages from a socket whose read
/// timeout is the poll interval.
pub(crate) struct Inbound {
    stream: TcpStream,
    mac: HmacSha256,
    dir: Dir,
    seq: u64,
    peer: Role,
    max_data: usize,
}

impl Inbound {
    /// `max_data`: the largest `Data` payload accepted.
    pub(crate) fn new(
        stream: TcpStream,
        key: &[u8; 32],
        dir: Dir,
        peer: Role,
        max_data: usize,
    ) -> Self {
        Inbound {
            stream,
            mac: keyed(key),
            dir,
            seq: 0,
            peer,
            max_data,
        }
    }

    /// Fill `buf`, calling `watch` after every read attempt. `Ok(false)`
    /// when the peer closed before the first byte and `boundary` allows it.
    fn fill(
        &mut self,
        buf: &mut [u8],
        boundary: bool,
        watch: &mut Watch,
    ) -> Result<bool, ChannelError> {
        let mut got = 0;
        while got < buf.len() {
            match self.stream.read(&mut buf[got..]) {
                Ok(0) => {
                    if got == 0 && boundary {
                        return Ok(false);
                    }
                    return Err(ChannelError::Closed {
                        peer: self.peer,
                        detail: format!(" in the middle of message {}", self.seq),
                    });
                }
                Ok(n) => {
                    got += n;
                    watch(true)?;
                }
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                    watch(false)?
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => {
                    return Err(io_err(format!("receiving from the {}", self.peer), e));
                }
            }
        }
        Ok(true)
    }

    /// The next message and its sequence number; `Ok(None)` when the peer
    /// closed the connection between messages. A length over the limit
    /// for its kind is refused before anything is allocated; a message
    /// whose tag does not verify is refused and nothing of it returned.
    pub(crate) fn next(
        &mut self,
        watch: &mut Watch,
    ) -> Result<Option<(u64, Message)>, ChannelError> {
        let seq = self.seq;
        let mut h = [0u8; HEAD_LEN];
        if !self.fill(&mut h, true, watch)? {
            return Ok(None);
        }
        let len = u32::from_le_bytes(h[..4].try_into().expect("4 bytes")) as usize;
        let k = h[4];
        let max = match k {
            kind::DATA => 8 + self.max_data,
            _ => MAX_SMALL_BODY,
        };
        if len > max {
            return Err(ChannelError::TooLarge {
                what: format!("message {seq} (kind {k:#04x})"),
                len: len as u64,
                max: max as u64,
            });
        }
        let mut m = message_mac(&self.mac, self.dir, seq, &h);
        let (first, rest) = if k == kind::DATA && len >= 8 {
            let mut off = [0u8; 8];
            self.fill(&mut off, false, watch)?;
            let mut bytes = vec![0u8; len - 8];
            self.fill(&mut bytes, false, watch)?;
            m.update(&off);
            m.update(&bytes);
            (off.to_vec(), bytes)
        } else {
            let mut body = vec![0u8; len];
            self.fill(&mut body, false, watch)?;
            m.update(&body);
            (body, Vec::new())
        };
        let mut tag = [0u8; TAG_LEN];
        self.fill(&mut tag, false, watch)?;
        if m.verify_truncated_left(&tag).is_err() {
            return Err(ChannelError::Altered { seq });
        }
        self.seq += 1;
        let bad = |detail: String| ChannelError::Protocol { seq, detail };
        let u64_at =
            |b: &[u8], i: usize| u64::from_le_bytes(b[i..i + 8].try_into().expect("8 bytes"));
        let msg = match (k, first.len()) {
            (kind::DATA, 8) => Message::Data {
                offset: u64_at(&first, 0),
                bytes: rest,
            },
            (kind::ACK, 16) => Message::Ack {
                received: u64_at(&first, 0),
                applied: u64_at(&first, 8),
            },
            (kind::HEARTBEAT, 8) => Message::Heartbeat {
                position: u64_at(&first, 0),
            },
            (kind::END, 8) => Message::End {
                total: u64_at(&first, 0),
            },
            (kind::DATA | kind::ACK | kind::HEARTBEAT | kind::END, n) => {
                return Err(bad(format!("kind {k:#04x} with a body of {n} bytes")))
            }
            _ => return Err(bad(format!("unknown message kind {k:#04x}"))),
        };
        Ok(Some((seq, msg)))
    }
}
