//! Disks (issue 9, separate disks): the default guest's `disk` workload
//! writes numbered MiB to `/dev/vda` through virtio-blk and reads them
//! back past the page cache; the image file then holds exactly those
//! bytes. A recording with a disk replays on its own copy of the disk to
//! the same state and the same bytes (no disk data in the log), and a
//! replay without the disk, or with a disk of other contents, is refused.
//!
//! A shared disk (`PATH,shared`) is outside the VM: a recording logs what
//! the guest read, so its replay needs no particular contents and writes
//! nothing.
//!
//! One boot for the file: a snapshot at the ready marker, taken with a
//! throwaway blank disk (nothing is written before the ready marker, so a
//! fresh blank image is the disk as it was at the snapshot).

mod common;

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use common::*;

/// MiB the workload writes.
const MIB: u64 = 2;

fn disk_snapshot() -> &'static Path {
    static SNAP: OnceLock<(tempfile::TempDir, PathBuf)> = OnceLock::new();
    &SNAP
        .get_or_init(|| {
            let dir = tempfile::tempdir().unwrap();
            let snap = dir.path().join("disk.snap");
            let scratch = blank_disk(&dir.path().join("scratch.img"));
            let args: Vec<OsString> = vec![
                "run".into(),
                "--workload".into(),
                "disk".into(),
                "--append".into(),
                format!("vmft.count={MIB}").into(),
                "--disk".into(),
                scratch.into(),
            ];
            snapshot_at_ready(&args, &snap);
            (dir, snap)
        })
        .1
}

fn disk_lines(stdout: &str) -> Vec<String> {
    stdout
        .lines()
        .map(|l| l.trim_end_matches('\r'))
        .filter(|l| l.starts_with("disk "))
        .map(str::to_string)
        .collect()
}

#[test]
fn the_disk_workload_writes_through_virtio_blk_and_the_image_holds_it() {
    if !require_kvm() {
        return;
    }
    let snap = disk_snapshot();
    let dir = tempfile::tempdir().unwrap();
    let img = blank_disk(&dir.path().join("vda.img"));
    let mut cmd = vmft();
    cmd.args(["run", "--no-stdin", "--restore"])
        .arg(snap)
        .arg("--disk")
        .arg(&img);
    let out = output_within(cmd, 600);
    let (stdout, stderr) = texts(&out);
    assert!(out.status.success(), "{stderr}\n{stdout}");
    let lines = disk_lines(&stdout);
    assert_eq!(
        lines.len() as u64,
        2 * MIB + 1,
        "two lines per MiB and the end:\n{stdout}"
    );
    assert!(
        lines[2 * MIB as usize].starts_with(&format!("disk done mib={MIB} sum=")),
        "{stdout}"
    );
    assert!(stdout.contains("VMFT-DONE status=0"), "{stdout}");
    if let Some(p) = disk_problem(&img, MIB) {
        panic!("the image is wrong: {p}\n{stdout}");
    }
}

#[test]
fn a_recording_with_a_disk_replays_on_its_own_copy_to_the_same_state_and_bytes() {
    if !require_kvm() {
        return;
    }
    let snap = disk_snapshot();
    let dir = tempfile::tempdir().unwrap();
    let a = blank_disk(&dir.path().join("a.img"));
    let b = blank_disk(&dir.path().join("b.img"));
    let log = dir.path().join("disk.log");
    let mut cmd = vmft();
    cmd.args(["record", "--no-stdin", "--restore"])
        .arg(snap)
        .arg("--disk")
        .arg(&a)
        .arg("--log")
        .arg(&log);
    let out = output_within(cmd, 600);
    let (stdout, stderr) = texts(&out);
    assert!(out.status.success(), "{stderr}");
    assert!(stdout.contains("disk done mib="), "{stdout}");
    let recorded = digest(&stderr).expect("the recording prints its digest");

    // No disk data travels in the log: the replay does the same I/O on b.
    let mut cmd = vmft();
    cmd.args(["replay", "--log"])
        .arg(&log)
        .arg("--disk")
        .arg(&b);
    let out = output_within(cmd, 600);
    let (_, stderr) = texts(&out);
    assert!(out.status.success(), "replay failed:\n{stderr}");
    assert_eq!(digest(&stderr), Some(recorded), "{stderr}");
    assert_eq!(
        std::fs::read(&a).unwrap(),
        std::fs::read(&b).unwrap(),
        "the replayed disk differs from the recorded one"
    );
    assert_eq!(disk_problem(&b, MIB), None);

    // Without the disk, or with other contents, the replay is refused
    // before it starts.
    let mut cmd = vmft();
    cmd.args(["replay", "--log"]).arg(&log);
    let out = output_within(cmd, 120);
    let (_, stderr) = texts(&out);
    assert!(!out.status.success());
    assert!(
        stderr.contains("another VM configuration") && stderr.contains("no disk"),
        "{stderr}"
    );
    let mut cmd = vmft();
    cmd.args(["replay", "--log"])
        .arg(&log)
        .arg("--disk")
        .arg(&a); // a has the blocks written already
    let out = output_within(cmd, 120);
    let (_, stderr) = texts(&out);
    assert!(!out.status.success());
    assert!(stderr.contains("another VM configuration"), "{stderr}");
}

