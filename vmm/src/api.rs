//! The monitor's control socket: a small HTTP/1.1 API on a Unix socket
//! (`--api-sock PATH`), and the same figures for Prometheus on TCP
//! (`--metrics ADDR`).
//!
//! Routes (GET only, one request per connection, `Connection: close`):
//!
//! | path       | body                                                     |
//! | ---------- | -------------------------------------------------------- |
//! | `/status`  | the monitor's [`MonitorStatus`] as JSON                  |
//! | `/metrics` | the same in Prometheus text format ([`status::prometheus`]) |
//!
//! Anything else is 404, another method 405, a request that is not HTTP
//! (or larger than 8 KiB, or slower than 2 s) 400. Each connection is
//! served on the server's own thread: the figures are a copy taken under
//! a short lock, so a slow client never holds up the VM.
//!
//! Written here rather than on an HTTP crate: two fixed GET routes over a
//! Unix socket need a request line and a response, and the monitor's
//! dependencies stay those of a VMM.

use std::io::{self, Read, Write};
use std::net::{TcpListener, ToSocketAddrs};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::Duration;

use thiserror::Error;

use crate::ft::status::{self, MonitorStatus, StatusBoard};

/// Largest request accepted.
const MAX_REQUEST: usize = 8 << 10;
/// Longest a client may take to send its request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);

/// Errors of the control socket and its client.
#[derive(Debug, Error)]
pub enum ApiError {
    /// The socket cannot be bound.
    #[error("cannot serve the control socket at {path}: {source}")]
    Bind {
        /// Where.
        path: String,
        /// Why.
        source: io::Error,
    },
    /// Another monitor already answers there.
    #[error("another monitor already serves at {0}")]
    InUse(PathBuf),
    /// The monitor could not be asked.
    #[error("cannot ask the monitor at {path}: {source}")]
    Connect {
        /// Where.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// The monitor answered something unexpected.
    #[error("the monitor at {path} answered badly: {detail}")]
    BadAnswer {
        /// Where.
        path: PathBuf,
        /// What.
        detail: String,
    },
}

/// Where a monitor's control socket goes unless `--api-sock` says:
/// `$XDG_RUNTIME_DIR/vmft/`, else `/run/vmft/` for root, else
/// `/tmp/vmft-UID/`.
pub fn default_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("XDG_RUNTIME_DIR").filter(|d| !d.is_empty()) {
        return Path::new(&d).join("vmft");
    }
    // SAFETY: geteuid has no preconditions and cannot fail.
    let uid = unsafe { libc::geteuid() };
    if uid == 0 {
        PathBuf::from("/run/vmft")
    } else {
        PathBuf::from(format!("/tmp/vmft-{uid}"))
    }
}

/// The default socket of a `role` side of `vm` in this process.
pub fn default_path(vm: &str, role: &str) -> PathBuf {
    default_dir().join(format!("{vm}-{role}-{}.sock", std::process::id()))
}

/// A running control socket; the socket file is removed when dropped.
pub struct ApiServer {
    path: PathBuf,
}

impl ApiServer {
    /// Serve `board` at `path` (its directory is created). A stale socket
    /// there (nobody answers) is replaced; a live one is refused.
    pub fn start(path: &Path, board: StatusBoard) -> Result<ApiServer, ApiError> {
        let bind_err = |source| ApiError::Bind {
            path: path.display().to_string(),
            source,
        };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            use std::os::unix::fs::DirBuilderExt;
            // Only this user reaches the sockets it creates a directory for.
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .map_err(bind_err)?;
        }
        if let Ok(meta) = std::fs::symlink_metadata(path) {
            use std::os::unix::fs::FileTypeExt;
            if !meta.file_type().is_socket() {
                return Err(bind_err(io::Error::new(
                    io::ErrorKind::AlreadyExists,
                    "a file that is not a socket is there",
                )));
            }
            if UnixStream::connect(path).is_ok() {
                return Err(ApiError::InUse(path.to_owned()));
            }
            // A socket nobody answers on: a killed monitor's.
            std::fs::remove_file(path).map_err(bind_err)?;
        }
        let listener = UnixListener::bind(path).map_err(bind_err)?;
        spawn_server("api", board, move || {
            let (c, _) = listener.accept()?;
            c.set_read_timeout(Some(REQUEST_TIMEOUT))?;
            c.set_write_timeout(Some(REQUEST_TIMEOUT))?;
            Ok(c)
        })
        .map_err(bind_err)?;
        Ok(ApiServer {
            path: path.to_owned(),
        })
    }

    /// The socket's path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Serve `board`'s Prometheus text (and `/status`) on TCP `addr`; returns
