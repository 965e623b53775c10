//! The console stream's wire protocol: a side (a monitor that may release
//! guest output) and the console endpoint (`vmft console --listen ADDR`).
//!
//! The side dials the console. Every message is a frame: a 4-byte
//! big-endian length, then a body of that many bytes (at most
//! [`MAX_FRAME_BODY`]): one type byte, the payload, and after the
//! handshake an HMAC-SHA256 tag of 32 bytes.
//!
//! ```text
//!  side (primary / backup / live)                     console endpoint
//!  ------------------------------                     ----------------
//!  Open { "VMFTCON1", nonce_s }          ───────────▶
//!                                        ◀─────────── Challenge { "VMFTCON1", nonce_c,
//!                                                       proof_c = H(token, "console" ‖ nonce_s ‖ nonce_c) }
//!  checks proof_c (a console without
//!  the token is left at once)
//!  Proof { proof_s = H(token, "side" ‖ nonce_s ‖ nonce_c) } ──▶
//!                                                     checks proof_s; if wrong: Refused { reason }, close
//!        key = H(token, "session" ‖ nonce_s ‖ nonce_c); from here every frame carries
//!        tag = H(key, direction ‖ counter ‖ type ‖ payload), counter from 0 per direction
//!                                        ◀─────────── Welcome { printed_upto }
//!  Hello { vm, generation, role, claimant,
//!          next_offset, won_claim,
//!          input_resume_seq }            ───────────▶  follows the highest generation;
//!                                                      if this side is now the live one:
//!                                        ◀─────────── Input { seq, bytes }  (every unconfirmed
//!                                                       input from input_resume_seq on)
//!  Output { offset, bytes }              ───────────▶  prints the bytes not yet printed
//!                                        ◀─────────── Ack { offset }  (printed up to here)
//!  Claimed { generation }                ───────────▶  from now on: only this claimant of
//!                                                       this generation (or a newer one)
//!                                        ◀─────────── Input { seq, bytes }  (typed keys)
//!  InputLogged { upto_seq }              ───────────▶  drops inputs up to upto_seq
//!                                        ◀─────────── Stop  (only in `vmft ft`: the escape)
//!  Done { reason, exit_status }          ───────────▶  prints what is left, exits with
//!                                                       exit_status, closes every side
//!
//!  (any time, for a side of another VM or one that breaks the rules)
//!                                        ◀─────────── Dropped { reason }, close
//! ```
//!
//! `H` is HMAC-SHA256; the labels are `vmft-console/console`,
//! `vmft-console/side` and `vmft-console/session`. The direction byte is
//! `b'S'` for side → console and `b'C'` for console → side. A frame
//! replayed from another session fails the tag (another key); one
//! replayed, dropped or reordered within a session fails it too (another
//! counter); a frame reflected back to its sender fails it (another
//! direction).
//!
//! States of a side's connection, on the console: *handshake* (the
//! first three frames, within a timeout; anything else: refused and
//! closed) → *authenticated* (Welcome sent; the side counts once it has
//! said Hello) → *closed*. `Hello` may be sent again on the same
//! connection: a live side that forms a new pair moves to the new
//! generation. A side that has not said Hello is ignored.
//!
//! Bounds: a body is at most [`MAX_FRAME_BODY`] bytes; one output chunk
//! at most [`MAX_OUTPUT_CHUNK`], one input chunk at most
//! [`MAX_INPUT_CHUNK`], names at most [`MAX_NAME`], a reason at most
//! [`MAX_REASON`]. Larger lengths are refused before anything is
//! allocated for them.
//!
//! Versions: the magic `VMFTCON1` carries the version. Any change to a
//! message's layout or meaning takes a new magic; a console and a side of
//! different versions refuse each other in the handshake.

use std::io::{self, Read, Write};

use hmac::{Hmac, Mac};
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

/// The protocol's magic and version.
pub const MAGIC: [u8; 8] = *b"VMFTCON1";
/// Length of each nonce.
pub const NONCE_LEN: usize = 32;
/// Length of an HMAC-SHA256 tag.
pub const TAG_LEN: usize = 32;
/// Largest output chunk in one frame.
pub const MAX_OUTPUT_CHUNK: usize = 16 * 1024;
/// Largest input chunk in one frame.
pub const MAX_INPUT_CHUNK: usize = 4096;
/// Longest VM name or claimant.
pub const MAX_NAME: usize = 256;
/// Longest reason (in `Done` and `Refused`).
pub const MAX_REASON: usize = 1024;
/// Largest frame body: type, the largest payload (an output chunk and its
/// offset), the tag.
pub const MAX_FRAME_BODY: usize = 1 + 8 + MAX_OUTPUT_CHUNK + TAG_LEN;

