//! The logging channel over loopback: a real log streamed and decoded,
//! acks, flow control, heartbeats, failure detection, clean ends, and
//! every way a peer or the wire can be wrong.
//!
//! Byte-level attacks go through a small relay that parses the channel's
//! frames (greeting, two handshake frames from the primary, then tagged
//! messages `len u32 | kind u8 | body | tag[16]`) and may alter, drop,
//! repeat or replace the primary's messages.

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use ft_log::channel::*;
use ft_log::entry::*;
use ft_log::format::*;

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

/// Heartbeat 50 ms, timeout 1 s, generous handshake and connect limits.
fn cfg() -> ChannelConfig {
    let mut c = ChannelConfig::new(b"correct horse battery".to_vec(), "vm-test", "hash-A")
        .with_timing(ms(50), ms(1000));
    c.connect_deadline = Duration::from_secs(10);
    c.handshake_timeout = Duration::from_secs(5);
    c.finish_timeout = Duration::from_secs(10);
    c
}

fn counter(c: ChannelConfig) -> (ChannelConfig, Arc<AtomicUsize>) {
    let n = Arc::new(AtomicUsize::new(0));
    let m = n.clone();
    (
        c.with_on_failure(move || {
            m.fetch_add(1, Ordering::SeqCst);
        }),
        n,
    )
}

fn listen() -> (BackupListener, SocketAddr) {
    let l = BackupListener::bind("127.0.0.1:0").unwrap();
    let a = l.local_addr().unwrap();
    (l, a)
}

/// Connect a primary to a backup directly, or through `relay_to`.
fn try_pair(
    p: &ChannelConfig,
    b: &ChannelConfig,
    tamper: Option<Tamper>,
) -> (
    Result<PrimaryLink, ChannelError>,
    Result<BackupLink, ChannelError>,
) {
    let (l, addr) = listen();
    let bc = b.clone();
    let t = thread::spawn(move || l.accept(&bc));
    let target = match tamper {
        Some(f) => relay(addr, f),
        None => addr,
    };
    let p = PrimaryLink::connect(target, p);
    (p, t.join().unwrap())
}

fn pair(p: &ChannelConfig, b: &ChannelConfig) -> (PrimaryLink, BackupLink) {
    let (p, b) = try_pair(p, b, None);
    (p.unwrap(), b.unwrap())
}

fn pair_via(p: &ChannelConfig, b: &ChannelConfig, tamper: Tamper) -> (PrimaryLink, BackupLink) {
    let (p, b) = try_pair(p, b, Some(tamper));
    (p.unwrap(), b.unwrap())
}

/// What the relay does with the primary's `n`th tagged message (0-based,
/// which is also its message number): the frames to forward instead.
type Tamper = Box<dyn FnMut(u64, Vec<u8>) -> Vec<Vec<u8>> + Send>;

const DATA: u8 = 0x01;

fn read_frame(s: &mut TcpStream, tagged: bool) -> io::Result<Vec<u8>> {
    let mut f = vec![0u8; 5];
    s.read_exact(&mut f)?;
    let len = u32::from_le_bytes(f[..4].try_into().unwrap()) as usize;
    let extra = len + if tagged { 16 } else { 0 };
    f.resize(5 + extra, 0);
    s.read_exact(&mut f[5..])?;
    Ok(f)
}

/// A relay from a fresh local port to `backup`: the backup's bytes pass
/// unchanged, the primary's tagged messages through `tamper`.
fn relay(backup: SocketAddr, mut tamper: Tamper) -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    thread::spawn(move || {
        let (mut p, _) = l.accept().unwrap();
        let mut b = TcpStream::connect(backup).unwrap();
        let (mut p2, mut b2) = (p.try_clone().unwrap(), b.try_clone().unwrap());
        thread::spawn(move || {
            let _ = io::copy(&mut b2, &mut p2);
            let _ = p2.shutdown(Shutdown::Write);
        });
        let mut pump = || -> io::Result<()> {
            let mut g = [0u8; 10];
            p.read_exact(&mut g)?;
            b.write_all(&g)?;
            for _ in 0..2 {
                let f = read_frame(&mut p, false)?;
                b.write_all(&f)?;
            }
            let mut n = 0;
            loop {
                let f = read_frame(&mut p, true)?;
                for out in tamper(n, f) {
                    b.write_all(&out)?;
                }
                n += 1;
            }
        };
        let _ = pump();
        let _ = b.shutdown(Shutdown::Both);
        let _ = p.shutdown(Shutdown::Both);
    });
    addr
}

