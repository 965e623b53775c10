//! The arbiter's wire protocol.
//!
//! Every message is a frame: a 4-byte big-endian length, then that many
//! payload bytes (at most [`MAX_FRAME`]). A payload starts with the protocol
//! version ([`VERSION`]) and a message kind; strings are a 2-byte length and
//! UTF-8 bytes; integers are big-endian. A connection starts with `Hello`
//! carrying the shared secret; the server answers `HelloOk` or an error and
//! closes.

use thiserror::Error;

/// Protocol version byte.
pub const VERSION: u8 = 1;
/// Largest payload accepted, in bytes.
pub const MAX_FRAME: usize = 4096;
/// Longest VM id or claimant name, in bytes.
pub const MAX_NAME: usize = 255;

/// Error codes carried by [`Response::Error`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorCode {
    /// The request is malformed.
    BadRequest = 1,
    /// The token is wrong or missing.
    Unauthenticated = 2,
    /// The decision could not be made durable.
    Storage = 3,
    /// The protocol version is not supported.
    Version = 4,
    /// The server has as many connections as it allows; try again later.
    Busy = 5,
}

impl ErrorCode {
    fn from_u8(v: u8) -> Result<Self, ProtocolError> {
        Ok(match v {
            1 => ErrorCode::BadRequest,
            2 => ErrorCode::Unauthenticated,
            3 => ErrorCode::Storage,
            4 => ErrorCode::Version,
            5 => ErrorCode::Busy,
            _ => return Err(ProtocolError::Malformed("unknown error code")),
        })
    }
}

/// Client to server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    /// Authenticate with the shared secret.
    Hello {
        /// Shared secret.
        token: Vec<u8>,
    },
    /// Claim (vm, generation) for `claimant`.
    TestAndSet {
        /// Request id echoed in the response.
        id: u64,
        /// VM identifier.
        vm: String,
        /// Protection generation.
        generation: u64,
        /// Who claims.
        claimant: String,
    },
    /// Read the decision for (vm, generation).
    Owner {
        /// Request id.
        id: u64,
        /// VM identifier.
        vm: String,
        /// Protection generation.
        generation: u64,
    },
}

/// Server to client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Response {
    /// Authentication accepted.
    HelloOk,
    /// The claimant owns the register.
    Won {
        /// Request id.
        id: u64,
    },
    /// Somebody else owns it.
    Lost {
        /// Request id.
        id: u64,
        /// The winner.
        owner: String,
    },
    /// Answer to `Owner`.
    OwnerIs {
        /// Request id.
        id: u64,
        /// The winner, if decided.
        owner: Option<String>,
    },
    /// The request failed; no decision was made or reported.
    Error {
        /// Request id (0 when not known).
        id: u64,
        /// What kind of failure.
        code: ErrorCode,
        /// Human-readable detail.
        message: String,
    },
}

/// Decoding errors.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum ProtocolError {
    /// The frame declares more than [`MAX_FRAME`] bytes.
    #[error("frame of {0} bytes exceeds the maximum of {MAX_FRAME}")]
    Oversized(usize),
    /// Another protocol version.
    #[error("protocol version {0}, expected {VERSION}")]
    Version(u8),
    /// The payload does not parse.
    #[error("malformed message: {0}")]
    Malformed(&'static str),
}

struct W(Vec<u8>);

impl W {
    fn new(kind: u8) -> Self {
        W(vec![VERSION, kind])
    }
    fn u8(&mut self, v: u8) -> &mut Self {
        self.0.push(v);
        self
    }
    fn u64(&mut self, v: u64) -> &mut Self {
        self.0.extend_from_slice(&v.to_be_bytes());
        self
    }
    fn bytes(&mut self, v: &[u8]) -> &mut Self {
        let n = v.len().min(u16::MAX as usize);
        self.0.extend_from_slice(&(n as u16).to_be_bytes());
        self.0.extend_from_slice(&v[..n]);
        self
    }
    fn frame(&self) -> Vec<u8> {
        let mut f = (self.0.len() as u32).to_be_bytes().to_vec();
        f.extend_from_slice(&self.0);
        f
    }
}

struct R<'a>(&'a [u8]);

