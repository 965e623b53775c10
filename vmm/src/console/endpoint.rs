//! The console endpoint: `vmft console --listen ADDR`.
//!
//! It listens; sides dial it (over time: the primary, the backup that goes
//! live, a re-protected pair's sides). It follows the highest generation
//! that has spoken (a `Primary` or `Live` hello, or a claim: a backup's
//! hello alone does not count); once a side announces a won claim, only
//! that claimant's output of that generation (or a newer generation's)
//! is printed. The first chunk ever seen sets the base offset; every
//! byte is printed once, in order; an overlap is trimmed; a chunk that
//! starts past the next offset is a gap, reported loudly and counted.
//!
//! Typed keys are numbered (seq from 1) and sent to the live side; each
//! is kept until the live side confirms its backup logged it
//! (`InputLogged`). A new live side gets every unconfirmed input again
//! from the seq it says it expects. Unconfirmed input is bounded
//! ([`ConsoleConfig::max_unconfirmed_input`]): when full, the console
//! says so and stops reading its stdin until confirmations free room.
//!
//! On a terminal, stdin is raw and Ctrl-A x is the escape: by default it
//! detaches (the console exits 0, the VM keeps running); with
//! [`ConsoleConfig::escape_stops_pair`] (`vmft ft`) it sends `Stop` to the
//! live side and keeps printing until a side says `Done` or every side
//! has left (a second Ctrl-A x leaves at once).
//!
//! The console ends when a live side says `Done` (exit with its status),
//! on a detach, or by [`ConsoleHandle::shutdown`].
//!
//! Memory is bounded: at most [`ConsoleConfig::max_connections`] sides,
//! a bounded event queue between the connections and the printing loop
//! (a slow terminal slows the sides down through TCP), bounded frames,
//! bounded unconfirmed input.

use std::collections::BTreeMap;
use std::io::{self, BufReader, IsTerminal, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError, SyncSender};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use tracing::{debug, info, warn};

use super::protocol::{
    self, console_handshake, FrameWriter, Hello, ProtocolError, Role, ToConsole, ToSide,
    MAX_INPUT_CHUNK,
};
use super::stream::{InputQueue, OutputCursor};
use super::ConsoleError;
use crate::terminal::{EscapeAction, EscapeFilter, RawTerminal};

/// Where typed input comes from.
pub enum ConsoleInput {
    /// The process's stdin: raw mode and the Ctrl-A escape when it is a
    /// terminal, plain bytes otherwise.
    Stdin,
    /// Any reader (a pipe, a test); `escape` applies the Ctrl-A filter.
    Reader {
        /// The keys.
        reader: Box<dyn Read + Send>,
        /// Apply the Ctrl-A escape.
        escape: bool,
    },
    /// No input.
    None,
}

/// How the console runs.
pub struct ConsoleConfig {
    /// Address to listen on (`HOST:PORT`; port 0 picks one).
    pub listen: String,
    /// The shared token (`--token-file`, see [`super::read_token_file`]).
    pub token: Vec<u8>,
    /// The escape stops the pair (`vmft ft`) instead of detaching.
    pub escape_stops_pair: bool,
    /// Typed input.
    pub input: ConsoleInput,
    /// Where the guest's output is printed.
    pub output: Box<dyn Write + Send>,
    /// Where the console's own notes go (gaps, waiting, detach).
    pub notes: Box<dyn Write + Send>,
    /// With no live side, a note after this long and then as often.
    pub idle_note_after: Duration,
    /// Bound on typed bytes not yet confirmed by the live side.
    pub max_unconfirmed_input: usize,
    /// Time a connection has to complete the handshake.
    pub handshake_timeout: Duration,
    /// A side that does not take a frame within this long is dropped.
    pub write_timeout: Duration,
    /// Most sides connected (or handshaking) at once.
    pub max_connections: usize,
}

impl ConsoleConfig {
    /// Defaults: stdin, stdout and stderr; the escape detaches.
    pub fn new(listen: impl Into<String>, token: impl Into<Vec<u8>>) -> Self {
        ConsoleConfig {
            listen: listen.into(),
            token: token.into(),
            escape_stops_pair: false,
            input: ConsoleInput::Stdin,
            output: Box::new(io::stdout()),
            notes: Box::new(io::stderr()),
            idle_note_after: Duration::from_secs(10),
            max_unconfirmed_input: 64 * 1024,
            handshake_timeout: Duration::from_secs(5),
            write_timeout: Duration::from_secs(10),
            max_connections: 32,
        }
    }
}