fn header() -> LogHeader {
    LogHeader {
        kernel: "/k".into(),
        initrd: None,
        mem_mib: 64,
        cmdline: "console=ttyS0".into(),
        config_hash: "ab".repeat(32),
        recorder: "channel test".into(),
        snapshot: None,
    }
}

/// `n` pseudo-random bytes (incompressible) from `seed`.
fn noise(n: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 32) as u8
        })
        .collect()
}

/// A real log of a few MB: exits, clock values, console input and six
/// epochs of incompressible pages (some split into parts).
fn sample_log() -> Vec<u8> {
    let mut w = LogWriter::new(Vec::new(), &header())
        .unwrap()
        .with_max_frame(256 << 10);
    let mut pos = 0;
    for i in 0..3000u64 {
        let k = i % 17 + 1;
        w.append(&Entry::Exits {
            first: pos + 1,
            exits: (0..k)
                .map(|j| ExitRecord {
                    kind: ExitKind::PioOut,
                    addr: 0x3f8,
                    data: (i * 31 + j) % 256,
                })
                .collect(),
        })
        .unwrap();
        pos += k;
        w.append(&Entry::Value {
            pos,
            source: ValueSource::Clock,
            value: i * 1_000_003,
        })
        .unwrap();
        if i % 700 == 3 {
            w.append(&Entry::ConsoleInput {
                pos,
                bytes: b"ls -l\n".to_vec(),
                next: None,
            })
            .unwrap();
        }
        if i % 500 == 0 {
            w.write_epoch(Epoch {
                pos,
                index: i / 500,
                vcpu: noise(3000, i),
                pages: (0..150)
                    .map(|g| Page {
                        gfn: g,
                        delta: g % 2 == 0,
                        data: noise(4096, i * 1000 + g),
                    })
                    .collect(),
                fingerprint: Fingerprint { rip: i, regs: pos },
            })
            .unwrap();
        }
    }
    w.into_inner()
}

/// Read the backup's stream to its end in a thread.
fn drain(b: &BackupLink) -> thread::JoinHandle<Vec<u8>> {
    let mut r = b.log_reader();
    thread::spawn(move || {
        let mut v = Vec::new();
        r.read_to_end(&mut v).unwrap();
        v
    })
}

fn wait_for(what: &str, limit: Duration, mut f: impl FnMut() -> bool) {
    let t = Instant::now();
    while !f() {
        assert!(t.elapsed() < limit, "{what}: not within {limit:?}");
        thread::sleep(ms(10));
    }
}

/// The failure hook ran, and only once.
fn assert_hook_ran_once(n: &AtomicUsize) {
    wait_for("the failure hook", Duration::from_secs(3), || {
        n.load(Ordering::SeqCst) >= 1
    });
    thread::sleep(ms(200));
    assert_eq!(n.load(Ordering::SeqCst), 1, "the hook runs exactly once");
}

fn failed_reason(s: Option<EndState>) -> String {
    match s {
        Some(EndState::PrimaryFailed { reason }) => reason,
        other => panic!("expected PrimaryFailed, got {other:?}"),
    }
}

#[test]
fn full_session_streams_a_real_log_in_odd_chunks() {
    let log = sample_log();
    assert!(log.len() > 3 << 20, "log of {} bytes", log.len());
    let (expected_header, expected) = decode_all(&log).unwrap();

    let mut p = cfg();
    p.max_message = 100_000; // splits the largest writes
    p.window = 512 << 10;
    let (p, pf) = counter(p);
    let (b, bf) = counter(cfg());
    let (mut primary, backup) = pair(&p, &b);

    let mut r = backup.log_reader();
    let reader = thread::spawn(move || {
        let sizes = [5usize, 333, 70_001, 1, 4096, 1 << 20];
        let (mut all, mut d, mut frames) = (Vec::new(), Decoder::new(), Vec::new());
        for i in 0.. {
            let mut buf = vec![0u8; sizes[i % sizes.len()]];
            let n = r.read(&mut buf).unwrap();
            if n == 0 {
                break;
            }
            all.extend_from_slice(&buf[..n]);
            d.push(&buf[..n]);
            while let Some(f) = d.next_frame().unwrap() {
                frames.push(f);
            }
        }
        d.finish().unwrap();
        let h = d.header().unwrap().cloned().unwrap();
        (all, h, frames)
    });

    let sizes = [1usize, 7, 4093, 65_537, 3, 1_048_583, 129, 250_001];
    let (mut at, mut i) = (0, 0);
    while at < log.len() {
        let n = sizes[i % sizes.len()].min(log.len() - at);
        primary.write(&log[at..at + n]).unwrap();
        at += n;
        i += 1;
        assert_eq!(primary.sent(), at as u64);
    }
    let handle = primary.handle();
    assert!(handle
        .wait_acked(log.len() as u64, Duration::from_secs(20))
        .unwrap());
    let stats = primary.stats();
    primary.finish().unwrap();

    let (all, h, frames) = reader.join().unwrap();
    assert!(all == log, "received bytes differ from the log");
    assert_eq!(h, expected_header);
    assert_eq!(frames, expected);
    assert_eq!(backup.end_state(), Some(EndState::Clean));

    assert_eq!(handle.acked(), log.len() as u64);
    assert_eq!(stats.bytes_queued, log.len() as u64);
    assert_eq!(stats.bytes_sent, log.len() as u64);
    assert!(stats.data_messages >= (log.len() / 100_000) as u64);
    assert!(stats.acks_received > 0);
    assert!(stats.ack_rtt.count > 0 && stats.ack_rtt.max > Duration::ZERO);
    let bs = backup.stats();
    assert_eq!(bs.bytes_received, log.len() as u64);
    assert_eq!(bs.bytes_delivered, log.len() as u64);
    // A clean end is no failure on either side.
    assert_eq!(pf.load(Ordering::SeqCst), 0);
    assert_eq!(bf.load(Ordering::SeqCst), 0);
}

