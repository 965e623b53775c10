//! The backup's end: a receiver thread that verifies and buffers the log
//! (and stops reading while the buffer is full), a sender thread for acks
//! and heartbeats, and the [`LogReader`] the replayer reads.

use std::collections::VecDeque;
use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tracing::{debug, info, warn};

use super::handshake;
use super::wire::{io_err, Dir, Inbound, Message, Sealer};
use super::{BackupStats, ChannelConfig, ChannelError, EndState, FailureHook, PeerInfo, Role};

struct State {
    buf: VecDeque<Vec<u8>>,
    /// Bytes of `buf[0]` already read.
    front: usize,
    buffered: usize,
    /// Log bytes received and verified.
    received: u64,
    end: Option<EndState>,
    receiver_waiting: bool,
}

struct Shared {
    state: Mutex<State>,
    changed: Condvar,
    applied: AtomicU64,
    primary_position: AtomicU64,
    silent: AtomicBool,
    closing: AtomicBool,
    stats: Mutex<BackupStats>,
    socket: TcpStream,
    on_failure: Option<FailureHook>,
    heartbeat: Duration,
    timeout: Duration,
    poll: Duration,
    limit: usize,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Shared {
    /// Declare the primary failed: once, unless the stream already ended
    /// or the link is closing.
    fn fail(&self, e: ChannelError) {
        let reason = e.to_string();
        {
            let mut st = lock(&self.state);
            if st.end.is_some() || self.closing.load(Ordering::SeqCst) {
                return;
            }
            st.end = Some(EndState::PrimaryFailed {
                reason: reason.clone(),
            });
            self.changed.notify_all();
        }
        warn!(%reason, "channel: primary declared failed");
        let _ = self.socket.shutdown(Shutdown::Both);
        if let Some(hook) = &self.on_failure {
            hook();
        }
    }

    fn wait<'a>(&self, st: MutexGuard<'a, State>, d: Duration) -> MutexGuard<'a, State> {
        self.changed
            .wait_timeout(st, d)
            .unwrap_or_else(|p| p.into_inner())
            .0
    }
}

/// Where the backup waits for its primary.
pub struct BackupListener {
    listener: TcpListener,
}

impl BackupListener {
    /// Listen on `addr` (port 0: any free port, see
    /// [`local_addr`](Self::local_addr)).
    pub fn bind(addr: impl ToSocketAddrs) -> Result<BackupListener, ChannelError> {
        let listener =
            TcpListener::bind(addr).map_err(|e| io_err("listening for the primary", e))?;
        Ok(BackupListener { listener })
    }

    /// The socket, for another use of the same address.
    pub(super) fn into_inner(self) -> TcpListener {
        self.listener
    }

    /// The address listened on.
    pub fn local_addr(&self) -> Result<SocketAddr, ChannelError> {
        self.listener
            .local_addr()
            .map_err(|e| io_err("reading the listening address", e))
    }

    /// Wait for a primary and run the handshake with it. A primary that
    /// fails the handshake (wrong token, other configuration, not a vmft
    /// channel at all) is refused with the error; call again to wait for
    /// the next.
    pub fn accept(&self, cfg: &ChannelConfig) -> Result<BackupLink, ChannelError> {
        cfg.validate()?;
        let (stream, from) = self
            .listener
            .accept()
            .map_err(|e| io_err("accepting the primary's connection", e))?;
        Self::handshake(stream, from, cfg)
    }

    /// [`accept`](Self::accept), giving up with `Ok(None)` when no primary
    /// connected within `timeout` (the handshake itself is bounded by
    /// [`ChannelConfig::handshake_timeout`]).
    pub fn accept_timeout(
        &self,
        cfg: &ChannelConfig,
        timeout: Duration,
    ) -> Result<Option<BackupLink>, ChannelError> {
        cfg.validate()?;
        let deadline = Instant::now() + timeout;
        let blocking = |b: bool| {
            self.listener
                .set_nonblocking(!b)
                .map_err(|e| io_err("setting the listener's mode", e))
        };
        blocking(false)?;
        let accepted = loop {
            match self.listener.accept() {
                Ok(c) => break Ok(Some(c)),
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    let now = Instant::now();
                    if now >= deadline {
                        break Ok(None);
                    }
                    std::thread::sleep((deadline - now).min(Duration::from_millis(20)));
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => break Err(io_err("accepting the primary's connection", e)),
            }
        };
        blocking(true)?;
        match accepted? {
            None => Ok(None),
            Some((stream, from)) => {
                stream
                    .set_nonblocking(false)
                    .map_err(|e| io_err("setting the socket's mode", e))?;
                Self::handshake(stream, from, cfg).map(Some)
            }
        }
    }

