//! The primary's end: a queue the vCPU thread fills, a sender thread, a
//! receiver thread that takes acks and watches for silence.

use std::collections::VecDeque;
use std::io::Write;
use std::net::{Shutdown, TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tracing::{debug, info, warn};

use super::handshake;
use super::wire::{io_err, Dir, Inbound, Message, Sealer};
use super::{ChannelConfig, ChannelError, FailureHook, LinkStats, PeerInfo, PeerState, Role};

/// Queued chunks up to this size are appended to rather than added.
const COALESCE: usize = 64 << 10;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum EndPhase {
    Streaming,
    /// `finish` asked for End after this many bytes.
    Requested(u64),
    /// End sent.
    Sent(u64),
    /// The backup acknowledged everything and closed.
    Done,
}

struct State {
    queue: VecDeque<Vec<u8>>,
    failed: Option<String>,
    end: EndPhase,
}

struct Shared {
    state: Mutex<State>,
    changed: Condvar,
    /// Bytes queued so far (the log offset).
    queued: AtomicU64,
    /// Highest `received` acknowledged (written under `state`).
    acked: AtomicU64,
    applied: AtomicU64,
    position: AtomicU64,
    window: AtomicU64,
    silent: AtomicBool,
    closing: AtomicBool,
    stats: Mutex<LinkStats>,
    /// (end offset, sent at) of `Data` messages not yet acknowledged.
    in_flight: Mutex<VecDeque<(u64, Instant)>>,
    socket: TcpStream,
    on_failure: Option<FailureHook>,
    heartbeat: Duration,
    timeout: Duration,
    poll: Duration,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Shared {
    /// Declare the backup failed: once, unless the link is closing or done.
    fn fail(&self, e: ChannelError) {
        let reason = e.to_string();
        {
            let mut st = lock(&self.state);
            if st.failed.is_some()
                || st.end == EndPhase::Done
                || self.closing.load(Ordering::SeqCst)
            {
                return;
            }
            st.failed = Some(reason.clone());
            self.changed.notify_all();
        }
        warn!(%reason, "channel: backup declared failed");
        let _ = self.socket.shutdown(Shutdown::Both);
        if let Some(hook) = &self.on_failure {
            hook();
        }
    }

    fn peer_state(&self) -> PeerState {
        match &lock(&self.state).failed {
            Some(reason) => PeerState::Failed {
                reason: reason.clone(),
            },
            None => PeerState::Alive,
        }
    }

    fn wait_acked(&self, offset: u64, timeout: Duration) -> Result<bool, ChannelError> {
        let deadline = Instant::now() + timeout;
        let mut st = lock(&self.state);
        loop {
            if self.acked.load(Ordering::SeqCst) >= offset {
                return Ok(true);
            }
            if let Some(reason) = &st.failed {
                return Err(ChannelError::PeerFailed {
                    reason: reason.clone(),
                });
            }
            let now = Instant::now();
            if now >= deadline {
                return Ok(false);
            }
            st = self
                .changed
                .wait_timeout(st, deadline - now)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    fn wait_failed(&self, timeout: Duration) -> PeerState {
        let deadline = Instant::now() + timeout;
        let mut st = lock(&self.state);
        loop {
            if let Some(reason) = &st.failed {
                return PeerState::Failed {
                    reason: reason.clone(),
                };
            }
            let now = Instant::now();
            if now >= deadline {
                return PeerState::Alive;
            }
            st = self
                .changed
                .wait_timeout(st, deadline - now)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    fn stats(&self) -> LinkStats {
        let mut s = lock(&self.stats).clone();
        s.bytes_queued = self.queued.load(Ordering::SeqCst);
        s.acked = self.acked.load(Ordering::SeqCst);
        s
    }
}

/// The primary's end of the channel. The caller (the vCPU thread) writes
/// log bytes; two threads of the link do the I/O. Everything but
/// [`write`](Self::write) and [`finish`](Self::finish) is also on
/// [`PrimaryHandle`], for other threads.
pub struct PrimaryLink {
    shared: Arc<Shared>,
    /// The same state, as the view other threads get.
    view: PrimaryHandle,
    sender: Option<JoinHandle<()>>,
    receiver: Option<JoinHandle<()>>,
    peer: PeerInfo,
    /// Largest piece a write queues at once (both sides' message limit).
    max_chunk: usize,
    finish_timeout: Duration,
}

/// A cloneable view of a [`PrimaryLink`] for other threads: positions,
/// acks, the peer's state, the window.
#[derive(Clone)]
pub struct PrimaryHandle {
    shared: Arc<Shared>,
}

impl PrimaryLink {
    /// Dial the backup at `addr`, retrying refused or timed-out attempts
    /// ([`ChannelConfig::connect_timeout`] each) until
    /// [`ChannelConfig::connect_deadline`], then run the handshake. A
    /// handshake failure (wrong token, mismatched configuration) is not
    /// retried.
    pub fn connect(
        addr: impl ToSocketAddrs,
        cfg: &ChannelConfig,
    ) -> Result<PrimaryLink, ChannelError> {
        cfg.validate()?;
        let mut stream = super::join::dial(&addr, cfg, "backup")?;
        let _ = stream.set_nodelay(true);
        let t = Some(cfg.handshake_timeout);
        stream
            .set_read_timeout(t)
            .and_then(|_| stream.set_write_timeout(t))
            .map_err(|e| io_err("setting socket timeouts", e))?;
        let session = handshake::primary(&mut stream, cfg)?;
        Self::start_on(stream, session, cfg)
    }

    /// Start the link's threads on a connection whose handshake is done.
    pub(super) fn start_on(
        stream: TcpStream,
        session: handshake::Session,
        cfg: &ChannelConfig,
    ) -> Result<PrimaryLink, ChannelError> {
        let poll = cfg.poll_interval();
        stream
            .set_read_timeout(Some(poll))
            .and_then(|_| stream.set_write_timeout(None))
            .map_err(|e| io_err("setting socket timeouts", e))?;
        let clone = |s: &TcpStream| s.try_clone().map_err(|e| io_err("cloning the socket", e));
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                queue: VecDeque::new(),
                failed: None,
                end: EndPhase::Streaming,
            }),
            changed: Condvar::new(),
            queued: AtomicU64::new(0),
            acked: AtomicU64::new(0),
            applied: AtomicU64::new(0),
            position: AtomicU64::new(0),
            window: AtomicU64::new(cfg.window),
            silent: AtomicBool::new(false),
            closing: AtomicBool::new(false),
            stats: Mutex::new(LinkStats::default()),
            in_flight: Mutex::new(VecDeque::new()),
            socket: clone(&stream)?,
            on_failure: cfg.on_failure.clone(),
            heartbeat: cfg.heartbeat,
            timeout: cfg.timeout,
            poll,
        });
        let max_chunk = cfg.max_message.min(session.peer_max_message);
        let inbound = Inbound::new(
            clone(&stream)?,
            &session.key,
            Dir::ToPrimary,
            Role::Backup,
            0,
        );
        let sealer = Sealer::new(&session.key, Dir::ToBackup);
        let sh = shared.clone();
        let sender = std::thread::Builder::new()
            .name("ft-chan-send".into())
            .spawn(move || send_loop(sh, stream, sealer, max_chunk))
            .map_err(|e| io_err("starting the sender thread", e))?;
        let sh = shared.clone();
        let receiver = std::thread::Builder::new()
            .name("ft-chan-recv".into())
            .spawn(move || receive_loop(sh, inbound))
            .map_err(|e| io_err("starting the receiver thread", e))?;
        info!(
            backup = ?session.peer.addr,
            vm = %session.peer.vm_name,
            generation = session.peer.generation,
            "channel: connected to the backup"
        );
        Ok(PrimaryLink {
            view: PrimaryHandle {
                shared: shared.clone(),
            },
            shared,
            sender: Some(sender),
            receiver: Some(receiver),
            peer: session.peer,
            max_chunk,
            finish_timeout: cfg.finish_timeout,
        })
    }

    /// Queue log bytes for sending; they follow the bytes queued before.
    /// Never waits for the socket; waits only while the bytes sent and not
    /// yet acknowledged would exceed the window (a write larger than the
    /// window goes out in pieces as acks arrive). Fails with
    /// [`ChannelError::PeerFailed`] once the backup is declared failed
    /// (bytes queued before stay counted in [`sent`](Self::sent)).
    pub fn write(&mut self, bytes: &[u8]) -> Result<(), ChannelError> {
        let sh = &*self.shared;
        let mut rest = bytes;
        let mut stalled: Option<Instant> = None;
        let mut st = lock(&sh.state);
        let result = loop {
            if let Some(reason) = &st.failed {
                break Err(ChannelError::PeerFailed {
                    reason: reason.clone(),
                });
            }
            if st.end != EndPhase::Streaming {
                break Err(ChannelError::LocallyClosed);
            }
            if rest.is_empty() {
                break Ok(());
            }
            let queued = sh.queued.load(Ordering::SeqCst);
            let outstanding = queued - sh.acked.load(Ordering::SeqCst).min(queued);
            let room = sh.window.load(Ordering::SeqCst).saturating_sub(outstanding);
            if room == 0 {
                stalled.get_or_insert_with(Instant::now);
                st = sh
                    .changed
                    .wait_timeout(st, sh.poll)
                    .unwrap_or_else(|p| p.into_inner())
                    .0;
                continue;
            }
            let n = (room.min(rest.len() as u64) as usize).min(self.max_chunk);
            let (now, later) = rest.split_at(n);
            match st.queue.back_mut() {
                Some(last) if last.len() + n <= COALESCE.min(self.max_chunk) => {
                    last.extend_from_slice(now)
                }
                _ => st.queue.push_back(now.to_vec()),
            }
            sh.queued.fetch_add(n as u64, Ordering::SeqCst);
            rest = later;
            sh.changed.notify_all();
        };
        drop(st);
        if let Some(since) = stalled {
            let mut s = lock(&sh.stats);
            s.stalls += 1;
            s.stall_time += since.elapsed();
        }
        result
    }

    /// Send `End` after everything queued, wait (at most
    /// [`ChannelConfig::finish_timeout`]) until the backup acknowledged all
    /// of it and closed its side, then close.
    pub fn finish(mut self) -> Result<(), ChannelError> {
        let sh = self.shared.clone();
        let deadline = Instant::now() + self.finish_timeout;
        let total;
        {
            let mut st = lock(&sh.state);
            if let Some(reason) = &st.failed {
                return Err(ChannelError::PeerFailed {
                    reason: reason.clone(),
                });
            }
            total = sh.queued.load(Ordering::SeqCst);
            st.end = EndPhase::Requested(total);
            sh.changed.notify_all();
            loop {
                if st.end == EndPhase::Done {
                    break;
                }
                if let Some(reason) = &st.failed {
                    return Err(ChannelError::PeerFailed {
                        reason: reason.clone(),
                    });
                }
                let now = Instant::now();
                if now >= deadline {
                    return Err(ChannelError::Timeout {
                        what: format!(
                            "the backup to acknowledge the end of the log at {total} (acknowledged {})",
                            sh.acked.load(Ordering::SeqCst)
                        ),
                        waited: self.finish_timeout,
                    });
                }
                st = sh
                    .changed
                    .wait_timeout(st, deadline - now)
                    .unwrap_or_else(|p| p.into_inner())
                    .0;
            }
        }
        self.close();
        info!(
            bytes = total,
            "channel: log complete, backup acknowledged the end"
        );
        Ok(())
    }

    fn close(&mut self) {
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

    /// A view for other threads.
    pub fn handle(&self) -> PrimaryHandle {
        self.view.clone()
    }

    /// What the backup said about itself.
    pub fn peer(&self) -> &PeerInfo {
        &self.peer
    }
}

/// Positions, acks, the peer's state, the window and statistics are the
/// handle's: one implementation for the link and for other threads.
impl std::ops::Deref for PrimaryLink {
    type Target = PrimaryHandle;

    fn deref(&self) -> &PrimaryHandle {
        &self.view
    }
}

impl Drop for PrimaryLink {
    /// Closing without [`finish`](PrimaryLink::finish): the socket is shut
    /// without `End`, which the backup takes as a failed primary.
    fn drop(&mut self) {
        if self.sender.is_some() || self.receiver.is_some() {
            self.close();
        }
    }
}

impl PrimaryHandle {
    /// See [`PrimaryLink::acked`].
    pub fn acked(&self) -> u64 {
        self.shared.acked.load(Ordering::SeqCst)
    }

    /// See [`PrimaryLink::backup_applied`].
    pub fn backup_applied(&self) -> u64 {
        self.shared.applied.load(Ordering::SeqCst)
    }

    /// See [`PrimaryLink::sent`].
    pub fn sent(&self) -> u64 {
        self.shared.queued.load(Ordering::SeqCst)
    }

    /// See [`PrimaryLink::wait_acked`].
    pub fn wait_acked(&self, offset: u64, timeout: Duration) -> Result<bool, ChannelError> {
        self.shared.wait_acked(offset, timeout)
    }

    /// See [`PrimaryLink::set_window`].
    pub fn set_window(&self, bytes: u64) {
        let _st = lock(&self.shared.state);
        self.shared.window.store(bytes.max(1), Ordering::SeqCst);
        self.shared.changed.notify_all();
    }

    /// See [`PrimaryLink::set_position`].
    pub fn set_position(&self, pos: u64) {
        self.shared.position.store(pos, Ordering::SeqCst);
    }

    /// See [`PrimaryLink::peer_state`].
    pub fn peer_state(&self) -> PeerState {
        self.shared.peer_state()
    }

    /// See [`PrimaryLink::wait_failed`].
    pub fn wait_failed(&self, timeout: Duration) -> PeerState {
        self.shared.wait_failed(timeout)
    }

    /// See [`PrimaryLink::stats`].
    pub fn stats(&self) -> LinkStats {
        self.shared.stats()
    }

    /// See [`PrimaryLink::set_silent`].
    pub fn set_silent(&self, silent: bool) {
        let _st = lock(&self.shared.state);
        self.shared.silent.store(silent, Ordering::SeqCst);
        self.shared.changed.notify_all();
    }
}

enum Job {
    Data(Vec<Vec<u8>>),
    Heartbeat(u64),
    End(u64),
}

/// The sender thread: `Data` as bytes are queued, heartbeats, `End`.
fn send_loop(sh: Arc<Shared>, mut out: TcpStream, mut sealer: Sealer, max_chunk: usize) {
    let hb = sh.heartbeat;
    let mut last_send = Instant::now();
    let mut last_hb = Instant::now();
    let mut last_hb_pos = 0u64;
    let mut offset = 0u64;
    loop {
        let job = {
            let mut st = lock(&sh.state);
            loop {
                if sh.closing.load(Ordering::SeqCst) || st.failed.is_some() {
                    return;
                }
                let silent = sh.silent.load(Ordering::SeqCst);
                if !silent {
                    if !st.queue.is_empty() {
                        let mut take = Vec::new();
                        let mut n = 0;
                        while let Some(c) = st.queue.front() {
                            if n + c.len() > max_chunk {
                                break;
                            }
                            n += c.len();
                            take.push(st.queue.pop_front().expect("front exists"));
                        }
                        break Job::Data(take);
                    }
                    if let EndPhase::Requested(total) = st.end {
                        st.end = EndPhase::Sent(total);
                        break Job::End(total);
                    }
                    let now = Instant::now();
                    let pos = sh.position.load(Ordering::SeqCst);
                    if now - last_send >= hb || (now - last_hb >= hb && pos != last_hb_pos) {
                        break Job::Heartbeat(pos);
                    }
                }
                let now = Instant::now();
                let next = (last_send + hb).min(last_hb + hb);
                let wait = next
                    .saturating_duration_since(now)
                    .clamp(Duration::from_millis(1), sh.poll);
                st = sh
                    .changed
                    .wait_timeout(st, wait)
                    .unwrap_or_else(|p| p.into_inner())
                    .0;
            }
        };
        let (frame, is_end) = match &job {
            Job::Data(chunks) => {
                let n: usize = chunks.iter().map(|c| c.len()).sum();
                let off = offset.to_le_bytes();
                let mut parts: Vec<&[u8]> = Vec::with_capacity(chunks.len() + 1);
                parts.push(&off);
                parts.extend(chunks.iter().map(|c| c.as_slice()));
                let frame = sealer.seal(super::wire::kind::DATA, &parts);
                offset += n as u64;
                (frame, false)
            }
            Job::Heartbeat(pos) => {
                last_hb = Instant::now();
                last_hb_pos = *pos;
                (
                    sealer.message(&Message::Heartbeat { position: *pos }),
                    false,
                )
            }
            Job::End(total) => {
                debug_assert_eq!(*total, offset);
                (sealer.message(&Message::End { total: *total }), true)
            }
        };
        if let Err(e) = out.write_all(&frame) {
            sh.fail(io_err("sending to the backup", e));
            return;
        }
        last_send = Instant::now();
        {
            let mut s = lock(&sh.stats);
            match &job {
                Job::Data(chunks) => {
                    s.bytes_sent += chunks.iter().map(|c| c.len() as u64).sum::<u64>();
                    s.data_messages += 1;
                    lock(&sh.in_flight).push_back((offset, last_send));
                }
                Job::Heartbeat(_) => s.heartbeats_sent += 1,
                Job::End(_) => {}
            }
        }
        if is_end {
            debug!(total = offset, "channel: End sent");
            return;
        }
    }
}

/// The receiver thread: acks and heartbeats from the backup; silence,
/// errors and the end.
fn receive_loop(sh: Arc<Shared>, mut inbound: Inbound) {
    let mut last_heard = Instant::now();
    let timeout = sh.timeout;
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
                peer: Role::Backup,
                waited: now - last_heard,
                timeout,
            });
        }
        Ok(())
    };
    loop {
        match inbound.next(&mut watch) {
            Ok(Some((seq, Message::Ack { received, applied }))) => {
                let queued = sh.queued.load(Ordering::SeqCst);
                let acked = sh.acked.load(Ordering::SeqCst);
                if received > queued || received < acked {
                    sh.fail(ChannelError::Protocol {
                        seq,
                        detail: format!(
                            "ack of {received} bytes, but {acked} were acknowledged before and {queued} sent"
                        ),
                    });
                    return;
                }
                {
                    let _st = lock(&sh.state);
                    sh.acked.store(received, Ordering::SeqCst);
                    sh.applied.store(applied, Ordering::SeqCst);
                    sh.changed.notify_all();
                }
                let now = Instant::now();
                let mut s = lock(&sh.stats);
                s.acks_received += 1;
                let mut fl = lock(&sh.in_flight);
                while let Some(&(end, at)) = fl.front() {
                    if end > received {
                        break;
                    }
                    s.ack_rtt.record(now - at);
                    fl.pop_front();
                }
            }
            Ok(Some((_, Message::Heartbeat { position }))) => {
                sh.applied.store(position, Ordering::SeqCst);
                lock(&sh.stats).heartbeats_received += 1;
            }
            Ok(Some((seq, m))) => {
                sh.fail(ChannelError::Protocol {
                    seq,
                    detail: format!("the backup sent a {} message", m.name()),
                });
                return;
            }
            Ok(None) => {
                let mut st = lock(&sh.state);
                if let EndPhase::Sent(total) = st.end {
                    if sh.acked.load(Ordering::SeqCst) == total {
                        st.end = EndPhase::Done;
                        sh.changed.notify_all();
                        return;
                    }
                }
                drop(st);
                sh.fail(ChannelError::Closed {
                    peer: Role::Backup,
                    detail: String::new(),
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