const LABEL_CONSOLE: &[u8] = b"vmft-console/console";
const LABEL_SIDE: &[u8] = b"vmft-console/side";
const LABEL_SESSION: &[u8] = b"vmft-console/session";

/// Direction byte in the tag: side → console.
const DIR_TO_CONSOLE: u8 = b'S';
/// Direction byte in the tag: console → side.
const DIR_TO_SIDE: u8 = b'C';

mod ty {
    pub const OPEN: u8 = 0x01;
    pub const CHALLENGE: u8 = 0x02;
    pub const PROOF: u8 = 0x03;
    pub const REFUSED: u8 = 0x04;

    pub const HELLO: u8 = 0x10;
    pub const OUTPUT: u8 = 0x11;
    pub const CLAIMED: u8 = 0x12;
    pub const INPUT_LOGGED: u8 = 0x13;
    pub const DONE: u8 = 0x14;

    pub const WELCOME: u8 = 0x20;
    pub const INPUT: u8 = 0x21;
    pub const ACK: u8 = 0x22;
    pub const STOP: u8 = 0x23;
    pub const DROPPED: u8 = 0x24;
}

/// What went wrong on the wire.
#[derive(Debug, thiserror::Error)]
pub enum ProtocolError {
    /// The connection failed.
    #[error("connection: {0}")]
    Io(#[from] io::Error),
    /// The peer closed the connection.
    #[error("the peer closed the connection")]
    Closed,
    /// A frame longer than the limit (or empty).
    #[error("frame length {len} is outside 1..={max}")]
    BadLength {
        /// The length announced.
        len: u64,
        /// The limit.
        max: usize,
    },
    /// Not this protocol, or another version of it.
    #[error("not a vmft console peer of this version (magic {0:02x?})")]
    BadMagic(Vec<u8>),
    /// A message type this direction does not carry.
    #[error("unexpected message type {0:#04x}")]
    UnexpectedType(u8),
    /// A message whose fields do not parse.
    #[error("malformed {what}")]
    Malformed {
        /// Which message or field.
        what: &'static str,
    },
    /// A frame's tag is wrong: altered, replayed, or from another session.
    #[error("a frame failed authentication (altered, replayed or from another session)")]
    BadTag,
    /// The side's proof is wrong: it does not hold the token.
    #[error("the peer does not hold the console token")]
    WrongToken,
    /// The console's proof is wrong: it does not hold the token.
    #[error("the console's proof does not match this side's token (the token files differ)")]
    ConsoleUnproven,
    /// The console refused this side.
    #[error("refused by the console: {0}")]
    Refused(String),
}

/// The role a side has in its pair.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// The primary of a protected pair: it releases output.
    Primary,
    /// The backup: it releases nothing until it has won a claim.
    Backup,
    /// A side running alone (a backup that went live, or a VM without a
    /// backup).
    Live,
}

impl Role {
    fn code(self) -> u8 {
        match self {
            Role::Primary => 1,
            Role::Backup => 2,
            Role::Live => 3,
        }
    }

    fn from_code(c: u8) -> Option<Role> {
        match c {
            1 => Some(Role::Primary),
            2 => Some(Role::Backup),
            3 => Some(Role::Live),
            _ => None,
        }
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Role::Primary => "primary",
            Role::Backup => "backup",
            Role::Live => "live",
        })
    }
}

/// A side introduces itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hello {
    /// The VM's name.
    pub vm: String,
    /// The pair's generation.
    pub generation: u64,
    /// The side's role.
    pub role: Role,
    /// The side's claimant identity (`name:pid:nonce`).
    pub claimant: String,
    /// The offset of the next output byte this side will send.
    pub next_offset: u64,
    /// The side has won the claim for `generation`.
    pub won_claim: bool,
    /// The next input seq this side expects (it has every input below).
    pub input_resume_seq: u64,
}

