//! The primary's logging link ([`LogLink`]): shared by its log sink
//! ([`ChannelSink`]), its hooks and its output releasers, and moved to a
//! joining backup's link at a hand-over, where the state transfer goes
//! first ([`LinkWriter`]) and the log after it.

use std::io::{self, Write};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ft_log::channel::{ChannelError, LinkStats, PeerState, PrimaryHandle, PrimaryLink};

/// The primary's logging link, shared by its log sink, its hooks and its
/// output releasers. Re-protection replaces it: the new link first carries
/// the state transfer (`base` bytes, [`crate::ft::transfer`]) and then the
/// log, so a log offset (a barrier) is the link offset minus `base`.
/// While the transfer is sent, the log waits here (`deferred`).
#[derive(Clone)]
pub struct LogLink {
    inner: Arc<Mutex<LinkState>>,
}

struct LinkState {
    /// Where log bytes are written (`None` while a transfer is sent, or
    /// once taken for the clean end).
    link: Option<PrimaryLink>,
    /// The current link's view for other threads (none before the first
    /// backup: a backup that went live).
    handle: Option<PrimaryHandle>,
    /// Link bytes before the log.
    base: u64,
    /// Log bytes waiting for the state transfer to be sent.
    deferred: Option<Vec<u8>>,
    /// The backup is gone and the claim won: log bytes are dropped.
    dropped: bool,
    /// Log bytes written to this link's log so far, sent or waiting.
    written: u64,
}

impl LogLink {
    /// The log goes to `link` from its first byte.
    pub fn new(link: PrimaryLink) -> Self {
        LogLink {
            inner: Arc::new(Mutex::new(LinkState {
                handle: Some(link.handle()),
                link: Some(link),
                base: 0,
                deferred: None,
                dropped: false,
                written: 0,
            })),
        }
    }

    /// No link yet: log bytes are dropped until a backup joins (a backup
    /// that went live and may be re-protected).
    pub fn none() -> Self {
        LogLink {
            inner: Arc::new(Mutex::new(LinkState {
                handle: None,
                link: None,
                base: 0,
                deferred: None,
                dropped: true,
                written: 0,
            })),
        }
    }

    fn with<T>(&self, f: impl FnOnce(&mut LinkState) -> T) -> T {
        f(&mut self.inner.lock().unwrap_or_else(|e| e.into_inner()))
    }

    fn view(&self) -> Option<(PrimaryHandle, u64)> {
        self.with(|s| s.handle.clone().map(|h| (h, s.base)))
    }

    /// The log sink writing to this link.
    pub fn sink(&self) -> ChannelSink {
        ChannelSink { link: self.clone() }
    }

    /// Log bytes the backup acknowledged.
    pub fn acked(&self) -> u64 {
        self.view()
            .map_or(0, |(h, base)| h.acked().saturating_sub(base))
    }

    /// Log bytes written so far, including those waiting for a state
    /// transfer: the barrier for everything the guest did up to now.
    pub fn written(&self) -> u64 {
        self.with(|s| s.written)
    }

