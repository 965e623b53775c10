//! The drill's TCP stream: one connection from the console's host to the
//! guest's echo server, held the whole drill, a numbered line every
//! [`PERIOD`], every echo checked ([`super::echo::EchoCheck`]).
//!
//! ```text
//! sender  ─ every 100 ms: check.send() ─▶ socket ─▶ guest (nc -e cat) ─┐
//! reader  ◀─ check.received() ◀─ socket ◀──────────────────────────────┘
//! ```
//!
//! A reset, a close, wrong bytes or a stall past the limit break it; the
//! drill looks after every round ([`TcpStream::problem`]) and at the end
//! ([`TcpStream::finish`]: every line echoed, then a clean close).

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::echo::{EchoCheck, Stall};

/// One line every this long.
pub const PERIOD: Duration = Duration::from_millis(100);

/// What the report shows of a stream.
#[derive(Debug, Clone)]
pub struct StreamFigures {
    /// The guest's address and port.
    pub target: SocketAddr,
    /// The host the client ran on.
    pub from: String,
    pub lines_sent: u64,
    pub bytes_sent: u64,
    pub lines_echoed: u64,
    pub bytes_echoed: u64,
    /// Every stall of at least [`super::echo::STALL_KEPT`], from the
    /// drill's start (one still in progress included).
    pub stalls: Vec<Stall>,
    /// From the connection to the end of the check.
    pub duration: Duration,
    /// The longest stall allowed.
    pub limit: Duration,
    /// Why the stream broke, if it did.
    pub broken: Option<String>,
}

impl StreamFigures {
    /// The longest stall, if any.
    pub fn longest(&self) -> Option<Stall> {
        self.stalls.iter().copied().max_by_key(|s| s.length)
    }
}

/// The client's side of the stream.
pub struct TcpStream {
    sock: std::net::TcpStream,
    target: SocketAddr,
    from: String,
    check: Arc<Mutex<EchoCheck>>,
    /// Set when the client is done sending (then it half-closes).
    done: Arc<AtomicBool>,
    sender: Option<JoinHandle<()>>,
    reader: Option<JoinHandle<()>>,
    t0: Instant,
    started: Instant,
    limit: Duration,
    /// Set once [`TcpStream::finish`] ran: the figures are final.
    ended: Option<Instant>,
}

fn lock(c: &Mutex<EchoCheck>) -> MutexGuard<'_, EchoCheck> {
    c.lock().unwrap_or_else(|e| e.into_inner())
}

impl TcpStream {
    /// Start the conversation on `sock` (connected to `target` from host
    /// `from`); times count from `t0`, the drill's start.
    pub fn start(
        sock: std::net::TcpStream,
        target: SocketAddr,
        from: &str,
        t0: Instant,
        limit: Duration,
    ) -> std::io::Result<TcpStream> {
        sock.set_nodelay(true)?;
        // A blocked write (the guest unreachable, the send buffer full)
        // returns now and then so the sender sees `done`.
        sock.set_write_timeout(Some(Duration::from_millis(500)))?;
        let check = Arc::new(Mutex::new(EchoCheck::new()));
        let done = Arc::new(AtomicBool::new(false));
        let reader = {
            let (mut sock, check, done) = (sock.try_clone()?, check.clone(), done.clone());
            std::thread::Builder::new()
                .name("drill-tcp-rx".into())
                .spawn(move || {
                    let mut buf = [0u8; 4096];
                    loop {
                        match sock.read(&mut buf) {
                            Ok(0) => {
                                lock(&check).closed(None, done.load(Ordering::SeqCst));
                                return;
                            }
                            Ok(n) => lock(&check).received(&buf[..n], t0.elapsed()),
                            Err(e) if e.kind() == ErrorKind::Interrupted => {}
                            Err(e) => {
                                lock(&check).closed(Some(&e), false);
                                return;
                            }
                        }
                    }
                })?
        };
        let sender = {
            let (mut sock, check, done) = (sock.try_clone()?, check.clone(), done.clone());
            std::thread::Builder::new()
                .name("drill-tcp-tx".into())
                .spawn(move || {
                    let mut next = Instant::now();
                    while !done.load(Ordering::SeqCst) {
                        let bytes = {
                            let mut c = lock(&check);
                            if c.broken().is_some() {
                                return;
                            }
                            c.send(t0.elapsed())
                        };
                        if let Err(e) = write_patiently(&mut sock, &bytes, &done) {
                            lock(&check).send_failed(&e);
                            return;
                        }
                        // A steady pace: after a blocked write, no burst to
                        // catch up.
                        next = (next + PERIOD).max(Instant::now());
                        std::thread::sleep(next.saturating_duration_since(Instant::now()));
                    }
                })?
        };
        Ok(TcpStream {
            sock,
            target,
            from: from.to_string(),
            check,
            done,
            sender: Some(sender),
            reader: Some(reader),
            t0,
            started: Instant::now(),
            limit,
            ended: None,
        })
    }