/// Messages from a side to the console.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ToConsole {
    /// Introduces the side (first message; may be repeated for a new
    /// generation).
    Hello(Hello),
    /// Guest output at `offset`.
    Output {
        /// Offset of the first byte in the guest's output stream.
        offset: u64,
        /// The bytes.
        bytes: Vec<u8>,
    },
    /// The side won the claim for `generation`.
    Claimed {
        /// The generation claimed.
        generation: u64,
    },
    /// The backup has logged every input up to `upto_seq`.
    InputLogged {
        /// Highest seq logged.
        upto_seq: u64,
    },
    /// The VM has ended (the guest halted or the pair was stopped).
    Done {
        /// Why, for the user.
        reason: String,
        /// The status the console exits with.
        exit_status: i32,
    },
}

/// Messages from the console to a side.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ToSide {
    /// Authenticated; the console has printed up to `printed_upto`
    /// (nothing yet: `None`).
    Welcome {
        /// The offset after the last byte printed.
        printed_upto: Option<u64>,
    },
    /// Typed keys.
    Input {
        /// Sequence number (from 1, contiguous).
        seq: u64,
        /// The keys.
        bytes: Vec<u8>,
    },
    /// The console has printed everything below `offset`.
    Ack {
        /// The offset after the last byte printed.
        offset: u64,
    },
    /// The user asked to stop the pair.
    Stop,
    /// The console drops this side (another VM, a protocol violation);
    /// the connection closes next.
    Dropped {
        /// Why, for the side's log.
        reason: String,
    },
}

/// A message of one direction.
pub trait Message: Sized {
    /// The tag's direction byte for this message's direction.
    const DIRECTION: u8;
    /// Type byte and payload.
    fn encode(&self) -> (u8, Vec<u8>);
    /// Parse a payload of type `ty`.
    fn decode(ty: u8, payload: &[u8]) -> Result<Self, ProtocolError>;
}

struct Enc(Vec<u8>);

impl Enc {
    fn new() -> Self {
        Enc(Vec::new())
    }
    fn u8(mut self, v: u8) -> Self {
        self.0.push(v);
        self
    }
    fn u64(mut self, v: u64) -> Self {
        self.0.extend_from_slice(&v.to_be_bytes());
        self
    }
    fn i32(mut self, v: i32) -> Self {
        self.0.extend_from_slice(&v.to_be_bytes());
        self
    }
    /// A string, cut to `max` bytes (at a character boundary).
    fn str(mut self, s: &str, max: usize) -> Self {
        let mut end = s.len().min(max);
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        self.0.extend_from_slice(&(end as u16).to_be_bytes());
        self.0.extend_from_slice(&s.as_bytes()[..end]);
        self
    }
    fn bytes(mut self, b: &[u8]) -> Self {
        self.0.extend_from_slice(b);
        self
    }
}

struct Dec<'a> {
    buf: &'a [u8],
    what: &'static str,
}

impl<'a> Dec<'a> {
    fn new(buf: &'a [u8], what: &'static str) -> Self {
        Dec { buf, what }
    }
    fn bad(&self) -> ProtocolError {
        ProtocolError::Malformed { what: self.what }
    }
    fn take(&mut self, n: usize) -> Result<&'a [u8], ProtocolError> {
        if self.buf.len() < n {
            return Err(self.bad());
        }
        let (a, b) = self.buf.split_at(n);
        self.buf = b;
        Ok(a)
    }
    fn u8(&mut self) -> Result<u8, ProtocolError> {
        Ok(self.take(1)?[0])
    }
    fn u64(&mut self) -> Result<u64, ProtocolError> {
        let b = self.take(8)?;
        Ok(u64::from_be_bytes(b.try_into().map_err(|_| self.bad())?))
    }
    fn i32(&mut self) -> Result<i32, ProtocolError> {
        let b = self.take(4)?;
        Ok(i32::from_be_bytes(b.try_into().map_err(|_| self.bad())?))
    }
    fn str(&mut self, max: usize) -> Result<String, ProtocolError> {
        let b = self.take(2)?;
        let n = u16::from_be_bytes([b[0], b[1]]) as usize;
        if n > max {
            return Err(self.bad());
        }
        let s = self.take(n)?;
        String::from_utf8(s.to_vec()).map_err(|_| self.bad())
    }
    fn array<const N: usize>(&mut self) -> Result<[u8; N], ProtocolError> {
        let b = self.take(N)?;
        b.try_into().map_err(|_| self.bad())
    }
    fn rest(&mut self, max: usize) -> Result<Vec<u8>, ProtocolError> {
        if self.buf.len() > max {
            return Err(self.bad());
        }
        let r = self.buf.to_vec();
        self.buf = &[];
        Ok(r)
    }
    fn end(&self) -> Result<(), ProtocolError> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(self.bad())
        }
    }
}

