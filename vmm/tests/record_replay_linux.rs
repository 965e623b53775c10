//! Record the default Linux guest running a workload with timer interrupts
//! and console input, replay it, and compare transcripts and final digests.

mod common;

use common::*;

#[test]
fn linux_guest_with_console_input_replays_byte_identically() {
    if !require_kvm() {
        return;
    }
    image();
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("linux.log");
    let mut cmd = vmft();
    cmd.args(["record", "--workload", "echo", "--stats", "--log"])
        .arg(&log);
    let (transcript, out) = spawn_and_type(cmd, "VMFT-READY", "replay me\nsecond line\nend\n");
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