    fn handshake(
        mut stream: TcpStream,
        from: SocketAddr,
        cfg: &ChannelConfig,
    ) -> Result<BackupLink, ChannelError> {
        debug!(%from, "channel: connection, handshaking");
        let _ = stream.set_nodelay(true);
        let t = Some(cfg.handshake_timeout);
        stream
            .set_read_timeout(t)
            .and_then(|_| stream.set_write_timeout(t))
            .map_err(|e| io_err("setting socket timeouts", e))?;
        let session = match handshake::backup(&mut stream, cfg) {
            Ok(s) => s,
            Err(e) => {
                warn!(%from, error = %e, "channel: primary refused");
                return Err(e);
            }
        };
        BackupLink::start_on(stream, session, cfg)
    }
}

/// The backup's end of the channel.
pub struct BackupLink {
    shared: Arc<Shared>,
    sender: Option<JoinHandle<()>>,
    receiver: Option<JoinHandle<()>>,
    peer: PeerInfo,
}

impl BackupLink {
    /// Start the link's threads on a connection whose handshake is done.
    pub(super) fn start_on(
        stream: TcpStream,
        session: handshake::Session,
        cfg: &ChannelConfig,
    ) -> Result<BackupLink, ChannelError> {
        let poll = cfg.poll_interval();
        stream
            .set_read_timeout(Some(poll))
            .and_then(|_| stream.set_write_timeout(None))
            .map_err(|e| io_err("setting socket timeouts", e))?;
        let clone = |s: &TcpStream| s.try_clone().map_err(|e| io_err("cloning the socket", e));
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                buf: VecDeque::new(),
                front: 0,
                buffered: 0,
                received: 0,
                end: None,
                receiver_waiting: false,
            }),
            changed: Condvar::new(),
            applied: AtomicU64::new(0),
            primary_position: AtomicU64::new(0),
            silent: AtomicBool::new(false),
            closing: AtomicBool::new(false),
            stats: Mutex::new(BackupStats::default()),
            socket: clone(&stream)?,
            on_failure: cfg.on_failure.clone(),
            heartbeat: cfg.heartbeat,
            timeout: cfg.timeout,
            poll,
            limit: cfg.backup_buffer,
        });
        let inbound = Inbound::new(
            clone(&stream)?,
            &session.key,
            Dir::ToBackup,
            Role::Primary,
            cfg.max_message,
        );
        let sealer = Sealer::new(&session.key, Dir::ToPrimary);
        let sh = shared.clone();
        let sender = std::thread::Builder::new()
            .name("ft-chan-send".into())
            .spawn(move || send_loop(sh, stream, sealer))
            .map_err(|e| io_err("starting the sender thread", e))?;
        let sh = shared.clone();
        let receiver = std::thread::Builder::new()
            .name("ft-chan-recv".into())
            .spawn(move || receive_loop(sh, inbound))
            .map_err(|e| io_err("starting the receiver thread", e))?;
        info!(
            primary = ?session.peer.addr,
            vm = %session.peer.vm_name,
            generation = session.peer.generation,
            "channel: primary connected"
        );
        Ok(BackupLink {
            shared,
            sender: Some(sender),
            receiver: Some(receiver),
            peer: session.peer,
        })
    }

    /// The log as it arrives, for the replayer: a blocking reader that
    /// returns verified bytes in order and `Ok(0)` once the stream ended
    /// (cleanly or not: see [`end_state`](Self::end_state)) and every
    /// byte received was read. Readers share one stream.
    pub fn log_reader(&self) -> LogReader {
        LogReader {
            shared: self.shared.clone(),
        }
    }

    /// `None` while the stream runs; then how it ended.
    pub fn end_state(&self) -> Option<EndState> {
        lock(&self.shared.state).end.clone()
    }

    /// Wait until the stream ends or `timeout` passes.
    pub fn wait_end(&self, timeout: Duration) -> Option<EndState> {
        let deadline = Instant::now() + timeout;
        let mut st = lock(&self.shared.state);
        loop {
            if st.end.is_some() {
                return st.end.clone();
            }
            let now = Instant::now();
            if now >= deadline {
                return None;
            }
            st = self.shared.wait(st, deadline - now);
        }
    }

    /// The replayer's position (exits applied), carried in acks and
    /// heartbeats.
    pub fn set_applied(&self, pos: u64) {
        self.shared.applied.store(pos, Ordering::SeqCst);
    }

    /// The primary's position from its latest heartbeat.
    pub fn primary_position(&self) -> u64 {
        self.shared.primary_position.load(Ordering::SeqCst)
    }

    /// Log bytes received and verified (what the acks say).
    pub fn received(&self) -> u64 {
        lock(&self.shared.state).received
    }

    /// What the primary said about itself (VM name, generation,
    /// configuration hash, hello blob).
    pub fn peer(&self) -> &PeerInfo {
        &self.peer
    }

    /// The generation the primary chose for this pair.
    pub fn generation(&self) -> u64 {
        self.peer.generation
    }

    /// Counters.
    pub fn stats(&self) -> BackupStats {
        let mut s = lock(&self.shared.stats).clone();
        s.bytes_received = lock(&self.shared.state).received;
        s
    }

    /// Fault injection (tests, drills): while set, the link sends nothing
    /// (no acks, no heartbeats), as a paused process would. Receiving goes
    /// on.
    pub fn set_silent(&self, silent: bool) {
        let _st = lock(&self.shared.state);
        self.shared.silent.store(silent, Ordering::SeqCst);
        self.shared.changed.notify_all();
    }
}

