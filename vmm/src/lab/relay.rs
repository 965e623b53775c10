//! A delaying TCP relay: delay and jitter on a link, in user space (this
//! kernel has no `netem`). A drill puts one between the primary and the
//! backup to measure output delay and lag against the channel's round
//! trip time.
//!
//! ```text
//! client ──▶ [listen] relay [connect] ──▶ target
//!            each chunk read is held until  read time + delay ± jitter,
//!            never before the chunk ahead of it (order is kept)
//! ```
//!
//! Each accepted connection gets its own connection to the target and
//! two pump threads (one per direction); a chunk is whatever one `read`
//! returned. [`Relay::cut`] closes every connection at once (a broken
//! link as both ends see it); new connections are still accepted.

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use thiserror::Error;

/// Errors starting a relay.
#[derive(Debug, Error)]
pub enum RelayError {
    /// The listening socket.
    #[error("relay: cannot listen on {addr}: {source}")]
    Listen {
        /// Where.
        addr: String,
        /// Why.
        source: io::Error,
    },
    /// The target's address.
    #[error("relay: cannot resolve the target {addr}: {source}")]
    Target {
        /// What was given.
        addr: String,
        /// Why.
        source: io::Error,
    },
}

/// How a relay delays.
#[derive(Debug, Clone, Copy)]
pub struct Delay {
    /// Added to every chunk, each way.
    pub delay: Duration,
    /// Each chunk gets up to this much more, drawn uniformly.
    pub jitter: Duration,
    /// Seed of the jitter's draws (printed by a drill, so a run can be
    /// repeated).
    pub seed: u64,
}

/// A running relay. Dropping it stops accepting and cuts every
/// connection.
pub struct Relay {
    local: SocketAddr,
    conns: Arc<Mutex<Vec<TcpStream>>>,
    stop: Arc<Mutex<bool>>,
    /// While set, every byte read is dropped (a partition: both ends hear
    /// nothing, the connections stay open).
    dropping: Arc<AtomicBool>,
}

impl Relay {
    /// Listen on `listen` and relay each connection to `target`.
    pub fn start(listen: &str, target: &str, delay: Delay) -> Result<Relay, RelayError> {
        let target_addr: SocketAddr = target
            .to_socket_addrs()
            .and_then(|mut a| {
                a.next()
                    .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "no address"))
            })
            .map_err(|source| RelayError::Target {
                addr: target.to_string(),
                source,
            })?;
        let listen_err = |source| RelayError::Listen {
            addr: listen.to_string(),
            source,
        };
        let listener = TcpListener::bind(listen).map_err(listen_err)?;
        let local = listener.local_addr().map_err(listen_err)?;
        let target = target_addr;
        let conns: Arc<Mutex<Vec<TcpStream>>> = Arc::default();
        let stop: Arc<Mutex<bool>> = Arc::default();
        let dropping: Arc<AtomicBool> = Arc::default();
        let (c, s, d) = (conns.clone(), stop.clone(), dropping.clone());
        thread::Builder::new()
            .name("relay-accept".into())
            .spawn(move || {
                let mut n = 0u64;
                for conn in listener.incoming() {
                    if *s.lock().unwrap_or_else(|e| e.into_inner()) {
                        return;
                    }
                    let Ok(client) = conn else { continue };
                    let Ok(server) = TcpStream::connect(target) else {
                        let _ = client.shutdown(Shutdown::Both);
                        continue;
                    };
                    n += 1;
                    let _ = client.set_nodelay(true);
                    let _ = server.set_nodelay(true);
                    let seed = delay.seed ^ n.wrapping_mul(0x9e37_79b9_7f4a_7c15);
                    let handles = [&client, &server].map(|s| s.try_clone());
                    if let [Ok(a), Ok(b)] = handles {
                        c.lock().unwrap_or_else(|e| e.into_inner()).extend([a, b]);
                    }
                    pump_pair(client, server, delay, seed, &d);
                }
            })
            .map_err(|source| RelayError::Listen {
                addr: local.to_string(),
                source,
            })?;
        Ok(Relay {
            local,
            conns,
            stop,
            dropping,
        })
    }

    /// The address clients connect to.
    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }

    /// Partition the link (`true`: every byte from now on is dropped, in
    /// both directions, and nobody is told) or heal it.
    pub fn partition(&self, on: bool) {
        self.dropping.store(on, Ordering::Release);
    }

    /// Close every relayed connection now (both ends see the link break).
    pub fn cut(&self) {
        for s in self
            .conns
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .drain(..)
        {
            let _ = s.shutdown(Shutdown::Both);
        }
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        *self.stop.lock().unwrap_or_else(|e| e.into_inner()) = true;
        // Wake the accept loop so it sees the stop.
        let _ = TcpStream::connect(self.local);
        self.cut();
    }
}