/// the bound address.
pub fn serve_metrics(addr: &str, board: StatusBoard) -> Result<std::net::SocketAddr, ApiError> {
    let bind_err = |source| ApiError::Bind {
        path: addr.to_string(),
        source,
    };
    let addrs: Vec<_> = addr.to_socket_addrs().map_err(bind_err)?.collect();
    let listener = TcpListener::bind(&addrs[..]).map_err(bind_err)?;
    let local = listener.local_addr().map_err(bind_err)?;
    spawn_server("metrics", board, move || {
        let (c, _) = listener.accept()?;
        c.set_read_timeout(Some(REQUEST_TIMEOUT))?;
        c.set_write_timeout(Some(REQUEST_TIMEOUT))?;
        Ok(c)
    })
    .map_err(bind_err)?;
    Ok(local)
}

/// A thread named `name` that serves `board` to each connection `accept`
/// hands it, one at a time.
fn spawn_server<C: Read + Write>(
    name: &str,
    board: StatusBoard,
    mut accept: impl FnMut() -> io::Result<C> + Send + 'static,
) -> io::Result<()> {
    std::thread::Builder::new()
        .name(name.to_string())
        .spawn(move || loop {
            match accept() {
                Ok(mut c) => serve(&mut c, &board),
                Err(e) => tracing::debug!("control socket: accept: {e}"),
            }
        })
        .map(|_| ())
}

/// Read one request from `conn` and answer it.
fn serve(conn: &mut (impl Read + Write), board: &StatusBoard) {
    let (code, kind, body) = match read_request(conn) {
        Err(why) => (400, "text/plain", format!("{why}\n")),
        Ok((method, _)) if method != "GET" => (405, "text/plain", "only GET\n".into()),
        Ok((_, path)) => match path.split('?').next().unwrap_or("") {
            "/status" | "/" => match serde_json::to_string(&board.snapshot()) {
                Ok(j) => (200, "application/json", j + "\n"),
                Err(e) => (500, "text/plain", format!("{e}\n")),
            },
            "/metrics" => (
                200,
                "text/plain; version=0.0.4",
                status::prometheus(&board.snapshot()),
            ),
            other => (404, "text/plain", format!("no route {other}\n")),
        },
    };
    let reason = match code {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        _ => "Internal Server Error",
    };
    let head = format!(
        "HTTP/1.1 {code} {reason}\r\nContent-Type: {kind}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    let _ = conn.write_all(head.as_bytes());
    let _ = conn.write_all(body.as_bytes());
    let _ = conn.flush();
}

/// The method and path of the request on `conn` (its headers are read and
/// ignored).
fn read_request(conn: &mut impl Read) -> Result<(String, String), String> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 1024];
    let deadline = std::time::Instant::now() + REQUEST_TIMEOUT;
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
        if buf.len() > MAX_REQUEST {
            return Err("request too large".into());
        }
        if std::time::Instant::now() >= deadline {
            return Err("request not complete within 2 s".into());
        }
        match conn.read(&mut chunk) {
            Ok(0) => return Err("connection closed inside the request".into()),
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) => return Err(format!("reading the request: {e}")),
        }
    }
    let text = String::from_utf8_lossy(&buf);
    let line = text.lines().next().unwrap_or("");
    let mut parts = line.split(' ');
    match (parts.next(), parts.next(), parts.next()) {
        (Some(m), Some(p), Some(v)) if v.starts_with("HTTP/1.") && p.starts_with('/') => {
            Ok((m.to_string(), p.to_string()))
        }
        _ => Err(format!("not an HTTP/1.x request line: {line:?}")),
    }
}

/// Ask the monitor at `path` for its status.
pub fn query(path: &Path) -> Result<MonitorStatus, ApiError> {
    let connect = |source| ApiError::Connect {
        path: path.to_owned(),
        source,
    };
    let mut c = UnixStream::connect(path).map_err(connect)?;
    c.set_read_timeout(Some(Duration::from_secs(5)))
        .map_err(connect)?;
    c.write_all(b"GET /status HTTP/1.1\r\nHost: vmft\r\nConnection: close\r\n\r\n")
        .map_err(connect)?;
    let mut answer = String::new();
    c.read_to_string(&mut answer).map_err(connect)?;
    let bad = |detail: String| ApiError::BadAnswer {
        path: path.to_owned(),
        detail,
    };
    let (head, body) = answer
        .split_once("\r\n\r\n")
        .ok_or_else(|| bad("no end of headers".into()))?;
    let status_line = head.lines().next().unwrap_or("");
    if !status_line.starts_with("HTTP/1.1 200") {
        return Err(bad(format!("{status_line:?}")));
    }
    serde_json::from_str(body).map_err(|e| bad(e.to_string()))
}

