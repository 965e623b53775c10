//! The interactive console driven through a pseudo-terminal, as a person
//! at a terminal would use it: every key (Ctrl-C included) goes to the
//! guest, Ctrl-A x leaves cleanly and restores the terminal, and a stop by
//! the escape or by a signal leaves a recording complete (it replays to its
//! end entry with the same digest).

mod common;

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use common::*;

/// A child process whose stdin, stdout and stderr are a fresh terminal.
struct Tty {
    master: File,
    child: Child,
    output: Arc<Mutex<Vec<u8>>>,
    /// The terminal's modes before vmft started (read before the spawn:
    /// read after it, vmft may already have made the terminal raw).
    initial: libc::termios,
}

fn termios(fd: &File) -> libc::termios {
    // SAFETY: termios is a plain C struct, filled by tcgetattr for an open fd.
    let mut t: libc::termios = unsafe { std::mem::zeroed() };
    // SAFETY: `fd` is an open pty master; `t` is valid for writes.
    assert_eq!(unsafe { libc::tcgetattr(fd.as_raw_fd(), &mut t) }, 0);
    t
}

impl Tty {
    fn spawn(mut cmd: Command) -> Tty {
        let (mut m, mut s) = (0, 0);
        // SAFETY: openpty writes two fds; the name, termios and winsize
        // arguments may be null.
        let r = unsafe {
            libc::openpty(
                &mut m,
                &mut s,
                std::ptr::null_mut(),
                std::ptr::null(),
                std::ptr::null(),
            )
        };
        assert_eq!(r, 0, "openpty failed");
        // SAFETY: both fds were just returned by openpty and are owned here.
        let (master, slave) = unsafe { (File::from_raw_fd(m), OwnedFd::from_raw_fd(s)) };
        let stdio = |fd: &OwnedFd| Stdio::from(fd.try_clone().unwrap());
        cmd.stdin(stdio(&slave))
            .stdout(stdio(&slave))
            .stderr(stdio(&slave));
        // SAFETY: only async-signal-safe calls between fork and exec: a new
        // session whose controlling terminal is the pty on stdin.
        unsafe {
            cmd.pre_exec(|| {
                if libc::setsid() < 0 || libc::ioctl(0, libc::TIOCSCTTY, 0) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let initial = termios(&master);
        let child = cmd.spawn().unwrap();
        drop(slave);
        let output = Arc::new(Mutex::new(Vec::new()));
        let (mut reader, out) = (master.try_clone().unwrap(), output.clone());
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = reader.read(&mut buf) {
                if n == 0 {
                    break;
                }
                out.lock().unwrap().extend_from_slice(&buf[..n]);
            }
        });
        Tty {
            master,
            child,
            output,
            initial,
        }
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.output.lock().unwrap()).into_owned()
    }