/// Why the console ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConsoleEnd {
    /// The live side said the VM ended.
    Done {
        /// Its reason.
        reason: String,
        /// Its exit status, which the console exits with.
        exit_status: i32,
    },
    /// The user detached (Ctrl-A x); the VM keeps running.
    Detached,
    /// After a stop request every side left without a final status.
    SidesLeft,
    /// [`ConsoleHandle::shutdown`] was called.
    Shutdown,
}

impl ConsoleEnd {
    /// The process exit status for this end: the VM's for `Done`, 0 for
    /// a detach or a shutdown, 1 when the sides left without a status.
    pub fn exit_status(&self) -> i32 {
        match self {
            ConsoleEnd::Done { exit_status, .. } => *exit_status,
            ConsoleEnd::Detached | ConsoleEnd::Shutdown => 0,
            ConsoleEnd::SidesLeft => 1,
        }
    }
}

/// What the console counted.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ConsoleStats {
    /// Output bytes printed.
    pub bytes_printed: u64,
    /// Output bytes received again and dropped (already printed).
    pub duplicate_bytes: u64,
    /// Output bytes from a side that is not followed (older generation,
    /// losing claimant, a backup that has not claimed), dropped.
    pub ignored_bytes: u64,
    /// Gaps: chunks that started past the next offset.
    pub gaps: u64,
    /// Bytes lost in gaps.
    pub gap_bytes: u64,
    /// Connections that said Hello.
    pub sides_seen: u64,
    /// Connections refused (handshake failed, wrong token, garbage,
    /// another VM, too many).
    pub refused: u64,
    /// Typed chunks numbered.
    pub inputs_typed: u64,
    /// Typed bytes held, not yet confirmed.
    pub input_unconfirmed_bytes: u64,
    /// Typed bytes dropped as lost (a restarted console met a pair that
    /// had gone further).
    pub input_lost_bytes: u64,
    /// The offset after the last byte printed.
    pub printed_upto: Option<u64>,
    /// The highest generation followed.
    pub highest_generation: Option<u64>,
    /// The winning claim followed: (generation, claimant).
    pub claim: Option<(u64, String)>,
    /// The claimant of the current live side.
    pub live: Option<String>,
}

/// How the console ended, and its counts.
#[derive(Debug, Clone)]
pub struct ConsoleOutcome {
    /// Why it ended.
    pub end: ConsoleEnd,
    /// What it counted.
    pub stats: ConsoleStats,
}

impl ConsoleOutcome {
    /// The process exit status ([`ConsoleEnd::exit_status`]).
    pub fn exit_status(&self) -> i32 {
        self.end.exit_status()
    }
}

enum Event {
    Connected {
        id: u64,
        peer: SocketAddr,
        writer: FrameWriter<TcpStream>,
    },
    Refused {
        peer: SocketAddr,
        error: String,
    },
    Message {
        id: u64,
        msg: ToConsole,
    },
    Closed {
        id: u64,
        error: ProtocolError,
    },
    Typed(Vec<u8>),
    InputPaused(usize),
    Escape,
    Help,
    StdinEnded,
    Shutdown,
}

/// Room for unconfirmed input, shared with the stdin reader.
struct Budget {
    used: Mutex<usize>,
    cv: Condvar,
    cap: usize,
    closed: AtomicBool,
}

impl Budget {
    fn release(&self, n: usize) {
        if n == 0 {
            return;
        }
        let mut u = self.used.lock().unwrap_or_else(|e| e.into_inner());
        *u = u.saturating_sub(n);
        self.cv.notify_all();
    }

    fn close(&self) {
        self.closed.store(true, Ordering::Release);
        let _g = self.used.lock().unwrap_or_else(|e| e.into_inner());
        self.cv.notify_all();
    }
}

/// Every open connection, so that the end of the console closes them all
/// (also those still in the handshake or not yet seen by the loop).
type Conns = Arc<Mutex<std::collections::HashMap<u64, TcpStream>>>;