    /// Wait (up to `timeout`) until a state transfer in progress is sent
    /// and the log goes to the link again, or the backup was given up.
    pub fn wait_transfer(&self, timeout: Duration) -> bool {
        let t0 = Instant::now();
        while t0.elapsed() < timeout {
            if self.with(|s| s.dropped || s.deferred.is_none()) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        false
    }

    /// Log bytes sent.
    pub fn sent(&self) -> u64 {
        self.view()
            .map_or(0, |(h, base)| h.sent().saturating_sub(base))
    }

    /// Wait up to `timeout` for the backup to acknowledge the log up to
    /// `barrier`.
    pub fn wait_acked(&self, barrier: u64, timeout: Duration) -> Result<bool, ChannelError> {
        match self.view() {
            Some((h, base)) => h.wait_acked(base + barrier, timeout),
            None => {
                std::thread::sleep(timeout);
                Ok(false)
            }
        }
    }

    /// The backup's replay position (from acks and heartbeats).
    pub fn backup_applied(&self) -> u64 {
        self.view().map_or(0, |(h, _)| h.backup_applied())
    }

    /// Whether the backup is alive, as far as the link knows.
    pub fn peer_state(&self) -> PeerState {
        self.view().map_or(
            PeerState::Failed {
                reason: "no backup has joined".into(),
            },
            |(h, _)| h.peer_state(),
        )
    }

    /// The primary's position, for heartbeats.
    pub fn set_position(&self, pos: u64) {
        if let Some((h, _)) = self.view() {
            h.set_position(pos)
        }
    }

    /// The link's counters.
    pub fn stats(&self) -> LinkStats {
        self.view().map(|(h, _)| h.stats()).unwrap_or_default()
    }

    /// The backup is gone: drop log bytes from now on.
    pub fn drop_log(&self) {
        self.with(|s| {
            s.dropped = true;
            s.deferred = None;
        })
    }

    /// Whether log bytes are dropped (no backup).
    pub fn is_dropped(&self) -> bool {
        self.with(|s| s.dropped)
    }

    /// Take the link (to end it cleanly).
    pub fn take(&self) -> Option<PrimaryLink> {
        self.with(|s| s.link.take())
    }

    /// A new backup joins on a link whose `handle` is given: log bytes wait
    /// until the first `base` bytes (the state transfer) are sent.
    pub(super) fn begin(&self, handle: PrimaryHandle, base: u64) {
        self.with(|s| {
            s.handle = Some(handle);
            s.base = base;
            s.link = None;
            s.deferred = Some(Vec::new());
            s.dropped = false;
            s.written = 0;
        })
    }

    /// The state transfer was sent on `link`: send the log that waited and
    /// write the log to it from now on. False if the backup was given up
    /// meanwhile.
    pub(super) fn complete(&self, mut link: PrimaryLink) -> bool {
        self.with(|s| {
            if s.dropped {
                return false;
            }
            if let Some(d) = s.deferred.take() {
                if let Err(e) = link.write(&d) {
                    tracing::debug!("log bytes not sent: {e}");
                }
            }
            s.link = Some(link);
            true
        })
    }
}

/// The primary's log sink: log bytes go to the current [`LogLink`]. After
/// the backup is gone (and the claim won) the log is dropped: the VM runs
/// unprotected.
pub struct ChannelSink {
    link: LogLink,
}

impl Write for ChannelSink {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.link.with(|s| {
            if s.dropped {
                return;
            }
            s.written += buf.len() as u64;
            if let Some(d) = s.deferred.as_mut() {
                d.extend_from_slice(buf);
            } else if let Some(l) = s.link.as_mut() {
                // A failed backup is handled at the next boundary
                // (PrimaryHooks): the bytes it will never see are dropped.
                if let Err(e) = l.write(buf) {
                    tracing::debug!("log bytes not sent: {e}");
                }
            }
        });
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// A joining backup's link as a byte sink, for the state transfer;
/// counts the bytes written.
pub(super) struct LinkWriter {
    pub(super) link: PrimaryLink,
    pub(super) written: u64,
}

impl LinkWriter {
    pub(super) fn new(link: PrimaryLink) -> Self {
        LinkWriter { link, written: 0 }
    }
}

impl Write for LinkWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.link.write(buf).map_err(io::Error::other)?;
        self.written += buf.len() as u64;
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ft_log::channel::{BackupLink, BackupListener, ChannelConfig};
    use std::io::Read;

    fn cfg() -> ChannelConfig {
        let mut c = ChannelConfig::new(b"log link test secret".to_vec(), "vm", "hash")
            .with_timing(Duration::from_millis(50), Duration::from_secs(5));
        c.handshake_timeout = Duration::from_secs(5);
        c
    }

    /// A primary's link and its backup, on loopback.
    fn pair() -> (PrimaryLink, BackupLink) {
        let l = BackupListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let t = std::thread::spawn(move || l.accept(&cfg()).unwrap());
        let p = PrimaryLink::connect(addr, &cfg()).unwrap();
        (p, t.join().unwrap())
    }

    /// Read exactly `n` bytes of what the backup received.
    fn read(b: &BackupLink, n: usize) -> Vec<u8> {
        let mut v = vec![0u8; n];
        b.log_reader().read_exact(&mut v).unwrap();
        v
    }

    #[test]
    fn after_a_hand_over_the_log_follows_the_state_and_barriers_count_from_the_log() {
        let (p1, _b1) = pair();
        let link = LogLink::new(p1);
        let mut sink = link.sink();
        sink.write_all(b"old log").unwrap();
        assert_eq!(link.written(), 7);
        // The backup is lost; a new one joins: 5 bytes of "state" first.
        link.drop_log();
        sink.write_all(b"dropped").unwrap();
        let (p2, b2) = pair();
        link.begin(p2.handle(), 5);
        assert_eq!(link.written(), 0, "the new log counts from its first byte");
        sink.write_all(b"new log").unwrap();
        assert_eq!(link.written(), 7);
        // The log waits for the state: nothing of it is sent yet.
        assert!(!link.wait_transfer(Duration::from_millis(50)));
        assert_eq!(link.sent(), 0);
        let mut w = LinkWriter::new(p2);
        w.write_all(b"STATE").unwrap();
        assert_eq!(w.written, 5);
        assert!(link.complete(w.link));
        assert!(link.wait_transfer(Duration::from_millis(50)));
        sink.write_all(b" more").unwrap();
        assert_eq!(read(&b2, 17), b"STATEnew log more");
        // Acks count in log bytes: the state's 5 are not log.
        assert!(link.wait_acked(12, Duration::from_secs(5)).unwrap());
        assert_eq!(link.acked(), 12);
        assert!(!link.wait_acked(13, Duration::from_millis(100)).unwrap());
    }

    #[test]
    fn a_backup_given_up_during_the_transfer_gets_no_log() {
        let (p, b) = pair();
        let link = LogLink::none();
        assert!(link.is_dropped());
        let mut sink = link.sink();
        link.begin(p.handle(), 3);
        sink.write_all(b"log").unwrap();
        link.drop_log();
        assert!(!link.complete(p), "a dropped backup's link is not taken");
        assert!(link.wait_transfer(Duration::from_millis(10)));
        assert!(link.take().is_none());
        let mut v = Vec::new();
        let _ = b.log_reader().read_to_end(&mut v);
        assert!(v.is_empty(), "{v:?}");
    }
}