impl<'a> R<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], ProtocolError> {
        if self.0.len() < n {
            return Err(ProtocolError::Malformed("payload ends early"));
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Ok(a)
    }
    fn u8(&mut self) -> Result<u8, ProtocolError> {
        Ok(self.take(1)?[0])
    }
    fn u64(&mut self) -> Result<u64, ProtocolError> {
        Ok(u64::from_be_bytes(self.take(8)?.try_into().unwrap()))
    }
    fn bytes(&mut self) -> Result<&'a [u8], ProtocolError> {
        let n = u16::from_be_bytes(self.take(2)?.try_into().unwrap()) as usize;
        self.take(n)
    }
    fn name(&mut self) -> Result<String, ProtocolError> {
        let b = self.bytes()?;
        validate_name(b)?;
        Ok(String::from_utf8(b.to_vec()).expect("validated"))
    }
    fn string(&mut self) -> Result<String, ProtocolError> {
        String::from_utf8(self.bytes()?.to_vec()).map_err(|_| ProtocolError::Malformed("not UTF-8"))
    }
    fn end(&self) -> Result<(), ProtocolError> {
        if self.0.is_empty() {
            Ok(())
        } else {
            Err(ProtocolError::Malformed("trailing bytes"))
        }
    }
}

/// Check a VM id or claimant: 1 to [`MAX_NAME`] bytes of printable UTF-8.
pub fn validate_name(b: &[u8]) -> Result<(), ProtocolError> {
    if b.is_empty() || b.len() > MAX_NAME {
        return Err(ProtocolError::Malformed("name must be 1 to 255 bytes"));
    }
    let s = std::str::from_utf8(b).map_err(|_| ProtocolError::Malformed("name not UTF-8"))?;
    if s.chars().any(|c| c.is_control()) {
        return Err(ProtocolError::Malformed("name has control characters"));
    }
    Ok(())
}

fn header(payload: &[u8]) -> Result<(u8, R<'_>), ProtocolError> {
    let mut r = R(payload);
    let v = r.u8()?;
    if v != VERSION {
        return Err(ProtocolError::Version(v));
    }
    Ok((r.u8()?, r))
}

impl Request {
    /// Encode as a frame (length prefix included).
    pub fn encode(&self) -> Vec<u8> {
        match self {
            Request::Hello { token } => W::new(0x01).bytes(token).frame(),
            Request::TestAndSet {
                id,
                vm,
                generation,
                claimant,
            } => W::new(0x02)
                .u64(*id)
                .bytes(vm.as_bytes())
                .u64(*generation)
                .bytes(claimant.as_bytes())
                .frame(),
            Request::Owner { id, vm, generation } => W::new(0x03)
                .u64(*id)
                .bytes(vm.as_bytes())
                .u64(*generation)
                .frame(),
        }
    }

    /// Decode a payload (without the length prefix).
    pub fn decode(payload: &[u8]) -> Result<Self, ProtocolError> {
        let (kind, mut r) = header(payload)?;
        let req = match kind {
            0x01 => Request::Hello {
                token: r.bytes()?.to_vec(),
            },
            0x02 => Request::TestAndSet {
                id: r.u64()?,
                vm: r.name()?,
                generation: r.u64()?,
                claimant: r.name()?,
            },
            0x03 => Request::Owner {
                id: r.u64()?,
                vm: r.name()?,
                generation: r.u64()?,
            },
            _ => return Err(ProtocolError::Malformed("unknown request kind")),
        };
        r.end()?;
        Ok(req)
    }
}

impl Response {
    /// Encode as a frame.
    pub fn encode(&self) -> Vec<u8> {
        match self {
            Response::HelloOk => W::new(0x81).frame(),
            Response::Won { id } => W::new(0x82).u64(*id).frame(),
            Response::Lost { id, owner } => W::new(0x83).u64(*id).bytes(owner.as_bytes()).frame(),
            Response::OwnerIs { id, owner } => {
                let mut w = W::new(0x84);
                w.u64(*id).u8(owner.is_some() as u8);
                w.bytes(owner.as_deref().unwrap_or("").as_bytes());
                w.frame()
            }
            Response::Error { id, code, message } => W::new(0xff)
                .u64(*id)
                .u8(*code as u8)
                .bytes(message.as_bytes())
                .frame(),
        }
    }

