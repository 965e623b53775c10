//! A side's link to the console endpoint.
//!
//! The vCPU thread calls [`ConsoleLink::release`], [`ConsoleLink::take_input`]
//! and the others; none of them touches the network. A manager thread
//! owns the connection: it (re)connects, says hello, sends what was
//! queued; a receiver thread takes acks, input and the stop request.
//!
//! Released output is kept until the console acknowledges it (bounded by
//! [`LinkOptions::max_unacked_bytes`]): if the connection breaks (the
//! console restarts, the network blips) the link reconnects and sends
//! everything not acknowledged again; the console drops what it already
//! printed. When the buffer is full, `release` says so once and waits:
//! back-pressure on the guest, never a silent drop.

use std::collections::VecDeque;
use std::io::BufReader;
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tracing::{debug, info, warn};

use super::protocol::{
    side_handshake, FrameReader, FrameWriter, Hello, ProtocolError, Role, ToConsole, ToSide,
    MAX_OUTPUT_CHUNK,
};
use super::ConsoleError;

/// How a link behaves.
#[derive(Debug, Clone)]
pub struct LinkOptions {
    /// How long [`ConsoleLink::connect`] keeps trying to reach the console.
    pub connect_deadline: Duration,
    /// Bound on released output not yet acknowledged by the console
    /// (at least [`MAX_OUTPUT_CHUNK`]).
    pub max_unacked_bytes: usize,
    /// How long [`ConsoleLink::done`] waits for the console to take `Done`.
    pub done_timeout: Duration,
    /// A console that does not take a frame within this long is
    /// reconnected.
    pub write_timeout: Duration,
    /// Longest pause between reconnection attempts.
    pub max_backoff: Duration,
}

impl Default for LinkOptions {
    fn default() -> Self {
        LinkOptions {
            connect_deadline: Duration::from_secs(10),
            max_unacked_bytes: 1 << 20,
            done_timeout: Duration::from_secs(10),
            write_timeout: Duration::from_secs(10),
            max_backoff: Duration::from_secs(2),
        }
    }
}

/// Bound on input received but not yet taken by the vCPU (the console
/// holds at most its own bound unconfirmed, so this is only a guard
/// against a misbehaving console).
const MAX_INPUT_HELD: usize = 4 << 20;
/// Time a connection has to complete the handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// A connection that lasted this long resets the reconnection backoff.
const STABLE: Duration = Duration::from_secs(1);
/// Time one TCP connect may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);

type Callback = Box<dyn Fn() + Send + Sync>;

struct State {
    /// What this side says in Hello (generation, role, claim as now).
    hello: Hello,
    /// Released output not yet acknowledged, in offset order.
    chunks: VecDeque<(u64, Vec<u8>)>,
    buffered: usize,
    released_end: Option<u64>,
    acked: Option<u64>,
    /// On the current connection, everything below this offset was sent.
    send_from: u64,
    controls: VecDeque<ToConsole>,
    done: Option<ToConsole>,
    done_sent: bool,
    input: VecDeque<(u64, Vec<u8>)>,
    input_bytes: usize,
    expected_seq: u64,
    /// Bytes of the chunk numbered `.0` that the guest already has (a
    /// backup going live resumes mid-chunk): dropped when it arrives.
    skip: Option<(u64, u64)>,
    serial: u64,
    broken: bool,
    connected: bool,
    stream: Option<TcpStream>,
    shutdown: bool,
    /// The buffer is full (said once per episode).
    full: bool,
    /// Bound on `buffered`.
    cap: usize,
    /// Why the console last refused this side.
    dropped: Option<String>,
}

impl State {
    fn new(hello: Hello, cap: usize) -> State {
        State {
            send_from: 0,
            expected_seq: hello.input_resume_seq.max(1),
            skip: None,
            hello,
            chunks: VecDeque::new(),
            buffered: 0,
            released_end: None,
            acked: None,
            controls: VecDeque::new(),
            done: None,
            done_sent: false,
            input: VecDeque::new(),
            input_bytes: 0,
            serial: 0,
            broken: false,
            connected: false,
            stream: None,
            shutdown: false,
            full: false,
            cap,
            dropped: None,
        }
    }

    /// Below this offset, output was released already or printed.
    fn floor(&self) -> Option<u64> {
        match (self.released_end, self.acked) {
            (Some(a), Some(b)) => Some(a.max(b)),
            (a, b) => a.or(b),
        }
    }