impl Message for ToConsole {
    const DIRECTION: u8 = DIR_TO_CONSOLE;

    fn encode(&self) -> (u8, Vec<u8>) {
        match self {
            ToConsole::Hello(h) => (
                ty::HELLO,
                Enc::new()
                    .str(&h.vm, MAX_NAME)
                    .u64(h.generation)
                    .u8(h.role.code())
                    .str(&h.claimant, MAX_NAME)
                    .u64(h.next_offset)
                    .u8(h.won_claim as u8)
                    .u64(h.input_resume_seq)
                    .0,
            ),
            ToConsole::Output { offset, bytes } => {
                (ty::OUTPUT, Enc::new().u64(*offset).bytes(bytes).0)
            }
            ToConsole::Claimed { generation } => (ty::CLAIMED, Enc::new().u64(*generation).0),
            ToConsole::InputLogged { upto_seq } => (ty::INPUT_LOGGED, Enc::new().u64(*upto_seq).0),
            ToConsole::Done {
                reason,
                exit_status,
            } => (
                ty::DONE,
                Enc::new().str(reason, MAX_REASON).i32(*exit_status).0,
            ),
        }
    }

    fn decode(t: u8, payload: &[u8]) -> Result<Self, ProtocolError> {
        let msg = match t {
            ty::HELLO => {
                let mut d = Dec::new(payload, "Hello");
                let vm = d.str(MAX_NAME)?;
                let generation = d.u64()?;
                let role = Role::from_code(d.u8()?).ok_or(d.bad())?;
                let claimant = d.str(MAX_NAME)?;
                let next_offset = d.u64()?;
                let won_claim = match d.u8()? {
                    0 => false,
                    1 => true,
                    _ => return Err(d.bad()),
                };
                let input_resume_seq = d.u64()?;
                d.end()?;
                ToConsole::Hello(Hello {
                    vm,
                    generation,
                    role,
                    claimant,
                    next_offset,
                    won_claim,
                    input_resume_seq,
                })
            }
            ty::OUTPUT => {
                let mut d = Dec::new(payload, "Output");
                let offset = d.u64()?;
                let bytes = d.rest(MAX_OUTPUT_CHUNK)?;
                if offset.checked_add(bytes.len() as u64).is_none() {
                    return Err(d.bad());
                }
                ToConsole::Output { offset, bytes }
            }
            ty::CLAIMED => {
                let mut d = Dec::new(payload, "Claimed");
                let generation = d.u64()?;
                d.end()?;
                ToConsole::Claimed { generation }
            }
            ty::INPUT_LOGGED => {
                let mut d = Dec::new(payload, "InputLogged");
                let upto_seq = d.u64()?;
                d.end()?;
                ToConsole::InputLogged { upto_seq }
            }
            ty::DONE => {
                let mut d = Dec::new(payload, "Done");
                let reason = d.str(MAX_REASON)?;
                let exit_status = d.i32()?;
                d.end()?;
                ToConsole::Done {
                    reason,
                    exit_status,
                }
            }
            other => return Err(ProtocolError::UnexpectedType(other)),
        };
        Ok(msg)
    }
}

impl Message for ToSide {
    const DIRECTION: u8 = DIR_TO_SIDE;

    fn encode(&self) -> (u8, Vec<u8>) {
        match self {
            ToSide::Welcome { printed_upto } => (
                ty::WELCOME,
                match printed_upto {
                    None => Enc::new().u8(0).0,
                    Some(o) => Enc::new().u8(1).u64(*o).0,
                },
            ),
            ToSide::Input { seq, bytes } => (ty::INPUT, Enc::new().u64(*seq).bytes(bytes).0),
            ToSide::Ack { offset } => (ty::ACK, Enc::new().u64(*offset).0),
            ToSide::Stop => (ty::STOP, Vec::new()),
            ToSide::Dropped { reason } => (ty::DROPPED, Enc::new().str(reason, MAX_REASON).0),
        }
    }

