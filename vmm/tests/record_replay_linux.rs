//! Record the default Linux guest running a workload with timer interrupts
//! and console input, replay it, and compare transcripts and final digests.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::process::Stdio;

use common::*;

#[test]
fn linux_guest_with_console_input_replays_byte_identically() {
    if !require_kvm() {
        return;
    }
    image();
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("linux.log");
    let mut child = vmft()
        .args(["record", "--workload", "echo", "--stats", "--log"])
        .arg(&log)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let mut reader = BufReader::new(child.stdout.take().unwrap());
    let mut transcript = String::new();
    loop {
        let mut line = String::new();
        assert!(
            reader.read_line(&mut line).unwrap() > 0,
            "guest ended before ready:\n{transcript}"
        );
        transcript.push_str(&line);
        if line.contains("VMFT-READY") {
            break;
        }
    }
    stdin.write_all(b"replay me\nsecond line\nend\n").unwrap();
    stdin.flush().unwrap();
    reader.read_to_string(&mut transcript).unwrap();
    let out = child.wait_with_output().unwrap();
    let rec_err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "record failed:\n{rec_err}");
    assert!(transcript.contains("echo 1: replay me"), "{transcript}");
    assert!(transcript.contains("echo done lines=2"), "{transcript}");
    // The log holds timer interrupts and the console input.
    assert!(rec_err.contains("console-input"), "{rec_err}");
    assert!(rec_err.contains("interrupt"), "{rec_err}");

    let serial = dir.path().join("replay.serial");
    let out = vmft()
        .args(["replay", "--log"])
        .arg(&log)
        .arg("--serial-out")
        .arg(&serial)
        .output()
        .unwrap();
    let (_, rep_err) = texts(&out);
    assert!(out.status.success(), "replay failed:\n{rep_err}");
    let replayed = std::fs::read_to_string(&serial).unwrap();
    assert!(
        replayed == transcript,
        "transcripts differ:\n--- record\n{transcript}\n--- replay\n{replayed}"
    );
    let (d1, d2) = (digest(&rec_err), digest(&rep_err));
    assert!(d1.is_some());
    assert_eq!(d1, d2, "final state digests differ");
}
