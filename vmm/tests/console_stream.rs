//! The console stream end to end, over loopback TCP: a console endpoint
//! in a thread, sides as `ConsoleLink`s (and raw clients for the
//! misbehaving ones).

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use vmm::console::protocol::{side_handshake, ToConsole};
use vmm::console::{
    Console, ConsoleConfig, ConsoleEnd, ConsoleError, ConsoleHandle, ConsoleInput, ConsoleLink,
    ConsoleOutcome, ConsoleStats, Hello, LinkOptions, ProtocolError, Role,
};

const TOKEN: &[u8] = b"console-test-token";
const WAIT: Duration = Duration::from_secs(10);

/// A `Write` whose bytes the test can read.
#[derive(Clone, Default)]
struct Buf(Arc<Mutex<Vec<u8>>>);

impl Write for Buf {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Buf {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

/// Typed keys: a `Read` fed by the test.
struct Keys(Receiver<Vec<u8>>, Vec<u8>);

impl Read for Keys {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.1.is_empty() {
            match self.0.recv() {
                Ok(b) => self.1 = b,
                Err(_) => return Ok(0),
            }
        }
        let n = buf.len().min(self.1.len());
        buf[..n].copy_from_slice(&self.1[..n]);
        self.1.drain(..n);
        Ok(n)
    }
}

struct Running {
    handle: ConsoleHandle,
    addr: String,
    out: Buf,
    notes: Buf,
    keys: Sender<Vec<u8>>,
    thread: JoinHandle<Result<ConsoleOutcome, ConsoleError>>,
}

impl Running {
    fn stats(&self) -> ConsoleStats {
        self.handle.stats()
    }

    fn type_keys(&self, k: &[u8]) {
        self.keys.send(k.to_vec()).unwrap();
    }