    fn decode(t: u8, payload: &[u8]) -> Result<Self, ProtocolError> {
        let msg = match t {
            ty::WELCOME => {
                let mut d = Dec::new(payload, "Welcome");
                let printed_upto = match d.u8()? {
                    0 => None,
                    1 => Some(d.u64()?),
                    _ => return Err(d.bad()),
                };
                d.end()?;
                ToSide::Welcome { printed_upto }
            }
            ty::INPUT => {
                let mut d = Dec::new(payload, "Input");
                let seq = d.u64()?;
                let bytes = d.rest(MAX_INPUT_CHUNK)?;
                if seq == 0 || bytes.is_empty() {
                    return Err(d.bad());
                }
                ToSide::Input { seq, bytes }
            }
            ty::ACK => {
                let mut d = Dec::new(payload, "Ack");
                let offset = d.u64()?;
                d.end()?;
                ToSide::Ack { offset }
            }
            ty::STOP => {
                Dec::new(payload, "Stop").end()?;
                ToSide::Stop
            }
            ty::DROPPED => {
                let mut d = Dec::new(payload, "Dropped");
                let reason = d.str(MAX_REASON)?;
                d.end()?;
                ToSide::Dropped { reason }
            }
            other => return Err(ProtocolError::UnexpectedType(other)),
        };
        Ok(msg)
    }
}

fn hmac(key: &[u8], parts: &[&[u8]]) -> [u8; TAG_LEN] {
    let mut m = HmacSha256::new_from_slice(key).expect("HMAC takes a key of any length");
    for p in parts {
        m.update(p);
    }
    m.finalize().into_bytes().into()
}

fn hmac_verify(key: &[u8], parts: &[&[u8]], tag: &[u8]) -> bool {
    let mut m = HmacSha256::new_from_slice(key).expect("HMAC takes a key of any length");
    for p in parts {
        m.update(p);
    }
    m.verify_slice(tag).is_ok()
}

/// Fresh random bytes from the kernel.
pub fn nonce() -> io::Result<[u8; NONCE_LEN]> {
    let mut n = [0u8; NONCE_LEN];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut n)?;
    Ok(n)
}

/// Read one frame body (type and the rest), unauthenticated.
fn read_body<R: Read>(r: &mut R) -> Result<Vec<u8>, ProtocolError> {
    let mut len = [0u8; 4];
    match r.read_exact(&mut len) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Err(ProtocolError::Closed),
        Err(e) => return Err(e.into()),
    }
    let len = u32::from_be_bytes(len) as usize;
    if len == 0 || len > MAX_FRAME_BODY {
        return Err(ProtocolError::BadLength {
            len: len as u64,
            max: MAX_FRAME_BODY,
        });
    }
    let mut body = vec![0u8; len];
    match r.read_exact(&mut body) {
        Ok(()) => Ok(body),
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => Err(ProtocolError::Closed),
        Err(e) => Err(e.into()),
    }
}

fn write_body<W: Write>(w: &mut W, body: &[u8]) -> Result<(), ProtocolError> {
    debug_assert!(!body.is_empty() && body.len() <= MAX_FRAME_BODY);
    let mut frame = Vec::with_capacity(4 + body.len());
    frame.extend_from_slice(&(body.len() as u32).to_be_bytes());
    frame.extend_from_slice(body);
    w.write_all(&frame)?;
    w.flush()?;
    Ok(())
}

/// The receiving half of an authenticated session.
pub struct FrameReader<R> {
    inner: R,
    key: [u8; TAG_LEN],
    counter: u64,
}

/// The sending half of an authenticated session.
pub struct FrameWriter<W> {
    inner: W,
    key: [u8; TAG_LEN],
    counter: u64,
}

impl<R: Read> FrameReader<R> {
    /// Receive the next message; its tag must match this session, this
    /// direction and the next counter.
    pub fn recv<M: Message>(&mut self) -> Result<M, ProtocolError> {
        let body = read_body(&mut self.inner)?;
        if body.len() < 1 + TAG_LEN {
            return Err(ProtocolError::BadTag);
        }
        let (msg, tag) = body.split_at(body.len() - TAG_LEN);
        let counter = self.counter.to_be_bytes();
        if !hmac_verify(&self.key, &[&[M::DIRECTION], &counter, msg], tag) {
            return Err(ProtocolError::BadTag);
        }
        self.counter += 1;
        M::decode(msg[0], &msg[1..])
    }

    /// The underlying reader.
    pub fn get_ref(&self) -> &R {
        &self.inner
    }
}

impl<W: Write> FrameWriter<W> {
    /// Send a message, tagged for this session, direction and counter.
    pub fn send<M: Message>(&mut self, msg: &M) -> Result<(), ProtocolError> {
        let (t, payload) = msg.encode();
        let mut body = Vec::with_capacity(1 + payload.len() + TAG_LEN);
        body.push(t);
        body.extend_from_slice(&payload);
        let counter = self.counter.to_be_bytes();
        let tag = hmac(&self.key, &[&[M::DIRECTION], &counter, &body]);
        body.extend_from_slice(&tag);
        if body.len() > MAX_FRAME_BODY {
            return Err(ProtocolError::BadLength {
                len: body.len() as u64,
                max: MAX_FRAME_BODY,
            });
        }
        write_body(&mut self.inner, &body)?;
        self.counter += 1;
        Ok(())
    }

