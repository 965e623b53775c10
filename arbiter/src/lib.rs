//! `arbiter`: the test-and-set service that decides which side of a
//! fault-tolerant pair goes live, and its client.
//!
//! Semantics: `test_and_set(vm, generation, name)` returns
//! [`Decision::Won`] for the first claimant of (vm, generation) forever
//! after, including when that claimant asks again (a retry after a lost
//! reply is safe), and [`Decision::Lost`] with the winner's identity for
//! everybody else. `owner(vm, generation)` reads the decision. A new
//! generation is a fresh register for a VM that was re-protected.
//!
//! Claimant identity: a backend never claims under the bare `name` it is
//! given but under `name:pid:nonce` ([`Incarnation::identity`]): this
//! process's id and a nonce drawn (from the OS's random source) once per
//! client object. A retry by the same client, after a lost reply or a
//! reconnect, claims under the same identity and wins again; two processes,
//! or two clients in one process, started with the same name have different
//! identities, so they can never both win. Owners are reported as
//! identities.
//!
//! Backends: the built-in server ([`server`], durable [`store`]) reached
//! through [`client::Client`], or etcd ([`etcd::EtcdArbiter`]). Whatever the backend, "unreachable" is an
//! error, never a decision: a side that cannot reach the arbiter waits.

pub mod client;
pub mod etcd;
pub mod protocol;
pub mod server;
pub mod store;

use std::future::Future;
use std::io::Read;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

use thiserror::Error;

/// The outcome of a claim.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// The claimant owns the register: it may go live.
    Won,
    /// Somebody else owns it: the claimant must halt.
    Lost {
        /// The winner.
        owner: String,
    },
}

/// Errors of any arbiter backend. None of them is a decision.
#[derive(Debug, Error)]
pub enum ArbiterError {
    /// The arbiter could not be reached (or kept failing) within the retry budget.
    #[error("arbiter {addr} unreachable after {attempts} attempts: {last}")]
    Unreachable {
        /// Where it was looked for.
        addr: String,
        /// Attempts made.
        attempts: u32,
        /// The last failure.
        last: String,
    },
    /// The arbiter refused the request (bad token, bad request).
    #[error("arbiter {addr} refused the request: {message}")]
    Rejected {
        /// Server address.
        addr: String,
        /// Server's explanation.
        message: String,
    },
    /// The request itself is invalid (e.g. an empty VM id).
    #[error("invalid request: {0}")]
    Invalid(String),
}

/// One start of a claimant: the process id and a nonce, fixed for the
/// life of one client object. See the crate documentation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Incarnation {
    pid: u32,
    nonce: u64,
}

/// Longest `name` a claim accepts: the identity (`name:pid:nonce`, pid up
/// to 10 digits, nonce 16 hex digits) must fit [`protocol::MAX_NAME`].
pub const MAX_CLAIMANT_NAME: usize = protocol::MAX_NAME - (1 + 10 + 1 + 16);

impl Incarnation {
    /// A new incarnation of this process: a nonce no other incarnation in
    /// this process has (a per-process random start plus a counter) and that
    /// another process matches only by a 64-bit chance.
    pub fn new() -> Self {
        static START: OnceLock<u64> = OnceLock::new();
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let start = *START.get_or_init(random_u64);
        Incarnation {
            pid: std::process::id(),
            nonce: start.wrapping_add(NEXT.fetch_add(1, Ordering::Relaxed)),
        }
    }

    /// The identity under which `name` claims: `name:pid:nonce` (nonce as
    /// 16 hex digits).
    pub fn identity(&self, name: &str) -> String {
        format!("{name}:{}:{:016x}", self.pid, self.nonce)
    }
}

impl Default for Incarnation {
    fn default() -> Self {
        Incarnation::new()
    }
}

/// 64 random bits from the kernel (`/dev/urandom`); if that cannot be read,
/// from the standard library's hash keys (also seeded by the OS), mixed with
/// the clock.
fn random_u64() -> u64 {
    let mut b = [0u8; 8];
    if std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut b))
        .is_ok()
    {
        return u64::from_le_bytes(b);
    }
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    h.write_u128(now);
    h.finish()
}

/// Check a claimant name and build its identity.
fn claimant_identity(inc: &Incarnation, name: &str) -> Result<String, ArbiterError> {
    protocol::validate_name(name.as_bytes())
        .map_err(|e| ArbiterError::Invalid(format!("claimant {name:?}: {e}")))?;
    if name.len() > MAX_CLAIMANT_NAME {
        return Err(ArbiterError::Invalid(format!(
            "claimant {name:?}: longer than {MAX_CLAIMANT_NAME} bytes (\":pid:nonce\" is added)"
        )));
    }
    Ok(inc.identity(name))
}

/// A test-and-set register service.
pub trait Arbiter {
    /// Claim (vm, generation) for `name`, under this backend's identity
    /// for it ([`Arbiter::identity`]).
    fn test_and_set(
        &mut self,
        vm: &str,
        generation: u64,
        name: &str,
    ) -> impl Future<Output = Result<Decision, ArbiterError>> + Send;

    /// The identity under which this backend claims for `name`
    /// (`name:pid:nonce`); the same for every call on this backend.
    fn identity(&self, name: &str) -> String;

    /// Read who owns (vm, generation), if anybody.
    fn owner(
        &mut self,
        vm: &str,
        generation: u64,
    ) -> impl Future<Output = Result<Option<String>, ArbiterError>> + Send;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn incarnations_of_one_process_never_share_a_nonce() {
        let ids: std::collections::HashSet<String> = (0..1000)
            .map(|_| Incarnation::new().identity("x"))
            .collect();
        assert_eq!(ids.len(), 1000);
        let inc = Incarnation::new();
        assert_eq!(inc.identity("x"), inc.identity("x"));
        assert!(inc
            .identity("x")
            .starts_with(&format!("x:{}:", std::process::id())));
    }

    #[test]
    fn claimant_names_are_checked_before_the_suffix_is_added() {
        let inc = Incarnation::new();
        assert!(claimant_identity(&inc, "").is_err());
        assert!(claimant_identity(&inc, "a\nb").is_err());
        assert!(claimant_identity(&inc, &"n".repeat(MAX_CLAIMANT_NAME + 1)).is_err());
        let id = claimant_identity(&inc, &"n".repeat(MAX_CLAIMANT_NAME)).unwrap();
        protocol::validate_name(id.as_bytes()).unwrap();
        // The largest pid and nonce still fit.
        let worst = Incarnation {
            pid: u32::MAX,
            nonce: u64::MAX,
        };
        assert_eq!(
            worst.identity(&"n".repeat(MAX_CLAIMANT_NAME)).len(),
            protocol::MAX_NAME
        );
    }
}