/// Relay both directions of one connection.
fn pump_pair(
    client: TcpStream,
    server: TcpStream,
    delay: Delay,
    seed: u64,
    dropping: &Arc<AtomicBool>,
) {
    for (from, to, seed) in [
        (client.try_clone(), server.try_clone(), seed),
        (server.try_clone(), client.try_clone(), seed.rotate_left(17)),
    ] {
        if let (Ok(from), Ok(to)) = (from, to) {
            pump(from, to, delay, seed, dropping.clone());
        }
    }
}

/// Chunks read, each with when it may be written, and whether the
/// reading side ended.
type Queue = (VecDeque<(Instant, Vec<u8>)>, bool);

/// One direction's queue between its reader and its writer.
struct Line {
    queue: Mutex<Queue>,
    ready: Condvar,
}

/// One direction: a reader thread stamps chunks, a writer thread writes
/// each when its time comes.
fn pump(
    mut from: TcpStream,
    mut to: TcpStream,
    delay: Delay,
    seed: u64,
    dropping: Arc<AtomicBool>,
) {
    let line = Arc::new(Line {
        queue: Mutex::new((VecDeque::new(), false)),
        ready: Condvar::new(),
    });
    let l = line.clone();
    let _ = thread::Builder::new()
        .name("relay-read".into())
        .spawn(move || {
            let mut rng = seed | 1;
            let mut last = Instant::now();
            let mut buf = vec![0u8; 64 << 10];
            loop {
                let n = match from.read(&mut buf) {
                    Ok(0) | Err(_) => 0,
                    Ok(n) => n,
                };
                if n > 0 && dropping.load(Ordering::Acquire) {
                    continue;
                }
                let mut q = l.queue.lock().unwrap_or_else(|e| e.into_inner());
                if n == 0 {
                    q.1 = true;
                    l.ready.notify_all();
                    return;
                }
                // xorshift64: the jitter's draws.
                rng ^= rng << 13;
                rng ^= rng >> 7;
                rng ^= rng << 17;
                let extra = match delay.jitter.as_nanos() as u64 {
                    0 => 0,
                    j => rng % (j + 1),
                };
                let at = (Instant::now() + delay.delay + Duration::from_nanos(extra)).max(last);
                last = at;
                q.0.push_back((at, buf[..n].to_vec()));
                l.ready.notify_all();
            }
        });
    let _ = thread::Builder::new()
        .name("relay-write".into())
        .spawn(move || loop {
            let mut q = line.queue.lock().unwrap_or_else(|e| e.into_inner());
            let chunk = loop {
                match q.0.front() {
                    Some((at, _)) if *at <= Instant::now() => {
                        break q.0.pop_front().expect("front exists").1;
                    }
                    Some((at, _)) => {
                        let wait = at.saturating_duration_since(Instant::now());
                        q = line
                            .ready
                            .wait_timeout(q, wait)
                            .unwrap_or_else(|e| e.into_inner())
                            .0;
                    }
                    None if q.1 => {
                        let _ = to.shutdown(Shutdown::Write);
                        return;
                    }
                    None => {
                        q = line.ready.wait(q).unwrap_or_else(|e| e.into_inner());
                    }
                }
            };
            drop(q);
            if to.write_all(&chunk).is_err() {
                let _ = to.shutdown(Shutdown::Both);
                return;
            }
        });
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An echo server on loopback.
    fn echo() -> SocketAddr {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let a = l.local_addr().unwrap();
        thread::spawn(move || {
            for c in l.incoming() {
                let Ok(mut c) = c else { continue };
                thread::spawn(move || {
                    let mut r = c.try_clone().unwrap();
                    let _ = io::copy(&mut r, &mut c);
                });
            }
        });
        a
    }

    #[test]
    fn bytes_pass_in_order_both_ways_however_they_are_jittered() {
        let target = echo().to_string();
        let relay = Relay::start(
            "127.0.0.1:0",
            &target,
            Delay {
                delay: Duration::from_millis(1),
                jitter: Duration::from_millis(5),
                seed: 7,
            },
        )
        .unwrap();
        let mut c = TcpStream::connect(relay.local_addr()).unwrap();
        let data: Vec<u8> = (0..200_000u32).map(|i| (i * 31 % 251) as u8).collect();
        let mut w = c.try_clone().unwrap();
        let sent = data.clone();
        let t = thread::spawn(move || {
            for piece in sent.chunks(997) {
                w.write_all(piece).unwrap();
            }
            w.shutdown(Shutdown::Write).unwrap();
        });
        let mut back = Vec::new();
        c.read_to_end(&mut back).unwrap();
        t.join().unwrap();
        assert_eq!(back.len(), data.len());
        assert!(back == data, "bytes reordered or changed");
    }

    #[test]
    fn nothing_arrives_before_the_delay_each_way() {
        let delay = Duration::from_millis(150);
        let target = echo().to_string();
        let relay = Relay::start(
            "127.0.0.1:0",
            &target,
            Delay {
                delay,
                jitter: Duration::ZERO,
                seed: 1,
            },
        )
        .unwrap();
        let mut c = TcpStream::connect(relay.local_addr()).unwrap();
        let t0 = Instant::now();
        c.write_all(b"x").unwrap();
        let mut b = [0u8; 1];
        c.read_exact(&mut b).unwrap();
        // There and back: at least twice the delay (a lower bound, which a
        // slow machine only makes larger).
        assert!(t0.elapsed() >= delay * 2, "{:?}", t0.elapsed());
        assert_eq!(&b, b"x");
    }

    #[test]
    fn a_cut_breaks_the_link_for_both_ends_and_new_connections_work() {
        let target = echo().to_string();
        let relay = Relay::start(
            "127.0.0.1:0",
            &target,
            Delay {
                delay: Duration::ZERO,
                jitter: Duration::ZERO,
                seed: 1,
            },
        )
        .unwrap();
        let mut c = TcpStream::connect(relay.local_addr()).unwrap();
        c.write_all(b"a").unwrap();
        let mut b = [0u8; 1];
        c.read_exact(&mut b).unwrap();
        relay.cut();
        c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut rest = Vec::new();
        // The read ends (EOF or a reset), it does not wait for the timeout.
        if let Err(e) = c.read_to_end(&mut rest) {
            assert!(
                !matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ),
                "the link is not broken: {e}"
            );
        }
        assert!(rest.is_empty(), "nothing after the cut");
        let mut c2 = TcpStream::connect(relay.local_addr()).unwrap();
        c2.write_all(b"b").unwrap();
        c2.read_exact(&mut b).unwrap();
        assert_eq!(&b, b"b");
    }

    #[test]
    fn an_unresolvable_target_is_named() {
        let e = Relay::start(
            "127.0.0.1:0",
            "no-such-host.invalid:1",
            Delay {
                delay: Duration::ZERO,
                jitter: Duration::ZERO,
                seed: 0,
            },
        )
        .err()
        .expect("refused");
        assert!(e.to_string().contains("cannot resolve the target"), "{e}");
    }
}
