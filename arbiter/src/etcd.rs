//! The etcd backend, for sites that outgrow one arbiter machine: the
//! register is an etcd key `<prefix>/<vm>/<generation>`, claimed with one
//! transaction that creates the key only if it does not exist and otherwise
//! reads it. etcd's Raft makes the decision durable on a majority before the
//! transaction returns.

use std::time::{Duration, Instant};

use etcd_client::{Client, Compare, CompareOp, ConnectOptions, Txn, TxnOp, TxnOpResponse};
use tracing::debug;

use crate::protocol::validate_name;
use crate::{Arbiter, ArbiterError, Decision};

/// Settings of the etcd backend.
#[derive(Debug, Clone)]
pub struct EtcdConfig {
    /// Client URLs of the cluster members, e.g. `http://127.0.0.1:2379`.
    pub endpoints: Vec<String>,
    /// Key prefix of the registers.
    pub prefix: String,
    /// Time allowed per request.
    pub request_timeout: Duration,
    /// Total time to keep retrying one call.
    pub retry_budget: Duration,
}

impl EtcdConfig {
    /// Defaults for `endpoints`.
    pub fn new(endpoints: Vec<String>) -> Self {
        EtcdConfig {
            endpoints,
            prefix: "/vmft/arbiter".into(),
            request_timeout: Duration::from_secs(2),
            retry_budget: Duration::from_secs(15),
        }
    }
}

/// Test-and-set registers in etcd.
pub struct EtcdArbiter {
    cfg: EtcdConfig,
    client: Option<Client>,
}

impl EtcdArbiter {
    /// A backend for the cluster; it connects on first use.
    pub fn new(cfg: EtcdConfig) -> Self {
        EtcdArbiter { cfg, client: None }
    }

    fn key(&self, vm: &str, generation: u64) -> String {
        format!("{}/{}/{}", self.cfg.prefix, vm, generation)
    }

    fn addr(&self) -> String {
        self.cfg.endpoints.join(",")
    }

    async fn client(&mut self) -> Result<Client, String> {
        if let Some(c) = &self.client {
            return Ok(c.clone());
        }
        let opts = ConnectOptions::new()
            .with_connect_timeout(self.cfg.request_timeout)
            .with_timeout(self.cfg.request_timeout);
        let c = tokio::time::timeout(
            self.cfg.request_timeout,
            Client::connect(&self.cfg.endpoints, Some(opts)),
        )
        .await
        .map_err(|_| "connect timed out".to_string())?
        .map_err(|e| format!("connect: {e}"))?;
        self.client = Some(c.clone());
        Ok(c)
    }

    /// Run `op` with retries and backoff until it succeeds or the budget is spent.
    async fn retry<T, F, Fut>(&mut self, op: F) -> Result<T, ArbiterError>
    where
        F: Fn(Client) -> Fut,
        Fut: std::future::Future<Output = Result<T, etcd_client::Error>>,
    {
        let start = Instant::now();
        let mut attempts = 0u32;
        let mut backoff = Duration::from_millis(20);
        loop {
            attempts += 1;
            let last = match self.client().await {
                Err(e) => e,
                Ok(c) => match tokio::time::timeout(self.cfg.request_timeout, op(c)).await {
                    Ok(Ok(v)) => return Ok(v),
                    Ok(Err(e)) => e.to_string(),
                    Err(_) => "request timed out".into(),
                },
            };
            if start.elapsed() + backoff > self.cfg.retry_budget {
                return Err(ArbiterError::Unreachable {
                    addr: self.addr(),
                    attempts,
                    last,
                });
            }
            debug!(attempts, error = %last, "etcd call failed; retrying");
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(1));
        }
    }
}

fn check(what: &str, name: &str) -> Result<(), ArbiterError> {
    validate_name(name.as_bytes())
        .map_err(|e| ArbiterError::Invalid(format!("{what} {name:?}: {e}")))?;
    if name.contains('/') {
        return Err(ArbiterError::Invalid(format!(
            "{what} {name:?} contains '/'"
        )));
    }
    Ok(())
}

impl Arbiter for EtcdArbiter {
    async fn test_and_set(
        &mut self,
        vm: &str,
        generation: u64,
        claimant: &str,
    ) -> Result<Decision, ArbiterError> {
        check("vm id", vm)?;
        check("claimant", claimant)?;
        let key = self.key(vm, generation);
        let claimant_s = claimant.to_string();
        let resp = self
            .retry(|mut c| {
                let txn = Txn::new()
                    .when([Compare::create_revision(key.clone(), CompareOp::Equal, 0)])
                    .and_then([TxnOp::put(key.clone(), claimant_s.clone(), None)])
                    .or_else([TxnOp::get(key.clone(), None)]);
                async move { c.txn(txn).await }
            })
            .await?;
        if resp.succeeded() {
            return Ok(Decision::Won);
        }
        let owner = resp
            .op_responses()
            .into_iter()
            .find_map(|r| match r {
                TxnOpResponse::Get(g) => g
                    .kvs()
                    .first()
                    .map(|kv| String::from_utf8_lossy(kv.value()).into_owned()),
                _ => None,
            })
            .ok_or_else(|| ArbiterError::Rejected {
                addr: self.addr(),
                message: format!("key {key} exists but could not be read"),
            })?;
        Ok(if owner == claimant {
            Decision::Won
        } else {
            Decision::Lost { owner }
        })
    }

    async fn owner(&mut self, vm: &str, generation: u64) -> Result<Option<String>, ArbiterError> {
        check("vm id", vm)?;
        let key = self.key(vm, generation);
        let resp = self
            .retry(|mut c| {
                let key = key.clone();
                async move { c.get(key, None).await }
            })
            .await?;
        Ok(resp
            .kvs()
            .first()
            .map(|kv| String::from_utf8_lossy(kv.value()).into_owned()))
    }
}
