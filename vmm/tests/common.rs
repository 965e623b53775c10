//! Helpers shared by the integration tests: the `vmft` binary, the default
//! guest image, and transcript checks.
#![allow(dead_code)]

use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;

/// The `vmft` binary under test.
pub fn vmft() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_vmft"));
    c.stdin(Stdio::null());
    c
}

/// These tests need /dev/kvm, and every machine of this project has it: a
/// test that cannot run fails, unless whoever runs it asked to skip the KVM
/// tests by name with `VMFT_SKIP_KVM=1`, and then the skip is printed.
/// Returns whether to run.
pub fn require_kvm() -> bool {
    let usable = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok();
    let skip = std::env::var("VMFT_SKIP_KVM").ok();
    match kvm_gate(usable, skip.as_deref()) {
        Ok(run) => {
            if !run {
                let name = std::thread::current().name().unwrap_or("?").to_string();
                eprintln!("SKIPPED (VMFT_SKIP_KVM=1): {name}: /dev/kvm is not usable here");
            }
            run
        }
        Err(why) => panic!("{why}"),
    }
}

/// The decision behind [`require_kvm`]: run, skip (asked for by name), or
/// fail.
pub fn kvm_gate(usable: bool, skip_env: Option<&str>) -> Result<bool, String> {
    match (usable, skip_env) {
        (true, _) => Ok(true),
        (false, Some("1")) => Ok(false),
        (false, _) => Err(
            "/dev/kvm is not usable on this machine, so this KVM integration \
                           test cannot run; set VMFT_SKIP_KVM=1 to skip the KVM tests on purpose"
                .into(),
        ),
    }
}

/// Paths of the default guest image (built once by guest-images/build.sh).
pub fn image() -> &'static (PathBuf, PathBuf) {
    static IMAGE: OnceLock<(PathBuf, PathBuf)> = OnceLock::new();
    IMAGE.get_or_init(|| {
        let out = vmft()
            .arg("image")
            .stderr(Stdio::inherit())
            .output()
            .unwrap();
        assert!(out.status.success(), "vmft image failed");
        let text = String::from_utf8(out.stdout).unwrap();
        let get = |k: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(&format!("{k}=")))
                .map(PathBuf::from)
                .unwrap_or_else(|| panic!("no {k}= in {text}"))
        };
        (get("kernel"), get("initrd"))
    })
}

/// The counter workload's expected lines for `n` iterations.
pub fn expected_counter(n: u64) -> Vec<String> {
    let mut sum: u64 = 7;
    let mut lines = Vec::new();
    for i in 1..=n {
        sum = (sum * 31 + i * 7919) % 1_000_000_007;
        lines.push(format!("counter {i} sum={sum}"));
    }
    lines.push(format!("counter done n={n} sum={sum}"));
    lines
}

/// Lines of guest output after the ready marker, without kernel log lines.
pub fn after_ready(stdout: &str) -> Vec<String> {
    stdout
        .lines()
        .map(|l| l.trim_end_matches('\r'))
        .skip_while(|l| !l.contains("VMFT-READY"))
        .skip(1)
        .filter(|l| !l.starts_with('['))
        .map(str::to_string)
        .collect()
}

/// stdout and stderr as text.
pub fn texts(out: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Build the test guest for `mode` (see tests/guests/testguest.S) with
/// binutils; cached per test process.
pub fn test_guest(mode: u32) -> PathBuf {
    use std::collections::HashMap;
    use std::sync::Mutex;
    static BUILT: OnceLock<Mutex<HashMap<u32, PathBuf>>> = OnceLock::new();
    static DIR: OnceLock<tempfile::TempDir> = OnceLock::new();
    let dir = DIR.get_or_init(|| tempfile::tempdir().unwrap()).path();
    let mut built = BUILT.get_or_init(Default::default).lock().unwrap();
    if let Some(p) = built.get(&mode) {
        return p.clone();
    }
    let src = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/guests/testguest.S");
    let obj = dir.join(format!("tg{mode}.o"));
    let elf = dir.join(format!("tg{mode}.elf"));
    let st = Command::new("as")
        .args(["--64", "--defsym", &format!("MODE={mode}")])
        .arg(&src)
        .arg("-o")
        .arg(&obj)
        .status()
        .expect("`as` (binutils) is needed to build the test guests");
    assert!(st.success(), "assembling the test guest failed");
    let st = Command::new("ld")
        .args([
            "-static",
            "-nostdlib",
            "-N",
            "-Ttext",
            "0x1000000",
            "-e",
            "_start",
            "--no-warn-rwx-segments",
            "-o",
        ])
        .arg(&elf)
        .arg(&obj)
        .status()
        .expect("`ld` (binutils) is needed to build the test guests");
    assert!(st.success(), "linking the test guest failed");
    built.insert(mode, elf.clone());
    elf
}

/// The `vmft: final state digest` line of a run's stderr.
pub fn digest(stderr: &str) -> Option<String> {
    stderr
        .lines()
        .find_map(|l| l.strip_prefix("vmft: final state digest "))
        .map(str::to_string)
}

/// Spawn `cmd` with piped stdio, read its stdout until a line contains
/// `marker`, then type `text` (as a person would, once the guest is
/// ready). Returns the whole stdout and the finished process's output
/// (whose stdout part is empty).
pub fn spawn_and_type(mut cmd: Command, marker: &str, text: &str) -> (String, Output) {
    use std::io::{BufRead, BufReader, Read, Write};
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let mut reader = BufReader::new(child.stdout.take().unwrap());
    let mut stdout = String::new();
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap() == 0 {
            break;
        }
        stdout.push_str(&line);
        if line.contains(marker) {
            stdin.write_all(text.as_bytes()).unwrap();
            stdin.flush().unwrap();
            break;
        }
    }
    reader.read_to_string(&mut stdout).unwrap();
    drop(stdin);
    let out = child.wait_with_output().unwrap();
    (stdout, out)
}

