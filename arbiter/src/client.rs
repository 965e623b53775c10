//! Client of the built-in arbiter: connect and request timeouts, and retry
//! with exponential backoff within a budget. Running out of budget is
//! [`ArbiterError::Unreachable`], never a decision.

use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::timeout;
use tracing::debug;

use crate::protocol::{frame_len, validate_name, ErrorCode, Request, Response};
use crate::{claimant_identity, Arbiter, ArbiterError, Decision, Incarnation};

/// Client settings.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// Server address, host:port.
    pub addr: String,
    /// Shared secret.
    pub token: Vec<u8>,
    /// Time allowed to establish a connection (and authenticate).
    pub connect_timeout: Duration,
    /// Time allowed for one request's answer.
    pub request_timeout: Duration,
    /// Total time to keep retrying one call.
    pub retry_budget: Duration,
    /// First backoff; doubles up to `max_backoff`.
    pub initial_backoff: Duration,
    /// Largest backoff.
    pub max_backoff: Duration,
}

impl ClientConfig {
    /// Defaults for `addr` and `token`.
    pub fn new(addr: impl Into<String>, token: impl Into<Vec<u8>>) -> Self {
        ClientConfig {
            addr: addr.into(),
            token: token.into(),
            connect_timeout: Duration::from_secs(2),
            request_timeout: Duration::from_secs(5),
            retry_budget: Duration::from_secs(10),
            initial_backoff: Duration::from_millis(20),
            max_backoff: Duration::from_secs(1),
        }
    }
}

/// A connection to the built-in arbiter, re-established as needed. Each
/// client is one [`Incarnation`]: its claims are made as `name:pid:nonce`.
pub struct Client {
    cfg: ClientConfig,
    incarnation: Incarnation,
    conn: Option<TcpStream>,
    next_id: u64,
    jitter: u64,
}

enum ConnectFail {
    Auth(String),
    Other(String),
}

enum Attempt<T> {
    Done(T),
    Fatal(ArbiterError),
    Retry(String),
}

impl Client {
    /// A client; it connects on first use.
    pub fn new(cfg: ClientConfig) -> Self {
        let seed = Instant::now().elapsed().as_nanos() as u64
            ^ (&cfg as *const _ as u64)
            ^ std::process::id() as u64;
        Client {
            cfg,
            incarnation: Incarnation::new(),
            conn: None,
            next_id: 1,
            jitter: seed | 1,
        }
    }

    fn backoff(&mut self, attempt: u32) -> Duration {
        // xorshift jitter: spread retries of many clients.
        self.jitter ^= self.jitter << 13;
        self.jitter ^= self.jitter >> 7;
        self.jitter ^= self.jitter << 17;
        let base = self
            .cfg
            .initial_backoff
            .saturating_mul(1 << attempt.min(16))
            .min(self.cfg.max_backoff);
        let half = base / 2;
        half + Duration::from_nanos(self.jitter % (half.as_nanos() as u64 + 1))
    }

    async fn connect(&self) -> Result<TcpStream, ConnectFail> {
        let addr = self.cfg.addr.clone();
        let mut s = match timeout(self.cfg.connect_timeout, TcpStream::connect(&addr)).await {
            Err(_) => {
                return Err(ConnectFail::Other(format!(
                    "connect timed out after {:?}",
                    self.cfg.connect_timeout
                )))
            }
            Ok(Err(e)) => return Err(ConnectFail::Other(format!("connect: {e}"))),
            Ok(Ok(s)) => s,
        };
        let _ = s.set_nodelay(true);
        let hello = Request::Hello {
            token: self.cfg.token.clone(),
        }
        .encode();
        match timeout(self.cfg.connect_timeout, exchange(&mut s, &hello)).await {
            Err(_) => Err(ConnectFail::Other("handshake timed out".into())),
            Ok(Err(e)) => Err(ConnectFail::Other(format!("handshake: {e}"))),
            Ok(Ok(Response::HelloOk)) => Ok(s),
            Ok(Ok(Response::Error {
                code: ErrorCode::Unauthenticated,
                message,
                ..
            })) => Err(ConnectFail::Auth(message)),
            Ok(Ok(Response::Error {
                code: ErrorCode::Busy,
                message,
                ..
            })) => Err(ConnectFail::Other(format!("server busy: {message}"))),
            Ok(Ok(other)) => Err(ConnectFail::Other(format!(
                "unexpected handshake answer {other:?}"
            ))),
        }
    }