    /// Keep released bytes (the caller made room).
    fn push(&mut self, offset: u64, bytes: &[u8]) {
        self.chunks.push_back((offset, bytes.to_vec()));
        self.buffered += bytes.len();
        self.released_end = Some(offset + bytes.len() as u64);
    }

    /// The console printed everything below `upto`.
    fn ack(&mut self, upto: u64) {
        if self.acked.is_some_and(|a| a >= upto) {
            return;
        }
        self.acked = Some(upto);
        while let Some((off, bytes)) = self.chunks.front_mut() {
            let end = *off + bytes.len() as u64;
            if end <= upto {
                self.buffered -= bytes.len();
                self.chunks.pop_front();
            } else {
                if *off < upto {
                    let cut = (upto - *off) as usize;
                    bytes.drain(..cut);
                    *off = upto;
                    self.buffered -= cut;
                }
                break;
            }
        }
        self.send_from = self.send_from.max(upto);
        if self.full && self.buffered * 2 <= self.cap {
            self.full = false;
            info!("console output flows again");
        }
    }

    /// The next piece of output to send on this connection.
    fn next_output(&mut self) -> Option<(u64, Vec<u8>)> {
        let from = self.send_from;
        let (off, bytes) = self
            .chunks
            .iter()
            .find(|(off, b)| off + b.len() as u64 > from)?;
        let start = from.max(*off);
        let skip = (start - off) as usize;
        let piece = bytes[skip..bytes.len().min(skip + MAX_OUTPUT_CHUNK)].to_vec();
        self.send_from = start + piece.len() as u64;
        Some((start, piece))
    }

    /// The guest has every chunk before `seq` and the first `skip` bytes
    /// of chunk `seq`: expect `seq` next and drop what the guest has, from
    /// what is queued now or from the chunk when it comes.
    fn resume_input(&mut self, seq: u64, skip: u64) {
        let seq = seq.max(1);
        self.expected_seq = seq;
        self.skip = (skip > 0).then_some((seq, skip));
        let dropped: usize = self
            .input
            .iter()
            .filter(|(s, _)| *s < seq)
            .map(|(_, b)| b.len())
            .sum();
        self.input.retain(|(s, _)| *s >= seq);
        self.input_bytes -= dropped;
        if let Some((_, bytes)) = self.input.front_mut().filter(|(s, _)| *s == seq) {
            let cut = (skip as usize).min(bytes.len());
            bytes.drain(..cut);
            self.input_bytes -= cut;
            self.skip = None;
        }
        if self.input.front().is_some_and(|(_, b)| b.is_empty()) {
            self.input.pop_front();
        }
    }

    /// A typed chunk from the console: queue what the guest does not have
    /// yet. Returns whether anything was queued.
    fn accept_input(&mut self, seq: u64, mut bytes: Vec<u8>) -> bool {
        if seq < self.expected_seq {
            debug!(seq, "console input already received: skipped");
            return false;
        }
        if seq > self.expected_seq {
            warn!(
                expected = self.expected_seq,
                got = seq,
                "console input seqs skip ahead"
            );
        }
        self.expected_seq = seq + 1;
        if let Some((at, skip)) = self.skip.take() {
            if at == seq {
                bytes.drain(..(skip as usize).min(bytes.len()));
                debug!(seq, skip, "console input: the guest has its start");
            }
        }
        if bytes.is_empty() {
            return false;
        }
        self.input_bytes += bytes.len();
        self.input.push_back((seq, bytes));
        true
    }

    fn current_hello(&self) -> Hello {
        let next_offset = self
            .chunks
            .iter()
            .find(|(off, b)| off + b.len() as u64 > self.send_from)
            .map(|(off, _)| self.send_from.max(*off))
            .or(self.released_end)
            .unwrap_or(self.hello.next_offset);
        Hello {
            next_offset,
            input_resume_seq: self.expected_seq,
            ..self.hello.clone()
        }
    }
}

