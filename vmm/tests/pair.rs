//! The fault-tolerant pair end to end, as separate processes: an arbiter
//! (`arbiter serve`), a console endpoint (`vmft console`), a backup
//! (`vmft backup`) and a primary (`vmft primary`), all on loopback, all
//! restoring one snapshot of the default guest running the `ticker`
//! workload (30 numbered, checksummed lines, then `ticker done`).
//!
//! What they show (issue 8): whichever side dies, and at whatever moment,
//! the console prints every line of the guest's output exactly once and in
//! order; a paused primary that wakes up after the backup went live is
//! fenced (it loses the claim and releases nothing); with the arbiter down
//! nobody goes live until it is back; and the channel refuses a peer
//! without the secret, garbage, and an altered frame.
//!
//! The tests in this file run one at a time (a global lock), so that the
//! failover times they print mean something on a 2-core machine.
//! `VMFT_PAIR_ROUNDS` lowers the number of kill rounds (default 10),
//! `VMFT_PAIR_SEED` repeats a printed seed.

mod common;

use std::ffi::OsString;
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::thread;
use std::time::{Duration, Instant};

use common::*;

/// `vmft.count` of the shared snapshot: 30 ticker lines.
const COUNT: u64 = 3;
/// The channel's failure timeout unless a test says otherwise.
const TIMEOUT_MS: u64 = 2000;
const HEARTBEAT_MS: u64 = 100;

// ---------------------------------------------------------------- set-up

/// One pair test at a time: each runs up to two guests under emulation.
/// Held for the test's duration; prints how long the test took (the
/// shared boot excluded, it is printed on its own).
struct Serial {
    _lock: MutexGuard<'static, ()>,
    name: String,
    t0: Instant,
}

fn serial() -> Serial {
    static LOCK: Mutex<()> = Mutex::new(());
    let lock = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    ticker_snapshot();
    Serial {
        _lock: lock,
        name: thread::current().name().unwrap_or("?").to_string(),
        t0: Instant::now(),
    }
}

impl Drop for Serial {
    fn drop(&mut self) {
        let how = if thread::panicking() {
            "failed"
        } else {
            "passed"
        };
        println!(
            "pair: {} {how} in {:.1} s",
            self.name,
            self.t0.elapsed().as_secs_f64()
        );
    }
}

/// The directory of the shared snapshot, removed when the test process
/// exits (a static's destructor never runs).
static SNAP_DIR: OnceLock<PathBuf> = OnceLock::new();

extern "C" fn remove_snapshot_dir() {
    if let Some(dir) = SNAP_DIR.get() {
        let _ = std::fs::remove_dir_all(dir);
    }
}

/// A snapshot of the default guest running `ticker` with `vmft.count=3`,
/// taken at its ready marker (one boot for this file's tests).
fn ticker_snapshot() -> &'static Path {
    static SNAP: OnceLock<PathBuf> = OnceLock::new();
    SNAP.get_or_init(|| {
        let dir = SNAP_DIR.get_or_init(|| {
            let dir = tempfile::tempdir().unwrap().keep();
            // SAFETY: registers a plain function without arguments.
            unsafe { libc::atexit(remove_snapshot_dir) };
            dir
        });
        let snap = dir.join("ticker.snap");
        let (kernel, initrd) = image();
        let mut cmd = vmft();
        cmd.args(["run", "--workload", "ticker", "--append"])
            .arg(format!("vmft.count={COUNT}"))
            .args(["--no-stdin", "--snapshot-on-ready"])
            .arg(&snap)
            .arg("--kernel")
            .arg(kernel)
            .arg("--initrd")
            .arg(initrd);
        let t0 = Instant::now();
        let mut boot = Proc::spawn("boot", cmd);
        let limit = Duration::from_secs(400);
        loop {
            let err = boot.stderr();
            if err.contains("snapshot saved to") {
                break;
            }
            if let Some(st) = boot.poll() {
                panic!("the boot ended ({st}) before its snapshot:\n{err}");
            }
            assert!(
                t0.elapsed() < limit,
                "no snapshot within {limit:?}; stderr:\n{err}\nstdout:\n{}",
                boot.stdout()
            );
            thread::sleep(Duration::from_millis(100));
        }
        eprintln!(
            "pair: ticker snapshot taken after {:.1} s of boot",
            t0.elapsed().as_secs_f64()
        );
        drop(boot);
        snap
    })
}

/// A free loopback port (for the console, whose address the sides need
/// before it starts).
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

// ---------------------------------------------------------------- processes

/// A child process with its stdout and stderr captured; killed (SIGKILL,
/// which also ends a stopped process) and reaped when dropped, so that a
/// failing test leaves nothing running.
struct Proc {
    name: String,
    child: Child,
    out: Arc<Mutex<Captured>>,
    err: Arc<Mutex<Captured>>,
    status: Option<ExitStatus>,
    started: Instant,
}

impl Proc {
    fn spawn(name: &str, mut cmd: Command) -> Proc {
        cmd.stdin(Stdio::null());
        Self::spawn_with(name, cmd)
    }

    /// Spawn with stdin as a pipe; the caller takes it from `child.stdin`.
    fn spawn_piped(name: &str, mut cmd: Command) -> Proc {
        cmd.stdin(Stdio::piped());
        Self::spawn_with(name, cmd)
    }

    fn spawn_with(name: &str, mut cmd: Command) -> Proc {
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start the {name}: {e}"));
        let out = capture(child.stdout.take().unwrap());
        let err = capture(child.stderr.take().unwrap());
        Proc {
            name: name.to_string(),
            child,
            out,
            err,
            status: None,
            started: Instant::now(),
        }
    }

    fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    fn signal(&self, sig: i32) {
        assert!(
            self.status.is_none(),
            "the {} already exited ({:?})",
            self.name,
            self.status
        );
        // SAFETY: kill(2) on the pid of a child we own and have not reaped.
        let r = unsafe { libc::kill(self.pid(), sig) };
        assert_eq!(r, 0, "kill({}, {sig}) failed", self.name);
    }

    /// `kill -9`, and reap it.
    fn kill9(&mut self) -> Instant {
        self.signal(libc::SIGKILL);
        let at = Instant::now();
        self.status = Some(self.child.wait().unwrap());
        at
    }

    /// The exit status, if it exited.
    fn poll(&mut self) -> Option<ExitStatus> {
        if self.status.is_none() {
            self.status = self.child.try_wait().unwrap();
        }
        self.status
    }

    fn stdout(&self) -> String {
        String::from_utf8_lossy(&self.out.lock().unwrap().bytes).into_owned()
    }

    fn stderr(&self) -> String {
        strip_ansi(&String::from_utf8_lossy(&self.err.lock().unwrap().bytes))
    }

    fn stdout_lines(&self) -> Vec<(Instant, String)> {
        self.out.lock().unwrap().lines()
    }

    /// When the first stderr line containing `needle` arrived.
    fn stderr_line_time(&self, needle: &str) -> Option<Instant> {
        self.err
            .lock()
            .unwrap()
            .lines()
            .into_iter()
            .find(|(_, l)| strip_ansi(l).contains(needle))
            .map(|(t, _)| t)
    }