    /// The underlying writer.
    pub fn get_ref(&self) -> &W {
        &self.inner
    }
}

fn session_key(token: &[u8], ns: &[u8; NONCE_LEN], nc: &[u8; NONCE_LEN]) -> [u8; TAG_LEN] {
    hmac(token, &[LABEL_SESSION, ns, nc])
}

/// The side's half of the handshake: prove the token, check the
/// console's proof, and wait for its `Welcome`. Returns the session and
/// the console's printed offset.
#[allow(clippy::type_complexity)]
pub fn side_handshake<R: Read, W: Write>(
    mut r: R,
    mut w: W,
    token: &[u8],
) -> Result<(FrameReader<R>, FrameWriter<W>, Option<u64>), ProtocolError> {
    let ns = nonce()?;
    write_body(&mut w, &Enc::new().u8(ty::OPEN).bytes(&MAGIC).bytes(&ns).0)?;
    let body = read_body(&mut r)?;
    let nc = match body[0] {
        ty::CHALLENGE => {
            let mut d = Dec::new(&body[1..], "Challenge");
            let magic: [u8; 8] = d.array()?;
            if magic != MAGIC {
                return Err(ProtocolError::BadMagic(magic.to_vec()));
            }
            let nc: [u8; NONCE_LEN] = d.array()?;
            let proof: [u8; TAG_LEN] = d.array()?;
            d.end()?;
            if !hmac_verify(token, &[LABEL_CONSOLE, &ns, &nc], &proof) {
                return Err(ProtocolError::ConsoleUnproven);
            }
            nc
        }
        ty::REFUSED => return Err(refused(&body[1..])),
        other => return Err(ProtocolError::UnexpectedType(other)),
    };
    let proof = hmac(token, &[LABEL_SIDE, &ns, &nc]);
    write_body(&mut w, &Enc::new().u8(ty::PROOF).bytes(&proof).0)?;
    let key = session_key(token, &ns, &nc);
    let mut reader = FrameReader {
        inner: r,
        key,
        counter: 0,
    };
    let writer = FrameWriter {
        inner: w,
        key,
        counter: 0,
    };
    // The console answers with Welcome (tagged) or Refused (plain).
    let body = read_body(&mut reader.inner)?;
    if body[0] == ty::REFUSED {
        return Err(refused(&body[1..]));
    }
    if body.len() < 1 + TAG_LEN {
        return Err(ProtocolError::BadTag);
    }
    let (msg, tag) = body.split_at(body.len() - TAG_LEN);
    if !hmac_verify(&key, &[&[DIR_TO_SIDE], &0u64.to_be_bytes(), msg], tag) {
        return Err(ProtocolError::BadTag);
    }
    reader.counter = 1;
    match ToSide::decode(msg[0], &msg[1..])? {
        ToSide::Welcome { printed_upto } => Ok((reader, writer, printed_upto)),
        _ => Err(ProtocolError::UnexpectedType(msg[0])),
    }
}

fn refused(payload: &[u8]) -> ProtocolError {
    match Dec::new(payload, "Refused").str(MAX_REASON) {
        Ok(reason) => ProtocolError::Refused(reason),
        Err(e) => e,
    }
}