    fn finish(self) -> (ConsoleOutcome, String, String) {
        let deadline = Instant::now() + WAIT;
        while !self.thread.is_finished() {
            assert!(
                Instant::now() < deadline,
                "the console did not end; notes:\n{}",
                self.notes.text()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        let outcome = self.thread.join().unwrap().unwrap();
        (outcome, self.out.text(), self.notes.text())
    }
}

fn start_with(listen: &str, tweak: impl Fn(&mut ConsoleConfig)) -> Running {
    let out = Buf::default();
    let notes = Buf::default();
    // The port of a console that just ended may take a moment to free.
    let deadline = Instant::now() + WAIT;
    let (console, keys) = loop {
        let (keys, rx) = mpsc::channel();
        let mut cfg = ConsoleConfig::new(listen, TOKEN);
        cfg.output = Box::new(out.clone());
        cfg.notes = Box::new(notes.clone());
        cfg.input = ConsoleInput::Reader {
            reader: Box::new(Keys(rx, Vec::new())),
            escape: true,
        };
        tweak(&mut cfg);
        match Console::bind(cfg) {
            Ok(console) => break (console, keys),
            Err(ConsoleError::Bind { .. }) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(e) => panic!("bind: {e}"),
        }
    };
    let handle = console.handle();
    let addr = handle.local_addr().to_string();
    let thread = std::thread::spawn(move || console.run());
    Running {
        handle,
        addr,
        out,
        notes,
        keys,
        thread,
    }
}

fn start() -> Running {
    start_with("127.0.0.1:0", |_| {})
}

fn hello(generation: u64, role: Role, claimant: &str, next_offset: u64, won: bool) -> Hello {
    Hello {
        vm: "vm1".into(),
        generation,
        role,
        claimant: claimant.into(),
        next_offset,
        won_claim: won,
        input_resume_seq: 1,
    }
}

fn opts() -> LinkOptions {
    LinkOptions {
        connect_deadline: Duration::from_secs(5),
        done_timeout: Duration::from_secs(5),
        max_backoff: Duration::from_millis(100),
        ..LinkOptions::default()
    }
}

fn link(c: &Running, h: Hello) -> ConsoleLink {
    ConsoleLink::connect_with(&c.addr, TOKEN, h, opts()).unwrap()
}

fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Input received by `l` until `n` chunks have come.
fn input_of(l: &ConsoleLink, n: usize) -> Vec<(u64, Vec<u8>)> {
    let mut got = Vec::new();
    wait_for("input", || {
        got.extend(l.take_input());
        got.len() >= n
    });
    got
}

/// The guest's output in this test: 100 numbered lines.
fn guest_stream() -> Vec<u8> {
    (0..100)
        .map(|i| format!("ticker {i} sum={}\r\n", i * (i + 1) / 2))
        .collect::<String>()
        .into_bytes()
}

#[test]
fn failover_prints_every_byte_exactly_once() {
    let c = start();
    let stream = guest_stream();
    let primary = link(&c, hello(10, Role::Primary, "p:1:aa", 0, false));
    let backup = link(&c, hello(10, Role::Backup, "b:2:bb", 0, false));
    // The primary releases in uneven chunks; the console prints them.
    for piece in stream[..700].chunks(37) {
        let off = piece.as_ptr() as usize - stream.as_ptr() as usize;
        primary.release(off as u64, piece);
    }
    assert!(primary.wait_acked(700, WAIT));
    // The backup, not live, releases nothing; then the primary dies.
    drop(primary);
    // The backup wins the claim and re-sends from the offset the primary
    // had logged as released (550: before what the console printed).
    backup.announce_claim(10);
    backup.release(550, &stream[550..]);
    assert!(backup.wait_acked(stream.len() as u64, WAIT));
    backup.done("guest halted", 0).unwrap();
    let (outcome, out, _) = c.finish();
    assert_eq!(out.as_bytes(), &stream[..], "printed text is the stream");
    assert_eq!(outcome.stats.duplicate_bytes, 150);
    assert_eq!(outcome.stats.gaps, 0);
    assert_eq!(outcome.stats.bytes_printed, stream.len() as u64);
    assert_eq!(outcome.stats.sides_seen, 2);
    assert_eq!(outcome.stats.claim, Some((10, "b:2:bb".to_string())));
    assert_eq!(
        outcome.end,
        ConsoleEnd::Done {
            reason: "guest halted".into(),
            exit_status: 0
        }
    );
}

#[test]
fn after_a_claim_older_and_losing_sides_are_ignored() {
    let c = start();
    let old = link(&c, hello(5, Role::Primary, "p:1:aa", 0, false));
    old.release(0, b"abc");
    assert!(old.wait_acked(3, WAIT));
    let winner = link(&c, hello(5, Role::Backup, "b:2:bb", 0, false));
    winner.announce_claim(5);
    // It joined after the console printed "abc": it knows, and does not
    // send it again.
    assert_eq!(winner.acked_offset(), Some(3));
    winner.release(0, b"abc");
    assert_eq!(winner.unacked_bytes(), 0);
    wait_for("the claim", || {
        c.stats().claim == Some((5, "b:2:bb".into()))
    });

    // The old primary wakes up and releases more: ignored.
    old.release(3, b"XYZW");
    wait_for("ignored bytes", || c.stats().ignored_bytes == 4);
    // A side of an older generation: ignored as well.
    let older = link(&c, hello(4, Role::Primary, "p:9:zz", 3, false));
    older.release(3, b"OLD!");
    wait_for("ignored bytes", || c.stats().ignored_bytes == 8);
    // A backup of a newer pair that has not claimed does not take over.
    let new_backup = link(&c, hello(6, Role::Backup, "b:3:cc", 3, false));
    new_backup.release(3, b"NOPE");
    wait_for("ignored bytes", || c.stats().ignored_bytes == 12);
    // Done from a fenced side does not end the console.
    let fenced = ConsoleLink::connect_with(
        &c.addr,
        TOKEN,
        hello(5, Role::Primary, "p:1:aa", 3, false),
        LinkOptions {
            done_timeout: Duration::from_millis(300),
            ..opts()
        },
    )
    .unwrap();
    let _ = fenced.done("fenced", 5);
    assert!(!c.thread.is_finished());

    winner.release(3, b"def");
    assert!(winner.wait_acked(6, WAIT));
    // Re-protection: the live side forms a new pair (generation 6) and
    // says hello again; it stays followed.
    winner.rehello(6, Role::Primary);
    winner.release(6, b"ghi");
    assert!(winner.wait_acked(9, WAIT));
    assert_eq!(c.stats().highest_generation, Some(6));
    // The side of generation 5 that had claimed before is now old.
    old.release(7, b"late");
    wait_for("ignored bytes", || c.stats().ignored_bytes == 16);
    winner.done("guest halted", 0).unwrap();
    let (outcome, out, _) = c.finish();
    assert_eq!(out, "abcdefghi");
    assert_eq!(outcome.stats.ignored_bytes, 16);
    assert_eq!(outcome.exit_status(), 0);
}

#[test]
fn a_gap_is_reported_loudly_and_counted() {
    let c = start();
    let side = link(&c, hello(1, Role::Primary, "p:1:aa", 0, false));
    side.release(0, b"abc");
    side.release(10, b"xyz");
    assert!(side.wait_acked(13, WAIT));
    assert_eq!(c.stats().gaps, 1);
    side.done("guest halted", 0).unwrap();
    let (outcome, out, notes) = c.finish();
    assert_eq!(out, "abcxyz");
    assert_eq!((outcome.stats.gaps, outcome.stats.gap_bytes), (1, 7));
    assert!(
        notes.contains("vmft console: GAP: bytes 3..10 of the guest's output were lost"),
        "{notes}"
    );
}

#[test]
fn the_first_chunk_sets_the_base_offset() {
    let c = start();
    // A VM restored from a snapshot starts mid-stream.
    let primary = link(&c, hello(1, Role::Primary, "p:1:aa", 1000, false));
    primary.release(1000, b"hello ");
    assert!(primary.wait_acked(1006, WAIT));
    // A side that goes live re-sends from before the base: trimmed.
    let live = link(&c, hello(2, Role::Live, "b:2:bb", 990, true));
    live.release(990, b"0123456789hello world\r\n");
    assert!(live.wait_acked(1013, WAIT));
    live.done("guest halted", 0).unwrap();
    let (outcome, out, notes) = c.finish();
    assert_eq!(out, "hello world\r\n");
    assert_eq!(outcome.stats.printed_upto, Some(1013));
    assert_eq!(outcome.stats.gaps, 0, "{notes}");
}

#[test]
fn typed_input_reaches_the_live_side_and_unconfirmed_input_survives_it() {
    let c = start();
    let p1 = link(&c, hello(1, Role::Primary, "p:1:aa", 0, false));
    // A backup that has not claimed is not typed to.
    let b1 = link(&c, hello(1, Role::Backup, "b:2:bb", 0, false));
    wait_for("the live side", || {
        c.stats().live.as_deref() == Some("p:1:aa")
    });
    c.type_keys(b"ls\r");
    assert_eq!(input_of(&p1, 1), vec![(1, b"ls\r".to_vec())]);
    // The primary disappears without confirming.
    drop(p1);
    // The backup goes live: it gets the unconfirmed input again.
    b1.announce_claim(1);
    assert_eq!(input_of(&b1, 1), vec![(1, b"ls\r".to_vec())]);
    // It confirms seq 1; then more is typed.
    b1.confirm_input(1);
    c.type_keys(b"a");
    assert_eq!(input_of(&b1, 1), vec![(2, b"a".to_vec())]);
    wait_for("the confirmation", || {
        c.stats().input_unconfirmed_bytes == 1
    });
    drop(b1);
    // A new pair's primary that has every input below 2: only seq 2, once.
    let mut h = hello(2, Role::Primary, "b:2:bb", 0, false);
    h.input_resume_seq = 2;
    let p2 = link(&c, h);
    assert_eq!(input_of(&p2, 1), vec![(2, b"a".to_vec())]);
    // A reconnect of the same side that says it has seq 2 already gets
    // nothing again; new keys still arrive in order.
    let mut h = hello(2, Role::Primary, "b:2:bb", 0, false);
    h.input_resume_seq = 3;
    let p3 = link(&c, h);
    wait_for("the newest side to be followed", || {
        c.stats().live.is_some() && c.stats().sides_seen == 4
    });
    c.type_keys(b"b");
    assert_eq!(input_of(&p3, 1), vec![(3, b"b".to_vec())]);
    assert!(p2.take_input().is_empty());
    p3.confirm_input(3);
    // (The stats are published just after the input went out.)
    wait_for("the confirmation", || {
        let s = c.stats();
        s.inputs_typed == 3 && s.input_unconfirmed_bytes == 0
    });
    p3.done("guest halted", 0).unwrap();
    c.finish();
}

#[test]
fn a_side_with_a_wrong_token_is_refused() {
    let c = start();
    let o = LinkOptions {
        connect_deadline: Duration::from_secs(2),
        ..opts()
    };
    let err = ConsoleLink::connect_with(
        &c.addr,
        b"not-the-token",
        hello(1, Role::Primary, "x:1:aa", 0, false),
        o,
    )
    .unwrap_err();
    assert!(
        matches!(
            err,
            ConsoleError::Handshake {
                source: ProtocolError::ConsoleUnproven,
                ..
            }
        ),
        "{err}"
    );
    wait_for("the refusal", || c.stats().refused == 1);
    // A peer that forges its proof is told so and closed (the console
    // never sends a Welcome).
    let mut s = TcpStream::connect(&c.addr).unwrap();
    let mut open = vec![0, 0, 0, 41, 0x01];
    open.extend_from_slice(b"VMFTCON1");
    open.extend_from_slice(&[7; 32]);
    s.write_all(&open).unwrap();
    let mut challenge = [0u8; 4 + 1 + 8 + 32 + 32];
    s.read_exact(&mut challenge).unwrap();
    let mut proof = vec![0, 0, 0, 33, 0x03];
    proof.extend_from_slice(&[9; 32]);
    s.write_all(&proof).unwrap();
    let mut rest = Vec::new();
    s.read_to_end(&mut rest).unwrap();
    assert_eq!(rest[4], 0x04, "a Refused frame");
    assert!(String::from_utf8_lossy(&rest).contains("wrong token"));
    wait_for("the refusal", || c.stats().refused == 2);
    assert_eq!(c.stats().sides_seen, 0);
    // The console still serves the right token.
    let good = link(&c, hello(1, Role::Primary, "p:1:aa", 0, false));
    good.release(0, b"ok");
    good.done("guest halted", 0).unwrap();
    let (_, out, _) = c.finish();
    assert_eq!(out, "ok");
}

#[test]
fn garbage_is_refused_before_and_after_the_handshake() {
    let c = start();
    let mut s = TcpStream::connect(&c.addr).unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let mut rest = Vec::new();
    let _ = s.read_to_end(&mut rest);
    wait_for("the refusal", || c.stats().refused == 1);

    // An authenticated side that then sends a frame with a wrong tag is
    // dropped; nothing of it is printed.
    let s = TcpStream::connect(&c.addr).unwrap();
    let (_r, mut w, printed) = side_handshake(s.try_clone().unwrap(), s, TOKEN).unwrap();
    assert_eq!(printed, None);
    w.send(&ToConsole::Hello(hello(
        1,
        Role::Primary,
        "raw:1:aa",
        0,
        false,
    )))
    .unwrap();
    let mut forged = vec![0, 0, 0, 45, 0x11];
    forged.extend_from_slice(&0u64.to_be_bytes());
    forged.extend_from_slice(b"evil");
    forged.extend_from_slice(&[0; 32]);
    w.get_ref().try_clone().unwrap().write_all(&forged).unwrap();
    wait_for("the side to be dropped", || {
        c.stats().sides_seen == 1 && c.stats().live.is_none()
    });
    let good = link(&c, hello(1, Role::Primary, "p:1:aa", 0, false));
    good.release(0, b"fine");
    good.done("guest halted", 0).unwrap();
    let (outcome, out, _) = c.finish();
    assert_eq!(out, "fine");
    assert_eq!(outcome.stats.refused, 1);
}

#[test]
fn done_ends_the_console_with_its_status() {
    let c = start();
    let side = link(&c, hello(1, Role::Primary, "p:1:aa", 0, false));
    side.release(0, b"last words\r\n");
    side.done("the pair was stopped", 3).unwrap();
    let (outcome, out, notes) = c.finish();
    assert_eq!(out, "last words\r\n");
    assert_eq!(
        outcome.end,
        ConsoleEnd::Done {
            reason: "the pair was stopped".into(),
            exit_status: 3
        }
    );
    assert_eq!(outcome.exit_status(), 3);
    assert!(notes.contains("the VM ended: the pair was stopped (status 3)"));
}

#[test]
fn the_escape_detaches_and_leaves_the_vm_running() {
    let c = start();
    let side = link(&c, hello(1, Role::Primary, "p:1:aa", 0, false));
    wait_for("the live side", || c.stats().live.is_some());
    c.type_keys(b"hi\x01x");
    let got = input_of(&side, 1);
    let (outcome, _, notes) = c.finish();
    assert_eq!(got, vec![(1, b"hi".to_vec())]);
    assert_eq!(outcome.end, ConsoleEnd::Detached);
    assert_eq!(outcome.exit_status(), 0);
    assert!(notes.contains("detached; the VM keeps running"), "{notes}");
    assert!(!side.stop_requested());
}

#[test]
fn in_ft_mode_the_escape_stops_the_pair() {
    let c = start_with("127.0.0.1:0", |cfg| cfg.escape_stops_pair = true);
    let side = link(&c, hello(1, Role::Primary, "p:1:aa", 0, false));
    let calls = Arc::new(AtomicU32::new(0));
    let k = calls.clone();
    side.on_stop(move || {
        k.fetch_add(1, Ordering::SeqCst);
    });
    wait_for("the live side", || c.stats().live.is_some());
    c.type_keys(b"\x01x");
    wait_for("the stop request", || side.stop_requested());
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    // The console keeps printing until the side says Done.
    side.release(0, b"stopping\r\n");
    assert!(side.wait_acked(10, WAIT));
    side.done("the pair was stopped", 0).unwrap();
    let (outcome, out, notes) = c.finish();
    assert_eq!(out, "stopping\r\n");
    assert_eq!(outcome.exit_status(), 0);
    assert!(notes.contains("stopping the pair"), "{notes}");
}

#[test]
fn a_side_resends_unacknowledged_output_to_a_restarted_console() {
    let a = start();
    let addr = a.addr.clone();
    let side = ConsoleLink::connect_with(
        &addr,
        TOKEN,
        hello(1, Role::Primary, "p:1:aa", 0, false),
        LinkOptions {
            max_unacked_bytes: 16 * 1024,
            ..opts()
        },
    )
    .unwrap();
    side.release(0, b"abc");
    assert!(side.wait_acked(3, WAIT));
    a.handle.shutdown();
    let (outcome, out, _) = a.finish();
    assert_eq!((outcome.end, out.as_str()), (ConsoleEnd::Shutdown, "abc"));
    // Released while no console is there: held, and more than the buffer
    // holds makes release wait (back-pressure, not a drop).
    let big = vec![b'.'; 16 * 1024];
    side.release(3, &big);
    let side = Arc::new(side);
    let s = side.clone();
    let blocked = std::thread::spawn(move || s.release(3 + big.len() as u64, b"!\r\n"));
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        !blocked.is_finished(),
        "release waits while the buffer is full"
    );
    let b = start_with(&addr, |_| {});
    blocked.join().unwrap();
    assert!(side.wait_acked(3 + 16 * 1024 + 3, WAIT));
    let side = Arc::try_unwrap(side).unwrap();
    side.done("guest halted", 0).unwrap();
    let (outcome, out, _) = b.finish();
    // The new console starts where the side's unacknowledged output does.
    assert_eq!(out.len(), 16 * 1024 + 3);
    assert!(out.ends_with("!\r\n"));
    assert_eq!(outcome.stats.printed_upto, Some(3 + 16 * 1024 + 3));
}

#[test]
fn with_no_live_side_the_console_says_it_waits() {
    let c = start_with("127.0.0.1:0", |cfg| {
        cfg.idle_note_after = Duration::from_millis(100)
    });
    wait_for("the note", || {
        c.notes
            .text()
            .contains("vmft console: no live side connected (waiting)")
    });
    c.handle.shutdown();
    c.finish();
}

#[test]
fn a_side_of_another_vm_is_refused() {
    let c = start();
    let side = link(&c, hello(1, Role::Primary, "p:1:aa", 0, false));
    side.release(0, b"mine");
    assert!(side.wait_acked(4, WAIT));
    let mut h = hello(9, Role::Primary, "q:1:aa", 0, false);
    h.vm = "vm2".into();
    let other = link(&c, h);
    other.release(4, b"theirs");
    wait_for("the refusal", || c.stats().refused >= 1);
    wait_for("the reason", || other.refused_reason().is_some());
    assert!(other
        .refused_reason()
        .unwrap()
        .contains("this console follows \"vm1\""));
    side.release(4, b"!");
    side.done("guest halted", 0).unwrap();
    let (outcome, out, _) = c.finish();
    assert_eq!(out, "mine!");
    assert_eq!(outcome.stats.highest_generation, Some(1));
}