    fn report(&mut self, whole_stdout: bool) -> String {
        let status = match self.poll() {
            Some(st) => format!("{st}"),
            None => "running".into(),
        };
        let out = self.stdout();
        let out = if whole_stdout || out.len() <= 4000 {
            out
        } else {
            format!("...{}", &out[out.len() - 4000..])
        };
        format!(
            "===== {} (pid {}, started {:.1} s ago, {status})\n--- stderr:\n{}--- stdout:\n{}\n",
            self.name,
            self.pid(),
            self.started.elapsed().as_secs_f64(),
            self.stderr(),
            out
        )
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if self.status.is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

// ---------------------------------------------------------------- the pair

/// How to start a pair.
struct Opts {
    timeout_ms: u64,
    /// The primary's channel secret, if not the pair's.
    primary_token: Option<&'static [u8]>,
    /// What both sides run (default: the ticker snapshot).
    guest: Guest,
    /// The console reads typed input from a pipe the test writes to.
    console_stdin: bool,
    /// More options for the backup.
    backup_args: Vec<OsString>,
    /// More options for the primary.
    primary_args: Vec<OsString>,
}

/// What a pair runs.
#[derive(Clone, Copy)]
enum Guest {
    /// The shared snapshot of the default guest running `ticker`.
    Ticker,
    /// Another snapshot.
    Restore(&'static Path),
    /// A test guest (`tests/guests/testguest.S`) of this mode, booted.
    Assembled(u32),
}

impl Guest {
    fn args(self) -> Vec<OsString> {
        match self {
            Guest::Ticker => vec!["--restore".into(), ticker_snapshot().into()],
            Guest::Restore(snap) => vec!["--restore".into(), snap.into()],
            Guest::Assembled(mode) => vec![
                "--kernel".into(),
                test_guest(mode).into(),
                "--mem".into(),
                "64".into(),
            ],
        }
    }
}

impl Default for Opts {
    fn default() -> Self {
        Opts {
            timeout_ms: TIMEOUT_MS,
            primary_token: None,
            guest: Guest::Ticker,
            console_stdin: false,
            backup_args: Vec::new(),
            primary_args: Vec::new(),
        }
    }
}

/// Where the pair's parts are and what they share.
struct Setup {
    timeout_ms: u64,
    guest: Guest,
    primary_args: Vec<OsString>,
    /// The primary's channel secret, if not the pair's.
    primary_token: Option<&'static [u8]>,
    arbiter_addr: String,
    console_addr: String,
    backup_addr: String,
    token: PathBuf,
    atoken: PathBuf,
    adata: PathBuf,
}

impl Setup {
    /// The options both sides take.
    fn side_args(&self, token: &Path) -> Vec<OsString> {
        let mut args = self.guest.args();
        args.extend::<[OsString; 13]>([
            "--arbiter".into(),
            self.arbiter_addr.clone().into(),
            "--arbiter-token-file".into(),
            self.atoken.clone().into(),
            "--token-file".into(),
            token.into(),
            "--no-stdin".into(),
            "--console".into(),
            self.console_addr.clone().into(),
            "--timeout-ms".into(),
            self.timeout_ms.to_string().into(),
            "--heartbeat-ms".into(),
            HEARTBEAT_MS.to_string().into(),
        ]);
        args
    }
}

/// An arbiter, a console, a backup and (once started) a primary, in a
/// fresh directory. Every process is killed when this is dropped.
struct Cluster {
    // Dropped first: the processes die before their directory goes.
    arbiter: Option<Proc>,
    console: Proc,
    backup: Proc,
    primary: Option<Proc>,
    s: Setup,
    dir: tempfile::TempDir,
}

const TOKEN: &[u8] = b"pair-test-channel-secret";
const ATOKEN: &[u8] = b"pair-test-arbiter-secret";

fn start_arbiter(listen: &str, data: &Path, token: &Path) -> (Proc, String) {
    let mut cmd = Command::new(arbiter_bin());
    cmd.args(["serve", "--listen", listen, "--data"])
        .arg(data)
        .arg("--token-file")
        .arg(token);
    let mut p = Proc::spawn("arbiter", cmd);
    let t0 = Instant::now();
    loop {
        if let Some(addr) = p
            .stdout()
            .lines()
            .find_map(|l| l.strip_prefix("listening "))
        {
            return (p, addr.trim().to_string());
        }
        if p.poll().is_some() || t0.elapsed() > Duration::from_secs(60) {
            panic!("the arbiter did not start:\n{}", p.report(true));
        }
        thread::sleep(Duration::from_millis(20));
    }
}

impl Cluster {
    /// Start the arbiter, the console and the backup (waiting for the
    /// primary).
    fn start(opts: Opts) -> Cluster {
        if let Guest::Ticker = opts.guest {
            ticker_snapshot();
        }
        let dir = tempfile::tempdir().unwrap();
        let token = dir.path().join("channel.token");
        let atoken = dir.path().join("arbiter.token");
        let adata = dir.path().join("arbiter-data");
        std::fs::write(&token, TOKEN).unwrap();
        std::fs::write(&atoken, ATOKEN).unwrap();
        std::fs::create_dir(&adata).unwrap();

        let (arbiter, arbiter_addr) = start_arbiter("127.0.0.1:0", &adata, &atoken);

        let console_addr = format!("127.0.0.1:{}", free_port());
        let mut cmd = vmft();
        cmd.args(["console", "--listen", &console_addr, "--token-file"])
            .arg(&token);
        let console = if opts.console_stdin {
            Proc::spawn_piped("console", cmd)
        } else {
            cmd.arg("--no-stdin");
            Proc::spawn("console", cmd)
        };

        let s = Setup {
            timeout_ms: opts.timeout_ms,
            guest: opts.guest,
            primary_args: opts.primary_args.clone(),
            primary_token: opts.primary_token,
            arbiter_addr,
            console_addr,
            backup_addr: String::new(),
            token,
            atoken,
            adata,
        };
        let mut cmd = vmft();
        cmd.env("XDG_RUNTIME_DIR", dir.path());
        cmd.args(["backup", "--listen", "127.0.0.1:0"])
            .args(s.side_args(&s.token))
            .args(&opts.backup_args);
        let backup = Proc::spawn("backup", cmd);
        let mut c = Cluster {
            arbiter: Some(arbiter),
            console,
            backup,
            primary: None,
            s,
            dir,
        };
        const WAITING: &str = "waiting for the primary on ";
        c.wait_for("the backup to listen", 60, |c| {
            c.backup.stderr().contains(WAITING)
        });
        c.s.backup_addr = c
            .backup
            .stderr()
            .lines()
            .find_map(|l| l.split_once(WAITING).map(|(_, a)| a.trim().to_string()))
            .unwrap();
        c
    }

    /// Start the primary, dialling `backup` (the backup's address unless
    /// a relay sits between them).
    fn start_primary_to(&mut self, backup: &str) {
        let token = match self.s.primary_token {
            Some(t) => {
                let p = self.dir.path().join("other.token");
                std::fs::write(&p, t).unwrap();
                p
            }
            None => self.s.token.clone(),
        };
        let mut cmd = vmft();
        cmd.args(["primary", "--backup", backup])
            .args(self.s.side_args(&token))
            .args(&self.s.primary_args)
            .env("XDG_RUNTIME_DIR", self.dir.path());
        self.primary = Some(Proc::spawn("primary", cmd));
    }

    /// Start the primary and wait until the pair is formed.
    fn start_primary(&mut self) {
        let addr = self.s.backup_addr.clone();
        self.start_primary_to(&addr);
        self.wait_for("the pair to form", 120, |c| {
            c.primary().stderr().contains("connected to the backup")
                && c.backup.stderr().contains("the primary connected")
        });
    }

    /// Start another backup with `extra` options (`--join ADDR`: a new
    /// backup for a running side).
    fn spawn_backup(&self, extra: &[&str]) -> Proc {
        let mut cmd = vmft();
        cmd.env("XDG_RUNTIME_DIR", self.dir.path());
        cmd.arg("backup")
            .args(extra)
            .args(self.s.side_args(&self.s.token));
        Proc::spawn("backup", cmd)
    }

    fn primary(&mut self) -> &mut Proc {
        self.primary.as_mut().expect("the primary was started")
    }

    /// `vmft status --json` for the monitors of this cluster (their
    /// control sockets are in the cluster's runtime directory): one JSON
    /// line per monitor that answers, as (role, line).
    fn status(&self) -> Vec<(String, String)> {
        let out = vmft()
            .args(["status", "--json"])
            .env("XDG_RUNTIME_DIR", self.dir.path())
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(|l| {
                let role = if l.contains("\"role\":\"primary\"") {
                    "primary"
                } else {
                    "backup"
                };
                (role.to_string(), l.to_string())
            })
            .collect()
    }

    /// The status line of `role`, waiting up to `secs` for one that
    /// contains every piece of `want`.
    fn wait_status(&mut self, role: &str, want: &[&str], secs: u64) -> String {
        let what = format!("vmft status to show the {role} with {want:?}");
        let mut last = String::new();
        self.wait_for(&what, secs, |c| {
            match c.status().into_iter().find(|(r, _)| r == role) {
                Some((_, l)) => {
                    let ok = want.iter().all(|w| l.contains(w));
                    last = l;
                    ok
                }
                None => false,
            }
        });
        last
    }

    /// Every process's stderr and stdout, and the console's transcript.
    fn report(&mut self) -> String {
        let mut s = String::new();
        if let Some(a) = self.arbiter.as_mut() {
            s += &a.report(false);
        }
        s += &self.backup.report(false);
        if let Some(p) = self.primary.as_mut() {
            s += &p.report(false);
        }
        s += &self.console.report(true);
        s
    }

    /// Wait until `cond` holds; fail with every process's output after
    /// `secs`.
    fn wait_for(&mut self, what: &str, secs: u64, mut cond: impl FnMut(&mut Cluster) -> bool) {
        let t0 = Instant::now();
        loop {
            if cond(self) {
                return;
            }
            if t0.elapsed() > Duration::from_secs(secs) {
                let r = self.report();
                panic!("{what}: not within {secs} s\n{r}");
            }
            thread::sleep(Duration::from_millis(10));
        }
    }

    /// Fail with every process's output unless `ok`.
    fn check(&mut self, ok: bool, what: impl std::fmt::Display) {
        if !ok {
            let r = self.report();
            panic!("{what}\n{r}");
        }
    }

    /// The console's ticker lines so far.
    fn ticker_lines(&self) -> Vec<(Instant, String)> {
        self.console
            .stdout_lines()
            .into_iter()
            .filter(|(_, l)| l.starts_with("ticker "))
            .collect()
    }

    /// Wait for one process to exit.
    fn wait_exit(&mut self, who: Who, secs: u64) -> ExitStatus {
        let what = format!("the {who:?} to exit");
        self.wait_for(&what, secs, |c| c.proc(who).poll().is_some());
        self.proc(who).poll().unwrap()
    }

    fn proc(&mut self, who: Who) -> &mut Proc {
        match who {
            Who::Primary => self.primary(),
            Who::Backup => &mut self.backup,
            Who::Console => &mut self.console,
        }
    }

    /// Wait for the console to end, and check that its transcript is the
    /// whole output, each line once, in order, and that it exited 0.
    fn expect_complete_transcript(&mut self, secs: u64) {
        let st = self.wait_exit(Who::Console, secs);
        let problem = transcript_problem(&self.console.stdout(), true);
        self.check(
            problem.is_none(),
            format!(
                "the console's transcript is wrong: {}",
                problem.unwrap_or_default()
            ),
        );
        self.check(
            st.code() == Some(0),
            format!("the console exited {st}, not 0"),
        );
    }
}

#[derive(Clone, Copy, Debug)]
enum Who {
    Primary,
    Backup,
    Console,
}

/// What is wrong with a console transcript, if anything: its ticker lines
/// must be the expected ones in order, each once (all of them when
/// `complete`, else a prefix), and every other line the workload's end
/// marker or a kernel message.
fn transcript_problem(text: &str, complete: bool) -> Option<String> {
    let expected = expected_ticker(COUNT);
    let mut got = Vec::new();
    let mut done = 0;
    for line in text.lines().map(|l| l.trim_end_matches('\r')) {
        if line.starts_with("ticker ") {
            got.push(line);
        } else if line == "VMFT-DONE status=0" {
            done += 1;
            if got.len() != expected.len() {
                return Some(format!(
                    "VMFT-DONE after {} ticker lines, not {}",
                    got.len(),
                    expected.len()
                ));
            }
        } else if !(line.is_empty() || line.starts_with('[')) {
            return Some(format!("a line that the guest did not print: {line:?}"));
        }
    }
    if let Some(i) = (0..got.len()).find(|&i| expected.get(i).map(String::as_str) != Some(got[i])) {
        return Some(format!(
            "ticker line {} is {:?}, expected {:?} (lost, repeated or reordered output)",
            i + 1,
            got[i],
            expected.get(i)
        ));
    }
    if complete && got.len() != expected.len() {
        return Some(format!(
            "{} ticker lines, expected {} (output lost)",
            got.len(),
            expected.len()
        ));
    }
    if complete && done != 1 {
        return Some(format!("VMFT-DONE printed {done} times, expected once"));
    }
    if done > 1 {
        return Some(format!("VMFT-DONE printed {done} times"));
    }
    None
}

// ---------------------------------------------------------------- the tests

fn rounds() -> u64 {
    match std::env::var("VMFT_PAIR_ROUNDS") {
        Ok(s) => s
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("VMFT_PAIR_ROUNDS={s:?} is not a number")),
        Err(_) => 10,
    }
}

fn secs(d: Duration) -> f64 {
    d.as_secs_f64()
}

#[test]
fn kill_9_of_the_primary_at_random_moments_loses_and_repeats_nothing() {
    if !require_kvm() {
        return;
    }
    let _one = serial();
    let seed = seed("VMFT_PAIR_SEED");
    let rounds = rounds();
    let mut rng = Rng(seed);
    println!("pair: kill -9 of the primary: {rounds} rounds, seed {seed} (VMFT_PAIR_SEED={seed} repeats them)");
    let mut failovers = Vec::new();
    let mut claims = Vec::new();
    for round in 1..=rounds {
        let k = rng.range(1, 28) as usize;
        let extra = Duration::from_millis(rng.range(0, 300));
        println!(
            "pair: round {round}/{rounds} (seed {seed}): kill after {k} lines + {} ms",
            extra.as_millis()
        );
        let mut c = Cluster::start(Opts::default());
        c.start_primary();
        c.wait_for(&format!("{k} ticker lines on the console"), 180, |c| {
            c.ticker_lines().len() >= k
        });
        thread::sleep(extra);
        let before = c.ticker_lines().len();
        let killed = c.primary().kill9();
        c.wait_for("the backup to go live", 120, |c| {
            c.backup.stderr().contains("claim won: the backup is LIVE")
        });
        c.wait_for("a new line on the console after the kill", 120, |c| {
            c.ticker_lines().iter().any(|(t, _)| *t > killed)
        });
        let first_new = c
            .ticker_lines()
            .iter()
            .find(|(t, _)| *t > killed)
            .map(|(t, _)| *t)
            .unwrap();
        let failover = first_new - killed;
        let claim = c
            .backup
            .stderr_line_time("claim won: the backup is LIVE")
            .map(|t| t.saturating_duration_since(killed));
        c.expect_complete_transcript(300);
        let st = c.wait_exit(Who::Backup, 60);
        c.check(
            st.code() == Some(0),
            format!("the backup exited {st}, not 0"),
        );
        println!(
            "pair: round {round}: seed {seed} killed after {before} lines (+{} ms); \
             claim won {:.3} s after the kill; failover (kill to first new console line) {:.3} s",
            extra.as_millis(),
            claim.map(secs).unwrap_or(f64::NAN),
            secs(failover)
        );
        failovers.push(failover);
        if let Some(d) = claim {
            claims.push(d);
        }
    }
    let dist = |v: &mut Vec<Duration>| {
        v.sort();
        if v.is_empty() {
            return "none".to_string();
        }
        format!(
            "min {:.3} s, median {:.3} s, max {:.3} s (n={})",
            secs(v[0]),
            secs(v[v.len() / 2]),
            secs(v[v.len() - 1]),
            v.len()
        )
    };
    println!(
        "pair: failover, kill -9 to the first new console line: {}",
        dist(&mut failovers)
    );
    println!(
        "pair: kill -9 to the backup's won claim: {}",
        dist(&mut claims)
    );
}

/// The checksum test guest 11 prints: `h = h * 131 + byte` over every
/// byte it got.
fn echo_checksum(bytes: &[u8]) -> u64 {
    bytes
        .iter()
        .fold(0u64, |h, &b| h.wrapping_mul(131).wrapping_add(b as u64))
}

#[test]
fn typed_input_crosses_a_failover_exactly_once() {
    if !require_kvm() {
        return;
    }
    let _one = serial();
    let seed = seed("VMFT_PAIR_SEED");
    let mut rng = Rng(seed ^ 0x1f);
    let rounds = rounds().clamp(1, 4);
    println!("pair: typed input across kill -9 of the primary: {rounds} rounds, seed {seed}");
    for round in 1..=rounds {
        let mut c = Cluster::start(Opts {
            guest: Guest::Assembled(11),
            console_stdin: true,
            ..Opts::default()
        });
        let mut keys = c.console.child.stdin.take().expect("the console's stdin");
        c.start_primary();
        c.wait_for("READY on the console", 120, |c| {
            c.console.stdout().contains("READY\n")
        });
        // Type chunks of a few bytes, some time apart, and kill the primary
        // after one of them. Odd rounds: a moment (0-6 ms) after it, while
        // the primary may be between handing the chunk to the guest and
        // hearing that the backup has it. Even rounds: with the backup
        // paused for the last few chunks before the kill (it receives the
        // log but acknowledges nothing), so the guest has input that the
        // console never heard was safe: the backup must not get it twice.
        let chunks = 40;
        let kill_after = rng.range(6, 30) as usize;
        let pause_backup = round % 2 == 0;
        let pause_from = kill_after - rng.range(1, 4) as usize;
        let mut typed = Vec::new();
        for i in 0..chunks {
            if pause_backup && i == pause_from {
                c.backup.signal(libc::SIGSTOP);
            }
            let chunk = format!("k{i:02}{}", if i % 3 == 2 { "\n" } else { " " });
            keys.write_all(chunk.as_bytes()).unwrap();
            keys.flush().unwrap();
            typed.extend_from_slice(chunk.as_bytes());
            if i == kill_after {
                let pause = if pause_backup { 100 } else { rng.range(0, 6) };
                thread::sleep(Duration::from_millis(pause));
                c.primary().kill9();
                if pause_backup {
                    c.backup.signal(libc::SIGCONT);
                }
            }
            thread::sleep(Duration::from_millis(rng.range(5, 40)));
        }
        c.wait_for("the backup to go live", 120, |c| {
            c.backup.stderr().contains("claim won: the backup is LIVE")
        });
        keys.write_all(b".").unwrap();
        keys.flush().unwrap();
        typed.push(b'.');
        let st = c.wait_exit(Who::Console, 120);
        let out = c.console.stdout();
        let echoed = out
            .split_once("READY\n")
            .map(|(_, rest)| rest.split("RESULT ").next().unwrap_or(rest))
            .unwrap_or_default()
            .to_string();
        let want = String::from_utf8(typed.clone()).unwrap();
        c.check(
            echoed == want,
            format!(
                "round {round} (seed {seed}, kill after chunk {kill_after}): the guest echoed\n{echoed:?}\nthe user typed\n{want:?}"
            ),
        );
        let result = format!("RESULT {:016x}", echo_checksum(&typed));
        c.check(
            out.contains(&result),
            format!("round {round}: the guest's checksum is not {result}: it got other bytes"),
        );
        c.check(
            st.code() == Some(0),
            format!("the console exited {st}, not 0"),
        );
        println!(
            "pair: round {round}: killed after chunk {kill_after}{}: every typed byte reached the guest once",
            if pause_backup {
                format!(" (backup paused from chunk {pause_from})")
            } else {
                String::new()
            }
        );
    }
}

#[test]
fn a_promoted_backup_records_a_log_that_replays_to_its_end() {
    if !require_kvm() {
        return;
    }
    let _one = serial();
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("after.log");
    let mut c = Cluster::start(Opts {
        backup_args: vec!["--takeover-log".into(), log.clone().into()],
        ..Opts::default()
    });
    c.start_primary();
    c.wait_for("6 ticker lines on the console", 180, |c| {
        c.ticker_lines().len() >= 6
    });
    c.primary().kill9();
    c.wait_for("the backup to record after the takeover", 120, |c| {
        c.backup.stderr().contains("vmft: recording from exit")
    });
    c.expect_complete_transcript(300);
    let st = c.wait_exit(Who::Backup, 60);
    c.check(st.success(), format!("the backup exited {st}"));
    let err = c.backup.stderr();
    let digest = |text: &str| {
        text.lines()
            .find_map(|l| l.split("final state digest ").nth(1))
            .map(|d| d.trim().to_string())
    };
    let live_digest = digest(&err).expect("the backup prints its final digest");
    // The log and the state at the takeover replay to the same end.
    let snap = dir.path().join("after.log.snap");
    let serial = dir.path().join("replayed.txt");
    let out = vmft()
        .args(["replay", "--restore"])
        .arg(&snap)
        .arg("--log")
        .arg(&log)
        .arg("--serial-out")
        .arg(&serial)
        .output()
        .unwrap();
    let (_, stderr) = texts(&out);
    let stdout = std::fs::read_to_string(&serial).unwrap_or_default();
    c.check(
        out.status.success(),
        format!("the takeover log does not replay:\n{stderr}"),
    );
    c.check(
        digest(&stderr).as_deref() == Some(live_digest.as_str()),
        format!("the replay ends in another state than the live backup:\n{stderr}"),
    );
    // It holds the run after the takeover: the last ticker lines and the end.
    let expected = expected_ticker(COUNT);
    let replayed: Vec<&str> = stdout
        .lines()
        .map(|l| l.trim_end_matches('\r'))
        .filter(|l| l.starts_with("ticker "))
        .collect();
    c.check(
        !replayed.is_empty()
            && expected.ends_with(&replayed.iter().map(|l| l.to_string()).collect::<Vec<_>>()),
        format!("the replay printed {replayed:?}, not the end of the ticker"),
    );
    c.check(
        stdout.contains("VMFT-DONE status=0"),
        format!("the replay does not reach the workload's end:\n{stdout}"),
    );
    println!(
        "pair: the promoted backup's log replays {} ticker lines to the same end",
        replayed.len()
    );
}

/// MiB the `disk` workload of the disk pair test writes.
const DISK_MIB: u64 = 3;

/// A snapshot of the default guest running `disk` with one blank disk, at
/// its ready marker (nothing is written before it: a fresh blank image is
/// the disk as it was).
fn disk_snapshot() -> &'static Path {
    static SNAP: OnceLock<PathBuf> = OnceLock::new();
    SNAP.get_or_init(|| {
        let dir = SNAP_DIR.get_or_init(|| {
            let dir = tempfile::tempdir().unwrap().keep();
            // SAFETY: registers a plain function without arguments.
            unsafe { libc::atexit(remove_snapshot_dir) };
            dir
        });
        let snap = dir.join("disk.snap");
        let scratch = blank_disk(&dir.join("scratch.img"));
        let args: Vec<OsString> = vec![
            "run".into(),
            "--workload".into(),
            "disk".into(),
            "--append".into(),
            format!("vmft.count={DISK_MIB}").into(),
            "--disk".into(),
            scratch.into(),
        ];
        snapshot_at_ready(&args, &snap);
        snap
    })
}

/// The `disk` lines on the console.
fn disk_lines(c: &Cluster) -> Vec<String> {
    c.console
        .stdout_lines()
        .into_iter()
        .map(|(_, l)| l)
        .filter(|l| l.starts_with("disk "))
        .collect()
}

/// The console shows the whole `disk` workload: each MiB written, each
/// read back with its sum, the end line; each once, in order.
fn expect_disk_lines(c: &mut Cluster) {
    let lines = disk_lines(c);
    let mut want: Vec<String> = (1..=DISK_MIB)
        .map(|m| format!("disk {m} written"))
        .collect();
    want.extend((1..=DISK_MIB).map(|m| format!("disk {m} sum=")));
    want.push(format!("disk done mib={DISK_MIB} sum="));
    c.check(
        lines.len() == want.len()
            && lines
                .iter()
                .zip(&want)
                .all(|(l, w)| l.starts_with(w.as_str())),
        format!("the console's disk lines are not each once, in order: {lines:?}"),
    );
}

/// The live backup (`who`) runs the `disk` workload to its end: the
/// console shows all of it, `image` holds every MiB, and it exits 0.
fn backup_finishes_the_disk_workload(c: &mut Cluster, image: &Path, who: &str) {
    let st = c.wait_exit(Who::Console, 300);
    c.check(st.code() == Some(0), format!("the console exited {st}"));
    expect_disk_lines(c);
    if let Some(problem) = disk_problem(image, DISK_MIB) {
        c.check(false, format!("{who}'s disk is wrong: {problem}"));
    }
    let st = c.wait_exit(Who::Backup, 60);
    c.check(st.success(), format!("{who} exited {st}"));
}

#[test]
fn with_separate_disks_kill_9_of_the_primary_loses_no_write() {
    if !require_kvm() {
        return;
    }
    let _one = serial();
    let seed = seed("VMFT_PAIR_SEED");
    let mut rng = Rng(seed ^ 0xd15c);
    let dir = tempfile::tempdir().unwrap();
    let p = blank_disk(&dir.path().join("primary.img"));
    let b = blank_disk(&dir.path().join("backup.img"));
    let mut c = Cluster::start(Opts {
        guest: Guest::Restore(disk_snapshot()),
        primary_args: vec!["--disk".into(), p.into()],
        backup_args: vec!["--disk".into(), b.clone().into()],
        ..Opts::default()
    });
    c.start_primary();
    // Kill while it writes or while it reads back (2 lines per MiB).
    let k = rng.range(1, 2 * DISK_MIB - 1) as usize;
    c.wait_for(&format!("{k} disk lines on the console"), 300, |c| {
        disk_lines(c).len() >= k
    });
    c.primary().kill9();
    c.wait_for("the backup to go live", 120, |c| {
        c.backup.stderr().contains("claim won: the backup is LIVE")
    });
    backup_finishes_the_disk_workload(&mut c, &b, "the backup");
    println!("pair: separate disks: the primary killed after {k} lines; the backup's disk holds all {DISK_MIB} MiB");
}

/// Re-protection with a writable disk of each side's own: the new
/// backup's image starts as other bytes, gets the primary's through the
/// state transfer (chunks copied while the guest writes, the rest in the
/// pause), and after the primary dies the new backup finishes the
/// workload: every MiB reads back right, and its image holds them all.
#[test]
fn a_new_backup_gets_the_primary_s_writable_disk_and_carries_on_with_it() {
    if !require_kvm() {
        return;
    }
    let _one = serial();
    let dir = tempfile::tempdir().unwrap();
    let p = blank_disk(&dir.path().join("primary.img"));
    let b = blank_disk(&dir.path().join("backup.img"));
    let j = dir.path().join("joiner.img");
    std::fs::write(&j, vec![0x5a; DISK_BYTES as usize]).unwrap();
    let join = format!("127.0.0.1:{}", free_port());
    let mut c = Cluster::start(Opts {
        guest: Guest::Restore(disk_snapshot()),
        primary_args: vec![
            "--disk".into(),
            p.clone().into(),
            "--listen".into(),
            join.clone().into(),
        ],
        backup_args: vec!["--disk".into(), b.into()],
        ..Opts::default()
    });
    c.start_primary();
    // A MiB is on the primary's disk (and the backup's) before the backup
    // dies: the new backup has it only through the transfer.
    c.wait_for("the first MiB written", 300, |c| {
        disk_lines(c)
            .iter()
            .any(|l| l.starts_with("disk 1 written"))
    });
    c.backup.kill9();
    c.wait_for("the primary to win its claim", 120, |c| {
        c.primary()
            .stderr()
            .contains("claim won: the VM continues here, UNPROTECTED")
    });
    let listen = format!("127.0.0.1:{}", free_port());
    let jd = j.display().to_string();
    let joiner = c.spawn_backup(&["--join", &join, "--listen", &listen, "--disk", &jd]);
    drop(std::mem::replace(&mut c.backup, joiner));
    c.wait_for("the primary to be protected again", 120, |c| {
        c.primary().stderr().contains("the VM is PROTECTED again")
    });
    let at = disk_lines(&c).len();
    c.wait_for("the new backup to have the state", 60, |c| {
        c.backup.stderr().contains("state received")
    });
    let p_err = c.primary().stderr();
    let b_err = c.backup.stderr();
    let chunks = b_err
        .lines()
        .find_map(|l| l.split(" pages, ").nth(1))
        .and_then(|r| r.split(' ').next())
        .and_then(|n| n.parse::<u64>().ok());
    let (paused, received) = copied_pages(&p_err, &b_err);
    c.check(
        paused.zip(received).is_some_and(|(p, r)| p * 10 < r),
        format!("most pages did not go while the guest ran: {paused:?} of {received:?}"),
    );
    c.check(
        p_err.contains("and 1 disk image(s) of")
            && b_err.contains("are overwritten with the primary's")
            && chunks.is_some_and(|n| n >= 16),
        format!("the transfer did not carry the MiB written before it ({chunks:?} disk chunks)"),
    );
    c.check(
        at < 2 * DISK_MIB as usize + 1,
        format!("the workload had ended ({at} lines) before the pair was protected again"),
    );
    c.primary().kill9();
    c.wait_for("the new backup to go live", 120, |c| {
        c.backup.stderr().contains("claim won: the backup is LIVE")
    });
    backup_finishes_the_disk_workload(&mut c, &j, "the new backup");
    let said = |text: &str, what: &str| {
        text.lines()
            .find(|l| l.contains(what))
            .unwrap_or_default()
            .to_string()
    };
    println!(
        "pair: writable disk re-protected with {at} of {} disk lines on the console\n  primary: {}\n  backup: {}",
        2 * DISK_MIB + 1,
        said(&p_err, "to the new backup after"),
        said(&b_err, "state received")
    );
}

#[test]
fn with_a_shared_disk_a_paused_primary_is_fenced_and_no_write_is_lost() {
    if !require_kvm() {
        return;
    }
    let _one = serial();
    let seed = seed("VMFT_PAIR_SEED");
    let mut rng = Rng(seed ^ 0x5ade);
    let dir = tempfile::tempdir().unwrap();
    let img = blank_disk(&dir.path().join("shared.img"));
    let shared: OsString = format!("{},shared", img.display()).into();
    let mut c = Cluster::start(Opts {
        guest: Guest::Restore(disk_snapshot()),
        primary_args: vec!["--disk".into(), shared.clone()],
        backup_args: vec!["--disk".into(), shared],
        timeout_ms: 1500,
        ..Opts::default()
    });
    c.start_primary();
    // Pause while it writes or while it reads back (2 lines per MiB).
    let k = rng.range(1, 2 * DISK_MIB - 1) as usize;
    c.wait_for(&format!("{k} disk lines on the console"), 300, |c| {
        disk_lines(c).len() >= k
    });
    c.primary().signal(libc::SIGSTOP);
    c.wait_for(
        "the backup to go live while the primary is stopped",
        120,
        |c| c.backup.stderr().contains("claim won: the backup is LIVE"),
    );
    // The backup owns the disk now: the fence names it.
    let fence = std::fs::read_to_string(format!("{}.vmft-fence", img.display())).unwrap();
    c.check(
        fence.contains("backup:"),
        format!("after the takeover the fence holds {fence:?}, not the backup"),
    );
    // The backup finishes the workload alone, and stops.
    let st = c.wait_exit(Who::Console, 300);
    c.check(st.code() == Some(0), format!("the console exited {st}"));
    let st = c.wait_exit(Who::Backup, 60);
    c.check(st.success(), format!("the backup exited {st}"));
    expect_disk_lines(&mut c);
    if let Some(problem) = disk_problem(&img, DISK_MIB) {
        c.check(false, format!("the shared disk is wrong: {problem}"));
    }
    let err = woken_primary_writes_nothing(&mut c, &img);
    println!(
        "pair: shared disk: the primary paused after {k} lines, woke up and stopped ({}); \
         the disk holds all {DISK_MIB} MiB",
        if err.contains("fenced") {
            "fenced"
        } else {
            "lost the claim"
        }
    );
}

/// The stopped primary wakes up, maybe holding writes it believes
/// acknowledged: it must stop (lost the claim, or fenced) without touching
/// the shared image `img` (its bytes would be the same ones, so the
/// modification time is what tells), which holds the whole workload.
/// Returns its stderr.
fn woken_primary_writes_nothing(c: &mut Cluster, img: &Path) -> String {
    let before = std::fs::metadata(img).unwrap().modified().unwrap();
    c.primary().signal(libc::SIGCONT);
    let st = c.wait_exit(Who::Primary, 120);
    let err = c.primary().stderr();
    c.check(
        matches!(st.code(), Some(3) | Some(5)),
        format!("the woken primary exited {st}, not 3 (lost the claim) or 5 (fenced)"),
    );
    c.check(
        !err.contains("claim won"),
        "the woken primary claims to have won",
    );
    let after = std::fs::metadata(img).unwrap().modified().unwrap();
    c.check(
        after == before,
        "the woken primary wrote to the shared disk after another side went live",
    );
    if let Some(problem) = disk_problem(img, DISK_MIB) {
        c.check(
            false,
            format!("the shared disk is wrong at the end: {problem}"),
        );
    }
    err
}

/// The generation and owner a shared disk's fence file holds.
fn fence_of(img: &Path) -> (u64, String) {
    let text = std::fs::read_to_string(format!("{}.vmft-fence", img.display())).unwrap_or_default();
    let (g, owner) = text.trim().split_once(' ').unwrap_or_default();
    (g.parse().unwrap_or(0), owner.to_string())
}

/// Which side of the re-protected pair fails in [`shared_reprotection`].
#[derive(Clone, Copy, PartialEq)]
enum Fails {
    /// kill -9 of the live side: the new backup claims the new generation.
    Live,
    /// SIGSTOP of the new backup: the live side claims the new generation
    /// itself (its fence moved there at the hand-over).
    NewBackup,
}

/// Re-protection with a shared disk: the backup goes live while the
/// primary is stopped, a new backup joins it (the pair moves to a newer
/// generation, and the live side's writes with it at the fence), then one
/// side of the new pair fails (`fails`) and the other wins the new
/// generation, owns the fence there and finishes the workload on the same
/// image. A stopped new backup, woken while the live side runs, loses the
/// claim; the first primary, woken at the end, writes nothing.
fn shared_reprotection(fails: Fails) {
    let _one = serial();
    let dir = tempfile::tempdir().unwrap();
    let img = blank_disk(&dir.path().join("shared.img"));
    let shared = format!("{},shared", img.display());
    let mut c = Cluster::start(Opts {
        guest: Guest::Restore(disk_snapshot()),
        primary_args: vec!["--disk".into(), shared.clone().into()],
        backup_args: vec!["--disk".into(), shared.clone().into()],
        timeout_ms: 1500,
        ..Opts::default()
    });
    // Once live, the backup takes new backups where the primary reached it.
    let join = c.s.backup_addr.clone();
    c.start_primary();
    c.wait_for("the first MiB written", 300, |c| {
        disk_lines(c)
            .iter()
            .any(|l| l.starts_with("disk 1 written"))
    });
    c.primary().signal(libc::SIGSTOP);
    c.wait_for("the backup to go live", 120, |c| {
        c.backup.stderr().contains("claim won: the backup is LIVE")
    });
    let (g1, owner1) = fence_of(&img);
    c.check(
        owner1.starts_with("backup:"),
        format!("after the takeover the fence names {owner1:?}, not the backup"),
    );
    let listen = format!("127.0.0.1:{}", free_port());
    let mut joiner = c.spawn_backup(&["--join", &join, "--listen", &listen, "--disk", &shared]);
    c.wait_for("the promoted backup to be protected again", 120, |c| {
        c.backup.stderr().contains("the VM is PROTECTED again")
    });
    let at = disk_lines(&c).len();
    c.check(
        at < 2 * DISK_MIB as usize + 1,
        format!("the workload had ended ({at} lines) before the pair was protected again"),
    );
    let (g2, owner2) = match fails {
        Fails::Live => {
            // The joiner is the cluster's backup from here on.
            std::mem::swap(&mut c.backup, &mut joiner);
            joiner.kill9();
            c.wait_for("the new backup to go live", 120, |c| {
                c.backup.stderr().contains("claim won: the backup is LIVE")
            });
            let (g2, owner2) = fence_of(&img);
            c.check(
                g2 > g1 && owner2.starts_with("backup:") && owner2 != owner1,
                format!(
                    "the new backup took over: the fence holds {g2} {owner2:?} (before: {g1} {owner1:?})"
                ),
            );
            (g2, owner2)
        }
        Fails::NewBackup => {
            joiner.signal(libc::SIGSTOP);
            c.wait_for("the live side to win the new generation", 120, |c| {
                c.backup
                    .stderr()
                    .contains("claim won: the VM continues here, UNPROTECTED")
            });
            let (g2, owner2) = fence_of(&img);
            c.check(
                g2 > g1 && owner2 == owner1,
                format!(
                    "the live side claimed the new generation: the fence holds {g2} {owner2:?} \
                     (before: {g1} {owner1:?})"
                ),
            );
            // The new backup wakes while the live side runs: it finds its
            // primary gone and loses the claim of its generation.
            joiner.signal(libc::SIGCONT);
            std::mem::swap(&mut c.backup, &mut joiner);
            let st = c.wait_exit(Who::Backup, 120);
            let err = c.backup.stderr();
            c.check(
                st.code() == Some(3) && !err.contains("claim won"),
                format!("the woken new backup exited {st}, not 3 (lost the claim)"),
            );
            std::mem::swap(&mut c.backup, &mut joiner);
            (g2, owner2)
        }
    };
    backup_finishes_the_disk_workload(&mut c, &img, "the live side");
    woken_primary_writes_nothing(&mut c, &img);
    println!(
        "pair: shared disk re-protected with {at} of {} disk lines on the console; fence {g1} \
         {owner1} -> {g2} {owner2}",
        2 * DISK_MIB + 1
    );
}

#[test]
fn with_a_shared_disk_a_new_backup_joins_and_takes_over_at_the_new_generation() {
    if !require_kvm() {
        return;
    }
    shared_reprotection(Fails::Live);
}

#[test]
fn with_a_shared_disk_the_live_side_claims_the_new_generation_when_its_new_backup_stops() {
    if !require_kvm() {
        return;
    }
    shared_reprotection(Fails::NewBackup);
}

#[test]
fn kill_9_of_the_backup_the_primary_wins_and_finishes() {
    if !require_kvm() {
        return;
    }
    let _one = serial();
    let mut c = Cluster::start(Opts::default());
    c.start_primary();
    c.wait_for("10 ticker lines on the console", 180, |c| {
        c.ticker_lines().len() >= 10
    });
    // The operator's view of a live pair: both sides, protected.
    let p = c.wait_status(
        "primary",
        &["\"state\":\"protected\"", "\"lag_exits\":"],
        30,
    );
    let b = c.wait_status(
        "backup",
        &["\"state\":\"replaying\"", "\"protected\":true"],
        30,
    );
    let generation = |l: &str| {
        l.split("\"generation\":")
            .nth(1)
            .and_then(|r| r.split(',').next())
            .map(str::to_string)
    };
    c.check(
        generation(&p).is_some()
            && generation(&p) == generation(&b)
            && generation(&p) != Some("0".into()),
        format!("the two sides show different generations: {p} / {b}"),
    );
    let killed = c.backup.kill9();
    c.wait_for("the primary to claim and win", 120, |c| {
        c.primary()
            .stderr()
            .contains("claim won: the VM continues here, UNPROTECTED")
    });
    let won = c
        .primary()
        .stderr_line_time("claim won")
        .map(|t| t.saturating_duration_since(killed));
    // A failed-over single primary: unprotected, and it says why.
    c.wait_status(
        "primary",
        &[
            "\"state\":\"unprotected\"",
            "\"protected\":false",
            "\"failed\":\"backup\"",
        ],
        30,
    );
    println!(
        "pair: kill -9 of the backup: the primary won its claim {:.3} s later",
        won.map(secs).unwrap_or(f64::NAN)
    );
    // Unprotected, the primary releases output as it comes: new lines
    // appear while it still runs, not only when it ends.
    let before = c.ticker_lines().len();
    c.wait_for("new lines from the unprotected primary", 120, |c| {
        c.ticker_lines().len() > before
    });
    let seen = c.ticker_lines().len();
    c.check(
        seen < 31,
        format!("the primary's output came all at once at its end ({seen} lines)"),
    );
    c.expect_complete_transcript(300);
    let st = c.wait_exit(Who::Primary, 60);
    c.check(
        st.code() == Some(0),
        format!("the primary exited {st}, not 0"),
    );
}

/// Re-protection (issue 10): the primary loses its backup and runs alone;
/// a new backup joins it (`vmft backup --join`: the state, then the log of
/// a new generation; `vmft status` shows the transfer); then the primary
/// dies too and the new backup goes live. The console's transcript is
/// complete, each line once and in order, across both failovers and the
/// transfer.
/// From a hand-over's notes: the pages the primary copied in the pause
/// and the pages the new backup received in all.
fn copied_pages(primary: &str, backup: &str) -> (Option<u64>, Option<u64>) {
    // The number just before `what` on the line that says `line`.
    let number_before = |text: &str, line: &str, what: &str| {
        text.lines()
            .find(|l| l.contains(line))
            .and_then(|l| l.split_once(what))
            .and_then(|(head, _)| head.rsplit(' ').next())
            .and_then(|n| n.parse::<u64>().ok())
    };
    (
        number_before(primary, "in the pause", " pages and "),
        number_before(backup, "state received", " pages, "),
    )
}

#[test]
fn a_new_backup_joins_the_survivor_and_takes_over_when_it_dies_too() {
    if !require_kvm() {
        return;
    }
    let _one = serial();
    let join = format!("127.0.0.1:{}", free_port());
    let mut c = Cluster::start(Opts {
        // Slow enough that the transfer can be seen in `vmft status`.
        primary_args: vec![
            "--listen".into(),
            join.clone().into(),
            "--transfer-mbps".into(),
            "8".into(),
        ],
        ..Opts::default()
    });
    c.start_primary();
    c.wait_for("3 ticker lines on the console", 180, |c| {
        c.ticker_lines().len() >= 3
    });
    c.backup.kill9();
    c.wait_for("the primary to win its claim", 120, |c| {
        c.primary()
            .stderr()
            .contains("claim won: the VM continues here, UNPROTECTED")
    });
    let listen = format!("127.0.0.1:{}", free_port());
    let joiner = c.spawn_backup(&["--join", &join, "--listen", &listen]);
    drop(std::mem::replace(&mut c.backup, joiner));
    // The operator sees the transfer while it runs.
    c.wait_status(
        "backup",
        &["\"state\":\"transfer\"", "\"transfer\":{", "\"done\":false"],
        60,
    );
    c.wait_for("the primary to be protected again", 120, |c| {
        c.primary().stderr().contains("the VM is PROTECTED again")
    });
    c.wait_status(
        "primary",
        &["\"state\":\"protected\"", "\"reprotections\":1"],
        30,
    );
    c.wait_status("backup", &["\"state\":\"replaying\""], 60);
    let at = c.ticker_lines().len();
    c.check(
        at < 27,
        format!("the workload had nearly ended ({at} lines) when the pair was protected again"),
    );
    c.wait_for("2 more lines from the re-protected pair", 120, |c| {
        c.ticker_lines().len() >= at + 2
    });
    // Memory went over while the guest ran (round 0 and any later
    // rounds): the pause took a small part of it; the backup replays from
    // the result without diverging (the log's memory digests would show a
    // page the copy missed).
    c.wait_for("the new backup to have the state", 60, |c| {
        c.backup.stderr().contains("state received")
    });
    let p = c.primary().stderr();
    let b = c.backup.stderr();
    let (paused, received) = copied_pages(&p, &b);
    c.check(
        paused.zip(received).is_some_and(|(p, r)| p * 10 < r),
        format!(
            "most pages did not go while the guest ran: {paused:?} in the pause of {received:?}"
        ),
    );
    c.check(
        b.contains("round 0,") && !b.contains("divergence"),
        "the new backup did not report the copy, or diverged from the state it got",
    );
    let killed = c.primary().kill9();
    c.wait_for("the new backup to go live", 120, |c| {
        c.backup.stderr().contains("the backup is LIVE")
    });
    let live = c
        .backup
        .stderr_line_time("the backup is LIVE")
        .map(|t| t.saturating_duration_since(killed));
    c.expect_complete_transcript(300);
    let st = c.wait_exit(Who::Backup, 60);
    c.check(
        st.code() == Some(0),
        format!("the new backup exited {st}, not 0"),
    );
    let pause = c
        .primary()
        .stderr()
        .lines()
        .find_map(|l| {
            l.split("after a pause of ")
                .nth(1)
                .and_then(|r| r.split(' ').next())
                .map(str::to_string)
        })
        .unwrap_or_default();
    let said = |text: &str, what: &str| {
        text.lines()
            .find(|l| l.contains(what))
            .unwrap_or_default()
            .to_string()
    };
    println!(
        "pair: re-protection paused the guest {pause} ms; the new backup went live {:.3} s after kill -9 of the primary\n  primary: {}\n  backup: {}",
        live.map(secs).unwrap_or(f64::NAN),
        said(&p, "to the new backup after"),
        said(&b, "state received")
    );
}

/// Divergence repair (issue 10): the test guest that branches on RDTSC,
/// run as a pair. Its backup diverges again and again; each time, instead
/// of stopping, it asks the primary for a fresh state (a join at the
/// primary's `--listen`) and carries on from it, and both sides say so.
#[test]
fn a_diverging_backup_asks_the_primary_for_a_fresh_state_and_carries_on() {
    if !require_kvm() {
        return;
    }
    let _one = serial();
    let join = format!("127.0.0.1:{}", free_port());
    let mut c = Cluster::start(Opts {
        guest: Guest::Assembled(12),
        primary_args: vec!["--listen".into(), join.clone().into()],
        backup_args: vec!["--repair-from".into(), join.clone().into()],
        ..Opts::default()
    });
    c.start_primary();
    c.wait_for(
        "the backup to diverge and ask for a fresh state",
        120,
        |c| c.backup.stderr().contains("(divergence repair)"),
    );
    c.wait_for("the primary to re-protect it", 120, |c| {
        let p = c.primary().stderr();
        p.contains("asks for a fresh state after a divergence")
            && p.contains("the VM is PROTECTED again")
    });
    c.wait_for("a second repair", 120, |c| {
        c.backup.stderr().matches("(divergence repair)").count() >= 2
    });
    let b = c.backup.stderr();
    c.check(
        b.contains("divergence at exit") && b.contains("state received"),
        "the backup neither named the divergence nor received a state",
    );
    let st = c.wait_exit(Who::Primary, 300);
    c.check(
        st.code() == Some(0),
        format!("the primary exited {st}, not 0"),
    );
    println!(
        "pair: divergence repairs: {}",
        c.backup.stderr().matches("(divergence repair)").count()
    );
}

#[test]
fn a_paused_primary_is_fenced() {
    if !require_kvm() {
        return;
    }
    let _one = serial();
    let mut c = Cluster::start(Opts {
        timeout_ms: 1500,
        ..Opts::default()
    });
    c.start_primary();
    c.wait_for("8 ticker lines on the console", 180, |c| {
        c.ticker_lines().len() >= 8
    });
    c.primary().signal(libc::SIGSTOP);
    let stopped = Instant::now();
    c.wait_for(
        "the backup to go live while the primary is stopped",
        120,
        |c| c.backup.stderr().contains("claim won: the backup is LIVE"),
    );
    let won = c
        .backup
        .stderr_line_time("claim won")
        .map(|t| t.saturating_duration_since(stopped));
    println!(
        "pair: SIGSTOP of the primary (timeout 1.5 s): the backup won its claim {:.3} s later",
        won.map(secs).unwrap_or(f64::NAN)
    );
    // The operator's view: the backup runs the VM alone (the stopped
    // primary does not answer; `vmft status` skips it after its timeout).
    c.wait_status(
        "backup",
        &[
            "\"state\":\"live\"",
            "\"protected\":false",
            "\"failed\":\"primary\"",
        ],
        60,
    );
    // Stay stopped well past the timeout, and until the backup's output
    // has reached the console.
    c.wait_for("new lines from the live backup", 120, |c| {
        stopped.elapsed() >= Duration::from_secs(5)
            && c.ticker_lines().iter().any(|(t, _)| *t > stopped)
    });
    c.primary().signal(libc::SIGCONT);
    let st = c.wait_exit(Who::Primary, 120);
    let err = c.primary().stderr();
    c.check(
        st.code() == Some(3),
        format!("the woken primary exited {st}, not 3 (lost the claim)"),
    );
    c.check(
        err.contains("claim lost to"),
        "the woken primary does not say it lost the claim",
    );
    c.check(
        !err.contains("claim won"),
        "the woken primary claims to have won",
    );
    c.expect_complete_transcript(300);
    let st = c.wait_exit(Who::Backup, 60);
    c.check(
        st.code() == Some(0),
        format!("the backup exited {st}, not 0"),
    );
}

#[test]
fn arbiter_down_when_the_primary_dies_nobody_goes_live_until_it_is_back() {
    if !require_kvm() {
        return;
    }
    let _one = serial();
    let mut c = Cluster::start(Opts::default());
    c.start_primary();
    c.wait_for("5 ticker lines on the console", 180, |c| {
        c.ticker_lines().len() >= 5
    });
    c.arbiter.as_mut().unwrap().kill9();
    c.arbiter = None;
    let killed = c.primary().kill9();
    c.wait_for("the backup to say it cannot reach the arbiter", 60, |c| {
        c.backup.stderr().contains("cannot reach the arbiter")
    });
    // Whatever the primary had sent before it died has arrived by now.
    thread::sleep(Duration::from_secs(1).saturating_sub(killed.elapsed()));
    let lines = c.ticker_lines().len();
    let quiet = Instant::now();
    while quiet.elapsed() < Duration::from_secs(5) {
        let now = c.ticker_lines().len();
        c.check(
            now == lines,
            format!("the console printed new lines ({lines} -> {now}) while no side could claim"),
        );
        c.check(
            !c.backup.stderr().contains("claim won"),
            "the backup went live without the arbiter",
        );
        let running = c.backup.poll().is_none();
        c.check(running, "the backup exited");
        thread::sleep(Duration::from_millis(50));
    }
    // The arbiter comes back on the same port with the same data.
    let addr = c.s.arbiter_addr.clone();
    let mut tries = 0;
    loop {
        let (adata, atoken) = (c.s.adata.clone(), c.s.atoken.clone());
        let mut cmd = Command::new(arbiter_bin());
        cmd.args(["serve", "--listen", &addr, "--data"])
            .arg(&adata)
            .arg("--token-file")
            .arg(&atoken);
        let mut a = Proc::spawn("arbiter (restarted)", cmd);
        let t0 = Instant::now();
        while !a.stdout().contains("listening ")
            && a.poll().is_none()
            && t0.elapsed() < Duration::from_secs(60)
        {
            thread::sleep(Duration::from_millis(20));
        }
        if a.stdout().contains("listening ") {
            c.arbiter = Some(a);
            break;
        }
        tries += 1;
        // The port may still be held for a moment; more than that is a bug.
        assert!(
            tries < 10,
            "the arbiter did not restart on {addr}:\n{}",
            a.report(true)
        );
        thread::sleep(Duration::from_millis(500));
    }
    let back = Instant::now();
    c.wait_for("the backup to go live once the arbiter is back", 120, |c| {
        c.backup.stderr().contains("claim won: the backup is LIVE")
    });
    let won = c
        .backup
        .stderr_line_time("claim won")
        .map(|t| t.saturating_duration_since(back));
    println!(
        "pair: the arbiter back {:.1} s after the primary died: the backup won its claim {:.3} s later",
        secs(back - killed),
        won.map(secs).unwrap_or(f64::NAN)
    );
    c.expect_complete_transcript(300);
    let st = c.wait_exit(Who::Backup, 60);
    c.check(
        st.code() == Some(0),
        format!("the backup exited {st}, not 0"),
    );
}

/// A relay between the primary and the backup that flips one byte of the
/// log in the first `Data` message it forwards after `armed` is set (in
/// the last byte of its body, so the frame's length and kind stay
/// intact and only its authentication tag can tell). The channel's wire
/// format: a 10-byte greeting, two handshake frames `len u32 | kind u8 |
/// body`, then tagged messages `len u32 | kind u8 | body | tag[16]`.
struct Relay {
    addr: SocketAddr,
    armed: Arc<AtomicBool>,
    /// Bytes of the message flipped, once it was (0 before).
    flipped_at: Arc<AtomicU64>,
}

fn read_frame(s: &mut impl Read, tagged: bool) -> std::io::Result<Vec<u8>> {
    let mut f = vec![0u8; 5];
    s.read_exact(&mut f)?;
    let len = u32::from_le_bytes(f[..4].try_into().unwrap()) as usize;
    f.resize(5 + len + if tagged { 16 } else { 0 }, 0);
    s.read_exact(&mut f[5..])?;
    Ok(f)
}

impl Relay {
    fn start(backup: &str) -> Relay {
        const DATA: u8 = 0x01;
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let armed = Arc::new(AtomicBool::new(false));
        let flipped_at = Arc::new(AtomicU64::new(0));
        let (arm, flipped) = (armed.clone(), flipped_at.clone());
        let backup = backup.to_string();
        thread::spawn(move || {
            let Ok((mut p, _)) = l.accept() else { return };
            let Ok(mut b) = TcpStream::connect(&backup) else {
                return;
            };
            let (mut p2, mut b2) = (p.try_clone().unwrap(), b.try_clone().unwrap());
            thread::spawn(move || {
                let _ = std::io::copy(&mut b2, &mut p2);
                let _ = p2.shutdown(Shutdown::Write);
            });
            let mut total = 0u64;
            let mut pump = || -> std::io::Result<()> {
                let mut g = [0u8; 10];
                p.read_exact(&mut g)?;
                b.write_all(&g)?;
                for _ in 0..2 {
                    b.write_all(&read_frame(&mut p, false)?)?;
                }
                loop {
                    let mut f = read_frame(&mut p, true)?;
                    total += f.len() as u64;
                    let body_end = f.len() - 16;
                    if f[4] == DATA
                        && body_end > 5 + 8
                        && flipped.load(Ordering::SeqCst) == 0
                        && arm.load(Ordering::SeqCst)
                    {
                        f[body_end - 1] ^= 0x20;
                        flipped.store(total, Ordering::SeqCst);
                    }
                    b.write_all(&f)?;
                }
            };
            let _ = pump();
            let _ = b.shutdown(Shutdown::Both);
            let _ = p.shutdown(Shutdown::Both);
        });
        Relay {
            addr,
            armed,
            flipped_at,
        }
    }
}

#[test]
fn the_channel_refuses_a_peer_without_the_secret_garbage_and_altered_frames() {
    if !require_kvm() {
        return;
    }
    let _one = serial();

    // (a) A primary with another secret.
    {
        let mut c = Cluster::start(Opts {
            primary_token: Some(b"not-the-pair-secret"),
            ..Opts::default()
        });
        let addr = c.s.backup_addr.clone();
        c.start_primary_to(&addr);
        let st = c.wait_exit(Who::Primary, 120);
        let err = c.primary().stderr();
        c.check(
            st.code() == Some(1),
            format!("(a) the primary with a wrong token exited {st}, not 1"),
        );
        c.check(
            err.contains("refused our authentication") && err.contains("wrong token"),
            "(a) the primary does not say the backup refused its authentication",
        );
        c.check(
            !err.contains("connected to the backup"),
            "(a) the primary says it connected",
        );
        c.wait_for("(a) the backup to say it refused the primary", 30, |c| {
            c.backup.stderr().contains("failed authentication")
        });
        c.check(
            c.ticker_lines().is_empty(),
            "(a) the console printed guest output",
        );
        backup_after_refusal(&mut c, "(a)", "failed authentication");
    }

    // (b) Garbage on the backup's port.
    {
        let mut c = Cluster::start(Opts::default());
        let mut s = TcpStream::connect(&c.s.backup_addr).unwrap();
        s.write_all(b"GET / HTTP/1.1\r\nHost: vmft\r\n\r\n")
            .unwrap();
        c.wait_for("(b) the backup to refuse the garbage", 30, |c| {
            c.backup.stderr().contains("not a vmft channel")
        });
        drop(s);
        backup_after_refusal(&mut c, "(b)", "not a vmft channel");
    }

    // (c) One byte of the log altered in flight.
    {
        let mut c = Cluster::start(Opts::default());
        let relay = Relay::start(&c.s.backup_addr);
        c.start_primary_to(&relay.addr.to_string());
        c.wait_for("(c) the pair to form through the relay", 120, |c| {
            c.primary().stderr().contains("connected to the backup")
                && c.backup.stderr().contains("the primary connected")
        });
        c.wait_for("(c) 5 ticker lines on the console", 180, |c| {
            c.ticker_lines().len() >= 5
        });
        relay.armed.store(true, Ordering::SeqCst);
        c.wait_for("(c) the relay to alter a message", 60, |_| {
            relay.flipped_at.load(Ordering::SeqCst) > 0
        });
        println!(
            "pair: (c) flipped a byte of the Data message ending at byte {} of the primary's stream",
            relay.flipped_at.load(Ordering::SeqCst)
        );
        c.wait_for("(c) the backup to refuse the altered message", 60, |c| {
            let e = c.backup.stderr();
            e.contains("failed authentication") && e.contains("altered")
        });
        // Both sides now see the other as failed and claim: at most one
        // may win, and the console never shows a line the guest did not
        // print once, in order.
        c.wait_for("(c) one side to win the claim", 120, |c| {
            c.backup.stderr().contains("claim won") || c.primary().stderr().contains("claim won")
        });
        let loser = if c.backup.stderr().contains("claim won") {
            Who::Primary
        } else {
            Who::Backup
        };
        let st = c.wait_exit(loser, 120);
        c.check(
            st.code() == Some(3),
            format!("(c) the {loser:?}, which lost the claim, exited {st}, not 3"),
        );
        c.expect_complete_transcript(300);
        let (b, p) = (c.backup.stderr(), c.primary().stderr());
        c.check(
            !(b.contains("claim won") && p.contains("claim won")),
            "(c) both sides won the claim",
        );
    }
}

/// After refusing a connection, the backup either keeps waiting (and a
/// primary with the secret still forms the pair) or exits 1 with an error
/// that says why (`needle`); anything else fails.
fn backup_after_refusal(c: &mut Cluster, what: &str, needle: &str) {
    c.check(
        !c.backup.stderr().contains("the primary connected"),
        format!("{what} the backup accepted the connection"),
    );
    thread::sleep(Duration::from_secs(2));
    match c.backup.poll() {
        Some(st) => {
            let err = c.backup.stderr();
            let said = err
                .lines()
                .any(|l| l.contains("error:") && l.contains(needle));
            c.check(
                st.code() == Some(1) && said,
                format!("{what} the backup exited {st} without an error line naming {needle:?}"),
            );
            println!(
                "pair: {what} the backup refused and exited 1: {}",
                err.trim_end().lines().last().unwrap_or("")
            );
        }
        None => {
            c.s.primary_token = None;
            c.start_primary();
            println!("pair: {what} the backup refused and kept waiting; a primary with the secret then formed the pair");
        }
    }
}

#[test]
fn transcript_check_catches_lost_repeated_and_foreign_lines() {
    let good = expected_ticker(COUNT);
    let mut text =
        good.join("\r\n") + "\r\nVMFT-DONE status=0\r\n[   68.1] reboot: System halted\r\n";
    assert_eq!(transcript_problem(&text, true), None);
    let half = good[..12].join("\n") + "\n";
    assert_eq!(transcript_problem(&half, false), None);
    assert!(transcript_problem(&half, true).is_some());
    let mut repeated = good.clone();
    repeated.insert(7, good[6].clone());
    assert!(transcript_problem(&repeated.join("\n"), false).is_some());
    let mut lost = good.clone();
    lost.remove(7);
    assert!(transcript_problem(&lost.join("\n"), false).is_some());
    text = text.replace("ticker 9 ", "tickticker 9 ");
    assert!(transcript_problem(&text, true).is_some());
}