struct Shared {
    addr: String,
    token: Vec<u8>,
    opts: LinkOptions,
    state: Mutex<State>,
    cv: Condvar,
    stop: AtomicBool,
    on_stop: Mutex<Option<Callback>>,
    on_input: Mutex<Option<Callback>>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn wait<'a>(&self, g: MutexGuard<'a, State>) -> MutexGuard<'a, State> {
        self.cv.wait(g).unwrap_or_else(|e| e.into_inner())
    }

    fn wait_timeout<'a>(&self, g: MutexGuard<'a, State>, d: Duration) -> MutexGuard<'a, State> {
        self.cv
            .wait_timeout(g, d)
            .map(|(g, _)| g)
            .unwrap_or_else(|e| e.into_inner().0)
    }
}

/// One established, authenticated connection.
struct Conn {
    stream: TcpStream,
    reader: FrameReader<BufReader<TcpStream>>,
    writer: FrameWriter<TcpStream>,
    printed_upto: Option<u64>,
}

/// A side's link to the console. Dropping it closes the connection
/// (output not yet sent is abandoned: use [`ConsoleLink::done`] to end
/// cleanly).
pub struct ConsoleLink {
    shared: Arc<Shared>,
    manager: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for ConsoleLink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConsoleLink")
            .field("addr", &self.shared.addr)
            .finish_non_exhaustive()
    }
}

impl ConsoleLink {
    /// Connect to the console at `addr` (retrying until the default
    /// deadline, [`LinkOptions::connect_deadline`]) and say `hello`.
    pub fn connect(addr: &str, token: &[u8], hello: Hello) -> Result<ConsoleLink, ConsoleError> {
        Self::connect_with(addr, token, hello, LinkOptions::default())
    }