    async fn attempt(&mut self, req: &Request, id: u64) -> Attempt<Response> {
        if self.conn.is_none() {
            match self.connect().await {
                Ok(s) => self.conn = Some(s),
                Err(ConnectFail::Auth(message)) => {
                    return Attempt::Fatal(ArbiterError::Rejected {
                        addr: self.cfg.addr.clone(),
                        message,
                    })
                }
                Err(ConnectFail::Other(e)) => return Attempt::Retry(e),
            }
        }
        let s = self.conn.as_mut().expect("connected");
        let frame = req.encode();
        let r = match timeout(self.cfg.request_timeout, exchange(s, &frame)).await {
            Err(_) => Err(format!("no answer within {:?}", self.cfg.request_timeout)),
            Ok(r) => r,
        };
        match r {
            Err(e) => {
                self.conn = None;
                Attempt::Retry(e)
            }
            Ok(Response::Error {
                code: ErrorCode::Storage,
                message,
                ..
            }) => Attempt::Retry(format!("server storage error: {message}")),
            Ok(Response::Error { message, .. }) => {
                self.conn = None;
                Attempt::Fatal(ArbiterError::Rejected {
                    addr: self.cfg.addr.clone(),
                    message,
                })
            }
            Ok(resp) => {
                let rid = match &resp {
                    Response::Won { id }
                    | Response::Lost { id, .. }
                    | Response::OwnerIs { id, .. } => *id,
                    _ => 0,
                };
                if rid != id {
                    self.conn = None;
                    return Attempt::Retry(format!("answer for request {rid}, expected {id}"));
                }
                Attempt::Done(resp)
            }
        }
    }

    async fn call(&mut self, make: impl Fn(u64) -> Request) -> Result<Response, ArbiterError> {
        let start = Instant::now();
        let mut attempts = 0u32;
        loop {
            let id = self.next_id;
            self.next_id += 1;
            attempts += 1;
            match self.attempt(&make(id), id).await {
                Attempt::Done(r) => return Ok(r),
                Attempt::Fatal(e) => return Err(e),
                Attempt::Retry(last) => {
                    let pause = self.backoff(attempts - 1);
                    if start.elapsed() + pause > self.cfg.retry_budget {
                        return Err(ArbiterError::Unreachable {
                            addr: self.cfg.addr.clone(),
                            attempts,
                            last,
                        });
                    }
                    debug!(attempt = attempts, error = %last, "arbiter call failed; retrying");
                    tokio::time::sleep(pause).await;
                }
            }
        }
    }
}

async fn exchange(s: &mut TcpStream, frame: &[u8]) -> Result<Response, String> {
    s.write_all(frame).await.map_err(|e| format!("send: {e}"))?;
    let mut prefix = [0u8; 4];
    s.read_exact(&mut prefix)
        .await
        .map_err(|e| format!("receive: {e}"))?;
    let n = frame_len(prefix).map_err(|e| e.to_string())?;
    let mut body = vec![0u8; n];
    s.read_exact(&mut body)
        .await
        .map_err(|e| format!("receive: {e}"))?;
    Response::decode(&body).map_err(|e| e.to_string())
}

fn check(vm: &str) -> Result<(), ArbiterError> {
    validate_name(vm.as_bytes()).map_err(|e| ArbiterError::Invalid(format!("vm id {vm:?}: {e}")))
}

impl Arbiter for Client {
    fn identity(&self, name: &str) -> String {
        self.incarnation.identity(name)
    }

    async fn test_and_set(
        &mut self,
        vm: &str,
        generation: u64,
        name: &str,
    ) -> Result<Decision, ArbiterError> {
        check(vm)?;
        let claimant = claimant_identity(&self.incarnation, name)?;
        let resp = self
            .call(|id| Request::TestAndSet {
                id,
                vm: vm.to_string(),
                generation,
                claimant: claimant.clone(),
            })
            .await?;
        match resp {
            Response::Won { .. } => Ok(Decision::Won),
            Response::Lost { owner, .. } => Ok(Decision::Lost { owner }),
            other => Err(ArbiterError::Rejected {
                addr: self.cfg.addr.clone(),
                message: format!("unexpected answer {other:?}"),
            }),
        }
    }

    async fn owner(&mut self, vm: &str, generation: u64) -> Result<Option<String>, ArbiterError> {
        check(vm)?;
        match self
            .call(|id| Request::Owner {
                id,
                vm: vm.to_string(),
                generation,
            })
            .await?
        {
            Response::OwnerIs { owner, .. } => Ok(owner),
            other => Err(ArbiterError::Rejected {
                addr: self.cfg.addr.clone(),
                message: format!("unexpected answer {other:?}"),
            }),
        }
    }
}
