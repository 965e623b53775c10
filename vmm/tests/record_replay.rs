//! Deterministic record and replay of the small test guests: each guest is
//! recorded and replayed 20 times with different timing, a deliberately
//! nondeterministic guest is caught at its first differing exit, and bad
//! logs are refused with clear errors.

mod common;

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use common::*;

const MEM: &str = "64";

struct Run {
    ok: bool,
    stdout: String,
    stderr: String,
}

fn record(kernel: &Path, log: &Path, epoch_ms: u64, input: Option<&str>) -> Run {
    let mut cmd = vmft();
    cmd.args(["record", "--mem", MEM, "--epoch-ms", &epoch_ms.to_string()])
        .arg("--kernel")
        .arg(kernel)
        .arg("--log")
        .arg(log);
    match input {
        None => {
            cmd.arg("--no-stdin");
            let out = cmd.output().unwrap();
            let (stdout, stderr) = texts(&out);
            Run {
                ok: out.status.success(),
                stdout,
                stderr,
            }
        }
        Some(text) => {
            let (stdout, out) = spawn_and_type(cmd, "READY", text);
            Run {
                ok: out.status.success(),
                stdout,
                stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
            }
        }
    }
}

fn replay(log: &Path, serial: &Path) -> Run {
    let out = vmft()
        .args(["replay", "--log"])
        .arg(log)
        .arg("--serial-out")
        .arg(serial)
        .output()
        .unwrap();
    let (_, stderr) = texts(&out);
    Run {
        ok: out.status.success(),
        stdout: std::fs::read_to_string(serial).unwrap_or_default(),
        stderr,
    }
}

/// Burn the other core while `flag` is set.
fn load_other_core(flag: Arc<AtomicBool>) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let mut x = 1u64;
        while flag.load(Ordering::Relaxed) {
            for _ in 0..10_000 {
                x = x.wrapping_mul(6364136223846793005).wrapping_add(1);
            }
            std::hint::black_box(x);
        }
    })
}

/// Record and replay `mode` 20 times with epoch bounds from 1 to 20 ms,
/// loading the other core on every other run; each replay must end in the
/// recording's state with the same transcript.
fn twenty_times(mode: u32, input: Option<&str>, expect: impl Fn(&str)) {
    if !require_kvm() {
        return;
    }
    let kernel = test_guest(mode);
    let dir = tempfile::tempdir().unwrap();
    let bounds = [1, 2, 3, 5, 10, 20];
    let mut epochs_seen = 0;
    for i in 0..20 {
        let load = Arc::new(AtomicBool::new(i % 2 == 1));
        let loader = load_other_core(load.clone());
        let log = dir.path().join(format!("m{mode}-{i}.log"));
        let bound = bounds[i % bounds.len()];
        let rec = record(&kernel, &log, bound, input);
        load.store(false, Ordering::Relaxed);
        loader.join().unwrap();
        assert!(
            rec.ok,
            "mode {mode} run {i}: record failed:\n{}",
            rec.stderr
        );
        expect(&rec.stdout);
        let rep = replay(&log, &dir.path().join(format!("m{mode}-{i}.serial")));
        assert!(
            rep.ok,
            "mode {mode} run {i} (epoch bound {bound} ms): replay failed:\n{}",
            rep.stderr
        );
        assert_eq!(
            digest(&rec.stderr),
            digest(&rep.stderr),
            "mode {mode} run {i}: final digests differ"
        );
        assert!(digest(&rec.stderr).is_some());
        assert_eq!(
            rec.stdout, rep.stdout,
            "mode {mode} run {i}: transcripts differ"
        );
        epochs_seen += rec
            .stderr
            .lines()
            .find_map(|l| {
                l.strip_prefix("vmft: exits ")
                    .and_then(|r| r.split(" epochs ").nth(1))
            })
            .and_then(|n| n.trim().parse::<u64>().ok())
            .unwrap_or(0);
    }
    eprintln!("mode {mode}: 20 record/replay pairs identical, {epochs_seen} epochs in all");
    if (1..=3).contains(&mode) {
        assert!(epochs_seen > 0, "mode {mode} should have needed epochs");
    }
}

fn result_line(stdout: &str) -> String {
    stdout
        .lines()
        .find_map(|l| l.strip_prefix("RESULT "))
        .unwrap_or_else(|| panic!("no RESULT in {stdout}"))
        .to_string()
}

#[test]
fn compute_loop_with_interrupts_uses_epochs_and_replays() {
    // The guest's LCG: r = r * 0x5851f42d + 12345, 400M times, from 1.
    let mut r: u64 = 1;
    for _ in 0..400_000_000u64 {
        r = r.wrapping_mul(0x5851f42d).wrapping_add(12345);
    }
    let expected = format!("{r:016x}");
    twenty_times(1, None, |out| assert_eq!(result_line(out), expected));
}

