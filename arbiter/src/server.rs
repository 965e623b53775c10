//! The built-in arbiter server: tokio TCP, the framed protocol of
//! [`crate::protocol`], decisions made durable by [`crate::store`] before
//! they are answered.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use thiserror::Error;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::timeout;
use tracing::{debug, info, warn};

use crate::protocol::{constant_time_eq, frame_len, ErrorCode, Request, Response};
use crate::store::{Claim, Store, StoreError};
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
}

impl ServerConfig {
    /// Defaults with the given token.
    pub fn new(token: impl Into<Vec<u8>>) -> Self {
        ServerConfig {
            token: token.into(),
            handshake_timeout: Duration::from_secs(5),
            frame_timeout: Duration::from_secs(5),
            idle_timeout: Duration::from_secs(300),
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
}

/// A bound, ready server.
pub struct Server {
    listener: TcpListener,
    store: Arc<Mutex<Store>>,
    cfg: Arc<ServerConfig>,
    commits: CommitQueue,
}

type Reply = tokio::sync::oneshot::Sender<Result<Decision, String>>;
type CommitQueue = std::sync::mpsc::Sender<(Claim, Reply)>;

/// Group commit: one thread takes every claim queued so far, decides them,
/// appends their records with one write and one fsync, publishes the new
/// decisions, then answers. Decisions are never visible before they are
/// durable; a crash loses only unanswered claims.
fn start_committer(store: Arc<Mutex<Store>>) -> Result<CommitQueue, StoreError> {
    let (path, mut file) = {
        let st = store.lock().unwrap_or_else(|e| e.into_inner());
        (st.log_path(), st.log_file()?)
    };
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
                let plan = store
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .plan(&claims);
                let result = plan.write(&mut file, &path);
                match result {
                    Ok(()) => {
                        store
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .apply(plan.new);
                        for ((_, reply), d) in batch.into_iter().zip(plan.decisions) {
                            let _ = reply.send(Ok(d));
                        }
                    }
                    Err(e) => {
                        warn!(error = %e, "could not make decisions durable");
                        for (_, reply) in batch {
                            let _ = reply.send(Err(e.to_string()));
                        }
                    }
                }
            }
        })
        .expect("spawn committer");
    Ok(tx)
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
        let commits = start_committer(store.clone())?;
        Ok(Server {
            listener,
            store,
            cfg: Arc::new(cfg),
            commits,
        })
    }

    /// The bound address.
    pub fn local_addr(&self) -> SocketAddr {
        self.listener.local_addr().expect("bound socket")
    }

    /// Serve forever.
    pub async fn run(self) {
        info!(addr = %self.local_addr(), "arbiter serving");
        loop {
            let (stream, peer) = match self.listener.accept().await {
                Ok(x) => x,
                Err(e) => {
                    warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let _ = stream.set_nodelay(true);
            let store = self.store.clone();
            let cfg = self.cfg.clone();
            let commits = self.commits.clone();
            tokio::spawn(async move {
                match handle(stream, store, cfg, commits).await {
                    Ok(()) | Err(ConnError::Closed) => debug!(%peer, "connection closed"),
                    Err(e) => debug!(%peer, error = %e, "connection ended"),
                }
            });
        }
    }
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
        let payload = read_frame(&mut s, cfg.idle_timeout, cfg.frame_timeout).await?;
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
                let owner = store
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .owner(&vm, generation)
                    .map(str::to_string);
                Response::OwnerIs { id, owner }
            }
            Request::TestAndSet {
                id,
                vm,
                generation,
                claimant,
            } => {
                // Fast path: an existing (durable) decision needs no I/O.
                let known = store
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .owner(&vm, generation)
                    .map(str::to_string);
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
