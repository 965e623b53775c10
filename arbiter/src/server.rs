//! The built-in arbiter server: tokio TCP, the framed protocol of
//! [`crate::protocol`], decisions made durable by [`crate::store`] before
//! they are answered.
//!
//! Claims that need a new decision are group-committed (one write and one
//! fsync per batch). A batch whose write or fsync failed is rolled back by
//! the store and answered with [`ErrorCode::Storage`] (the client retries);
//! if the rollback fails too, the server stops ([`ServerError::Stopped`])
//! rather than answer from a state that is not on disk. At most
//! [`ServerConfig::max_connections`] connections are served at once; one
//! more is answered with [`ErrorCode::Busy`] and closed.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use thiserror::Error;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Semaphore};
use tokio::time::timeout;
use tracing::{debug, error, info, warn};

use crate::protocol::{constant_time_eq, frame_len, ErrorCode, Request, Response};
use crate::store::{lock, Claim, Store, StoreError};
use crate::Decision;

/// Server settings.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Shared secret clients must present.
    pub token: Vec<u8>,
    /// Time a new connection has to authenticate.
    pub handshake_timeout: Duration,
    /// Time a started frame has to arrive completely.
    pub frame_timeout: Duration,
    /// Idle time after which a connection is closed.
    pub idle_timeout: Duration,
    /// Most connections served at once; one more is answered with a
    /// [`ErrorCode::Busy`] error and closed.
    pub max_connections: usize,
}

/// Default of [`ServerConfig::max_connections`].
pub const DEFAULT_MAX_CONNECTIONS: usize = 1024;

/// Refused connections being told why at once; past that, a refused
/// connection is just closed.
const MAX_REFUSALS_IN_FLIGHT: usize = 64;

impl ServerConfig {
    /// Defaults with the given token.
    pub fn new(token: impl Into<Vec<u8>>) -> Self {
        ServerConfig {
            token: token.into(),
            handshake_timeout: Duration::from_secs(5),
            frame_timeout: Duration::from_secs(5),
            idle_timeout: Duration::from_secs(300),
            max_connections: DEFAULT_MAX_CONNECTIONS,
        }
    }
}

/// Server start-up errors.
#[derive(Debug, Error)]
pub enum ServerError {
    /// The store could not be opened.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The listening socket could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// Address requested.
        addr: String,
        /// Underlying error.
        source: std::io::Error,
    },
    /// The token is empty.
    #[error("the shared token must not be empty")]
    EmptyToken,
    /// The connection cap is zero.
    #[error("the connection cap must be at least 1")]
    NoConnections,
    /// The store failed in a way it could not undo; the server stopped.
    #[error("arbiter server stopped: {0}")]
    Stopped(String),
}

/// A bound, ready server.
pub struct Server {
    listener: TcpListener,
    store: Arc<Mutex<Store>>,
    cfg: Arc<ServerConfig>,
    commits: CommitQueue,
    /// Set (once) by the committer when the store stopped.
    stopped: watch::Receiver<Option<String>>,
}

type Reply = tokio::sync::oneshot::Sender<Result<Decision, String>>;
type CommitQueue = std::sync::mpsc::Sender<(Claim, Reply)>;