#[test]
fn repeating_registers_with_changing_memory_replays() {
    twenty_times(2, None, |out| assert!(out.contains("COUNTER "), "{out}"));
}

#[test]
fn many_pages_written_replays() {
    let mut sum: u64 = 0;
    for page in 0..4096u64 {
        for round in 0..8u64 {
            sum = sum.wrapping_mul(31).wrapping_add(round ^ page);
        }
    }
    let expected = format!("{sum:016x}");
    twenty_times(3, None, |out| assert_eq!(result_line(out), expected));
}

#[test]
fn hlt_idle_with_timer_wakeups_replays() {
    twenty_times(4, None, |out| {
        assert!(out.contains("TICKS 0000000000000032"), "{out}")
    });
}

#[test]
fn pit_and_rtc_time_reads_replay() {
    twenty_times(5, None, |out| assert!(out.contains("RESULT "), "{out}"));
}

#[test]
fn console_input_replays() {
    let text = "first line\nsecond\nthird!\n";
    let mut sum: u64 = 0;
    for b in text.bytes() {
        sum = sum.wrapping_mul(131).wrapping_add(b as u64);
    }
    let expected = format!("{sum:016x}");
    twenty_times(6, Some(text), |out| assert_eq!(result_line(out), expected));
}

#[test]
fn nondeterministic_guest_is_caught_at_the_first_differing_exit() {
    if !require_kvm() {
        return;
    }
    let kernel = test_guest(7);
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("rdtsc.log");
    let rec = record(&kernel, &log, 10, None);
    assert!(rec.ok, "{}", rec.stderr);
    let rep = replay(&log, &dir.path().join("serial"));
    assert!(
        !rep.ok,
        "a guest that branches on RDTSC must not replay cleanly"
    );
    let line = rep
        .stderr
        .lines()
        .find(|l| l.starts_with("vmft: error:"))
        .unwrap();
    assert!(line.contains("divergence at exit"), "{line}");
    // The first difference is an exit to port 0x80 on one side and 0x81 on
    // the other, named with both sides.
    assert!(line.contains("the primary wrote"), "{line}");
    assert!(line.contains("the backup wrote"), "{line}");
    let ports: Vec<&str> = ["port 0x80", "port 0x81"]
        .into_iter()
        .filter(|p| line.contains(p))
        .collect();
    assert_eq!(ports.len(), 2, "both ports named: {line}");
    // Nothing the backup printed comes from after the divergence.
    assert!(
        !rep.stdout.contains("RESULT"),
        "replay ran past the divergence"
    );
    // The exit named is the first RDTSC-dependent one in the log that the
    // backup did differently: every earlier exit matched, so it is an
    // out to 0x80/0x81 in the log.
    let n: u64 = line
        .split("divergence at exit ")
        .nth(1)
        .unwrap()
        .split(':')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    let shown = vmft()
        .args(["log", "--log"])
        .arg(&log)
        .args(["--from", &n.to_string(), "--to", &n.to_string()])
        .output()
        .unwrap();
    let shown = String::from_utf8_lossy(&shown.stdout);
    assert!(shown.contains(&format!("exit {n}: PioOut 0x8")), "{shown}");
}

fn replay_error(log: &Path) -> String {
    let dir = tempfile::tempdir().unwrap();
    let rep = replay(log, &dir.path().join("serial"));
    assert!(!rep.ok, "replay of a bad log succeeded");
    let lines: Vec<&str> = rep
        .stderr
        .lines()
        .filter(|l| !l.trim().is_empty())
        .collect();
    assert_eq!(lines.len(), 1, "one line expected:\n{}", rep.stderr);
    assert!(!rep.stderr.contains("panicked"), "{}", rep.stderr);
    lines[0].to_string()
}

#[test]
fn bad_logs_are_refused_with_clear_errors() {
    if !require_kvm() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("good.log");
    let rec = record(&test_guest(3), &good, 5, None);
    assert!(rec.ok, "{}", rec.stderr);
    let bytes = std::fs::read(&good).unwrap();
    let write = |name: &str, b: &[u8]| {
        let p = dir.path().join(name);
        std::fs::write(&p, b).unwrap();
        p
    };

    let e = replay_error(&write("cut.log", &bytes[..bytes.len() - 7]));
    assert!(e.contains("truncated") && e.contains("inside frame"), "{e}");

    let mut flipped = bytes.clone();
    let at = bytes.len() / 2;
    flipped[at] ^= 0x10;
    let e = replay_error(&write("flip.log", &flipped));
    assert!(
        e.contains("checksum mismatch") || e.contains("exceeds the maximum"),
        "{e}"
    );

    let mut v = bytes.clone();
    v[8] = 99;
    let e = replay_error(&write("version.log", &v));
    assert!(e.contains("format version 99"), "{e}");

    let e = replay_error(&write(
        "foreign.log",
        b"\x7fELF............................",
    ));
    assert!(e.contains("not a vmft log"), "{e}");

    let e = replay_error(&write("empty.log", b""));
    assert!(e.contains("empty"), "{e}");

    // A log replayed against another kernel.
    let out = vmft()
        .args(["replay", "--log"])
        .arg(&good)
        .arg("--kernel")
        .arg(test_guest(1))
        .output()
        .unwrap();
    let (_, stderr) = texts(&out);
    assert!(!out.status.success());
    assert!(
        stderr.contains("recorded for another VM configuration"),
        "{stderr}"
    );

    // A log cut cleanly after a frame (the primary died there): the replay
    // runs up to that point and says where the recording stopped.
    let (_, frames) = ft_log::decode_all(&bytes).unwrap();
    let cut_at = frames[frames.len() / 2].offset as usize;
    let e = replay_error(&write("stopped.log", &bytes[..cut_at]));
    assert!(e.contains("without an end entry"), "{e}");
    assert!(e.contains("the recording stopped there"), "{e}");
    let shown = vmft().args(["log", "--log"]).arg(&good).output().unwrap();
    assert!(shown.status.success());
}