#[test]
fn a_recording_with_a_shared_disk_replays_from_the_log_alone() {
    if !require_kvm() {
        return;
    }
    let snap = disk_snapshot();
    let dir = tempfile::tempdir().unwrap();
    let a = blank_disk(&dir.path().join("shared.img"));
    let log = dir.path().join("shared.log");
    let shared = |p: &Path| format!("{},shared", p.display());
    let mut cmd = vmft();
    cmd.args(["record", "--no-stdin", "--restore"])
        .arg(snap)
        .arg("--disk")
        .arg(shared(&a))
        .arg("--log")
        .arg(&log);
    let out = output_within(cmd, 600);
    let (stdout, stderr) = texts(&out);
    assert!(out.status.success(), "{stderr}");
    assert!(stdout.contains("VMFT-DONE status=0"), "{stdout}");
    if let Some(p) = disk_problem(&a, MIB) {
        panic!("the shared image is wrong after the recording: {p}\n{stdout}");
    }
    let recorded = digest(&stderr).expect("the recording prints its digest");

    // The image has moved on since (it holds the blocks already), and
    // another image of that size is blank: either way the replay takes
    // what the guest read from the log, and writes neither.
    let after = std::fs::read(&a).unwrap();
    let b = blank_disk(&dir.path().join("other.img"));
    for img in [&a, &b] {
        let before = std::fs::read(img).unwrap();
        let mut cmd = vmft();
        cmd.args(["replay", "--log"])
            .arg(&log)
            .arg("--disk")
            .arg(shared(img));
        let out = output_within(cmd, 600);
        let (_, stderr) = texts(&out);
        assert!(
            out.status.success(),
            "replay on {} failed:\n{stderr}",
            img.display()
        );
        assert_eq!(digest(&stderr), Some(recorded.clone()), "{stderr}");
        assert!(
            std::fs::read(img).unwrap() == before,
            "the replay wrote to {}",
            img.display()
        );
    }
    assert!(std::fs::read(&a).unwrap() == after);

    // A separate disk is another configuration: refused.
    let mut cmd = vmft();
    cmd.args(["replay", "--log"])
        .arg(&log)
        .arg("--disk")
        .arg(&b);
    let out = output_within(cmd, 120);
    let (_, stderr) = texts(&out);
    assert!(!out.status.success());
    assert!(stderr.contains("another VM configuration"), "{stderr}");
}

#[test]
fn a_missing_disk_image_is_named_before_anything_runs() {
    if !require_kvm() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nope.img");
    let mut cmd = vmft();
    cmd.args(["run", "--no-stdin", "--restore"])
        .arg(disk_snapshot())
        .arg("--disk")
        .arg(&missing);
    let out = output_within(cmd, 120);
    let (_, stderr) = texts(&out);
    assert!(!out.status.success());
    assert!(stderr.contains("nope.img"), "{stderr}");
    assert_eq!(stderr.trim().lines().count(), 1, "one line:\n{stderr}");
}

#[test]
fn a_backup_whose_disk_copy_differs_refuses_the_primary_at_the_handshake() {
    if !require_kvm() {
        return;
    }
    use std::io::Read;
    let snap = disk_snapshot();
    let dir = tempfile::tempdir().unwrap();
    let token = dir.path().join("token");
    std::fs::write(&token, b"disk-handshake-secret").unwrap();
    let p = blank_disk(&dir.path().join("p.img"));
    let b = blank_disk(&dir.path().join("b.img"));
    // One byte differs in the backup's copy.
    let mut bytes = std::fs::read(&b).unwrap();
    bytes[12345] = 1;
    std::fs::write(&b, bytes).unwrap();
    let side = |role: &str, disk: &Path| {
        let mut cmd = vmft();
        cmd.arg(role)
            .args(["--arbiter", "127.0.0.1:9", "--no-stdin", "--token-file"])
            .arg(&token)
            .arg("--restore")
            .arg(snap)
            .arg("--disk")
            .arg(disk);
        cmd
    };
    let mut backup = side("backup", &b)
        .args(["--listen", "127.0.0.1:0"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut err = backup.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n) = err.read(&mut buf) {
            if n == 0 || tx.send(buf[..n].to_vec()).is_err() {
                break;
            }
        }
    });
    let mut text = String::new();
    let addr = loop {
        let b = rx
            .recv_timeout(std::time::Duration::from_secs(120))
            .expect("the backup listens");
        text.push_str(&String::from_utf8_lossy(&b));
        if let Some(a) = text
            .lines()
            .find_map(|l| l.split("waiting for the primary on ").nth(1))
        {
            break a.trim().to_string();
        }
    };
    let mut primary = side("primary", &p);
    primary.args(["--backup", &addr]);
    let out = output_within(primary, 120);
    let (_, perr) = texts(&out);
    let _ = backup.kill();
    let _ = backup.wait();
    while let Ok(b) = rx.try_recv() {
        text.push_str(&String::from_utf8_lossy(&b));
    }
    assert!(!out.status.success(), "the pair formed:\n{perr}");
    assert!(
        perr.contains("configuration") || text.contains("configuration"),
        "the mismatch is not named:\nprimary: {perr}\nbackup: {text}"
    );
}