/// Bytes read from stdin at once.
const READ_SIZE: usize = 256;
/// How often the loop looks at the clock with nothing happening.
const TICK: Duration = Duration::from_millis(200);
/// Events queued between the connections and the printing loop.
const EVENT_QUEUE: usize = 256;

/// A handle on a running console: its address, its counts, a way to end
/// it.
#[derive(Clone)]
pub struct ConsoleHandle {
    addr: SocketAddr,
    stats: Arc<Mutex<ConsoleStats>>,
    events: SyncSender<Event>,
}

impl ConsoleHandle {
    /// The address the console listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// The counts so far.
    pub fn stats(&self) -> ConsoleStats {
        self.stats.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// End the console ([`ConsoleEnd::Shutdown`]).
    pub fn shutdown(&self) {
        let _ = self.events.send(Event::Shutdown);
    }
}

/// A bound console, not yet running.
pub struct Console {
    listener: TcpListener,
    addr: SocketAddr,
    cfg: ConsoleConfig,
    stats: Arc<Mutex<ConsoleStats>>,
    tx: SyncSender<Event>,
    rx: mpsc::Receiver<Event>,
}

/// Bind and run a console until it ends.
pub fn serve(config: ConsoleConfig) -> Result<ConsoleOutcome, ConsoleError> {
    Console::bind(config)?.run()
}

impl Console {
    /// Listen on `config.listen`.
    pub fn bind(mut config: ConsoleConfig) -> Result<Console, ConsoleError> {
        if config.token.is_empty() {
            return Err(ConsoleError::EmptyToken);
        }
        config.max_unconfirmed_input = config.max_unconfirmed_input.max(READ_SIZE);
        config.max_connections = config.max_connections.max(1);
        let listener = TcpListener::bind(&config.listen).map_err(|source| ConsoleError::Bind {
            addr: config.listen.clone(),
            source,
        })?;
        let addr = listener.local_addr()?;
        let (tx, rx) = mpsc::sync_channel(EVENT_QUEUE);
        Ok(Console {
            listener,
            addr,
            cfg: config,
            stats: Arc::default(),
            tx,
            rx,
        })
    }

    /// The address it listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// A handle for another thread.
    pub fn handle(&self) -> ConsoleHandle {
        ConsoleHandle {
            addr: self.addr,
            stats: self.stats.clone(),
            events: self.tx.clone(),
        }
    }