    /// [`ConsoleLink::connect`] with options.
    pub fn connect_with(
        addr: &str,
        token: &[u8],
        hello: Hello,
        mut opts: LinkOptions,
    ) -> Result<ConsoleLink, ConsoleError> {
        if token.is_empty() {
            return Err(ConsoleError::EmptyToken);
        }
        opts.max_unacked_bytes = opts.max_unacked_bytes.max(MAX_OUTPUT_CHUNK);
        let shared = Arc::new(Shared {
            addr: addr.to_string(),
            token: token.to_vec(),
            state: Mutex::new(State::new(hello, opts.max_unacked_bytes)),
            opts,
            cv: Condvar::new(),
            stop: AtomicBool::new(false),
            on_stop: Mutex::new(None),
            on_input: Mutex::new(None),
        });

        let started = Instant::now();
        let deadline = started + shared.opts.connect_deadline;
        let first = loop {
            match connect_once(&shared) {
                Ok(c) => break c,
                Err(e) if permanent(&e) => {
                    return Err(ConsoleError::Handshake {
                        addr: addr.to_string(),
                        source: e,
                    })
                }
                Err(e) => {
                    if Instant::now() >= deadline {
                        return Err(ConsoleError::Unreachable {
                            addr: addr.to_string(),
                            waited: started.elapsed(),
                            last: e.to_string(),
                        });
                    }
                    debug!("console not reachable yet: {e}");
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
        };
        if let Some(p) = first.printed_upto {
            shared.lock().ack(p);
        }
        info!(addr, "connected to the console");
        let s = shared.clone();
        let manager = std::thread::Builder::new()
            .name("vmft-console-link".into())
            .spawn(move || manage(s, first))?;
        Ok(ConsoleLink {
            shared,
            manager: Some(manager),
        })
    }

    /// Queue guest output at `offset` for the console. Never waits for
    /// the network; waits only when the unacknowledged buffer is full
    /// (said once, in the log). Bytes below what was released before, or
    /// below what the console has printed, are skipped (they are the same
    /// bytes).
    pub fn release(&self, offset: u64, bytes: &[u8]) {
        if bytes.is_empty() {
            return;
        }
        let mut st = self.shared.lock();
        let (mut offset, bytes) = match st.floor() {
            Some(end) if offset < end => {
                let skip = end - offset;
                if skip >= bytes.len() as u64 {
                    return;
                }
                (end, &bytes[skip as usize..])
            }
            _ => (offset, bytes),
        };
        let cap = self.shared.opts.max_unacked_bytes;
        for piece in bytes.chunks(MAX_OUTPUT_CHUNK) {
            while st.buffered + piece.len() > cap && !st.shutdown {
                if !st.full {
                    st.full = true;
                    warn!(
                        buffered = st.buffered,
                        "console output buffer full (not yet acknowledged by the console): \
                         the guest waits"
                    );
                }
                st = self.shared.wait(st);
            }
            if st.shutdown {
                return;
            }
            st.push(offset, piece);
            offset += piece.len() as u64;
            self.shared.cv.notify_all();
        }
    }

    /// This side won the claim for `generation`: the console follows only
    /// it from now on.
    pub fn announce_claim(&self, generation: u64) {
        let mut st = self.shared.lock();
        st.hello.generation = generation;
        st.hello.won_claim = true;
        st.hello.role = Role::Live;
        st.controls.push_back(ToConsole::Claimed { generation });
        self.shared.cv.notify_all();
    }

    /// The guest has had every typed chunk before `seq` and the first
    /// `skip` bytes of chunk `seq` (a backup going live learns it from the
    /// log): tell the console to send input from `seq` on, and drop those
    /// bytes when they come again. Call before [`Self::announce_claim`].
    pub fn resume_input(&self, seq: u64, skip: u64) {
        let mut st = self.shared.lock();
        st.resume_input(seq, skip);
        let h = st.current_hello();
        st.controls.push_back(ToConsole::Hello(h));
        self.shared.cv.notify_all();
    }

    /// This side now belongs to a new pair (re-protection): say hello
    /// again with its generation and role.
    pub fn rehello(&self, generation: u64, role: Role) {
        let mut st = self.shared.lock();
        st.hello.generation = generation;
        st.hello.role = role;
        st.hello.won_claim = false;
        st.controls
            .retain(|c| !matches!(c, ToConsole::Claimed { .. }));
        let h = st.current_hello();
        st.controls.push_back(ToConsole::Hello(h));
        self.shared.cv.notify_all();
    }

    /// Typed input received so far, with seqs, in order; never waits.
    /// Seqs already received once (a console re-sends after a failover)
    /// are not returned again.
    pub fn take_input(&self) -> Vec<(u64, Vec<u8>)> {
        let mut st = self.shared.lock();
        st.input_bytes = 0;
        st.input.drain(..).collect()
    }

    /// The next input seq this side expects.
    pub fn next_input_seq(&self) -> u64 {
        self.shared.lock().expected_seq
    }

    /// Call `f` (from the receiver thread) whenever input arrives: kick
    /// the vCPU.
    pub fn on_input(&self, f: impl Fn() + Send + Sync + 'static) {
        *self
            .shared
            .on_input
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = Some(Box::new(f));
    }

    /// The backup has logged every input up to `upto_seq`: the console
    /// may forget them.
    pub fn confirm_input(&self, upto_seq: u64) {
        let mut st = self.shared.lock();
        for c in st.controls.iter_mut() {
            if let ToConsole::InputLogged { upto_seq: u } = c {
                *u = (*u).max(upto_seq);
                self.shared.cv.notify_all();
                return;
            }
        }
        st.controls.push_back(ToConsole::InputLogged { upto_seq });
        self.shared.cv.notify_all();
    }

    /// The user asked (at the console) to stop the pair.
    pub fn stop_requested(&self) -> bool {
        self.shared.stop.load(Ordering::Acquire)
    }

    /// Call `f` (once, from the receiver thread) when the console asks to
    /// stop the pair; at once if it already has.
    pub fn on_stop(&self, f: impl Fn() + Send + Sync + 'static) {
        let mut slot = self
            .shared
            .on_stop
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if self.stop_requested() {
            drop(slot);
            f();
        } else {
            *slot = Some(Box::new(f));
        }
    }

    /// The offset after the last byte the console has printed (as far as
    /// this side knows).
    pub fn acked_offset(&self) -> Option<u64> {
        self.shared.lock().acked
    }

    /// Released bytes the console has not acknowledged yet.
    pub fn unacked_bytes(&self) -> usize {
        self.shared.lock().buffered
    }

    /// Why the console last refused this side after the handshake (it
    /// belongs to another VM, or broke the protocol); the link keeps
    /// retrying, slowly.
    pub fn refused_reason(&self) -> Option<String> {
        self.shared.lock().dropped.clone()
    }

    /// A connection to the console is up now.
    pub fn is_connected(&self) -> bool {
        self.shared.lock().connected
    }

    /// Wait until the console has printed everything below `offset`, or
    /// `timeout`; returns whether it has.
    pub fn wait_acked(&self, offset: u64, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut st = self.shared.lock();
        loop {
            if st.acked.is_some_and(|a| a >= offset) {
                return true;
            }
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            st = self.shared.wait_timeout(st, deadline - now);
        }
    }

    /// The VM has ended: send what is left and then `Done`, so that the
    /// console prints the rest and exits with `exit_status`. Waits up to
    /// [`LinkOptions::done_timeout`].
    pub fn done(self, reason: &str, exit_status: i32) -> Result<(), ConsoleError> {
        let timeout = self.shared.opts.done_timeout;
        let deadline = Instant::now() + timeout;
        let mut st = self.shared.lock();
        st.done = Some(ToConsole::Done {
            reason: reason.to_string(),
            exit_status,
        });
        self.shared.cv.notify_all();
        // Sent, and then the console closes the connection as it ends.
        loop {
            if st.done_sent && !st.connected {
                return Ok(());
            }
            let now = Instant::now();
            if now >= deadline {
                return if st.done_sent {
                    Ok(())
                } else {
                    Err(ConsoleError::DoneTimeout(timeout))
                };
            }
            st = self.shared.wait_timeout(st, deadline - now);
        }
    }
}

impl Drop for ConsoleLink {
    fn drop(&mut self) {
        {
            let mut st = self.shared.lock();
            st.shutdown = true;
            if let Some(s) = &st.stream {
                let _ = s.shutdown(std::net::Shutdown::Both);
            }
            self.shared.cv.notify_all();
        }
        if let Some(m) = self.manager.take() {
            let _ = m.join();
        }
    }
}

/// Errors that another attempt would not cure.
fn permanent(e: &ProtocolError) -> bool {
    matches!(
        e,
        ProtocolError::Refused(_)
            | ProtocolError::ConsoleUnproven
            | ProtocolError::WrongToken
            | ProtocolError::BadMagic(_)
    )
}

fn connect_once(shared: &Shared) -> Result<Conn, ProtocolError> {
    let addrs: Vec<SocketAddr> = shared.addr.to_socket_addrs()?.collect();
    let mut last = None;
    for a in addrs {
        match TcpStream::connect_timeout(&a, CONNECT_TIMEOUT) {
            Ok(stream) => {
                stream.set_nodelay(true)?;
                stream.set_read_timeout(Some(HANDSHAKE_TIMEOUT))?;
                stream.set_write_timeout(Some(HANDSHAKE_TIMEOUT))?;
                let r = BufReader::new(stream.try_clone()?);
                let (reader, writer, printed_upto) =
                    side_handshake(r, stream.try_clone()?, &shared.token)?;
                stream.set_read_timeout(None)?;
                stream.set_write_timeout(Some(shared.opts.write_timeout))?;
                return Ok(Conn {
                    stream,
                    reader,
                    writer,
                    printed_upto,
                });
            }
            Err(e) => last = Some(e),
        }
    }
    Err(last
        .unwrap_or_else(|| std::io::Error::other(format!("{} resolves to nothing", shared.addr)))
        .into())
}

/// The manager thread: run connections until shut down, reconnecting.
fn manage(shared: Arc<Shared>, first: Conn) {
    let mut next = Some(first);
    let mut backoff = Duration::from_millis(100);
    let mut warned = false;
    loop {
        let conn = match next.take() {
            Some(c) => c,
            None => {
                if shared.lock().shutdown {
                    return;
                }
                match connect_once(&shared) {
                    Ok(c) => {
                        info!(addr = %shared.addr, "reconnected to the console");
                        warned = false;
                        c
                    }
                    Err(e) => {
                        if !warned {
                            warned = true;
                            warn!(addr = %shared.addr, "console unreachable, retrying: {e}");
                        } else {
                            debug!(addr = %shared.addr, "console unreachable: {e}");
                        }
                        let st = shared.lock();
                        if st.shutdown {
                            return;
                        }
                        drop(shared.wait_timeout(st, backoff));
                        backoff = (backoff * 2).min(shared.opts.max_backoff);
                        continue;
                    }
                }
            }
        };
        let began = Instant::now();
        run_connection(&shared, conn);
        let st = shared.lock();
        if st.shutdown || st.done_sent {
            return;
        }
        if began.elapsed() < STABLE {
            // Dropped soon after it began (refused after the handshake, or
            // a console in trouble): do not hammer it.
            drop(shared.wait_timeout(st, backoff));
            backoff = (backoff * 2).min(shared.opts.max_backoff);
        } else {
            backoff = Duration::from_millis(100);
        }
    }
}

enum Job {
    Send(ToConsole),
    Quit,
}

fn run_connection(shared: &Arc<Shared>, conn: Conn) {
    let Conn {
        stream,
        reader,
        mut writer,
        printed_upto,
    } = conn;
    let (serial, hello) = {
        let mut st = shared.lock();
        st.serial += 1;
        st.broken = false;
        st.connected = true;
        st.stream = stream.try_clone().ok();
        st.send_from = 0;
        if let Some(p) = printed_upto {
            st.ack(p);
        }
        // The new hello says the generation, role and claim as they are.
        st.controls
            .retain(|c| matches!(c, ToConsole::InputLogged { .. }));
        shared.cv.notify_all();
        (st.serial, st.current_hello())
    };
    let s = shared.clone();
    let receiver = std::thread::Builder::new()
        .name("vmft-console-recv".into())
        .spawn(move || receive(s, reader, serial));
    let receiver = match receiver {
        Ok(r) => Some(r),
        Err(e) => {
            warn!("console link: cannot start its receiver: {e}");
            shared.lock().broken = true;
            None
        }
    };

    let mut first = Some(ToConsole::Hello(hello));
    loop {
        let job = match first.take() {
            Some(m) => Job::Send(m),
            None => {
                let mut st = shared.lock();
                loop {
                    if st.shutdown || st.broken {
                        break Job::Quit;
                    }
                    if let Some(c) = st.controls.pop_front() {
                        break Job::Send(c);
                    }
                    if let Some((offset, bytes)) = st.next_output() {
                        break Job::Send(ToConsole::Output { offset, bytes });
                    }
                    if !st.done_sent {
                        if let Some(d) = st.done.clone() {
                            break Job::Send(d);
                        }
                    }
                    st = shared.wait(st);
                }
            }
        };
        let msg = match job {
            Job::Send(m) => m,
            Job::Quit => break,
        };
        if let Err(e) = writer.send(&msg) {
            let mut st = shared.lock();
            if !st.shutdown {
                warn!("console connection lost while sending: {e}; reconnecting");
            }
            st.broken = true;
            break;
        }
        if matches!(msg, ToConsole::Done { .. }) {
            let mut st = shared.lock();
            st.done_sent = true;
            shared.cv.notify_all();
        }
    }
    let _ = stream.shutdown(std::net::Shutdown::Both);
    if let Some(r) = receiver {
        let _ = r.join();
    }
    let mut st = shared.lock();
    st.connected = false;
    st.stream = None;
    shared.cv.notify_all();
}

fn receive(shared: Arc<Shared>, mut reader: FrameReader<BufReader<TcpStream>>, serial: u64) {
    loop {
        match reader.recv::<ToSide>() {
            Ok(ToSide::Ack { offset }) => {
                let mut st = shared.lock();
                st.ack(offset);
                shared.cv.notify_all();
            }
            Ok(ToSide::Input { seq, bytes }) => {
                {
                    let mut st = shared.lock();
                    if !st.accept_input(seq, bytes) {
                        continue;
                    }
                    if st.input_bytes > MAX_INPUT_HELD {
                        warn!("console input is not being taken; dropping the connection");
                        st.broken = true;
                        shared.cv.notify_all();
                        return;
                    }
                }
                let cb = shared.on_input.lock().unwrap_or_else(|e| e.into_inner());
                if let Some(f) = cb.as_ref() {
                    f();
                }
            }
            Ok(ToSide::Stop) => {
                if !shared.stop.swap(true, Ordering::AcqRel) {
                    info!("the console asks to stop the pair");
                    let cb = shared
                        .on_stop
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .take();
                    if let Some(f) = cb {
                        f();
                    }
                }
            }
            Ok(ToSide::Welcome { .. }) => debug!("console: a second Welcome, ignored"),
            Ok(ToSide::Dropped { reason }) => {
                warn!("the console refuses this side: {reason}");
                let mut st = shared.lock();
                st.dropped = Some(reason);
                if st.serial == serial {
                    st.broken = true;
                }
                shared.cv.notify_all();
                return;
            }
            Err(e) => {
                let mut st = shared.lock();
                if st.serial == serial {
                    st.broken = true;
                }
                if !st.shutdown && !st.done_sent {
                    warn!("console connection lost: {e}; reconnecting");
                }
                shared.cv.notify_all();
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state() -> State {
        State::new(
            Hello {
                vm: "vm".into(),
                generation: 1,
                role: Role::Primary,
                claimant: "p:1:a".into(),
                next_offset: 100,
                won_claim: false,
                input_resume_seq: 0,
            },
            1 << 20,
        )
    }

    #[test]
    fn resuming_input_mid_chunk_drops_what_the_guest_has() {
        // The chunk is already queued: trimmed at once.
        let mut st = state();
        assert!(st.accept_input(1, b"abc".to_vec()));
        assert!(st.accept_input(2, b"defg".to_vec()));
        st.resume_input(2, 1);
        assert_eq!(st.input, VecDeque::from([(2, b"efg".to_vec())]));
        assert_eq!(st.input_bytes, 3);
        assert_eq!(st.expected_seq, 2);
        assert!(!st.accept_input(1, b"abc".to_vec()), "already had");

        // The chunk comes later (the console re-sends it): trimmed then.
        let mut st = state();
        st.resume_input(5, 2);
        assert_eq!(st.current_hello().input_resume_seq, 5);
        assert!(!st.accept_input(4, b"old".to_vec()));
        assert!(st.accept_input(5, b"hello".to_vec()));
        assert!(st.accept_input(6, b"!".to_vec()), "only chunk 5 is trimmed");
        assert_eq!(
            st.input,
            VecDeque::from([(5, b"llo".to_vec()), (6, b"!".to_vec())])
        );

        // The guest had the whole chunk: nothing of it is queued.
        let mut st = state();
        st.resume_input(3, 4);
        assert!(!st.accept_input(3, b"abcd".to_vec()));
        assert!(st.accept_input(4, b"e".to_vec()));
        assert_eq!(st.input_bytes, 1);

        // Seqs that skip ahead are taken (the console renumbered) and the
        // pending skip, meant for another chunk, is dropped.
        let mut st = state();
        st.resume_input(2, 1);
        assert!(st.accept_input(3, b"xyz".to_vec()));
        assert_eq!(st.input, VecDeque::from([(3, b"xyz".to_vec())]));
        assert!(st.accept_input(4, b"w".to_vec()));
        assert_eq!(st.input.len(), 2);
    }

    #[test]
    fn output_is_sent_in_bounded_pieces_and_acks_trim_it() {
        let mut st = state();
        assert_eq!(st.expected_seq, 1, "seqs start at 1");
        assert_eq!(st.current_hello().next_offset, 100);
        let big = vec![7u8; MAX_OUTPUT_CHUNK + 10];
        st.push(100, &big);
        st.push(100 + big.len() as u64, b"tail");
        let (o, p) = st.next_output().unwrap();
        assert_eq!((o, p.len()), (100, MAX_OUTPUT_CHUNK));
        let (o, p) = st.next_output().unwrap();
        assert_eq!((o, p.len()), (100 + MAX_OUTPUT_CHUNK as u64, 10));
        let (o, p) = st.next_output().unwrap();
        assert_eq!((o, p), (100 + big.len() as u64, b"tail".to_vec()));
        assert_eq!(st.next_output(), None);
        // The console printed into the middle of the first chunk.
        st.ack(150);
        assert_eq!(st.buffered, big.len() + 4 - 50);
        assert_eq!(st.chunks.front().unwrap().0, 150);
        // A new connection sends again from what is not acknowledged.
        st.send_from = 0;
        assert_eq!(st.current_hello().next_offset, 150);
        assert_eq!(st.next_output().unwrap().0, 150);
        // An old ack changes nothing.
        st.ack(120);
        assert_eq!(st.acked, Some(150));
        st.ack(100 + big.len() as u64 + 4);
        assert_eq!((st.buffered, st.chunks.len()), (0, 0));
        assert_eq!(st.floor(), Some(100 + big.len() as u64 + 4));
    }

    #[test]
    fn a_console_ahead_of_the_side_skips_what_it_printed() {
        let mut st = state();
        // Welcome: the console printed up to 500 already (another side).
        st.ack(500);
        assert_eq!(st.floor(), Some(500));
        st.push(500, b"new");
        assert_eq!(st.next_output(), Some((500, b"new".to_vec())));
    }
}