#[test]
fn handshake_carries_names_generation_and_hello_blobs() {
    let p = cfg()
        .with_generation(1_700_000_000_123)
        .with_hello(b"disks: 1".to_vec());
    let b = cfg().with_hello(b"backup ready".to_vec());
    let (primary, backup) = pair(&p, &b);
    assert_eq!(backup.generation(), 1_700_000_000_123);
    assert_eq!(backup.peer().role, Role::Primary);
    assert_eq!(backup.peer().vm_name, "vm-test");
    assert_eq!(backup.peer().config_hash, "hash-A");
    assert_eq!(backup.peer().hello, b"disks: 1");
    assert_eq!(primary.peer().role, Role::Backup);
    assert_eq!(primary.peer().generation, 1_700_000_000_123);
    assert_eq!(primary.peer().hello, b"backup ready");
    primary.finish().unwrap();
    assert_eq!(backup.wait_end(ms(5000)), Some(EndState::Clean));
}

#[test]
fn acks_advance_wait_acked_works_and_positions_travel() {
    let (mut primary, backup) = pair(&cfg(), &cfg());
    let reader = drain(&backup);
    let handle = primary.handle();

    // Another thread waits for an ack of bytes not yet written.
    let h = handle.clone();
    let waiter = thread::spawn(move || h.wait_acked(100_000, Duration::from_secs(20)));
    primary.write(&noise(60_000, 1)).unwrap();
    assert!(primary.wait_acked(60_000, Duration::from_secs(20)).unwrap());
    assert!(primary.acked() >= 60_000);
    primary.write(&noise(40_000, 2)).unwrap();
    assert!(waiter.join().unwrap().unwrap());
    assert_eq!(primary.acked(), 100_000);
    assert_eq!(backup.received(), 100_000);

    // Nothing beyond what was written is ever acknowledged.
    let t = Instant::now();
    assert!(!primary.wait_acked(100_001, ms(300)).unwrap());
    assert!(t.elapsed() >= ms(300));

    // Positions: the backup's applied count in its acks and heartbeats,
    // the primary's exit count in its heartbeats.
    backup.set_applied(77);
    wait_for("applied position", Duration::from_secs(5), || {
        primary.backup_applied() == 77
    });
    handle.set_position(5_555);
    wait_for("primary position", Duration::from_secs(5), || {
        backup.primary_position() == 5_555
    });

    primary.finish().unwrap();
    let got = reader.join().unwrap();
    assert_eq!(got.len(), 100_000);
    assert_eq!(&got[..60_000], &noise(60_000, 1)[..]);
}

