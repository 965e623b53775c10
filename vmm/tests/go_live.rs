//! A backup that reaches the end of a log with no end entry (the primary
//! stopped there) takes over: `vmft replay --go-live` continues the VM live
//! and the guest finishes its work with the right result.

mod common;

use std::path::Path;

use common::*;

/// Frame offsets of a log (where it can be cut cleanly).
fn frame_offsets(log: &Path) -> Vec<usize> {
    let bytes = std::fs::read(log).unwrap();
    let (_, frames) = ft_log::decode_all(&bytes).unwrap();
    frames.iter().map(|f| f.offset as usize).collect()
}

/// Replay the first `cut` bytes of `log` with --go-live; returns the
/// replayed console output followed by the live one, and stderr.
fn take_over(log: &Path, cut: usize, dir: &Path) -> (String, String) {
    let bytes = std::fs::read(log).unwrap();
    let partial = dir.join(format!("cut-{cut}.log"));
    std::fs::write(&partial, &bytes[..cut]).unwrap();
    let serial = dir.join(format!("cut-{cut}.serial"));
    let mut cmd = vmft();
    cmd.args(["replay", "--go-live", "--log"])
        .arg(&partial)
        .arg("--serial-out")
        .arg(&serial);
    let out = output_within(cmd, 240);
    let (live, stderr) = texts(&out);
    assert!(
        out.status.success(),
        "take-over at byte {cut} failed:\n{stderr}"
    );
    assert!(stderr.contains("the backup goes live"), "{stderr}");
    let replayed = std::fs::read_to_string(&serial).unwrap();
    (replayed + &live, stderr)
}

#[test]
fn test_guest_finishes_with_the_right_result_after_take_over_at_any_point() {
    if !require_kvm() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("pages.log");
    let out = vmft()
        .args([
            "record",
            "--no-stdin",
            "--mem",
            "64",
            "--epoch-ms",
            "2",
            "--kernel",
        ])
        .arg(test_guest(3))
        .arg("--log")
        .arg(&log)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", texts(&out).1);
    let expected = String::from_utf8_lossy(&out.stdout)
        .lines()
        .find(|l| l.starts_with("RESULT "))
        .unwrap()
        .to_string();
    let offsets = frame_offsets(&log);
    for k in [1, 4, 2, 3] {
        let cut = offsets[offsets.len() * k / 5];
        let (console, _) = take_over(&log, cut, dir.path());
        assert!(console.contains(&expected), "cut at {cut}: {console}");
    }
}

#[test]
fn linux_guest_finishes_its_workload_after_the_backup_takes_over() {
    if !require_kvm() {
        return;
    }
    image();
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("linux.log");
    let out = vmft()
        .args(["record", "--no-stdin", "--log"])
        .arg(&log)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", texts(&out).1);
    let recorded = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(recorded.contains("VMFT-DONE status=0"));
    // The primary "dies" in the middle of its boot, and near the end of
    // its log; each time the backup finishes the work (it halts: a backup
    // that waited forever for a timer tick would hang here).
    let offsets = frame_offsets(&log);
    for percent in [60, 97] {
        let cut = offsets[offsets.len() * percent / 100];
        let (console, stderr) = take_over(&log, cut, dir.path());
        let lines = after_ready(&console);
        let expected = expected_counter(20);
        assert_eq!(
            &lines[..expected.len()],
            &expected[..],
            "cut at {percent}%: {console}"
        );
        assert!(console.contains("VMFT-DONE status=0"), "{console}");
        assert!(stderr.contains("guest halted"), "{stderr}");
    }
}