    /// Why the stream is broken now, if it is: a reset, a close, wrong
    /// bytes, or a stall longer than the limit in progress.
    pub fn problem(&self) -> Option<String> {
        let c = lock(&self.check);
        if let Some(why) = c.broken() {
            return Some(why.to_string());
        }
        let stall = c.current_stall(self.t0.elapsed())?;
        (stall.length > self.limit).then(|| {
            format!(
                "no echo for {:.1} s (limit {} s) with {} lines outstanding, since {:.1} s into the drill",
                stall.length.as_secs_f64(),
                self.limit.as_secs(),
                c.outstanding(),
                stall.start.as_secs_f64()
            )
        })
    }

    /// The end of the conversation: stop sending, wait (up to the limit)
    /// for every line's echo, half-close and wait for the guest to close
    /// its end. Breaks the stream if any of it does not happen.
    pub fn finish(&mut self) {
        self.done.store(true, Ordering::SeqCst);
        if let Some(s) = self.sender.take() {
            let _ = s.join();
        }
        let wait = |what: &dyn Fn(&EchoCheck) -> bool| {
            let t = Instant::now();
            while t.elapsed() < self.limit {
                let c = lock(&self.check);
                if c.broken().is_some() || what(&c) {
                    return true;
                }
                drop(c);
                std::thread::sleep(Duration::from_millis(10));
            }
            false
        };
        if !wait(&|c| c.outstanding() == 0) {
            let mut c = lock(&self.check);
            let n = c.outstanding();
            c.break_with(format!(
                "{n} lines never came back within {} s of the last one sent",
                self.limit.as_secs()
            ));
        }
        if lock(&self.check).broken().is_some() {
            self.ended = Some(Instant::now());
            return;
        }
        if let Err(e) = self.sock.shutdown(Shutdown::Write) {
            lock(&self.check).break_with(format!("cannot half-close the connection: {e}"));
        }
        // The echo server ends with the client's end of stream: the
        // reader sees the guest's close.
        let t = Instant::now();
        let open = |r: &Option<JoinHandle<()>>| r.as_ref().is_some_and(|r| !r.is_finished());
        while open(&self.reader) && t.elapsed() < self.limit {
            std::thread::sleep(Duration::from_millis(10));
        }
        if open(&self.reader) {
            lock(&self.check).break_with(format!(
                "the guest did not close its end within {} s of the client's",
                self.limit.as_secs()
            ));
        }
        self.ended = Some(Instant::now());
    }

    /// The figures so far (final after [`TcpStream::finish`]).
    pub fn figures(&self) -> StreamFigures {
        let c = lock(&self.check);
        let mut stalls = c.stalls.clone();
        if let Some(s) = c.current_stall(self.t0.elapsed()) {
            if s.length >= super::echo::STALL_KEPT {
                stalls.push(s);
            }
        }
        StreamFigures {
            target: self.target,
            from: self.from.clone(),
            lines_sent: c.lines_sent,
            bytes_sent: c.bytes_sent,
            lines_echoed: c.lines_echoed,
            bytes_echoed: c.bytes_echoed,
            stalls,
            duration: self.ended.unwrap_or_else(Instant::now) - self.started,
            limit: self.limit,
            broken: c.broken().map(str::to_string).or_else(|| {
                drop(c);
                self.problem()
            }),
        }
    }
}

/// How long the last line may take to go out once the conversation is
/// ending (a line counted as sent must be sent whole, or its echo would
/// be waited for in vain).
const LAST_WRITE: Duration = Duration::from_secs(30);

/// Write all of `bytes`, retrying the write timeout's returns; once
/// `done`, for at most [`LAST_WRITE`] more.
fn write_patiently(
    sock: &mut std::net::TcpStream,
    mut bytes: &[u8],
    done: &AtomicBool,
) -> std::io::Result<()> {
    let mut ending: Option<Instant> = None;
    while !bytes.is_empty() {
        match sock.write(bytes) {
            Ok(0) => return Err(ErrorKind::WriteZero.into()),
            Ok(n) => bytes = &bytes[n..],
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                if done.load(Ordering::SeqCst)
                    && ending.get_or_insert_with(Instant::now).elapsed() > LAST_WRITE
                {
                    return Err(std::io::Error::new(
                        ErrorKind::TimedOut,
                        format!(
                            "the last line could not be sent within {} s",
                            LAST_WRITE.as_secs()
                        ),
                    ));
                }
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

impl Drop for TcpStream {
    fn drop(&mut self) {
        self.done.store(true, Ordering::SeqCst);
        let _ = self.sock.shutdown(Shutdown::Both);
        if let Some(s) = self.sender.take() {
            let _ = s.join();
        }
        if let Some(r) = self.reader.take() {
            let _ = r.join();
        }
    }
}