#[test]
fn flow_control_stalls_the_writer_until_acks_arrive() {
    // The backup holds at most 256 KiB unread; the window is 128 KiB.
    // Nobody reads at first: the backup stops reading the socket, acks
    // stop, and the writer must stall, for longer than the failure
    // timeout, without anybody declaring a failure.
    let mut p = cfg();
    p.window = 128 << 10;
    p.max_message = 32 << 10;
    let (p, pf) = counter(p);
    let mut b = cfg();
    b.backup_buffer = 256 << 10;
    let (b, bf) = counter(b);
    let (mut primary, backup) = pair(&p, &b);
    let handle = primary.handle();

    let log = noise(2 << 20, 7);
    let data = log.clone();
    let done = Arc::new(AtomicBool::new(false));
    let d = done.clone();
    let writer = thread::spawn(move || {
        primary.write(&data).unwrap();
        d.store(true, Ordering::SeqCst);
        primary
    });
    thread::sleep(ms(1500));
    assert!(!done.load(Ordering::SeqCst), "the writer did not stall");
    let sent = handle.sent();
    assert!(
        (128 << 10..=(256 + 32 + 128) << 10).contains(&sent),
        "sent {sent} while stalled"
    );
    assert_eq!(handle.peer_state(), PeerState::Alive);
    assert_eq!(backup.end_state(), None);

    // Reading frees the buffer, acks resume, the writer completes.
    let reader = drain(&backup);
    let mut primary = writer.join().unwrap();
    assert!(done.load(Ordering::SeqCst));
    let stats = primary.stats();
    assert!(stats.stalls >= 1, "{stats:?}");
    assert!(stats.stall_time >= ms(1000), "{stats:?}");
    assert!(backup.stats().buffer_full >= 1);
    primary.set_window(64 << 20);
    primary.write(b"tail").unwrap();
    primary.finish().unwrap();
    let got = reader.join().unwrap();
    assert_eq!(got.len(), log.len() + 4);
    assert!(got[..log.len()] == log[..]);
    assert_eq!(backup.end_state(), Some(EndState::Clean));
    assert_eq!(pf.load(Ordering::SeqCst) + bf.load(Ordering::SeqCst), 0);
}

#[test]
fn heartbeats_keep_an_idle_link_alive() {
    let p = cfg().with_timing(ms(50), ms(700));
    let b = cfg().with_timing(ms(50), ms(700));
    let (primary, backup) = pair(&p, &b);
    thread::sleep(ms(2100)); // three timeouts without a byte of log
    assert_eq!(primary.peer_state(), PeerState::Alive);
    assert_eq!(backup.end_state(), None);
    let ps = primary.stats();
    let bs = backup.stats();
    assert!(
        ps.heartbeats_sent >= 10 && ps.heartbeats_received >= 10,
        "{ps:?}"
    );
    assert!(
        bs.heartbeats_sent >= 10 && bs.heartbeats_received >= 10,
        "{bs:?}"
    );
    primary.finish().unwrap();
    assert_eq!(backup.wait_end(ms(5000)), Some(EndState::Clean));
}

#[test]
fn killed_primary_ends_the_reader_with_primary_failed() {
    let (b, bf) = counter(cfg());
    let (mut primary, backup) = pair(&cfg(), &b);
    let reader = drain(&backup);
    let data = noise(10_000, 3);
    primary.write(&data).unwrap();
    assert!(primary.wait_acked(10_000, Duration::from_secs(10)).unwrap());
    let t = Instant::now();
    drop(primary); // the socket closes without End
    let got = reader.join().unwrap();
    assert!(t.elapsed() < ms(1000 + 2000), "took {:?}", t.elapsed());
    assert_eq!(got, data, "every verified byte is still delivered");
    let reason = failed_reason(backup.end_state());
    assert!(reason.contains("closed the connection"), "{reason}");
    assert_hook_ran_once(&bf);
}

#[test]
fn silent_primary_is_declared_failed_after_the_timeout() {
    let (p, pf) = counter(cfg());
    let (b, bf) = counter(cfg());
    let (mut primary, backup) = pair(&p, &b);
    let reader = drain(&backup);
    primary.write(b"before the pause").unwrap();
    assert!(primary.wait_acked(16, Duration::from_secs(10)).unwrap());
    primary.set_silent(true); // no data, no heartbeats: a paused process
    let t = Instant::now();
    primary.write(b"never sent").unwrap();
    let end = backup.wait_end(Duration::from_secs(10));
    let took = t.elapsed();
    let reason = failed_reason(end);
    assert!(
        reason.contains("nothing heard from the primary"),
        "{reason}"
    );
    assert!(took >= ms(900) && took < ms(1000 + 3000), "took {took:?}");
    assert_eq!(reader.join().unwrap(), b"before the pause");
    assert_hook_ran_once(&bf);

    // The backup shut the connection: the primary notices too.
    assert!(matches!(
        primary.wait_failed(Duration::from_secs(10)),
        PeerState::Failed { .. }
    ));
    assert!(matches!(
        primary.write(b"x"),
        Err(ChannelError::PeerFailed { .. })
    ));
    assert_hook_ran_once(&pf);
}