/// The control sockets in `dir` (files ending in `.sock`), sorted.
pub fn sockets_in(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(Result::ok)
                .map(|e| e.path())
                .filter(|p| p.extension().is_some_and(|x| x == "sock"))
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ft::status::{Role, State};

    fn ask(path: &Path, request: &[u8]) -> String {
        let mut c = UnixStream::connect(path).unwrap();
        c.write_all(request).unwrap();
        let mut s = String::new();
        c.read_to_string(&mut s).unwrap();
        s
    }

    #[test]
    fn status_is_served_as_json_and_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/m.sock");
        let board = StatusBoard::new("db", Role::Backup, Some("0.0.0.0:7000".into()));
        board.set_state(State::Replaying);
        board.set_generation(9);
        let server = ApiServer::start(&path, board.clone()).unwrap();
        let s = query(&path).unwrap();
        assert_eq!(
            (s.role, s.state, s.generation),
            (Role::Backup, State::Replaying, 9)
        );
        // Changes show at the next query.
        board.set_state(State::Live);
        assert_eq!(query(&path).unwrap().state, State::Live);
        assert_eq!(sockets_in(&dir.path().join("sub")), vec![path.clone()]);
        drop(server);
        assert!(!path.exists(), "the socket is removed with the server");
        assert!(matches!(query(&path), Err(ApiError::Connect { .. })));
    }

    #[test]
    fn metrics_unknown_routes_methods_and_garbage() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.sock");
        let board = StatusBoard::new("db", Role::Primary, None);
        board.set_state(State::Protected);
        let _server = ApiServer::start(&path, board).unwrap();
        let m = ask(&path, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n");
        assert!(m.starts_with("HTTP/1.1 200 OK"), "{m}");
        assert!(
            m.contains("vmft_protected{vm=\"db\",role=\"primary\"} 1"),
            "{m}"
        );
        let r = ask(&path, b"GET /nope HTTP/1.1\r\n\r\n");
        assert!(r.starts_with("HTTP/1.1 404"), "{r}");
        let r = ask(&path, b"PUT /status HTTP/1.1\r\n\r\n");
        assert!(r.starts_with("HTTP/1.1 405"), "{r}");
        let r = ask(&path, b"hello\r\n\r\n");
        assert!(r.starts_with("HTTP/1.1 400"), "{r}");
    }

    #[test]
    fn a_live_socket_is_refused_and_a_stale_one_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.sock");
        let board = StatusBoard::new("db", Role::Primary, None);
        let first = ApiServer::start(&path, board.clone()).unwrap();
        assert!(matches!(
            ApiServer::start(&path, board.clone()),
            Err(ApiError::InUse(_))
        ));
        std::mem::forget(first);
        // A socket file nobody listens on (a killed monitor's).
        std::fs::remove_file(&path).unwrap();
        drop(UnixListener::bind(&path).unwrap());
        let _second = ApiServer::start(&path, board).unwrap();
        assert!(query(&path).is_ok());
    }

    #[test]
    fn a_file_that_is_not_a_socket_is_left_alone() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notes.txt");
        std::fs::write(&path, "keep me").unwrap();
        let e = ApiServer::start(&path, StatusBoard::new("db", Role::Primary, None))
            .err()
            .expect("refused");
        assert!(e.to_string().contains("not a socket"), "{e}");
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "keep me");
    }

    #[test]
    fn metrics_over_tcp() {
        let addr =
            serve_metrics("127.0.0.1:0", StatusBoard::new("db", Role::Primary, None)).unwrap();
        let mut c = std::net::TcpStream::connect(addr).unwrap();
        c.write_all(b"GET /metrics HTTP/1.1\r\n\r\n").unwrap();
        let mut s = String::new();
        c.read_to_string(&mut s).unwrap();
        assert!(s.contains("# TYPE vmft_exits_total counter"), "{s}");
    }
}
