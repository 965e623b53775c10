//! The etcd backend, for sites that outgrow one arbiter machine: the
//! register is an etcd key `<prefix>/<vm>/<generation>`, claimed with one
//! transaction that creates the key only if it does not exist
//! (`create_revision == 0`; a plain put, never a lease, so a decision never
//! expires) and otherwise reads it. etcd's Raft makes the decision durable on
//! a majority before the transaction returns.
//!
//! The client speaks etcd's v3 gRPC API through `tonic`, with the handful of
//! messages it needs written out in [`pb`] (no `protoc` at build time). It
//! talks to one member at a time and moves on to the next endpoint after a
//! failure.

pub mod pb;

use std::time::{Duration, Instant};

use tonic::codegen::http::uri::PathAndQuery;
use tonic::transport::{Channel, Endpoint};
use tonic_prost::ProstCodec;
use tracing::debug;

use crate::protocol::validate_name;
use crate::{claimant_identity, Arbiter, ArbiterError, Decision, Incarnation};

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

/// Test-and-set registers in etcd. Like [`crate::client::Client`], each
/// backend object is one [`Incarnation`]: it claims as `name:pid:nonce`.
pub struct EtcdArbiter {
    cfg: EtcdConfig,
    incarnation: Incarnation,
    /// Index into `cfg.endpoints` of the member in use.
    current: usize,
    /// Connection to that member, made on first use.
    channel: Option<Channel>,
}

impl EtcdArbiter {
    /// A backend for the cluster; it connects on first use.
    pub fn new(cfg: EtcdConfig) -> Self {
        EtcdArbiter {
            cfg,
            incarnation: Incarnation::new(),
            current: 0,
            channel: None,
        }
    }

    fn key(&self, vm: &str, generation: u64) -> String {
        format!("{}/{}/{}", self.cfg.prefix, vm, generation)
    }

    fn addr(&self) -> String {
        self.cfg.endpoints.join(",")
    }

    async fn channel(&mut self) -> Result<Channel, String> {
        if let Some(c) = &self.channel {
            return Ok(c.clone());
        }
        let url = self
            .cfg
            .endpoints
            .get(self.current)
            .ok_or("no etcd endpoints configured")?
            .clone();
        let endpoint = Endpoint::from_shared(url.clone())
            .map_err(|e| format!("endpoint {url:?}: {e}"))?
            .connect_timeout(self.cfg.request_timeout)
            .timeout(self.cfg.request_timeout);
        let c = tokio::time::timeout(self.cfg.request_timeout, endpoint.connect())
            .await
            .map_err(|_| format!("connect to {url} timed out"))?
            .map_err(|e| format!("connect to {url}: {e}"))?;
        self.channel = Some(c.clone());
        Ok(c)
    }

    /// After a failure: drop the connection and use the next member.
    fn next_endpoint(&mut self) {
        self.channel = None;
        self.current = (self.current + 1) % self.cfg.endpoints.len().max(1);
    }