    /// Run until a side says `Done`, the user detaches, or a shutdown.
    pub fn run(self) -> Result<ConsoleOutcome, ConsoleError> {
        let Console {
            listener,
            addr,
            mut cfg,
            stats,
            tx,
            rx,
        } = self;
        let closing = Arc::new(AtomicBool::new(false));
        let conns: Conns = Arc::default();
        let budget = Arc::new(Budget {
            used: Mutex::new(0),
            cv: Condvar::new(),
            cap: cfg.max_unconfirmed_input,
            closed: AtomicBool::new(false),
        });

        spawn_acceptor(
            listener,
            tx.clone(),
            closing.clone(),
            conns.clone(),
            cfg.token.clone(),
            cfg.handshake_timeout,
            cfg.write_timeout,
            cfg.max_connections,
        )?;

        // Input: raw terminal (restored when `_raw` drops, on every way out).
        let mut _raw = None;
        let input = std::mem::replace(&mut cfg.input, ConsoleInput::None);
        let reader: Option<(Box<dyn Read + Send>, bool)> = match input {
            ConsoleInput::Stdin => {
                if io::stdin().is_terminal() {
                    _raw = RawTerminal::enter();
                }
                Some((Box::new(io::stdin()), _raw.is_some()))
            }
            ConsoleInput::Reader { reader, escape } => Some((reader, escape)),
            ConsoleInput::None => None,
        };
        if let Some((reader, escape)) = reader {
            spawn_input(reader, escape, tx.clone(), budget.clone())?;
        }
        drop(tx);

        let mut lp = Loop {
            escape_stops_pair: cfg.escape_stops_pair,
            output: cfg.output,
            notes: cfg.notes,
            idle_note_after: cfg.idle_note_after,
            shared_stats: stats,
            stats: ConsoleStats::default(),
            sides: BTreeMap::new(),
            live: None,
            vm: None,
            highest: None,
            claim: None,
            cursor: OutputCursor::default(),
            at_line_start: true,
            inputs: InputQueue::new(),
            budget: budget.clone(),
            stop_requested: false,
            no_live_since: Instant::now(),
            last_idle_note: None,
            end: None,
        };
        if _raw.is_some() {
            let what = if cfg.escape_stops_pair {
                "Ctrl-A x stops the pair"
            } else {
                "Ctrl-A x detaches (the VM keeps running)"
            };
            lp.note(&format!("listening on {addr}; {what}"));
        }
        let result = lp.run(&rx);

        // Tear down: close every side, wake the acceptor, free the reader.
        {
            let conns = conns.lock().unwrap_or_else(|e| e.into_inner());
            closing.store(true, Ordering::Release);
            for stream in conns.values() {
                let _ = stream.shutdown(std::net::Shutdown::Both);
            }
        }
        budget.close();
        let wake = if addr.ip().is_unspecified() {
            SocketAddr::new(
                match addr {
                    SocketAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
                    SocketAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
                },
                addr.port(),
            )
        } else {
            addr
        };
        let _ = TcpStream::connect_timeout(&wake, Duration::from_millis(200));
        let end = result?;
        lp.publish();
        Ok(ConsoleOutcome {
            end,
            stats: lp.stats,
        })
    }
}

#[allow(clippy::too_many_arguments)]
fn spawn_acceptor(
    listener: TcpListener,
    tx: SyncSender<Event>,
    closing: Arc<AtomicBool>,
    conns: Conns,
    token: Vec<u8>,
    handshake_timeout: Duration,
    write_timeout: Duration,
    max_connections: usize,
) -> io::Result<()> {
    let active = Arc::new(AtomicUsize::new(0));
    let token: Arc<[u8]> = token.into();
    std::thread::Builder::new()
        .name("vmft-console-accept".into())
        .spawn(move || {
            let mut next_id = 1u64;
            for conn in listener.incoming() {
                if closing.load(Ordering::Acquire) {
                    break;
                }
                let stream = match conn {
                    Ok(s) => s,
                    Err(e) => {
                        warn!("console: accept failed: {e}");
                        std::thread::sleep(Duration::from_millis(50));
                        continue;
                    }
                };
                let peer = match stream.peer_addr() {
                    Ok(p) => p,
                    Err(_) => continue,
                };
                if active.load(Ordering::Acquire) >= max_connections {
                    let _ = protocol::refuse(&mut &stream, "too many connections");
                    let _ = tx.send(Event::Refused {
                        peer,
                        error: format!("too many connections (at most {max_connections})"),
                    });
                    continue;
                }
                let id = next_id;
                next_id += 1;
                {
                    // Registered under the lock that the end takes: either
                    // the end sees this connection, or it sees `closing`.
                    let mut all = conns.lock().unwrap_or_else(|e| e.into_inner());
                    if closing.load(Ordering::Acquire) {
                        break;
                    }
                    match stream.try_clone() {
                        Ok(s) => all.insert(id, s),
                        Err(_) => continue,
                    };
                }
                active.fetch_add(1, Ordering::AcqRel);
                let (tx, token, active, conns) =
                    (tx.clone(), token.clone(), active.clone(), conns.clone());
                let spawned = std::thread::Builder::new()
                    .name(format!("vmft-console-side-{id}"))
                    .spawn(move || {
                        serve_side(
                            stream,
                            peer,
                            id,
                            &token,
                            handshake_timeout,
                            write_timeout,
                            &tx,
                        );
                        conns.lock().unwrap_or_else(|e| e.into_inner()).remove(&id);
                        active.fetch_sub(1, Ordering::AcqRel);
                    });
                if let Err(e) = spawned {
                    warn!("console: cannot start a thread for {peer}: {e}");
                }
            }
        })?;
    Ok(())
}

fn serve_side(
    stream: TcpStream,
    peer: SocketAddr,
    id: u64,
    token: &[u8],
    handshake_timeout: Duration,
    write_timeout: Duration,
    tx: &SyncSender<Event>,
) {
    let refused = |error: String| {
        let _ = tx.send(Event::Refused { peer, error });
    };
    let setup = (|| {
        stream.set_nodelay(true)?;
        stream.set_read_timeout(Some(handshake_timeout))?;
        stream.set_write_timeout(Some(handshake_timeout))?;
        Ok::<_, io::Error>((stream.try_clone()?, stream.try_clone()?))
    })();
    let (r, w) = match setup {
        Ok(x) => x,
        Err(e) => return refused(e.to_string()),
    };
    let (mut reader, writer) = match console_handshake(BufReader::new(r), w, token) {
        Ok(x) => x,
        Err(e) => {
            if matches!(
                e,
                ProtocolError::BadLength { .. }
                    | ProtocolError::BadMagic(_)
                    | ProtocolError::UnexpectedType(_)
                    | ProtocolError::Malformed { .. }
            ) {
                let _ = protocol::refuse(&mut &stream, "not a vmft console side");
            }
            let _ = stream.shutdown(std::net::Shutdown::Both);
            return refused(e.to_string());
        }
    };
    let ready = stream
        .set_read_timeout(None)
        .and_then(|()| stream.set_write_timeout(Some(write_timeout)));
    if let Err(e) = ready {
        return refused(e.to_string());
    }
    if tx.send(Event::Connected { id, peer, writer }).is_err() {
        return;
    }
    loop {
        match reader.recv::<ToConsole>() {
            Ok(msg) => {
                if tx.send(Event::Message { id, msg }).is_err() {
                    return;
                }
            }
            Err(error) => {
                let _ = tx.send(Event::Closed { id, error });
                let _ = stream.shutdown(std::net::Shutdown::Both);
                return;
            }
        }
    }
}

fn spawn_input(
    mut reader: Box<dyn Read + Send>,
    escape: bool,
    tx: SyncSender<Event>,
    budget: Arc<Budget>,
) -> io::Result<()> {
    std::thread::Builder::new()
        .name("vmft-console-stdin".into())
        .spawn(move || {
            let mut filter = EscapeFilter::default();
            let mut raw = [0u8; READ_SIZE];
            loop {
                // Wait for room: stop reading while unconfirmed input is full.
                {
                    let mut used = budget.used.lock().unwrap_or_else(|e| e.into_inner());
                    let mut told = false;
                    while *used + READ_SIZE > budget.cap {
                        if budget.closed.load(Ordering::Acquire) {
                            return;
                        }
                        if !told {
                            told = true;
                            let _ = tx.send(Event::InputPaused(*used));
                        }
                        used = budget.cv.wait(used).unwrap_or_else(|e| e.into_inner());
                    }
                }
                let n = match reader.read(&mut raw) {
                    Ok(0) => {
                        let _ = tx.send(Event::StdinEnded);
                        return;
                    }
                    Ok(n) => n,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => {
                        debug!("console: stdin: {e}");
                        let _ = tx.send(Event::StdinEnded);
                        return;
                    }
                };
                let mut keys = Vec::with_capacity(n);
                let action = if escape {
                    filter.feed(&raw[..n], &mut keys)
                } else {
                    keys.extend_from_slice(&raw[..n]);
                    None
                };
                for piece in keys.chunks(MAX_INPUT_CHUNK) {
                    *budget.used.lock().unwrap_or_else(|e| e.into_inner()) += piece.len();
                    if tx.send(Event::Typed(piece.to_vec())).is_err() {
                        return;
                    }
                }
                let ev = match action {
                    Some(EscapeAction::Leave) => Event::Escape,
                    Some(EscapeAction::Help) => Event::Help,
                    None => continue,
                };
                if tx.send(ev).is_err() {
                    return;
                }
            }
        })?;
    Ok(())
}

struct Side {
    peer: SocketAddr,
    writer: FrameWriter<TcpStream>,
    hello: Option<Hello>,
    alive: bool,
    warned_ignored: bool,
}

struct Loop {
    escape_stops_pair: bool,
    output: Box<dyn Write + Send>,
    notes: Box<dyn Write + Send>,
    idle_note_after: Duration,
    shared_stats: Arc<Mutex<ConsoleStats>>,
    stats: ConsoleStats,
    sides: BTreeMap<u64, Side>,
    live: Option<u64>,
    vm: Option<String>,
    /// Highest generation that has spoken.
    highest: Option<u64>,
    /// The winning claim: (generation, claimant).
    claim: Option<(u64, String)>,
    cursor: OutputCursor,
    at_line_start: bool,
    inputs: InputQueue,
    budget: Arc<Budget>,
    stop_requested: bool,
    no_live_since: Instant,
    last_idle_note: Option<Instant>,
    end: Option<ConsoleEnd>,
}

impl Loop {
    fn run(&mut self, rx: &mpsc::Receiver<Event>) -> Result<ConsoleEnd, ConsoleError> {
        loop {
            match rx.recv_timeout(TICK) {
                Ok(ev) => self.handle(ev)?,
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => {
                    // Every producer is gone (cannot happen while the
                    // acceptor runs): nothing more can arrive.
                    return Ok(ConsoleEnd::Shutdown);
                }
            }
            self.select_live();
            self.publish();
            if let Some(end) = self.end.take() {
                return Ok(end);
            }
            self.idle_note();
        }
    }