    /// Wait until the output (after `from` bytes) contains `needle`.
    fn wait_for(&self, needle: &str, from: usize, secs: u64) -> usize {
        let t0 = Instant::now();
        loop {
            let text = self.text();
            if let Some(i) = text.get(from..).and_then(|t| t.find(needle)) {
                return from + i + needle.len();
            }
            assert!(
                t0.elapsed() < Duration::from_secs(secs),
                "no {needle:?} within {secs} s; the terminal shows:\n{text}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn type_keys(&mut self, keys: &[u8]) {
        self.master.write_all(keys).unwrap();
        self.master.flush().unwrap();
    }

    fn wait_exit(&mut self, secs: u64) -> std::process::ExitStatus {
        let t0 = Instant::now();
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                return st;
            }
            if t0.elapsed() > Duration::from_secs(secs) {
                let _ = self.child.kill();
                panic!(
                    "vmft did not exit within {secs} s; terminal:\n{}",
                    self.text()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

fn same_modes(a: &libc::termios, b: &libc::termios) -> bool {
    a.c_iflag == b.c_iflag
        && a.c_oflag == b.c_oflag
        && a.c_lflag == b.c_lflag
        && a.c_cflag == b.c_cflag
}

fn replay_digest(log: &Path) -> (bool, String) {
    let out = vmft().arg("replay").arg("--log").arg(log).output().unwrap();
    let (_, stderr) = texts(&out);
    (out.status.success(), stderr)
}

fn record_test_guest(log: &Path) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_vmft"));
    cmd.args(["record", "--mem", "64"])
        .arg("--kernel")
        .arg(test_guest(6))
        .arg("--log")
        .arg(log);
    cmd
}

#[test]
fn escape_ends_a_recording_cleanly_restores_the_terminal_and_the_log_replays() {
    if !require_kvm() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("escape.log");
    let mut tty = Tty::spawn(record_test_guest(&log));
    let before = tty.initial;
    let at = tty.wait_for("READY", 0, 60);
    // While vmft runs, the terminal is raw: no echo, no signal keys.
    let during = termios(&tty.master);
    assert_eq!(during.c_lflag & (libc::ICANON | libc::ECHO | libc::ISIG), 0);
    // Ctrl-C is a key for the guest (test guest 6 echoes what it gets).
    tty.type_keys(b"ab\x03cd\r");
    let at = tty.wait_for("cd", at, 30);
    tty.type_keys(b"\x01x");
    let st = tty.wait_exit(60);
    assert!(st.success(), "exit {st:?}; terminal:\n{}", tty.text());
    assert!(
        same_modes(&before, &termios(&tty.master)),
        "terminal modes not restored"
    );
    let text = tty.text();
    assert!(
        text[at..].contains("guest stopped on request (the console escape"),
        "{text}"
    );
    let recorded = digest(&text.replace('\r', "")).expect("the recording prints its digest");
    let (ok, stderr) = replay_digest(&log);
    assert!(ok, "replay failed:\n{stderr}");
    assert!(stderr.contains("guest stopped on request"), "{stderr}");
    assert_eq!(digest(&stderr), Some(recorded));
}

#[test]
fn sigterm_and_sighup_stop_a_recording_with_a_complete_log() {
    if !require_kvm() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    for (name, sig) in [
        ("term", libc::SIGTERM),
        ("int", libc::SIGINT),
        ("hup", libc::SIGHUP),
    ] {
        let log = dir.path().join(format!("{name}.log"));
        let mut child = record_test_guest(&log)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut out = child.stdout.take().unwrap();
        let mut first = [0u8; 5];
        out.read_exact(&mut first).unwrap();
        assert_eq!(&first, b"READY");
        // SAFETY: kill on the pid of a child we own.
        assert_eq!(unsafe { libc::kill(child.id() as i32, sig) }, 0);
        let status = child.wait().unwrap();
        let mut stderr = String::new();
        child
            .stderr
            .take()
            .unwrap()
            .read_to_string(&mut stderr)
            .unwrap();
        assert!(status.success(), "{name}: {status:?}\n{stderr}");
        assert!(
            stderr.contains("guest stopped on request"),
            "{name}: {stderr}"
        );
        let (ok, rstderr) = replay_digest(&log);
        assert!(ok, "{name}: replay failed:\n{rstderr}");
        assert_eq!(digest(&rstderr), digest(&stderr), "{name}");
    }
}

/// A snapshot of the default guest with the `shell` workload, taken at its
/// ready marker (one boot for this file's tests).
fn shell_snapshot() -> &'static PathBuf {
    static SNAP: OnceLock<(tempfile::TempDir, PathBuf)> = OnceLock::new();
    &SNAP
        .get_or_init(|| {
            let dir = tempfile::tempdir().unwrap();
            let snap = dir.path().join("shell.snap");
            snapshot_of("shell", &[], None, &snap);
            (dir, snap)
        })
        .1
}

#[test]
fn ctrl_c_interrupts_a_guest_command_and_the_escape_leaves_vmft_run() {
    if !require_kvm() {
        return;
    }
    let snap = shell_snapshot();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_vmft"));
    cmd.args(["run", "--restore"]).arg(snap);
    let mut tty = Tty::spawn(cmd);
    let before = tty.initial;
    let at = tty.wait_for("# ", 0, 120);
    tty.type_keys(b"sleep 100; echo slept-$((40+2))\r");
    let at = tty.wait_for("sleep 100", at, 60);
    std::thread::sleep(Duration::from_secs(2));
    tty.type_keys(b"\x03");
    // The shell comes back: ^C killed the sleep, not vmft.
    tty.type_keys(b"echo back-$((1+1))\r");
    let at = tty.wait_for("back-2", at + 1, 120);
    assert!(
        !tty.text()[..at].contains("slept-42"),
        "the sleep ran to its end"
    );
    assert!(tty.child.try_wait().unwrap().is_none(), "vmft exited on ^C");
    tty.type_keys(b"\x01x");
    let st = tty.wait_exit(60);
    assert!(st.success(), "exit {st:?}; terminal:\n{}", tty.text());
    assert!(
        same_modes(&before, &termios(&tty.master)),
        "terminal modes not restored"
    );
    assert!(
        tty.text()[at..].contains("guest stopped on request"),
        "{}",
        tty.text()
    );
}