impl Drop for BackupLink {
    /// Close without a word (after a takeover the old primary is told
    /// nothing). Readers then see the end of the stream.
    fn drop(&mut self) {
        self.shared.closing.store(true, Ordering::SeqCst);
        {
            let _st = lock(&self.shared.state);
            self.shared.changed.notify_all();
        }
        let _ = self.shared.socket.shutdown(Shutdown::Both);
        for t in [self.sender.take(), self.receiver.take()]
            .into_iter()
            .flatten()
        {
            let _ = t.join();
        }
    }
}

/// The received log as a blocking [`Read`]: verified bytes in order; `Ok(0)`
/// after the end (clean or failed) once everything received was read, or
/// once the link was dropped.
pub struct LogReader {
    shared: Arc<Shared>,
}

impl Read for LogReader {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        if out.is_empty() {
            return Ok(0);
        }
        let sh = &*self.shared;
        let mut st = lock(&sh.state);
        loop {
            if st.buffered > 0 {
                let mut n = 0;
                while n < out.len() {
                    let front = st.front;
                    let Some(chunk) = st.buf.front() else { break };
                    let take = (chunk.len() - front).min(out.len() - n);
                    out[n..n + take].copy_from_slice(&chunk[front..front + take]);
                    n += take;
                    if front + take == chunk.len() {
                        st.buf.pop_front();
                        st.front = 0;
                    } else {
                        st.front = front + take;
                    }
                }
                st.buffered -= n;
                if st.receiver_waiting && st.buffered < sh.limit {
                    sh.changed.notify_all();
                }
                drop(st);
                lock(&sh.stats).bytes_delivered += n as u64;
                return Ok(n);
            }
            if st.end.is_some() || sh.closing.load(Ordering::SeqCst) {
                return Ok(0);
            }
            st = sh.wait(st, sh.poll.max(Duration::from_millis(50)));
        }
    }
}

