//! Re-protection's state transfer: what a running primary sends a joining
//! backup on the new logging link before the log, and how the backup reads
//! it.
//!
//! ```text
//! primary (JoinListener accepted)                      backup (BackupLink::join)
//!   at a boundary, guest paused:
//!     state = snapshot file bytes (vCPU, devices, memory)
//!     new RecordDoor (header: hash of this state) ─ its log bytes wait
//!   guest runs on; the sender thread sends:
//!   head  "VMFT-XFR" | version u32 | generation u64 |
//!         console u64 | frames u64 | disk u64 |
//!         state length u64 | CRC32C of the above u32 ────▶ read_head: magic, version, CRC, length bound
//!   state bytes (a snapshot file: its own CRC) ─────────▶ read_state (progress)
//!   then the log that waited, and the log as it grows ──▶ ReplayDoor on the same reader
//! ```
//!
//! The offsets are where the new backup's copies of the output streams
//! begin (console bytes, transmitted-frame records, shared-disk write
//! records): the primary's stream positions at the instant of the state.
//! The log that follows is an ordinary log whose header carries the
//! configuration hash of this state, so the backup checks it as usual.
//! All integers little-endian.

use std::io::{self, Read, Write};

use thiserror::Error;

/// The transfer's magic.
pub const MAGIC: &[u8; 8] = b"VMFT-XFR";
/// The transfer layout's version.
pub const VERSION: u32 = 1;
/// Bytes of the head.
pub const HEAD_LEN: usize = 8 + 4 + 8 * 5 + 4;
/// Largest state accepted (guest memory is at most a few GiB here).
pub const MAX_STATE: u64 = 64 << 30;
/// State bytes per write (a progress report after each).
const CHUNK: usize = 1 << 20;

/// What precedes the state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TransferHead {
    /// The generation of the pair the transfer forms.
    pub generation: u64,
    /// Console output offset at the state.
    pub console: u64,
    /// Transmitted-frame stream offset at the state.
    pub frames: u64,
    /// Shared-disk write stream offset at the state.
    pub disk: u64,
    /// Bytes of state that follow.
    pub state_len: u64,
}

/// A transfer that cannot be read.
#[derive(Debug, Error)]
pub enum TransferError {
    /// The link ended or failed.
    #[error("the state transfer broke off after {got} of {want} bytes: {source}")]
    Io {
        /// Bytes read.
        got: u64,
        /// Bytes expected.
        want: u64,
        /// Why.
        source: io::Error,
    },
    /// Not a transfer, another version, or a damaged head.
    #[error("not a vmft state transfer: {0}")]
    Invalid(String),
}

impl TransferHead {
    /// The head's bytes.
    pub fn encode(&self) -> [u8; HEAD_LEN] {
        let mut b = [0u8; HEAD_LEN];
        b[..8].copy_from_slice(MAGIC);
        b[8..12].copy_from_slice(&VERSION.to_le_bytes());
        for (i, v) in [
            self.generation,
            self.console,
            self.frames,
            self.disk,
            self.state_len,
        ]
        .iter()
        .enumerate()
        {
            b[12 + 8 * i..20 + 8 * i].copy_from_slice(&v.to_le_bytes());
        }
        let crc = crc32c::crc32c(&b[..HEAD_LEN - 4]);
        b[HEAD_LEN - 4..].copy_from_slice(&crc.to_le_bytes());
        b
    }

    /// Parse a head.
    pub fn decode(b: &[u8; HEAD_LEN]) -> Result<TransferHead, TransferError> {
        if &b[..8] != MAGIC {
            return Err(TransferError::Invalid(format!(
                "magic {:?}, expected {:?}",
                String::from_utf8_lossy(&b[..8]),
                String::from_utf8_lossy(MAGIC)
            )));
        }
        let version = u32::from_le_bytes(b[8..12].try_into().expect("4 bytes"));
        if version != VERSION {
            return Err(TransferError::Invalid(format!(
                "version {version}, this vmft reads {VERSION}"
            )));
        }
        let crc = u32::from_le_bytes(b[HEAD_LEN - 4..].try_into().expect("4 bytes"));
        if crc != crc32c::crc32c(&b[..HEAD_LEN - 4]) {
            return Err(TransferError::Invalid(
                "the head's checksum is wrong".into(),
            ));
        }
        let u = |i: usize| u64::from_le_bytes(b[12 + 8 * i..20 + 8 * i].try_into().expect("8"));
        let head = TransferHead {
            generation: u(0),
            console: u(1),
            frames: u(2),
            disk: u(3),
            state_len: u(4),
        };
        if head.state_len > MAX_STATE {
            return Err(TransferError::Invalid(format!(
                "{} bytes of state (at most {MAX_STATE})",
                head.state_len
            )));
        }
        Ok(head)
    }

    /// Bytes on the link before the log: head and state.
    pub fn total(&self) -> u64 {
        HEAD_LEN as u64 + self.state_len
    }
}

