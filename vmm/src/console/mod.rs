//! The console stream, outside both fault domains.
//!
//! The guest's console output is deterministic, so every byte has an
//! offset that the primary and the backup agree on. The live side (the
//! primary, or a backup that went live) releases output in chunks with
//! their offsets to the console endpoint (`vmft console --listen ADDR`,
//! [`endpoint`]), which prints every byte exactly once and in order
//! whichever side sends it, and sends typed keys, numbered, to the live
//! side. Sides dial the console through a [`link::ConsoleLink`], which
//! never blocks the vCPU on the network (only on a full, bounded buffer).
//!
//! - [`protocol`]: the wire format, the handshake (HMAC-SHA256 on the
//!   shared token, fresh nonces from both sides, a per-session key that
//!   tags every frame) and the sequence diagram.
//! - [`stream`]: the offset and input-seq bookkeeping, without sockets.
//! - [`endpoint`]: the console: which side is followed (the highest
//!   generation; after a claim, only its claimant), printing, gaps,
//!   input, the escape, the end.
//! - [`link`]: the side's client: bounded held output re-sent on
//!   reconnect, input, claims, the stop request.
//!
//! For the failover to be exactly-once, the backup must hold its output
//! from the offset the console last acknowledged to the primary (the
//! primary logs [`link::ConsoleLink::acked_offset`]) and re-send from
//! there when it goes live: the console trims whatever it already has.

pub mod endpoint;
pub mod link;
pub mod protocol;
pub mod stream;

use std::path::{Path, PathBuf};
use std::time::Duration;

pub use endpoint::{
    serve, Console, ConsoleConfig, ConsoleEnd, ConsoleHandle, ConsoleInput, ConsoleOutcome,
    ConsoleStats,
};
pub use link::{ConsoleLink, LinkOptions};
pub use protocol::{Hello, ProtocolError, Role};

/// Errors of the console endpoint and of a side's link.
#[derive(Debug, thiserror::Error)]
pub enum ConsoleError {
    /// The listening address cannot be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address asked for.
        addr: String,
        /// Why.
        source: std::io::Error,
    },
    /// The token file cannot be read.
    #[error("cannot read the token file {path}: {source}")]
    TokenFile {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The token is empty.
    #[error("the token is empty")]
    EmptyToken,
    /// No console answered before the deadline.
    #[error("no console at {addr} within {waited:?}: {last}")]
    Unreachable {
        /// The console's address.
        addr: String,
        /// How long we tried.
        waited: Duration,
        /// The last failure.
        last: String,
    },
    /// The console and this side do not agree on the token or the
    /// protocol (retrying would not help).
    #[error("the console at {addr} and this side cannot talk: {source}")]
    Handshake {
        /// The console's address.
        addr: String,
        /// What failed.
        source: ProtocolError,
    },
    /// Writing the guest's output (stdout) failed.
    #[error("cannot write the console output: {0}")]
    Output(std::io::Error),
    /// A thread could not be started, or another local failure.
    #[error("console: {0}")]
    Io(#[from] std::io::Error),
    /// `Done` could not be delivered before the deadline.
    #[error("the console did not take the final status within {0:?}")]
    DoneTimeout(Duration),
}

/// Read the shared token (`--token-file`): the file's bytes without
/// leading or trailing ASCII whitespace, as the arbiter reads its token.
pub fn read_token_file(path: &Path) -> Result<Vec<u8>, ConsoleError> {
    let t = std::fs::read(path).map_err(|source| ConsoleError::TokenFile {
        path: path.to_path_buf(),
        source,
    })?;
    let t = t.trim_ascii().to_vec();
    if t.is_empty() {
        return Err(ConsoleError::EmptyToken);
    }
    Ok(t)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_file_is_trimmed_and_must_not_be_empty() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("token");
        std::fs::write(&p, b"  s3cret\n").unwrap();
        assert_eq!(read_token_file(&p).unwrap(), b"s3cret");
        std::fs::write(&p, b"\n").unwrap();
        assert!(matches!(read_token_file(&p), Err(ConsoleError::EmptyToken)));
        assert!(matches!(
            read_token_file(&dir.path().join("missing")),
            Err(ConsoleError::TokenFile { .. })
        ));
    }
}