/// The receiver thread: verify, buffer, note heartbeats and the end;
/// silence is judged only while reading.
fn receive_loop(sh: Arc<Shared>, mut inbound: Inbound) {
    let timeout = sh.timeout;
    let mut last_heard = Instant::now();
    loop {
        // Back-pressure: do not read while the buffer is full.
        {
            let mut st = lock(&sh.state);
            if st.buffered >= sh.limit {
                let since = Instant::now();
                debug!(buffered = st.buffered, "channel: buffer full, not reading");
                while st.buffered >= sh.limit
                    && st.end.is_none()
                    && !sh.closing.load(Ordering::SeqCst)
                {
                    st.receiver_waiting = true;
                    st = sh.wait(st, sh.poll);
                }
                st.receiver_waiting = false;
                drop(st);
                let mut s = lock(&sh.stats);
                s.buffer_full += 1;
                s.buffer_full_time += since.elapsed();
                // The primary could not be heard while we did not listen.
                last_heard = Instant::now();
            }
        }
        let closing = &sh.closing;
        let mut watch = |progress: bool| {
            if closing.load(Ordering::SeqCst) {
                return Err(ChannelError::LocallyClosed);
            }
            let now = Instant::now();
            if progress {
                last_heard = now;
            } else if now - last_heard >= timeout {
                return Err(ChannelError::Silence {
                    peer: Role::Primary,
                    waited: now - last_heard,
                    timeout,
                });
            }
            Ok(())
        };
        match inbound.next(&mut watch) {
            Ok(Some((seq, Message::Data { offset, bytes }))) => {
                let mut st = lock(&sh.state);
                if offset != st.received {
                    let received = st.received;
                    drop(st);
                    sh.fail(ChannelError::Protocol {
                        seq,
                        detail: format!("data at offset {offset}, expected {received}"),
                    });
                    return;
                }
                let n = bytes.len();
                st.received += n as u64;
                if n > 0 {
                    st.buf.push_back(bytes);
                    st.buffered += n;
                }
                let buffered = st.buffered as u64;
                sh.changed.notify_all();
                drop(st);
                let mut s = lock(&sh.stats);
                s.data_messages += 1;
                s.buffered_peak = s.buffered_peak.max(buffered);
            }
            Ok(Some((_, Message::Heartbeat { position }))) => {
                sh.primary_position.store(position, Ordering::SeqCst);
                lock(&sh.stats).heartbeats_received += 1;
            }
            Ok(Some((seq, Message::End { total }))) => {
                let mut st = lock(&sh.state);
                if total != st.received {
                    let received = st.received;
                    drop(st);
                    sh.fail(ChannelError::Protocol {
                        seq,
                        detail: format!(
                            "end of the log at {total}, but {received} bytes were received"
                        ),
                    });
                    return;
                }
                if st.end.is_none() {
                    st.end = Some(EndState::Clean);
                }
                sh.changed.notify_all();
                info!(bytes = total, "channel: the primary ended the log cleanly");
                return;
            }
            Ok(Some((seq, m))) => {
                sh.fail(ChannelError::Protocol {
                    seq,
                    detail: format!("the primary sent an {} message", m.name()),
                });
                return;
            }
            Ok(None) => {
                sh.fail(ChannelError::Closed {
                    peer: Role::Primary,
                    detail: " without ending the log".into(),
                });
                return;
            }
            Err(e) => {
                if !sh.closing.load(Ordering::SeqCst) {
                    sh.fail(e);
                }
                return;
            }
        }
    }
}

enum Job {
    Ack(u64),
    Heartbeat,
    Final(u64),
}

/// The sender thread: an ack whenever more was received, heartbeats when
/// idle, the final ack after `End`, then FIN.
fn send_loop(sh: Arc<Shared>, mut out: TcpStream, mut sealer: Sealer) {
    let hb = sh.heartbeat;
    let mut acked = 0u64;
    let mut last_send = Instant::now();
    loop {
        let job = {
            let mut st = lock(&sh.state);
            loop {
                if sh.closing.load(Ordering::SeqCst) {
                    return;
                }
                match st.end {
                    Some(EndState::PrimaryFailed { .. }) => return,
                    Some(EndState::Clean) => break Job::Final(st.received),
                    None => {}
                }
                if !sh.silent.load(Ordering::SeqCst) {
                    if st.received > acked {
                        break Job::Ack(st.received);
                    }
                    if last_send.elapsed() >= hb {
                        break Job::Heartbeat;
                    }
                }
                let wait = (last_send + hb)
                    .saturating_duration_since(Instant::now())
                    .clamp(Duration::from_millis(1), sh.poll);
                st = sh.wait(st, wait);
            }
        };
        let applied = sh.applied.load(Ordering::SeqCst);
        let frame = match job {
            Job::Ack(received) | Job::Final(received) => {
                acked = received;
                sealer.message(&Message::Ack { received, applied })
            }
            Job::Heartbeat => sealer.message(&Message::Heartbeat { position: applied }),
        };
        if let Err(e) = out.write_all(&frame) {
            sh.fail(io_err("sending to the primary", e));
            return;
        }
        last_send = Instant::now();
        {
            let mut s = lock(&sh.stats);
            match job {
                Job::Ack(_) | Job::Final(_) => s.acks_sent += 1,
                Job::Heartbeat => s.heartbeats_sent += 1,
            }
        }
        if let Job::Final(_) = job {
            let _ = out.shutdown(Shutdown::Write);
            return;
        }
    }
}