    /// Decode a payload.
    pub fn decode(payload: &[u8]) -> Result<Self, ProtocolError> {
        let (kind, mut r) = header(payload)?;
        let resp = match kind {
            0x81 => Response::HelloOk,
            0x82 => Response::Won { id: r.u64()? },
            0x83 => Response::Lost {
                id: r.u64()?,
                owner: r.name()?,
            },
            0x84 => {
                let id = r.u64()?;
                let present = r.u8()? != 0;
                let owner = r.string()?;
                Response::OwnerIs {
                    id,
                    owner: present.then_some(owner),
                }
            }
            0xff => Response::Error {
                id: r.u64()?,
                code: ErrorCode::from_u8(r.u8()?)?,
                message: r.string()?,
            },
            _ => return Err(ProtocolError::Malformed("unknown response kind")),
        };
        r.end()?;
        Ok(resp)
    }
}

/// Parse a frame's length prefix.
pub fn frame_len(prefix: [u8; 4]) -> Result<usize, ProtocolError> {
    let n = u32::from_be_bytes(prefix) as usize;
    if n > MAX_FRAME {
        return Err(ProtocolError::Oversized(n));
    }
    Ok(n)
}

/// Compare secrets in time independent of where they differ.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    let mut diff = (a.len() != b.len()) as u8;
    let n = a.len().max(b.len());
    for i in 0..n {
        let x = a.get(i).copied().unwrap_or(0);
        let y = b.get(i).copied().unwrap_or(0xff);
        diff |= x ^ y;
    }
    diff == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn payload(frame: &[u8]) -> &[u8] {
        let n = frame_len(frame[..4].try_into().unwrap()).unwrap();
        assert_eq!(n, frame.len() - 4);
        &frame[4..]
    }

    #[test]
    fn requests_round_trip() {
        let reqs = [
            Request::Hello {
                token: b"secret".to_vec(),
            },
            Request::TestAndSet {
                id: 7,
                vm: "vm-1".into(),
                generation: 3,
                claimant: "backup@host-b".into(),
            },
            Request::Owner {
                id: 8,
                vm: "vm-1".into(),
                generation: 3,
            },
        ];
        for r in reqs {
            assert_eq!(Request::decode(payload(&r.encode())).unwrap(), r);
        }
    }

    #[test]
    fn responses_round_trip() {
        let resps = [
            Response::HelloOk,
            Response::Won { id: 1 },
            Response::Lost {
                id: 2,
                owner: "primary".into(),
            },
            Response::OwnerIs { id: 3, owner: None },
            Response::OwnerIs {
                id: 4,
                owner: Some("x".into()),
            },
            Response::Error {
                id: 5,
                code: ErrorCode::Storage,
                message: "disk full".into(),
            },
            Response::Error {
                id: 0,
                code: ErrorCode::Busy,
                message: "too many connections".into(),
            },
        ];
        for r in resps {
            assert_eq!(Response::decode(payload(&r.encode())).unwrap(), r);
        }
    }

    #[test]
    fn bad_payloads_are_rejected() {
        assert_eq!(
            Request::decode(&[]),
            Err(ProtocolError::Malformed("payload ends early"))
        );
        assert_eq!(Request::decode(&[9, 1]), Err(ProtocolError::Version(9)));
        assert!(Request::decode(&[VERSION, 0x77]).is_err());
        let mut f = Request::Owner {
            id: 1,
            vm: "v".into(),
            generation: 1,
        }
        .encode();
        f.push(0);
        assert_eq!(
            Request::decode(&f[4..]),
            Err(ProtocolError::Malformed("trailing bytes"))
        );
        let empty_name = Request::TestAndSet {
            id: 1,
            vm: String::new(),
            generation: 0,
            claimant: "c".into(),
        }
        .encode();
        assert!(Request::decode(&empty_name[4..]).is_err());
        assert_eq!(
            frame_len(((MAX_FRAME + 1) as u32).to_be_bytes()),
            Err(ProtocolError::Oversized(MAX_FRAME + 1))
        );
    }

    #[test]
    fn constant_time_comparison() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"ab"));
        assert!(!constant_time_eq(b"", b"a"));
        assert!(constant_time_eq(b"", b""));
    }
}