/// Group commit: one thread takes every claim queued so far, decides them,
/// appends their records with one write and one fsync, publishes the new
/// decisions, then answers. Decisions are never visible before they are
/// durable; a crash loses only unanswered claims. A batch whose append
/// failed was rolled back by the store: its claims are answered with a
/// storage error (clients retry) and nothing of it is published. If the
/// rollback failed as well, the committer answers every claim with an error
/// from then on, and reports the stop through `stopped`.
fn start_committer(
    store: Arc<Mutex<Store>>,
    stopped: watch::Sender<Option<String>>,
) -> CommitQueue {
    let appender = lock(&store).appender();
    let (tx, rx) = std::sync::mpsc::channel::<(Claim, Reply)>();
    std::thread::Builder::new()
        .name("arbiter-commit".into())
        .spawn(move || {
            while let Ok(first) = rx.recv() {
                let mut batch = vec![first];
                while batch.len() < 4096 {
                    match rx.try_recv() {
                        Ok(x) => batch.push(x),
                        Err(_) => break,
                    }
                }
                let claims: Vec<Claim> = batch.iter().map(|(c, _)| c.clone()).collect();
                let plan = lock(&store).plan(&claims);
                let result = lock(&appender).append(&plan.records);
                match result {
                    Ok(()) => {
                        lock(&store).apply(plan.new);
                        for ((_, reply), d) in batch.into_iter().zip(plan.decisions) {
                            let _ = reply.send(Ok(d));
                        }
                    }
                    Err(e) => {
                        let message = format!("decision not made: {e}");
                        for (_, reply) in batch {
                            let _ = reply.send(Err(message.clone()));
                        }
                        if let StoreError::Stopped { .. } = e {
                            error!(error = %e, "arbiter store stopped; the server stops");
                            let _ = stopped.send(Some(e.to_string()));
                        } else {
                            warn!(error = %e, "could not make a batch of decisions durable; answered with an error");
                        }
                    }
                }
            }
        })
        .expect("spawn committer");
    tx
}

#[derive(Debug, Error)]
enum ConnError {
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    #[error("timed out")]
    Timeout,
    #[error("peer closed")]
    Closed,
    #[error("{0}")]
    Refused(String),
}

