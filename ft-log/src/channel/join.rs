//! Re-protection's direction: the **backup dials** a running primary
//! ([`BackupLink::join`]) that listens for it ([`JoinListener`]). After the
//! TCP connection the exchange is the usual one (the primary speaks first,
//! see the module docs of [`super`]): only who dials changes, so the
//! proofs, the session key and every message are the same.
//!
//! A joining backup does not know the primary's configuration hash before
//! the state transfer brings it, so it offers the one the primary's
//! listener expects for joins (the caller agrees on it, e.g. a fixed
//! "join" value per VM); the log that follows carries the real one.

use std::io::ErrorKind;
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

use tracing::{debug, warn};

use super::handshake;
use super::wire::io_err;
use super::{BackupLink, ChannelConfig, ChannelError, PrimaryLink};

/// Where a running primary waits for a new backup.
pub struct JoinListener {
    listener: TcpListener,
}

impl JoinListener {
    /// Listen on `addr` (port 0: any free port).
    pub fn bind(addr: impl ToSocketAddrs) -> Result<JoinListener, ChannelError> {
        let listener =
            TcpListener::bind(addr).map_err(|e| io_err("listening for a joining backup", e))?;
        Ok(JoinListener { listener })
    }

    /// Listen for joining backups where a backup listened for its primary:
    /// a backup that went live keeps its address (re-protection).
    pub fn from_backup_listener(l: super::BackupListener) -> JoinListener {
        JoinListener {
            listener: l.into_inner(),
        }
    }

    /// The address listened on.
    pub fn local_addr(&self) -> Result<SocketAddr, ChannelError> {
        self.listener
            .local_addr()
            .map_err(|e| io_err("reading the listening address", e))
    }

    /// Wait for a backup and run the handshake with it, as the primary. A
    /// peer that fails the handshake is refused with the error; call again
    /// to wait for the next.
    pub fn accept(&self, cfg: &ChannelConfig) -> Result<PrimaryLink, ChannelError> {
        cfg.validate()?;
        let (mut stream, from) = self
            .listener
            .accept()
            .map_err(|e| io_err("accepting a joining backup", e))?;
        debug!(%from, "channel: a backup joins, handshaking");
        prepare(&mut stream, cfg)?;
        let session = handshake::primary(&mut stream, cfg).inspect_err(|e| {
            warn!(%from, error = %e, "channel: joining backup refused");
        })?;
        PrimaryLink::start_on(stream, session, cfg)
    }
}

/// Set the socket up for the handshake.
fn prepare(stream: &mut TcpStream, cfg: &ChannelConfig) -> Result<(), ChannelError> {
    let _ = stream.set_nodelay(true);
    let t = Some(cfg.handshake_timeout);
    stream
        .set_read_timeout(t)
        .and_then(|_| stream.set_write_timeout(t))
        .map_err(|e| io_err("setting socket timeouts", e))
}

/// Dial `addr`, retrying refused or timed-out attempts
/// ([`ChannelConfig::connect_timeout`] each) until
/// [`ChannelConfig::connect_deadline`].
pub(super) fn dial(
    addr: &impl ToSocketAddrs,
    cfg: &ChannelConfig,
    whom: &str,
) -> Result<TcpStream, ChannelError> {
    let start = Instant::now();
    let deadline = start + cfg.connect_deadline;
    loop {
        let addrs: Vec<SocketAddr> = addr
            .to_socket_addrs()
            .map(|a| a.collect())
            .map_err(|e| io_err("resolving the peer's address", e))?;
        let mut last = std::io::Error::new(ErrorKind::NotFound, "the address resolves to nothing");
        for a in &addrs {
            let left = deadline.saturating_duration_since(Instant::now());
            let t = cfg.connect_timeout.min(left).max(Duration::from_millis(1));
            match TcpStream::connect_timeout(a, t) {
                Ok(s) => return Ok(s),
                Err(e) => last = e,
            }
        }
        let now = Instant::now();
        if now >= deadline {
            return Err(ChannelError::Connect {
                addr: addrs
                    .iter()
                    .map(|a| a.to_string())
                    .collect::<Vec<_>>()
                    .join(", "),
                waited: now - start,
                source: last,
            });
        }
        debug!(error = %last, "channel: {whom} not reachable yet, retrying");
        std::thread::sleep(Duration::from_millis(100).min(deadline - now));
    }
}

impl BackupLink {
    /// Dial a running primary at `addr` (its [`JoinListener`]) and run the
    /// handshake as the backup.
    pub fn join(addr: impl ToSocketAddrs, cfg: &ChannelConfig) -> Result<BackupLink, ChannelError> {
        cfg.validate()?;
        let mut stream = dial(&addr, cfg, "the primary")?;
        prepare(&mut stream, cfg)?;
        let session = handshake::backup(&mut stream, cfg)?;
        BackupLink::start_on(stream, session, cfg)
    }
}