#[test]
fn silent_backup_is_declared_failed_by_the_primary() {
    let (p, pf) = counter(cfg());
    let (mut primary, backup) = pair(&p, &cfg());
    let _reader = drain(&backup);
    backup.set_silent(true);
    let t = Instant::now();
    let state = primary.wait_failed(Duration::from_secs(10));
    let took = t.elapsed();
    let PeerState::Failed { reason } = state else {
        panic!("the backup's silence went unnoticed")
    };
    assert!(reason.contains("nothing heard from the backup"), "{reason}");
    assert!(took >= ms(900) && took < ms(1000 + 3000), "took {took:?}");
    assert_hook_ran_once(&pf);
    let e = primary.write(b"late").unwrap_err();
    assert!(matches!(e, ChannelError::PeerFailed { .. }), "{e}");
    assert!(primary.wait_acked(1, ms(100)).is_err());
    // The backup sees its primary go away (not cleanly).
    failed_reason(backup.wait_end(Duration::from_secs(10)));
}

#[test]
fn clean_finish_ends_the_reader_with_clean() {
    let (p, pf) = counter(cfg());
    let (b, bf) = counter(cfg());
    let (mut primary, backup) = pair(&p, &b);
    let reader = drain(&backup);
    primary.write(b"abc").unwrap();
    primary.finish().unwrap();
    assert_eq!(reader.join().unwrap(), b"abc");
    assert_eq!(backup.end_state(), Some(EndState::Clean));
    // The connection closing after End is not a failure, later either.
    thread::sleep(ms(1500));
    assert_eq!(backup.end_state(), Some(EndState::Clean));
    assert_eq!(pf.load(Ordering::SeqCst) + bf.load(Ordering::SeqCst), 0);
}

#[test]
fn wrong_secret_is_refused_on_both_sides() {
    let mut p = cfg();
    p.secret = b"not the secret".to_vec();
    let (pr, br) = try_pair(&p, &cfg(), None);
    let pe = pr.err().expect("the primary must be refused");
    let be = br.err().expect("the backup must refuse");
    assert!(matches!(pe, ChannelError::AuthRefused), "{pe}");
    assert!(matches!(be, ChannelError::AuthFailed), "{be}");
    assert!(pe.to_string().contains("wrong token?"), "{pe}");
    assert_eq!(be.to_string(), "peer failed authentication (wrong token?)");
}

#[test]
fn garbage_instead_of_a_handshake_is_refused() {
    // A client that speaks HTTP to the backup.
    let (l, addr) = listen();
    let t = thread::spawn(move || l.accept(&cfg()));
    let mut s = TcpStream::connect(addr).unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: backup\r\n\r\n")
        .unwrap();
    let e = t.join().unwrap().err().expect("garbage must be refused");
    assert!(matches!(e, ChannelError::NotChannel { .. }), "{e}");
    assert!(e.to_string().contains("not a vmft channel"), "{e}");

    // A server that speaks SSH to the primary.
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let server = thread::spawn(move || {
        let (mut s, _) = l.accept().unwrap();
        s.write_all(b"SSH-2.0-OpenSSH_9.2\r\n").unwrap();
        let mut sink = Vec::new();
        let _ = s.read_to_end(&mut sink);
    });
    let e = PrimaryLink::connect(addr, &cfg()).err().expect("refused");
    assert!(matches!(e, ChannelError::NotChannel { .. }), "{e}");
    server.join().unwrap();

    // A peer that connects and says nothing: the handshake times out.
    let (l, addr) = listen();
    let mut c = cfg();
    c.handshake_timeout = ms(300);
    let t = thread::spawn(move || l.accept(&c));
    let _s = TcpStream::connect(addr).unwrap();
    let e = t.join().unwrap().err().expect("refused");
    assert!(matches!(e, ChannelError::Timeout { .. }), "{e}");
}

#[test]
fn mismatched_config_hash_is_refused_naming_both() {
    let mut b = cfg();
    b.config_hash = "hash-B".into();
    let (pr, br) = try_pair(&cfg(), &b, None);
    for e in [pr.err().unwrap(), br.err().unwrap()] {
        assert!(matches!(e, ChannelError::ConfigMismatch { .. }), "{e}");
        assert_eq!(
            e.to_string(),
            "configuration hash mismatch: primary hash-A, backup hash-B"
        );
    }
}