impl Server {
    /// Open the store in `data_dir` and bind `addr`.
    pub async fn bind(
        addr: &str,
        data_dir: &Path,
        cfg: ServerConfig,
    ) -> Result<Server, ServerError> {
        if cfg.token.is_empty() {
            return Err(ServerError::EmptyToken);
        }
        if cfg.max_connections == 0 {
            return Err(ServerError::NoConnections);
        }
        let (store, rec) = Store::open(data_dir)?;
        if rec.torn_bytes > 0 {
            warn!(
                torn_bytes = rec.torn_bytes,
                "recovered from a crash mid-write"
            );
        }
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| ServerError::Bind {
                addr: addr.to_string(),
                source,
            })?;
        let store = Arc::new(Mutex::new(store));
        let (stop_tx, stopped) = watch::channel(None);
        let commits = start_committer(store.clone(), stop_tx);
        Ok(Server {
            listener,
            store,
            cfg: Arc::new(cfg),
            commits,
            stopped,
        })
    }

    /// The bound address.
    pub fn local_addr(&self) -> SocketAddr {
        self.listener.local_addr().expect("bound socket")
    }

    /// Serve until the store stops ([`ServerError::Stopped`]); then every
    /// connection is closed too.
    pub async fn run(self) -> Result<(), ServerError> {
        info!(
            addr = %self.local_addr(),
            max_connections = self.cfg.max_connections,
            "arbiter serving"
        );
        let slots = Arc::new(Semaphore::new(self.cfg.max_connections));
        let refusals = Arc::new(Semaphore::new(MAX_REFUSALS_IN_FLIGHT));
        let mut refused = RefusalLog::default();
        let mut stopped = self.stopped.clone();
        loop {
            let accepted = tokio::select! {
                r = self.listener.accept() => r,
                r = stopped.wait_for(Option::is_some) => {
                    let reason = match r {
                        Ok(v) => v.clone().unwrap_or_default(),
                        Err(_) => "committer gone".to_string(),
                    };
                    return Err(ServerError::Stopped(reason));
                }
            };
            let (stream, peer) = match accepted {
                Ok(x) => x,
                Err(e) => {
                    warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let Ok(slot) = slots.clone().try_acquire_owned() else {
                refused.note(peer, self.cfg.max_connections);
                if let Ok(permit) = refusals.clone().try_acquire_owned() {
                    let limit = self.cfg.max_connections;
                    tokio::spawn(async move {
                        refuse_busy(stream, limit).await;
                        drop(permit);
                    });
                }
                continue;
            };
            let _ = stream.set_nodelay(true);
            let store = self.store.clone();
            let cfg = self.cfg.clone();
            let commits = self.commits.clone();
            let stopped = self.stopped.clone();
            tokio::spawn(async move {
                match handle(stream, store, cfg, commits, stopped).await {
                    Ok(()) | Err(ConnError::Closed) => debug!(%peer, "connection closed"),
                    Err(e) => debug!(%peer, error = %e, "connection ended"),
                }
                drop(slot);
            });
        }
    }
}

/// Logs refused connections: the first at once, then at most one line a
/// second with the count since the last line (a flood does not flood the log).
#[derive(Default)]
struct RefusalLog {
    last: Option<std::time::Instant>,
    since_last: u64,
}

impl RefusalLog {
    fn note(&mut self, peer: SocketAddr, limit: usize) {
        self.since_last += 1;
        if self
            .last
            .is_some_and(|t| t.elapsed() < Duration::from_secs(1))
        {
            return;
        }
        warn!(
            %peer,
            refused = self.since_last,
            max_connections = limit,
            "connection cap reached; refusing connections"
        );
        self.last = Some(std::time::Instant::now());
        self.since_last = 0;
    }
}

/// Tell a connection over the cap why it is refused, then close it after
/// the peer has had a moment to read that (closing with its unread hello
/// still queued would reset the connection and lose the answer).
async fn refuse_busy(mut s: TcpStream, limit: usize) {
    let r = Response::Error {
        id: 0,
        code: ErrorCode::Busy,
        message: format!("too many connections (the server's cap is {limit}); try again later"),
    };
    let _ = timeout(Duration::from_secs(1), s.write_all(&r.encode())).await;
    let _ = s.shutdown().await;
    let mut sink = [0u8; 512];
    let _ = timeout(Duration::from_secs(1), async {
        while let Ok(n) = s.read(&mut sink).await {
            if n == 0 {
                break;
            }
        }
    })
    .await;
}

async fn read_frame(
    s: &mut TcpStream,
    wait: Duration,
    frame: Duration,
) -> Result<Vec<u8>, ConnError> {
    let mut prefix = [0u8; 4];
    match timeout(wait, s.read_exact(&mut prefix)).await {
        Err(_) => return Err(ConnError::Timeout),
        Ok(Err(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
            return Err(ConnError::Closed)
        }
        Ok(r) => r?,
    };
    let len = match frame_len(prefix) {
        Ok(n) => n,
        Err(e) => return Err(refuse(s, ErrorCode::BadRequest, e.to_string()).await),
    };
    let mut body = vec![0u8; len];
    match timeout(frame, s.read_exact(&mut body)).await {
        Err(_) => Err(ConnError::Timeout),
        Ok(Err(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
            Err(ConnError::Refused("truncated frame".into()))
        }
        Ok(r) => {
            r?;
            Ok(body)
        }
    }
}

/// Tell the peer why (best effort) and end the connection.
async fn refuse(s: &mut TcpStream, code: ErrorCode, message: String) -> ConnError {
    let r = Response::Error {
        id: 0,
        code,
        message: message.clone(),
    };
    let _ = send(s, &r).await;
    ConnError::Refused(message)
}

async fn send(s: &mut TcpStream, r: &Response) -> Result<(), ConnError> {
    match timeout(Duration::from_secs(5), s.write_all(&r.encode())).await {
        Err(_) => Err(ConnError::Timeout),
        Ok(r) => Ok(r?),
    }
}

async fn handle(
    mut s: TcpStream,
    store: Arc<Mutex<Store>>,
    cfg: Arc<ServerConfig>,
    commits: CommitQueue,
    mut stopped: watch::Receiver<Option<String>>,
) -> Result<(), ConnError> {
    let peer = s.peer_addr().ok();
    // Handshake: the first frame must be Hello with the right token.
    let first = read_frame(&mut s, cfg.handshake_timeout, cfg.frame_timeout).await?;
    match Request::decode(&first) {
        Ok(Request::Hello { token }) if constant_time_eq(&token, &cfg.token) => {
            send(&mut s, &Response::HelloOk).await?;
        }
        Ok(Request::Hello { .. }) | Ok(_) => {
            warn!(?peer, "refused a client with a wrong or missing token");
            let message = "wrong or missing token".to_string();
            return Err(refuse(&mut s, ErrorCode::Unauthenticated, message).await);
        }
        Err(e) => {
            warn!(?peer, error = %e, "refused a malformed handshake");
            let code = if matches!(e, crate::protocol::ProtocolError::Version(_)) {
                ErrorCode::Version
            } else {
                ErrorCode::BadRequest
            };
            return Err(refuse(&mut s, code, e.to_string()).await);
        }
    }
    loop {
        // Between requests, a stopped server closes the connection (a
        // request already read still gets its answer). The stop is looked
        // at first: a request that arrives after it is not answered (an
        // unbiased select would answer it half the time).
        let payload = tokio::select! {
            biased;
            _ = stopped.wait_for(Option::is_some) => {
                debug!(?peer, "closing: the server stopped");
                return Ok(());
            }
            r = read_frame(&mut s, cfg.idle_timeout, cfg.frame_timeout) => r?,
        };
        let req = match Request::decode(&payload) {
            Ok(r) => r,
            Err(e) => {
                warn!(?peer, error = %e, "malformed request; closing");
                return Err(refuse(&mut s, ErrorCode::BadRequest, e.to_string()).await);
            }
        };
        let resp = match req {
            Request::Hello { .. } => Response::HelloOk,
            Request::Owner { id, vm, generation } => {
                let owner = lock(&store).owner(&vm, generation).map(str::to_string);
                Response::OwnerIs { id, owner }
            }
            Request::TestAndSet {
                id,
                vm,
                generation,
                claimant,
            } => {
                // Fast path: an existing (durable) decision needs no I/O.
                let known = lock(&store).owner(&vm, generation).map(str::to_string);
                match known {
                    Some(owner) if owner == claimant => Response::Won { id },
                    Some(owner) => Response::Lost { id, owner },
                    None => {
                        let (tx, rx) = tokio::sync::oneshot::channel();
                        let claim = Claim {
                            vm,
                            generation,
                            claimant,
                        };
                        let r = match commits.send((claim, tx)) {
                            Ok(()) => rx.await.unwrap_or_else(|_| Err("committer stopped".into())),
                            Err(_) => Err("committer stopped".into()),
                        };
                        match r {
                            Ok(Decision::Won) => Response::Won { id },
                            Ok(Decision::Lost { owner }) => Response::Lost { id, owner },
                            Err(message) => Response::Error {
                                id,
                                code: ErrorCode::Storage,
                                message,
                            },
                        }
                    }
                }
            }
        };
        send(&mut s, &resp).await?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::client::{Client, ClientConfig};
    use crate::Arbiter;

    const TOKEN: &[u8] = b"server-unit-test-token";

    /// A raw protocol connection, authenticated.
    async fn connect(addr: &str) -> TcpStream {
        let mut s = TcpStream::connect(addr).await.unwrap();
        let hello = Request::Hello {
            token: TOKEN.to_vec(),
        };
        assert_eq!(exchange(&mut s, &hello).await, Some(Response::HelloOk));
        s
    }

    /// Send `req`, read one answer (`None`: the server closed).
    async fn exchange(s: &mut TcpStream, req: &Request) -> Option<Response> {
        s.write_all(&req.encode()).await.ok()?;
        let mut prefix = [0u8; 4];
        timeout(Duration::from_secs(5), s.read_exact(&mut prefix))
            .await
            .expect("an answer or a close within 5 s")
            .ok()?;
        let mut body = vec![0u8; frame_len(prefix).unwrap()];
        s.read_exact(&mut body).await.ok()?;
        Some(Response::decode(&body).unwrap())
    }

    fn claim(id: u64, vm: &str, claimant: &str) -> Request {
        Request::TestAndSet {
            id,
            vm: vm.into(),
            generation: 1,
            claimant: claimant.into(),
        }
    }

    fn owner(id: u64, vm: &str) -> Request {
        Request::Owner {
            id,
            vm: vm.into(),
            generation: 1,
        }
    }

    fn storage_error(r: Option<Response>) -> String {
        match r {
            Some(Response::Error {
                code: ErrorCode::Storage,
                message,
                ..
            }) => message,
            other => panic!("expected a storage error, got {other:?}"),
        }
    }

    async fn bind(dir: &Path) -> Server {
        Server::bind("127.0.0.1:0", dir, ServerConfig::new(TOKEN))
            .await
            .unwrap()
    }

    fn faults(server: &Server, f: impl FnOnce(&mut crate::store::Faults)) {
        let app = lock(&server.store).appender();
        f(&mut lock(&app).faults);
    }

    #[tokio::test]
    async fn a_batch_whose_fsync_or_write_failed_is_answered_with_an_error_and_not_decided() {
        let dir = tempfile::tempdir().unwrap();
        let server = bind(dir.path()).await;
        let addr = server.local_addr().to_string();
        faults(&server, |f| f.sync_fails = true);
        let store = server.store.clone();
        let appender = lock(&store).appender();
        let run = tokio::spawn(server.run());

        let mut s = connect(&addr).await;
        let msg = storage_error(exchange(&mut s, &claim(1, "vm", "a")).await);
        assert!(msg.contains("injected fsync failure"), "{msg}");
        assert_eq!(
            exchange(&mut s, &owner(2, "vm")).await,
            Some(Response::OwnerIs { id: 2, owner: None }),
            "the failed claim decided nothing"
        );
        // A later claimant wins the register the failed claim wanted.
        assert_eq!(
            exchange(&mut s, &claim(3, "vm", "b")).await,
            Some(Response::Won { id: 3 })
        );

        // A write that stops mid-record: error, and the log stays clean.
        lock(&appender).faults.write_fails_after = Some(7);
        storage_error(exchange(&mut s, &claim(4, "vm2", "a")).await);
        assert_eq!(
            exchange(&mut s, &claim(5, "vm3", "c")).await,
            Some(Response::Won { id: 5 })
        );
        assert_eq!(
            exchange(&mut s, &claim(6, "vm2", "c")).await,
            Some(Response::Won { id: 6 })
        );

        // What is on disk is exactly what was answered.
        let (reopened, r) = Store::open(dir.path()).unwrap();
        assert_eq!(r.torn_bytes, 0);
        assert_eq!(reopened.len(), 3);
        assert_eq!(reopened.owner("vm", 1), Some("b"));
        assert_eq!(reopened.owner("vm2", 1), Some("c"));
        assert_eq!(reopened.owner("vm3", 1), Some("c"));
        assert!(
            !run.is_finished(),
            "a rolled-back failure does not stop the server"
        );
        run.abort();
    }

    #[tokio::test]
    async fn the_client_retries_a_claim_whose_batch_failed() {
        let dir = tempfile::tempdir().unwrap();
        let server = bind(dir.path()).await;
        let addr = server.local_addr().to_string();
        faults(&server, |f| f.sync_fails = true);
        let run = tokio::spawn(server.run());
        let mut c = Client::new(ClientConfig::new(addr, TOKEN));
        assert_eq!(c.test_and_set("vm", 1, "a").await.unwrap(), Decision::Won);
        assert_eq!(c.owner("vm", 1).await.unwrap(), Some(c.identity("a")));
        run.abort();
    }

    #[tokio::test]
    async fn a_failed_rollback_stops_the_server() {
        let dir = tempfile::tempdir().unwrap();
        let server = bind(dir.path()).await;
        let addr = server.local_addr().to_string();
        faults(&server, |f| {
            f.write_fails_after = Some(3);
            f.rollback_fails = true;
        });
        let run = tokio::spawn(server.run());
        let mut s = connect(&addr).await;
        let mut other = connect(&addr).await;
        let msg = storage_error(exchange(&mut s, &claim(1, "vm", "a")).await);
        assert!(msg.contains("stopped"), "{msg}");
        let ended = timeout(Duration::from_secs(5), run)
            .await
            .expect("server stops")
            .unwrap();
        assert!(
            matches!(ended, Err(ServerError::Stopped(ref m)) if m.contains("rollback")),
            "{ended:?}"
        );
        // Open connections are closed, new ones refused.
        assert_eq!(exchange(&mut other, &owner(2, "vm")).await, None);
        assert!(TcpStream::connect(&addr).await.is_err());
        // The bytes the failed append left are a torn tail, dropped on open.
        let (reopened, r) = Store::open(dir.path()).unwrap();
        assert_eq!((reopened.len(), r.torn_bytes), (0, 3));
    }
}