/// Run `cmd` to completion, killing it and failing the test if it takes
/// longer than `secs` (a hung VM must fail the test, not stall CI).
pub fn output_within(mut cmd: Command, secs: u64) -> Output {
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let start = std::time::Instant::now();
    loop {
        if child.try_wait().unwrap().is_some() {
            return child.wait_with_output().unwrap();
        }
        if start.elapsed().as_secs() > secs {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!(
                "command did not finish within {secs} s; stderr:\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

/// The `ticker` workload's expected lines for `vmft.count=count`: 10·count
/// lines `ticker I sum=S`, then `ticker done lines=L sum=S` (the same
/// running sum as [`expected_counter`]).
pub fn expected_ticker(count: u64) -> Vec<String> {
    let lines = count * 10;
    let mut sum: u64 = 7;
    let mut out = Vec::new();
    for i in 1..=lines {
        sum = (sum * 31 + i * 7919) % 1_000_000_007;
        out.push(format!("ticker {i} sum={sum}"));
    }
    out.push(format!("ticker done lines={lines} sum={sum}"));
    out
}

/// Bytes of each test disk image.
pub const DISK_BYTES: u64 = 8 << 20;

/// A blank (all zero) disk image of [`DISK_BYTES`] at `path`.
pub fn blank_disk(path: &std::path::Path) -> PathBuf {
    let f = std::fs::File::create(path).unwrap();
    f.set_len(DISK_BYTES).unwrap();
    path.to_path_buf()
}

/// MiB `m` (from 1) as the `disk` workload writes it: "vmft disk mib M\n"
/// repeated, cut at 1 MiB.
pub fn disk_mib(m: u64) -> Vec<u8> {
    let line = format!("vmft disk mib {m}\n");
    line.as_bytes()
        .iter()
        .copied()
        .cycle()
        .take(1 << 20)
        .collect()
}

/// What is wrong with a disk image after the `disk` workload wrote `n`
/// MiB, if anything: its first `n` MiB must be the workload's and the rest
/// zero.
pub fn disk_problem(image: &std::path::Path, n: u64) -> Option<String> {
    let bytes = std::fs::read(image).unwrap();
    if bytes.len() as u64 != DISK_BYTES {
        return Some(format!("{} bytes, not {DISK_BYTES}", bytes.len()));
    }
    for m in 1..=n {
        let at = ((m - 1) << 20) as usize;
        if bytes[at..at + (1 << 20)] != disk_mib(m)[..] {
            return Some(format!(
                "MiB {m} (at byte {at}) is not what the guest wrote"
            ));
        }
    }
    let tail = (n << 20) as usize;
    bytes[tail..]
        .iter()
        .position(|&b| b != 0)
        .map(|p| format!("byte {} past the written MiB is not zero", tail + p))
}

/// Boot the default guest with `args` (a workload, disks, ...) and save a
/// snapshot at its ready marker to `snap`; the boot is then killed. Fails
/// the test if the snapshot does not come within a generous limit.
pub fn snapshot_at_ready(args: &[std::ffi::OsString], snap: &std::path::Path) {
    let mut cmd = vmft();
    cmd.args(args);
    boot_to_snapshot(cmd, snap);
}

/// Boot the default guest running `workload`, with more `vmft run`
/// arguments `args` (`--append`, `--net`, ...), and save a snapshot at its
/// ready marker to `snap`; the boot is then killed. `tap`: boot in a
/// network namespace of its own with a tap of that name in no bridge (for
/// a guest with `--net tap=NAME`; the namespace is removed after the
/// boot). Fails the test if the snapshot does not come within a generous
/// limit.
pub fn snapshot_of(workload: &str, args: &[&str], tap: Option<&str>, snap: &std::path::Path) {
    let ns = tap.map(|tap| {
        let ns = vmm::lab::netns::Netns::new("snap").unwrap();
        ns.make_tap(tap, None).unwrap();
        ns
    });
    let mut cmd = match &ns {
        Some(ns) => ns.exec(env!("CARGO_BIN_EXE_vmft")),
        None => vmft(),
    };
    cmd.args(["run", "--workload", workload]).args(args);
    boot_to_snapshot(cmd, snap);
    drop(ns);
}

/// Run `cmd`, a `vmft run` without its image and snapshot arguments, with
/// the default guest and `--snapshot-on-ready snap`, until it says the
/// snapshot is saved; then kill it.
fn boot_to_snapshot(mut cmd: Command, snap: &std::path::Path) {
    use std::io::Read;
    use std::sync::mpsc::RecvTimeoutError;
    let (kernel, initrd) = image();
    let mut child = cmd
        .arg("--no-stdin")
        .arg("--snapshot-on-ready")
        .arg(snap)
        .arg("--kernel")
        .arg(kernel)
        .arg("--initrd")
        .arg(initrd)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut err = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n) = err.read(&mut buf) {
            if n == 0 || tx.send(buf[..n].to_vec()).is_err() {
                break;
            }
        }
    });
    let t0 = std::time::Instant::now();
    let mut text = String::new();
    while !text.contains("snapshot saved to") {
        let left = std::time::Duration::from_secs(400).saturating_sub(t0.elapsed());
        match rx.recv_timeout(left) {
            Ok(b) => text.push_str(&String::from_utf8_lossy(&b)),
            Err(RecvTimeoutError::Timeout) => {
                let _ = child.kill();
                panic!("no snapshot at the ready marker within 400 s:\n{text}");
            }
            Err(RecvTimeoutError::Disconnected) => {
                let st = child.wait().unwrap();
                panic!("the boot ended ({st}) before its snapshot:\n{text}");
            }
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    eprintln!(
        "snapshot {} at the ready marker after {:.1} s of boot",
        snap.display(),
        t0.elapsed().as_secs_f64()
    );
}

/// The seed of a randomized test: the environment variable `var` (to
/// repeat a printed seed), or the time.
pub fn seed(var: &str) -> u64 {
    match std::env::var(var) {
        Ok(s) => s
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("{var}={s:?} is not a number")),
        Err(_) => std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64,
    }
}

/// splitmix64: enough randomness for picking moments, and repeatable.
pub struct Rng(pub u64);

impl Rng {
    /// The next value.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `lo..=hi`.
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next_u64() % (hi - lo + 1)
    }
}

/// Bytes a child wrote on one pipe, with the time each line ended.
#[derive(Default)]
pub struct Captured {
    /// Everything written.
    pub bytes: Vec<u8>,
    /// When each line ended.
    pub line_ends: Vec<std::time::Instant>,
}

impl Captured {
    /// The complete lines (without `\r`) and when each arrived.
    pub fn lines(&self) -> Vec<(std::time::Instant, String)> {
        let text = String::from_utf8_lossy(&self.bytes);
        text.split_inclusive('\n')
            .filter(|l| l.ends_with('\n'))
            .zip(&self.line_ends)
            .map(|(l, t)| (*t, l.trim_end_matches(['\n', '\r']).to_string()))
            .collect()
    }
}

/// Capture what `from` yields on a helper thread.
pub fn capture(
    mut from: impl std::io::Read + Send + 'static,
) -> std::sync::Arc<std::sync::Mutex<Captured>> {
    let cap = std::sync::Arc::new(std::sync::Mutex::new(Captured::default()));
    let to = cap.clone();
    std::thread::spawn(move || {
        let mut buf = [0u8; 8192];
        while let Ok(n) = from.read(&mut buf) {
            if n == 0 {
                break;
            }
            let now = std::time::Instant::now();
            let mut c = to.lock().unwrap();
            c.bytes.extend_from_slice(&buf[..n]);
            let lines = buf[..n].iter().filter(|&&b| b == b'\n').count();
            c.line_ends.extend((0..lines).map(|_| now));
        }
    });
    cap
}

/// Without the terminal colours of `tracing`'s output.
pub fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\x1b' {
            for d in chars.by_ref() {
                if d.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// The `arbiter` binary, built by the `arbiter` crate next to `vmft`
/// (built here if it is missing).
pub fn arbiter_bin() -> &'static std::path::Path {
    use std::path::Path;
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let vmft = Path::new(env!("CARGO_BIN_EXE_vmft"));
        let bin = vmft.with_file_name("arbiter");
        if bin.exists() {
            return bin;
        }
        let release = vmft.parent().and_then(Path::file_name) == Some("release".as_ref());
        let how = if release {
            "cargo build --release -p arbiter"
        } else {
            "cargo build -p arbiter"
        };
        eprintln!("{} is missing; running `{how}`", bin.display());
        let mut cargo = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
        cargo
            .current_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
            .args(["build", "-p", "arbiter"]);
        if release {
            cargo.arg("--release");
        }
        let ok = cargo.status().map(|s| s.success()).unwrap_or(false);
        assert!(
            ok && bin.exists(),
            "the arbiter binary {} is missing and `{how}` did not build it: run `{how}` \
             in the workspace, then these tests again",
            bin.display()
        );
        bin
    })
}