/// The console's half of the handshake: check the side's proof (on a
/// wrong one, tell it so and fail). The caller sends `Welcome` next.
pub fn console_handshake<R: Read, W: Write>(
    mut r: R,
    mut w: W,
    token: &[u8],
) -> Result<(FrameReader<R>, FrameWriter<W>), ProtocolError> {
    let body = read_body(&mut r)?;
    if body[0] != ty::OPEN {
        return Err(ProtocolError::UnexpectedType(body[0]));
    }
    let mut d = Dec::new(&body[1..], "Open");
    let magic: [u8; 8] = d.array()?;
    if magic != MAGIC {
        return Err(ProtocolError::BadMagic(magic.to_vec()));
    }
    let ns: [u8; NONCE_LEN] = d.array()?;
    d.end()?;
    let nc = nonce()?;
    let proof = hmac(token, &[LABEL_CONSOLE, &ns, &nc]);
    write_body(
        &mut w,
        &Enc::new()
            .u8(ty::CHALLENGE)
            .bytes(&MAGIC)
            .bytes(&nc)
            .bytes(&proof)
            .0,
    )?;
    let body = read_body(&mut r)?;
    if body[0] != ty::PROOF {
        return Err(ProtocolError::UnexpectedType(body[0]));
    }
    let mut d = Dec::new(&body[1..], "Proof");
    let side_proof: [u8; TAG_LEN] = d.array()?;
    d.end()?;
    if !hmac_verify(token, &[LABEL_SIDE, &ns, &nc], &side_proof) {
        let _ = refuse(&mut w, "wrong token");
        return Err(ProtocolError::WrongToken);
    }
    let key = session_key(token, &ns, &nc);
    Ok((
        FrameReader {
            inner: r,
            key,
            counter: 0,
        },
        FrameWriter {
            inner: w,
            key,
            counter: 0,
        },
    ))
}