#[test]
fn mismatched_vm_name_is_refused_and_an_empty_name_takes_any() {
    let mut b = cfg();
    b.vm_name = "other-vm".into();
    let (pr, br) = try_pair(&cfg(), &b, None);
    for e in [pr.err().unwrap(), br.err().unwrap()] {
        assert!(matches!(e, ChannelError::VmMismatch { .. }), "{e}");
        assert!(e.to_string().contains("\"vm-test\"") && e.to_string().contains("\"other-vm\""));
    }
    b.vm_name.clear();
    let (primary, backup) = pair(&cfg(), &b);
    assert_eq!(backup.peer().vm_name, "vm-test");
    primary.finish().unwrap();
}

/// 20 data messages of 10 000 bytes each, one per write (the later ones
/// may be refused once a tampered message made the backup hang up).
fn twenty_messages(p: &mut PrimaryLink) -> Vec<u8> {
    let log = noise(200_000, 11);
    for c in log.chunks(10_000) {
        match p.write(c) {
            Ok(()) => {}
            Err(ChannelError::PeerFailed { .. }) => break,
            Err(e) => panic!("{e}"),
        }
    }
    log
}

fn small_messages() -> ChannelConfig {
    let mut c = cfg();
    c.max_message = 10_000;
    c
}

#[test]
fn altered_data_message_is_refused_and_nothing_after_it_delivered() {
    // The relay flips one bit in the payload of the third data message.
    let altered = Arc::new(Mutex::new(None));
    let a = altered.clone();
    let mut data_seen = 0;
    let tamper: Tamper = Box::new(move |n, mut f| {
        if f[4] == DATA {
            data_seen += 1;
            if data_seen == 3 {
                f[5 + 8 + 1234] ^= 0x10;
                *a.lock().unwrap() = Some(n);
            }
        }
        vec![f]
    });
    let (p, pf) = counter(small_messages());
    let (mut primary, backup) = pair_via(&p, &small_messages(), tamper);
    let reader = drain(&backup);
    let log = twenty_messages(&mut primary);

    let got = reader.join().unwrap();
    assert!(got == log[..20_000], "delivered {} bytes", got.len());
    let reason = failed_reason(backup.end_state());
    let n = altered.lock().unwrap().expect("a message was altered");
    assert!(
        reason.contains(&format!(
            "message {n} failed authentication: altered in flight"
        )),
        "{reason}"
    );
    assert!(backup.received() == 20_000);
    // The primary learns that its backup is gone.
    assert!(matches!(
        primary.wait_failed(Duration::from_secs(10)),
        PeerState::Failed { .. }
    ));
    assert!(primary.acked() <= 20_000);
    assert_hook_ran_once(&pf);
}

#[test]
fn message_captured_in_one_session_is_refused_in_another() {
    // Session 1: capture the first data message on the wire.
    let captured = Arc::new(Mutex::new(None::<Vec<u8>>));
    let c = captured.clone();
    let tamper: Tamper = Box::new(move |_, f| {
        if f[4] == DATA {
            c.lock().unwrap().get_or_insert_with(|| f.clone());
        }
        vec![f]
    });
    let (mut primary, backup) = pair_via(&small_messages(), &small_messages(), tamper);
    let reader = drain(&backup);
    let log = twenty_messages(&mut primary);
    primary.finish().unwrap();
    assert!(reader.join().unwrap() == log);
    let old = captured.lock().unwrap().clone().expect("captured");

    // Session 2, same secret, same log: the relay swaps in the captured
    // frame for the first data message. It differs only in its tag.
    let swapped = Arc::new(Mutex::new(None));
    let s = swapped.clone();
    let mut done = false;
    let old2 = old.clone();
    let tamper: Tamper = Box::new(move |n, f| {
        if f[4] == DATA && !done {
            done = true;
            assert_eq!(f.len(), old2.len());
            assert_eq!(f[..f.len() - 16], old2[..old2.len() - 16]);
            assert_ne!(f[f.len() - 16..], old2[old2.len() - 16..]);
            *s.lock().unwrap() = Some(n);
            return vec![old2.clone()];
        }
        vec![f]
    });
    let (mut primary, backup) = pair_via(&small_messages(), &small_messages(), tamper);
    let reader = drain(&backup);
    twenty_messages(&mut primary);
    assert!(
        reader.join().unwrap().is_empty(),
        "nothing may be delivered"
    );
    let n = swapped.lock().unwrap().expect("swapped");
    let reason = failed_reason(backup.end_state());
    assert!(
        reason.contains(&format!("message {n} failed authentication")),
        "{reason}"
    );
}