/// Send the head and `state` to `w`, at most `rate` bytes per second if
/// given, calling `progress` with the bytes sent so far after each chunk.
pub fn send(
    w: &mut dyn Write,
    head: &TransferHead,
    state: &[u8],
    rate: Option<u64>,
    progress: &mut dyn FnMut(u64),
) -> io::Result<()> {
    let t0 = std::time::Instant::now();
    w.write_all(&head.encode())?;
    let mut sent = HEAD_LEN as u64;
    for chunk in state.chunks(CHUNK) {
        w.write_all(chunk)?;
        sent += chunk.len() as u64;
        progress(sent);
        if let Some(rate) = rate.filter(|r| *r > 0) {
            let due = std::time::Duration::from_secs_f64(sent as f64 / rate as f64);
            if let Some(wait) = due.checked_sub(t0.elapsed()) {
                std::thread::sleep(wait);
            }
        }
    }
    w.flush()
}

/// Read a transfer's head and state from `r`, calling `progress` with the
/// bytes read so far; `r` is left at the log that follows.
pub fn receive(
    r: &mut dyn Read,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<(TransferHead, Vec<u8>), TransferError> {
    let mut b = [0u8; HEAD_LEN];
    r.read_exact(&mut b).map_err(|source| TransferError::Io {
        got: 0,
        want: HEAD_LEN as u64,
        source,
    })?;
    let head = TransferHead::decode(&b)?;
    let want = head.total();
    // Grown as bytes arrive: a length in a valid head is still not worth
    // allocating before the bytes exist.
    let mut state = Vec::with_capacity(head.state_len.min(256 << 20) as usize);
    let mut buf = vec![0u8; CHUNK];
    while (state.len() as u64) < head.state_len {
        let n = (head.state_len - state.len() as u64).min(CHUNK as u64) as usize;
        match r.read(&mut buf[..n]) {
            Ok(0) => {
                return Err(TransferError::Io {
                    got: HEAD_LEN as u64 + state.len() as u64,
                    want,
                    source: io::ErrorKind::UnexpectedEof.into(),
                })
            }
            Ok(k) => {
                state.extend_from_slice(&buf[..k]);
                progress(HEAD_LEN as u64 + state.len() as u64, want);
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(source) => {
                return Err(TransferError::Io {
                    got: HEAD_LEN as u64 + state.len() as u64,
                    want,
                    source,
                })
            }
        }
    }
    Ok((head, state))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head() -> TransferHead {
        TransferHead {
            generation: 7,
            console: 1234,
            frames: 55,
            disk: 0,
            state_len: 3 * CHUNK as u64 + 17,
        }
    }

    #[test]
    fn a_transfer_reads_back_and_leaves_the_reader_at_the_log() {
        let state: Vec<u8> = (0..head().state_len)
            .map(|i| (i * 31 % 251) as u8)
            .collect();
        let mut wire = Vec::new();
        let mut sent = Vec::new();
        send(&mut wire, &head(), &state, None, &mut |n| sent.push(n)).unwrap();
        wire.extend_from_slice(b"LOG");
        assert_eq!(sent.last().copied(), Some(head().total()));
        let mut r = io::Cursor::new(wire);
        let mut last = (0, 0);
        let (h, got) = receive(&mut r, &mut |n, t| last = (n, t)).unwrap();
        assert_eq!(h, head());
        assert_eq!(got, state);
        assert_eq!(last, (head().total(), head().total()));
        let mut rest = Vec::new();
        r.read_to_end(&mut rest).unwrap();
        assert_eq!(rest, b"LOG");
    }

    #[test]
    fn a_rate_limit_spreads_the_transfer_out() {
        let state = vec![3u8; 2 * CHUNK];
        let h = TransferHead {
            state_len: state.len() as u64,
            ..head()
        };
        let t0 = std::time::Instant::now();
        // 2 MiB at 8 MiB/s: at least a quarter of a second.
        send(&mut io::sink(), &h, &state, Some(8 << 20), &mut |_| {}).unwrap();
        assert!(t0.elapsed() >= std::time::Duration::from_millis(240));
    }

    #[test]
    fn a_cut_transfer_says_how_far_it_got() {
        let state = vec![1u8; 1000];
        let h = TransferHead {
            state_len: 1000,
            ..head()
        };
        let mut wire = Vec::new();
        send(&mut wire, &h, &state, None, &mut |_| {}).unwrap();
        wire.truncate(HEAD_LEN + 600);
        let e = receive(&mut io::Cursor::new(wire), &mut |_, _| {}).unwrap_err();
        assert!(
            matches!(e, TransferError::Io { got, want, .. } if got == HEAD_LEN as u64 + 600 && want == h.total()),
            "{e}"
        );
    }

    #[test]
    fn damaged_or_foreign_heads_are_refused() {
        let good = head().encode();
        let mut flipped = good;
        flipped[20] ^= 1;
        let mut version = good;
        version[8] = 9;
        let mut foreign = good;
        foreign[..8].copy_from_slice(b"VMFT-CHN");
        for (b, want) in [
            (flipped, "checksum"),
            (version, "version 9"),
            (foreign, "magic"),
        ] {
            let e = TransferHead::decode(&b).unwrap_err();
            assert!(e.to_string().contains(want), "{e}");
        }
        let huge = TransferHead {
            state_len: MAX_STATE + 1,
            ..head()
        };
        assert!(TransferHead::decode(&huge.encode()).is_err());
    }
}