    fn publish(&mut self) {
        self.stats.printed_upto = self.cursor.next();
        self.stats.highest_generation = self.highest;
        self.stats.claim = self.claim.clone();
        self.stats.input_unconfirmed_bytes = self.inputs.bytes() as u64;
        self.stats.live = self
            .live
            .and_then(|id| self.sides.get(&id))
            .and_then(|s| s.hello.as_ref())
            .map(|h| h.claimant.clone());
        *self.shared_stats.lock().unwrap_or_else(|e| e.into_inner()) = self.stats.clone();
    }

    /// A note for the user, on its own line.
    fn note(&mut self, text: &str) {
        let lead = if self.at_line_start { "" } else { "\n" };
        let _ = writeln!(self.notes, "{lead}vmft console: {text}");
        let _ = self.notes.flush();
    }

    fn idle_note(&mut self) {
        if self.live.is_some() {
            return;
        }
        let now = Instant::now();
        let since = self.last_idle_note.unwrap_or(self.no_live_since);
        if now.duration_since(since) >= self.idle_note_after {
            self.last_idle_note = Some(now);
            self.note("no live side connected (waiting)");
        }
    }

    fn handle(&mut self, ev: Event) -> Result<(), ConsoleError> {
        match ev {
            Event::Connected { id, peer, writer } => {
                debug!(%peer, id, "console: side authenticated");
                let mut side = Side {
                    peer,
                    writer,
                    hello: None,
                    alive: true,
                    warned_ignored: false,
                };
                let welcome = ToSide::Welcome {
                    printed_upto: self.cursor.next(),
                };
                if let Err(e) = side.writer.send(&welcome) {
                    warn!(%peer, "console: cannot welcome a side: {e}");
                    return Ok(());
                }
                self.sides.insert(id, side);
            }
            Event::Refused { peer, error } => {
                warn!(%peer, "console: refused a connection: {error}");
                self.stats.refused += 1;
            }
            Event::Message { id, msg } => self.message(id, msg)?,
            Event::Closed { id, error } => {
                if let Some(side) = self.sides.remove(&id) {
                    match error {
                        ProtocolError::Closed => debug!(peer = %side.peer, "console: side left"),
                        e => warn!(peer = %side.peer, "console: side dropped: {e}"),
                    }
                }
                if self.stop_requested && self.sides.is_empty() {
                    self.note("every side has left; the pair is stopped");
                    self.end = Some(ConsoleEnd::SidesLeft);
                }
            }
            Event::Typed(bytes) => {
                self.stats.inputs_typed += 1;
                let seq = self.inputs.push(bytes);
                if let Some(id) = self.live {
                    if let Some((seq, bytes)) = self.inputs.send_one(seq) {
                        self.send(id, &ToSide::Input { seq, bytes });
                    }
                }
            }
            Event::InputPaused(used) => {
                self.note(&format!(
                    "{used} typed bytes are not yet confirmed by the live side; \
                     input waits until they are"
                ));
            }
            Event::Escape => self.escape(),
            Event::Help => {
                let what = if self.escape_stops_pair {
                    "Ctrl-A x stops the pair"
                } else {
                    "Ctrl-A x detaches (the VM keeps running)"
                };
                self.note(&format!(
                    "every key goes to the guest; {what}; Ctrl-A Ctrl-A sends Ctrl-A"
                ));
            }
            Event::StdinEnded => debug!("console: stdin ended; no more input"),
            Event::Shutdown => self.end = Some(ConsoleEnd::Shutdown),
        }
        Ok(())
    }