/// Tell a peer why it is refused (plain frame, best effort).
pub fn refuse<W: Write>(w: &mut W, reason: &str) -> Result<(), ProtocolError> {
    write_body(w, &Enc::new().u8(ty::REFUSED).str(reason, MAX_REASON).0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixStream;

    type SideEnd = Result<
        (
            FrameReader<UnixStream>,
            FrameWriter<UnixStream>,
            Option<u64>,
        ),
        ProtocolError,
    >;
    type ConsoleEnd = Result<(FrameReader<UnixStream>, FrameWriter<UnixStream>), ProtocolError>;

    fn pair(side_token: &'static [u8], console_token: &'static [u8]) -> (SideEnd, ConsoleEnd) {
        let (a, b) = UnixStream::pair().unwrap();
        let console = std::thread::spawn(move || {
            let r = b.try_clone().unwrap();
            let mut res = console_handshake(r, b, console_token);
            if let Ok((_, w)) = &mut res {
                // Welcome, as the endpoint does.
                w.send(&ToSide::Welcome {
                    printed_upto: Some(7),
                })
                .unwrap();
            }
            res
        });
        let side = side_handshake(a.try_clone().unwrap(), a, side_token);
        let console = console.join().unwrap();
        (side, console)
    }

    #[test]
    fn the_same_token_gives_one_session_both_ways() {
        let (side, console) = pair(b"secret", b"secret");
        let (mut sr, mut sw, printed) = side.unwrap();
        assert_eq!(printed, Some(7));
        let (mut cr, mut cw) = console.unwrap();
        let hello = Hello {
            vm: "vm1".into(),
            generation: 42,
            role: Role::Backup,
            claimant: "b:1:ab".into(),
            next_offset: 100,
            won_claim: true,
            input_resume_seq: 3,
        };
        sw.send(&ToConsole::Hello(hello.clone())).unwrap();
        sw.send(&ToConsole::Output {
            offset: 100,
            bytes: b"hi".to_vec(),
        })
        .unwrap();
        sw.send(&ToConsole::Done {
            reason: "halted".into(),
            exit_status: -3,
        })
        .unwrap();
        assert_eq!(cr.recv::<ToConsole>().unwrap(), ToConsole::Hello(hello));
        assert_eq!(
            cr.recv::<ToConsole>().unwrap(),
            ToConsole::Output {
                offset: 100,
                bytes: b"hi".to_vec()
            }
        );
        assert_eq!(
            cr.recv::<ToConsole>().unwrap(),
            ToConsole::Done {
                reason: "halted".into(),
                exit_status: -3
            }
        );
        cw.send(&ToSide::Input {
            seq: 1,
            bytes: b"x".to_vec(),
        })
        .unwrap();
        cw.send(&ToSide::Stop).unwrap();
        assert_eq!(
            sr.recv::<ToSide>().unwrap(),
            ToSide::Input {
                seq: 1,
                bytes: b"x".to_vec()
            }
        );
        assert_eq!(sr.recv::<ToSide>().unwrap(), ToSide::Stop);
    }

    #[test]
    fn a_side_with_another_token_is_refused_and_told() {
        let (side, console) = pair(b"wrong", b"secret");
        // The side sees the console's proof fail first: it never sends
        // its own proof, and the console sees the connection close.
        assert!(matches!(side, Err(ProtocolError::ConsoleUnproven)));
        assert!(matches!(console, Err(ProtocolError::Closed)));
    }

    #[test]
    fn a_forged_proof_is_refused_with_a_reason() {
        // A client that skips checking the console's proof and sends a
        // made-up one.
        let (mut a, b) = UnixStream::pair().unwrap();
        let console = std::thread::spawn(move || {
            let r = b.try_clone().unwrap();
            console_handshake(r, b, b"secret").map(|_| ())
        });
        write_body(
            &mut a,
            &Enc::new().u8(ty::OPEN).bytes(&MAGIC).bytes(&[1; 32]).0,
        )
        .unwrap();
        let challenge = read_body(&mut a).unwrap();
        assert_eq!(challenge[0], ty::CHALLENGE);
        write_body(&mut a, &Enc::new().u8(ty::PROOF).bytes(&[9; 32]).0).unwrap();
        let refusal = read_body(&mut a).unwrap();
        assert_eq!(refusal[0], ty::REFUSED);
        assert!(matches!(refused(&refusal[1..]), ProtocolError::Refused(r) if r == "wrong token"));
        assert!(matches!(
            console.join().unwrap(),
            Err(ProtocolError::WrongToken)
        ));
    }

    #[test]
    fn garbage_and_oversized_frames_are_refused_before_allocation() {
        let mut r = &b"GET / HTTP/1.1\r\n\r\n"[..];
        assert!(matches!(
            read_body(&mut r),
            Err(ProtocolError::BadLength { .. })
        ));
        let mut r = &[0u8, 0, 0, 0][..];
        assert!(matches!(
            read_body(&mut r),
            Err(ProtocolError::BadLength { len: 0, .. })
        ));
        let mut big = ((MAX_FRAME_BODY + 1) as u32).to_be_bytes().to_vec();
        big.extend_from_slice(&[0; 16]);
        assert!(matches!(
            read_body(&mut &big[..]),
            Err(ProtocolError::BadLength { .. })
        ));
    }

    #[test]
    fn an_altered_or_replayed_frame_fails_its_tag() {
        let key = [5u8; TAG_LEN];
        let mut buf = Vec::new();
        let mut w = FrameWriter {
            inner: &mut buf,
            key,
            counter: 0,
        };
        w.send(&ToConsole::Output {
            offset: 0,
            bytes: b"abc".to_vec(),
        })
        .unwrap();
        let frame = buf.clone();
        // Altered.
        let mut altered = frame.clone();
        let n = altered.len();
        altered[n - TAG_LEN - 1] ^= 1;
        let mut r = FrameReader {
            inner: &altered[..],
            key,
            counter: 0,
        };
        assert!(matches!(r.recv::<ToConsole>(), Err(ProtocolError::BadTag)));
        // Replayed: the same frame twice.
        let twice = [frame.clone(), frame.clone()].concat();
        let mut r = FrameReader {
            inner: &twice[..],
            key,
            counter: 0,
        };
        assert!(r.recv::<ToConsole>().is_ok());
        assert!(matches!(r.recv::<ToConsole>(), Err(ProtocolError::BadTag)));
        // Reflected: read as the other direction.
        let mut r = FrameReader {
            inner: &frame[..],
            key,
            counter: 0,
        };
        assert!(matches!(r.recv::<ToSide>(), Err(ProtocolError::BadTag)));
    }

    #[test]
    fn bounds_on_fields_are_enforced() {
        let long = "x".repeat(MAX_NAME + 10);
        let (t, p) = ToConsole::Hello(Hello {
            vm: long.clone(),
            generation: 1,
            role: Role::Primary,
            claimant: "c".into(),
            next_offset: 0,
            won_claim: false,
            input_resume_seq: 1,
        })
        .encode();
        // Encoding cuts the name to the bound, so it still decodes.
        match ToConsole::decode(t, &p).unwrap() {
            ToConsole::Hello(h) => assert_eq!(h.vm.len(), MAX_NAME),
            other => panic!("{other:?}"),
        }
        let too_big = vec![0u8; 8 + MAX_OUTPUT_CHUNK + 1];
        assert!(ToConsole::decode(ty::OUTPUT, &too_big).is_err());
        assert!(ToSide::decode(ty::INPUT, &[0u8; 8]).is_err(), "seq 0");
        assert!(matches!(
            ToConsole::decode(ty::ACK, &[0u8; 8]),
            Err(ProtocolError::UnexpectedType(ty::ACK))
        ));
        assert!(ToConsole::decode(ty::OUTPUT, &Enc::new().u64(u64::MAX).bytes(b"ab").0).is_err());
    }
}
