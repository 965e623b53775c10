//! The claim at failover: a side that wants to go live (a backup whose
//! primary failed, a primary whose backup failed) asks the arbiter to
//! test-and-set the register of (VM, generation). Exactly one claimant of
//! a generation ever wins; the loser halts.
//!
//! "Unreachable" is never a decision: while the arbiter cannot be reached
//! the side waits, says what it waits for, and retries (availability is
//! lost until the arbiter is back, never safety).

use std::time::{Duration, Instant};

use arbiter::client::{Client, ClientConfig};
use arbiter::etcd::{EtcdArbiter, EtcdConfig};
use arbiter::{Arbiter, ArbiterError, Decision};
use thiserror::Error;

/// Where the arbiter is: `HOST:PORT` for the built-in server, or
/// `etcd://h1:2379,h2:2379` for etcd.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ArbiterAddr {
    /// The built-in server.
    Builtin(String),
    /// An etcd cluster's client endpoints.
    Etcd(Vec<String>),
}

impl std::str::FromStr for ArbiterAddr {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        if let Some(rest) = s.strip_prefix("etcd://") {
            let eps: Vec<String> = rest
                .split(',')
                .filter(|e| !e.is_empty())
                .map(|e| format!("http://{e}"))
                .collect();
            if eps.is_empty() {
                return Err(format!("{s:?}: no etcd endpoints after etcd://"));
            }
            Ok(ArbiterAddr::Etcd(eps))
        } else if s.contains(':') {
            Ok(ArbiterAddr::Builtin(s.to_string()))
        } else {
            Err(format!(
                "{s:?}: expected HOST:PORT (built-in arbiter) or etcd://HOST:PORT,..."
            ))
        }
    }
}

impl std::fmt::Display for ArbiterAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ArbiterAddr::Builtin(a) => write!(f, "{a}"),
            ArbiterAddr::Etcd(eps) => write!(f, "etcd {}", eps.join(",")),
        }
    }
}

/// Claim errors: only ones that retrying cannot fix.
#[derive(Debug, Error)]
pub enum ClaimError {
    /// The arbiter refused the request (wrong token, invalid name).
    #[error("the arbiter at {addr} refused the claim: {source}")]
    Refused {
        /// Which arbiter.
        addr: String,
        /// Its answer.
        source: ArbiterError,
    },
    /// No async runtime for the client.
    #[error("cannot start the arbiter client: {0}")]
    Runtime(std::io::Error),
}

enum Backend {
    Builtin(Client),
    Etcd(EtcdArbiter),
}

/// One side's claimant: its identity is made once per process
/// (`name:pid:nonce`), so a retry after a lost reply wins again and two
/// processes can never both win.
pub struct Claimant {
    addr: ArbiterAddr,
    backend: Backend,
    name: String,
    runtime: tokio::runtime::Runtime,
}

impl Claimant {
    /// A claimant called `name` (e.g. `primary` or `backup`) at `addr`,
    /// presenting `token` to the built-in server.
    pub fn new(addr: ArbiterAddr, token: Vec<u8>, name: &str) -> Result<Self, ClaimError> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(ClaimError::Runtime)?;
        let backend = match &addr {
            ArbiterAddr::Builtin(a) => {
                let mut cfg = ClientConfig::new(a.clone(), token);
                cfg.retry_budget = Duration::from_secs(2);
                Backend::Builtin(Client::new(cfg))
            }
            ArbiterAddr::Etcd(eps) => Backend::Etcd(EtcdArbiter::new(EtcdConfig::new(eps.clone()))),
        };
        Ok(Claimant {
            addr,
            backend,
            name: name.to_string(),
            runtime,
        })
    }

    /// The identity this claimant claims under.
    pub fn identity(&self) -> String {
        match &self.backend {
            Backend::Builtin(c) => c.identity(&self.name),
            Backend::Etcd(e) => e.identity(&self.name),
        }
    }

    /// One attempt: a decision, or why there is none yet.
    pub fn try_claim(&mut self, vm: &str, generation: u64) -> Result<Decision, ArbiterError> {
        let name = self.name.clone();
        match &mut self.backend {
            Backend::Builtin(c) => self.runtime.block_on(c.test_and_set(vm, generation, &name)),
            Backend::Etcd(e) => self.runtime.block_on(e.test_and_set(vm, generation, &name)),
        }
    }

    /// Claim (vm, generation), retrying for as long as the arbiter cannot
    /// be reached; `waiting` is told (about every `note_every`) what the
    /// side waits for. Returns the decision.
    pub fn claim(
        &mut self,
        vm: &str,
        generation: u64,
        note_every: Duration,
        waiting: &mut dyn FnMut(&str),
    ) -> Result<Decision, ClaimError> {
        let mut last_note: Option<Instant> = None;
        loop {
            match self.try_claim(vm, generation) {
                Ok(d) => return Ok(d),
                Err(e @ (ArbiterError::Rejected { .. } | ArbiterError::Invalid(_))) => {
                    return Err(ClaimError::Refused {
                        addr: self.addr.to_string(),
                        source: e,
                    })
                }
                Err(e) => {
                    if last_note.is_none_or(|t| t.elapsed() >= note_every) {
                        waiting(&format!(
                            "cannot reach the arbiter at {} to claim {vm} generation {generation} ({e}); \
                             nobody goes live until it answers: retrying",
                            self.addr
                        ));
                        last_note = Some(Instant::now());
                    }
                    std::thread::sleep(Duration::from_millis(200));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arbiter_addresses_parse() {
        assert_eq!(
            "127.0.0.1:7420".parse::<ArbiterAddr>(),
            Ok(ArbiterAddr::Builtin("127.0.0.1:7420".into()))
        );
        assert_eq!(
            "etcd://h1:2379,h2:2379".parse::<ArbiterAddr>(),
            Ok(ArbiterAddr::Etcd(vec![
                "http://h1:2379".into(),
                "http://h2:2379".into()
            ]))
        );
        assert!("etcd://".parse::<ArbiterAddr>().is_err());
        assert!("nohost".parse::<ArbiterAddr>().is_err());
    }
}