    fn escape(&mut self) {
        if !self.escape_stops_pair {
            self.note("detached; the VM keeps running");
            self.end = Some(ConsoleEnd::Detached);
        } else if self.stop_requested {
            self.note("leaving at once; the pair was asked to stop");
            self.end = Some(ConsoleEnd::Detached);
        } else {
            self.stop_requested = true;
            self.note("stopping the pair (Ctrl-A x again leaves at once)");
            if let Some(id) = self.live {
                self.send(id, &ToSide::Stop);
            }
            if self.sides.is_empty() {
                self.note("no side is connected; waiting for one to stop it");
            }
        }
    }

    /// Whether `side`'s output is followed.
    fn follows(&self, side: &Side) -> bool {
        let Some(h) = &side.hello else {
            return false;
        };
        if !side.alive || Some(h.generation) != self.highest {
            return false;
        }
        match &self.claim {
            Some((g, c)) if *g == h.generation => h.claimant == *c,
            _ => h.role != Role::Backup,
        }
    }

    fn select_live(&mut self) {
        let live = self
            .sides
            .iter()
            .rev()
            .find(|(_, s)| self.follows(s))
            .map(|(id, _)| *id);
        if live == self.live {
            return;
        }
        self.live = live;
        let Some(id) = live else {
            self.no_live_since = Instant::now();
            self.last_idle_note = None;
            return;
        };
        let h = self.sides[&id]
            .hello
            .clone()
            .expect("followed sides said hello");
        info!(
            claimant = %h.claimant, role = %h.role, generation = h.generation,
            "console: following this side"
        );
        let adopted = self.inputs.adopt(h.input_resume_seq);
        self.budget.release(adopted.freed + adopted.lost);
        if adopted.lost > 0 {
            self.stats.input_lost_bytes += adopted.lost as u64;
            self.note(&format!(
                "{} typed bytes were lost: the pair had moved past this console's numbers",
                adopted.lost
            ));
        }
        for (seq, bytes) in self.inputs.send_from(h.input_resume_seq) {
            self.send(id, &ToSide::Input { seq, bytes });
        }
        if self.stop_requested {
            self.send(id, &ToSide::Stop);
        }
    }