    /// One unary call of `path`, retried with backoff (on the next member
    /// each time) until it succeeds or the budget is spent. Every call the
    /// arbiter makes is idempotent, so a retry after a lost answer is safe.
    async fn call<Req, Resp>(&mut self, path: &'static str, req: Req) -> Result<Resp, ArbiterError>
    where
        Req: prost::Message + Clone + Send + Sync + 'static,
        Resp: prost::Message + Default + Send + Sync + 'static,
    {
        let start = Instant::now();
        let mut attempts = 0u32;
        let mut backoff = Duration::from_millis(20);
        loop {
            attempts += 1;
            let last = match self.channel().await {
                Err(e) => e,
                Ok(c) => {
                    let mut grpc = tonic::client::Grpc::new(c);
                    let request = tonic::Request::new(req.clone());
                    let once = async {
                        grpc.ready()
                            .await
                            .map_err(|e| format!("connection not ready: {e}"))?;
                        grpc.unary::<Req, Resp, _>(
                            request,
                            PathAndQuery::from_static(path),
                            ProstCodec::default(),
                        )
                        .await
                        .map_err(|s| format!("{path}: {:?}: {}", s.code(), s.message()))
                    };
                    match tokio::time::timeout(self.cfg.request_timeout, once).await {
                        Ok(Ok(r)) => return Ok(r.into_inner()),
                        Ok(Err(e)) => e,
                        Err(_) => "request timed out".into(),
                    }
                }
            };
            self.next_endpoint();
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
    fn identity(&self, name: &str) -> String {
        self.incarnation.identity(name)
    }

    async fn test_and_set(
        &mut self,
        vm: &str,
        generation: u64,
        name: &str,
    ) -> Result<Decision, ArbiterError> {
        check("vm id", vm)?;
        check("claimant", name)?;
        let claimant = claimant_identity(&self.incarnation, name)?;
        let key = self.key(vm, generation).into_bytes();
        let txn = claim_txn(&key, &claimant);
        let resp: pb::TxnResponse = self.call(pb::KV_TXN, txn).await?;
        if resp.succeeded {
            return Ok(Decision::Won);
        }
        let owner = resp
            .responses
            .into_iter()
            .find_map(|r| match r.response {
                Some(pb::response_op::Response::ResponseRange(g)) => g
                    .kvs
                    .into_iter()
                    .next()
                    .map(|kv| String::from_utf8_lossy(&kv.value).into_owned()),
                _ => None,
            })
            .ok_or_else(|| ArbiterError::Rejected {
                addr: self.addr(),
                message: format!(
                    "key {} exists but could not be read",
                    String::from_utf8_lossy(&key)
                ),
            })?;
        Ok(if owner == claimant {
            Decision::Won
        } else {
            Decision::Lost { owner }
        })
    }

    async fn owner(&mut self, vm: &str, generation: u64) -> Result<Option<String>, ArbiterError> {
        check("vm id", vm)?;
        let req = pb::RangeRequest {
            key: self.key(vm, generation).into_bytes(),
            serializable: false,
        };
        let resp: pb::RangeResponse = self.call(pb::KV_RANGE, req).await?;
        Ok(resp
            .kvs
            .into_iter()
            .next()
            .map(|kv| String::from_utf8_lossy(&kv.value).into_owned()))
    }
}

/// The claim: if `key` was never created (`create_revision == 0`), put
/// `claimant` there (no lease); otherwise read it. One transaction, so
/// exactly one claimant's put ever succeeds.
fn claim_txn(key: &[u8], claimant: &str) -> pb::TxnRequest {
    use pb::request_op::Request;
    pb::TxnRequest {
        compare: vec![pb::Compare {
            result: pb::CompareResult::Equal as i32,
            target: pb::CompareTarget::Create as i32,
            key: key.to_vec(),
            target_union: Some(pb::compare::TargetUnion::CreateRevision(0)),
        }],
        success: vec![pb::RequestOp {
            request: Some(Request::RequestPut(pb::PutRequest {
                key: key.to_vec(),
                value: claimant.as_bytes().to_vec(),
                lease: 0,
            })),
        }],
        failure: vec![pb::RequestOp {
            request: Some(Request::RequestRange(pb::RangeRequest {
                key: key.to_vec(),
                serializable: false,
            })),
        }],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn claim_is_create_if_absent_without_a_lease() {
        let t = claim_txn(b"/p/vm/1", "me");
        assert_eq!(t.compare.len(), 1);
        let c = &t.compare[0];
        assert_eq!(c.target, pb::CompareTarget::Create as i32);
        assert_eq!(c.result, pb::CompareResult::Equal as i32);
        assert_eq!(
            c.target_union,
            Some(pb::compare::TargetUnion::CreateRevision(0))
        );
        match &t.success[..] {
            [pb::RequestOp {
                request: Some(pb::request_op::Request::RequestPut(p)),
            }] => {
                assert_eq!(p.key, b"/p/vm/1");
                assert_eq!(p.value, b"me");
                assert_eq!(p.lease, 0, "a decision never expires");
            }
            other => panic!("unexpected success branch {other:?}"),
        }
        assert!(matches!(
            &t.failure[..],
            [pb::RequestOp {
                request: Some(pb::request_op::Request::RequestRange(r)),
            }] if r.key == b"/p/vm/1" && !r.serializable
        ));
    }
}