#[test]
fn repeated_or_reordered_message_within_a_session_is_refused() {
    // Repeat the second data message.
    let mut data_seen = 0;
    let tamper: Tamper = Box::new(move |_, f| {
        if f[4] == DATA {
            data_seen += 1;
            if data_seen == 2 {
                return vec![f.clone(), f];
            }
        }
        vec![f]
    });
    let (mut primary, backup) = pair_via(&small_messages(), &small_messages(), tamper);
    let reader = drain(&backup);
    let log = twenty_messages(&mut primary);
    assert!(reader.join().unwrap() == log[..20_000]);
    let reason = failed_reason(backup.end_state());
    assert!(reason.contains("failed authentication"), "{reason}");
    drop(primary);

    // Swap the third and fourth data messages.
    let mut data_seen = 0;
    let mut held = None;
    let tamper: Tamper = Box::new(move |_, f| {
        if f[4] == DATA {
            data_seen += 1;
            if data_seen == 3 {
                held = Some(f);
                return vec![];
            }
            if let Some(h) = held.take() {
                return vec![f, h];
            }
        }
        vec![f]
    });
    let (mut primary, backup) = pair_via(&small_messages(), &small_messages(), tamper);
    let reader = drain(&backup);
    let log = twenty_messages(&mut primary);
    assert!(reader.join().unwrap() == log[..20_000]);
    let reason = failed_reason(backup.end_state());
    assert!(reason.contains("failed authentication"), "{reason}");
}

#[test]
fn oversize_lengths_are_refused_before_allocating() {
    // In the handshake: a hello claiming 4 GiB.
    let (l, addr) = listen();
    let t = thread::spawn(move || l.accept(&cfg()));
    let mut s = TcpStream::connect(addr).unwrap();
    s.write_all(ft_log::channel::MAGIC).unwrap();
    s.write_all(&PROTOCOL_VERSION.to_le_bytes()).unwrap();
    s.write_all(&[0xff, 0xff, 0xff, 0xff, 0x10]).unwrap();
    let e = t.join().unwrap().err().expect("refused");
    match &e {
        ChannelError::TooLarge { len, max, .. } => {
            assert_eq!(*len, u32::MAX as u64);
            assert_eq!(*max, MAX_HANDSHAKE as u64);
        }
        other => panic!("{other}"),
    }

    // After the handshake: a data message whose length field was raised
    // on the wire. The backup refuses it from the head alone (were it to
    // wait for 4 GiB, it would report silence instead).
    let mut first = true;
    let tamper: Tamper = Box::new(move |_, mut f| {
        if f[4] == DATA && first {
            first = false;
            f[..4].copy_from_slice(&0xffff_ff00u32.to_le_bytes());
        }
        vec![f]
    });
    let (mut primary, backup) = pair_via(&cfg(), &cfg(), tamper);
    let reader = drain(&backup);
    primary.write(&noise(5000, 5)).unwrap();
    assert!(reader.join().unwrap().is_empty());
    let reason = failed_reason(backup.end_state());
    assert!(
        reason.contains(&format!(
            "length {} exceeds the maximum {}",
            0xffff_ff00u32,
            8 + MAX_MESSAGE
        )),
        "{reason}"
    );
}

#[test]
fn connect_retries_until_the_backup_listens_and_gives_up_at_the_deadline() {
    // A free port, for a backup that starts half a second later.
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    let backup = thread::spawn(move || {
        thread::sleep(ms(500));
        let l = BackupListener::bind(addr).unwrap();
        l.accept(&cfg()).unwrap()
    });
    let primary = PrimaryLink::connect(addr, &cfg()).unwrap();
    let backup = backup.join().unwrap();
    primary.finish().unwrap();
    assert_eq!(backup.wait_end(ms(5000)), Some(EndState::Clean));

    // A backup that stops waiting.
    let (l, _) = listen();
    let t = Instant::now();
    assert!(l.accept_timeout(&cfg(), ms(300)).unwrap().is_none());
    assert!(t.elapsed() >= ms(300));
    // ... and one that does not give up too early.
    let (l, addr) = listen();
    let b = thread::spawn(move || l.accept_timeout(&cfg(), Duration::from_secs(10)));
    thread::sleep(ms(200));
    let primary = PrimaryLink::connect(addr, &cfg()).unwrap();
    let backup = b.join().unwrap().unwrap().expect("a primary came");
    primary.finish().unwrap();
    assert_eq!(backup.wait_end(ms(5000)), Some(EndState::Clean));

    // Nobody ever listens there.
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut c = cfg();
    c.connect_deadline = ms(400);
    let t = Instant::now();
    let e = PrimaryLink::connect(("127.0.0.1", port), &c)
        .err()
        .expect("no backup");
    assert!(matches!(e, ChannelError::Connect { .. }), "{e}");
    assert!(t.elapsed() >= ms(400));
}