    /// Send to a side; a side that cannot take it is dropped.
    fn send(&mut self, id: u64, msg: &ToSide) {
        let Some(side) = self.sides.get_mut(&id) else {
            return;
        };
        if !side.alive {
            return;
        }
        if let Err(e) = side.writer.send(msg) {
            warn!(peer = %side.peer, "console: dropping a side that does not take frames: {e}");
            side.alive = false;
            let _ = side.writer.get_ref().shutdown(std::net::Shutdown::Both);
        }
    }

    fn drop_side(&mut self, id: u64, why: &str) {
        self.send(
            id,
            &ToSide::Dropped {
                reason: why.to_string(),
            },
        );
        if let Some(side) = self.sides.get_mut(&id) {
            warn!(peer = %side.peer, "console: refusing a side: {why}");
            side.alive = false;
            let _ = side.writer.get_ref().shutdown(std::net::Shutdown::Both);
        }
        self.stats.refused += 1;
    }

    fn message(&mut self, id: u64, msg: ToConsole) -> Result<(), ConsoleError> {
        let Some(side) = self.sides.get(&id) else {
            return Ok(());
        };
        if !side.alive {
            return Ok(());
        }
        if side.hello.is_none() && !matches!(msg, ToConsole::Hello(_)) {
            self.drop_side(id, "spoke before saying hello");
            return Ok(());
        }
        match msg {
            ToConsole::Hello(h) => self.hello(id, h),
            ToConsole::Claimed { generation } => self.claimed(id, generation),
            ToConsole::Output { offset, bytes } => self.output(id, offset, &bytes)?,
            ToConsole::InputLogged { upto_seq } => {
                if self.live == Some(id) {
                    let freed = self.inputs.confirm(upto_seq);
                    self.budget.release(freed);
                } else {
                    debug!(
                        id,
                        upto_seq, "console: confirmation from a side not followed"
                    );
                }
            }
            ToConsole::Done {
                reason,
                exit_status,
            } => {
                if self.follows(&self.sides[&id]) {
                    self.note(&format!("the VM ended: {reason} (status {exit_status})"));
                    self.end = Some(ConsoleEnd::Done {
                        reason,
                        exit_status,
                    });
                } else {
                    warn!(id, %reason, "console: Done from a side not followed: ignored");
                }
            }
        }
        Ok(())
    }

