//! `arbiter`: the test-and-set service that decides which side of a
//! fault-tolerant pair goes live, and its client.
//!
//! Semantics: `test_and_set(vm, generation, claimant)` returns
//! [`Decision::Won`] for the first claimant of (vm, generation) forever
//! after, including when that claimant asks again (a retry after a lost
//! reply is safe), and [`Decision::Lost`] with the winner's name for
//! everybody else. `owner(vm, generation)` reads the decision. A new
//! generation is a fresh register for a VM that was re-protected.
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

/// A test-and-set register service.
pub trait Arbiter {
    /// Claim (vm, generation) for `claimant`.
    fn test_and_set(
        &mut self,
        vm: &str,
        generation: u64,
        claimant: &str,
    ) -> impl Future<Output = Result<Decision, ArbiterError>> + Send;

    /// Read who owns (vm, generation), if anybody.
    fn owner(
        &mut self,
        vm: &str,
        generation: u64,
    ) -> impl Future<Output = Result<Option<String>, ArbiterError>> + Send;
}