#[test]
fn replay_from_a_stream_fed_in_small_chunks_waits_for_the_log() {
    use std::io::Write;
    if !require_kvm() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("stream.log");
    let rec = record(&test_guest(1), &log, 5, None);
    assert!(rec.ok, "{}", rec.stderr);
    let bytes = std::fs::read(&log).unwrap();
    let mut child = vmft()
        .args(["replay", "--log", "-"])
        .stdin(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    // Irregular chunks with pauses: the backup must wait, never run ahead.
    let mut at = 0;
    let mut size = 1;
    while at < bytes.len() {
        let end = (at + size).min(bytes.len());
        stdin.write_all(&bytes[at..end]).unwrap();
        stdin.flush().unwrap();
        at = end;
        size = (size * 7 + 3) % 4099 + 1;
        if at % 5 == 0 {
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
    }
    drop(stdin);
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert_eq!(digest(&stderr), digest(&rec.stderr));
}

/// The kick count in a `--stats` report (0 when no kick happened).
fn kicks(stderr: &str) -> u64 {
    stderr
        .lines()
        .find_map(|l| l.trim().strip_prefix("kick "))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or(0)
}

#[test]
fn recording_does_not_kick_while_a_waiting_tick_cannot_be_delivered() {
    if !require_kvm() {
        return;
    }
    // Test guest 8 runs at CPL0 with IF=0 for about 0.6 s, exiting every
    // few ms, while timer ticks fall due. A kick cannot deliver them before
    // the next exit, so the primary must not kick at all with a 50 ms epoch
    // bound (commit a74457e kicked at every stop once a tick was overdue:
    // 2.2 million kicks in one Linux boot).
    let kernel = test_guest(8);
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("m8.log");
    let out = vmft()
        .args([
            "record",
            "--mem",
            MEM,
            "--epoch-ms",
            "50",
            "--no-stdin",
            "--stats",
        ])
        .arg("--kernel")
        .arg(&kernel)
        .arg("--log")
        .arg(&log)
        .output()
        .unwrap();
    let (stdout, stderr) = texts(&out);
    assert!(out.status.success(), "record failed:\n{stderr}");
    assert!(stdout.contains("TICKS 0000000000000005"), "{stdout}");
    let n = kicks(&stderr);
    assert!(
        n <= 5,
        "{n} kicks while no kick could deliver anything:\n{stderr}"
    );
    let rep = replay(&log, &dir.path().join("m8.serial"));
    assert!(rep.ok, "replay failed:\n{}", rep.stderr);
    assert_eq!(digest(&stderr), digest(&rep.stderr));
}

#[test]
fn an_msr_written_inside_an_epoch_stretch_reaches_the_backup() {
    if !require_kvm() {
        return;
    }
    // Test guest 9 writes MSR 0x140 (not in the fixed list epochs carried
    // before they took KVM's MSR index list) and then runs ~60 ms without
    // an exit, so epochs replace the stretch on the backup; it prints the
    // MSR it reads back. A backup without the MSR prints 0 and diverges.
    let kernel = test_guest(9);
    let dir = tempfile::tempdir().unwrap();
    for i in 0..3 {
        let log = dir.path().join(format!("m9-{i}.log"));
        let rec = record(&kernel, &log, 10, None);
        assert!(rec.ok, "record failed:\n{}", rec.stderr);
        assert_eq!(result_line(&rec.stdout), "0000000000000001");
        assert!(
            !rec.stderr.contains("epochs 0\n"),
            "the stretch must be cut by an epoch:\n{}",
            rec.stderr
        );
        let rep = replay(&log, &dir.path().join(format!("m9-{i}.serial")));
        assert!(rep.ok, "replay failed:\n{}", rep.stderr);
        assert_eq!(rec.stdout, rep.stdout);
        assert_eq!(digest(&rec.stderr), digest(&rep.stderr));
    }
}