#[test]
fn token_file_is_trimmed_and_an_empty_one_refused() {
    let dir = std::env::temp_dir().join(format!("vmft-channel-token-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = |name: &str, body: &[u8]| {
        let p = dir.join(name);
        std::fs::write(&p, body).unwrap();
        p
    };
    assert_eq!(load_token_file(file("a", b"s3cret\n")).unwrap(), b"s3cret");
    assert_eq!(
        load_token_file(file("b", b"s3cret\r\n")).unwrap(),
        b"s3cret"
    );
    assert_eq!(load_token_file(file("c", b"s3cret")).unwrap(), b"s3cret");
    assert_eq!(
        load_token_file(file("d", b" two\nlines\n\n")).unwrap(),
        b" two\nlines\n"
    );
    for (name, body) in [("e", &b""[..]), ("f", b"\n"), ("g", b"\r\n")] {
        let e = load_token_file(file(name, body)).unwrap_err();
        assert!(matches!(e, ChannelError::EmptyToken { .. }), "{e}");
        assert!(e.to_string().ends_with("is empty"), "{e}");
    }
    let missing = dir.join("missing");
    let e = load_token_file(&missing).unwrap_err();
    assert!(
        e.to_string().contains(&missing.display().to_string()),
        "{e}"
    );
    std::fs::remove_dir_all(&dir).unwrap();

    // An empty secret never reaches the wire.
    let mut c = cfg();
    c.secret.clear();
    let e = PrimaryLink::connect("127.0.0.1:9", &c).err().unwrap();
    assert!(matches!(e, ChannelError::Config(_)), "{e}");
}

/// Re-protection: the backup dials a running primary's join listener.
fn join_pair(
    p: &ChannelConfig,
    b: &ChannelConfig,
) -> (
    Result<PrimaryLink, ChannelError>,
    Result<BackupLink, ChannelError>,
) {
    let l = JoinListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let pc = p.clone();
    let t = thread::spawn(move || l.accept(&pc));
    let b = BackupLink::join(addr, b);
    (t.join().unwrap(), b)
}

#[test]
fn a_joining_backup_dials_the_primary_and_the_session_is_the_same() {
    let p = cfg()
        .with_generation(77)
        .with_hello(b"state follows".to_vec());
    let (primary, backup) = join_pair(&p, &cfg());
    let (mut primary, backup) = (primary.unwrap(), backup.unwrap());
    assert_eq!(backup.generation(), 77);
    assert_eq!(backup.peer().role, Role::Primary);
    assert_eq!(backup.peer().hello, b"state follows");
    assert_eq!(primary.peer().role, Role::Backup);
    let reader = drain(&backup);
    let log = sample_log();
    for piece in log.chunks(1000) {
        primary.write(piece).unwrap();
    }
    primary.finish().unwrap();
    assert_eq!(reader.join().unwrap(), log);
    assert_eq!(backup.end_state(), Some(EndState::Clean));
}

#[test]
fn a_joining_backup_with_the_wrong_secret_is_refused_and_the_primary_keeps_listening() {
    let l = JoinListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let t = thread::spawn(move || {
        let first = l.accept(&cfg());
        let second = l.accept(&cfg());
        (first, second)
    });
    let mut wrong = cfg();
    wrong.secret = b"not the secret".to_vec();
    let e = BackupLink::join(addr, &wrong).err().expect("refused");
    assert!(
        matches!(e, ChannelError::AuthFailed | ChannelError::AuthRefused),
        "{e}"
    );
    let good = BackupLink::join(addr, &cfg()).unwrap();
    let (first, second) = t.join().unwrap();
    assert!(first.is_err());
    let mut primary = second.unwrap();
    primary.write(b"x").unwrap();
    primary.finish().unwrap();
    assert_eq!(good.wait_end(ms(5000)), Some(EndState::Clean));
}

#[test]
fn joining_a_primary_that_does_not_listen_gives_up_at_the_deadline() {
    let addr = {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let mut c = cfg();
    c.connect_deadline = ms(300);
    let e = BackupLink::join(addr, &c).err().expect("nobody listens");
    assert!(matches!(e, ChannelError::Connect { .. }), "{e}");
    assert!(e.to_string().contains(&addr.to_string()), "{e}");
}