    fn hello(&mut self, id: u64, h: Hello) {
        match &self.vm {
            Some(vm) if *vm != h.vm => {
                let why = format!("it is for VM {:?}, this console follows {vm:?}", h.vm);
                self.drop_side(id, &why);
                return;
            }
            _ => self.vm = Some(h.vm.clone()),
        }
        let side = self.sides.get_mut(&id).expect("checked by the caller");
        if side.hello.is_none() {
            self.stats.sides_seen += 1;
        }
        info!(
            peer = %side.peer, vm = %h.vm, generation = h.generation, role = %h.role,
            claimant = %h.claimant, next_offset = h.next_offset, won_claim = h.won_claim,
            input_resume_seq = h.input_resume_seq, "console: side said hello"
        );
        side.hello = Some(h.clone());
        if h.won_claim {
            self.claimed(id, h.generation);
        } else if h.role != Role::Backup {
            self.raise(h.generation);
        }
        if let Some(top) = self.highest {
            if h.generation < top {
                info!(
                    generation = h.generation,
                    highest = top,
                    "console: a side of an older generation joined: its output is ignored"
                );
            }
        }
    }

    fn raise(&mut self, generation: u64) {
        match self.highest {
            Some(g) if g >= generation => {}
            _ => self.highest = Some(generation),
        }
    }

    fn claimed(&mut self, id: u64, generation: u64) {
        let side = self.sides.get_mut(&id).expect("checked by the caller");
        let h = side.hello.as_mut().expect("checked by the caller");
        if generation < h.generation {
            warn!(
                generation,
                side_generation = h.generation,
                "console: a claim for an older generation than the side's: ignored"
            );
            return;
        }
        h.generation = generation;
        h.won_claim = true;
        let claimant = h.claimant.clone();
        match &self.claim {
            Some((g, _)) if *g > generation => {
                warn!(generation, newer = *g, "console: a stale claim: ignored");
                return;
            }
            Some((g, c)) if *g == generation && *c != claimant => {
                warn!(
                    generation, first = %c, second = %claimant,
                    "console: two claimants for one generation; keeping the first"
                );
                return;
            }
            _ => {}
        }
        self.claim = Some((generation, claimant));
        self.raise(generation);
    }

    fn output(&mut self, id: u64, offset: u64, bytes: &[u8]) -> Result<(), ConsoleError> {
        let side = &self.sides[&id];
        if !self.follows(side) {
            self.stats.ignored_bytes += bytes.len() as u64;
            if !side.warned_ignored {
                let h = side.hello.as_ref().expect("checked by the caller");
                warn!(
                    claimant = %h.claimant, generation = h.generation, role = %h.role,
                    "console: ignoring output from a side that is not followed"
                );
                self.sides.get_mut(&id).expect("present").warned_ignored = true;
            }
            return Ok(());
        }
        let placed = self.cursor.place(offset, bytes);
        if let Some(gap) = placed.gap.clone() {
            self.stats.gaps += 1;
            self.stats.gap_bytes += gap.end - gap.start;
            self.note(&format!(
                "GAP: bytes {}..{} of the guest's output were lost",
                gap.start, gap.end
            ));
        }
        self.stats.duplicate_bytes += placed.duplicate;
        if !placed.print.is_empty() {
            self.output
                .write_all(placed.print)
                .and_then(|()| self.output.flush())
                .map_err(ConsoleError::Output)?;
            self.stats.bytes_printed += placed.print.len() as u64;
            self.at_line_start = placed.print.last() == Some(&b'\n');
        }
        if let Some(next) = self.cursor.next() {
            self.send(id, &ToSide::Ack { offset: next });
        }
        Ok(())
    }
}
