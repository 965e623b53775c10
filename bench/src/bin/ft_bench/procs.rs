//! Child processes of the bench (`vmft`, `arbiter`), their output lines
//! with the time each arrived, and the FT pair as separate processes.

use std::ffi::OsString;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use tracing::info;

/// A line of a child's output and when it arrived.
#[derive(Clone, Debug)]
pub struct Line {
    pub at: Instant,
    pub text: String,
}

/// A child process whose stdout and stderr lines are kept; killed
/// (SIGKILL) and reaped when dropped.
pub struct Proc {
    pub name: String,
    child: Child,
    lines: Arc<Mutex<Vec<Line>>>,
    status: Option<ExitStatus>,
}

fn collect(r: impl Read + Send + 'static, lines: Arc<Mutex<Vec<Line>>>) {
    thread::spawn(move || {
        let mut r = BufReader::new(r);
        let mut buf = Vec::new();
        loop {
            buf.clear();
            match r.read_until(b'\n', &mut buf) {
                Ok(0) | Err(_) => return,
                Ok(_) => {
                    let text = String::from_utf8_lossy(&buf).trim_end().to_string();
                    let line = Line {
                        at: Instant::now(),
                        text,
                    };
                    lines.lock().unwrap_or_else(|e| e.into_inner()).push(line);
                }
            }
        }
    });
}

impl Proc {
    pub fn spawn(name: &str, mut cmd: Command) -> Result<Proc> {
        use std::os::unix::process::CommandExt;
        // SAFETY: prctl is async-signal-safe and touches no memory of the
        // parent; the child gets SIGKILL if the bench dies first, so no VM
        // outlives it.
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("starting the {name}: {cmd:?}"))?;
        let lines = Arc::new(Mutex::new(Vec::new()));
        collect(child.stdout.take().expect("piped"), lines.clone());
        collect(child.stderr.take().expect("piped"), lines.clone());
        Ok(Proc {
            name: name.to_string(),
            child,
            lines,
            status: None,
        })
    }

    pub fn lines(&self) -> Vec<Line> {
        self.lines.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// All of its output, stdout and stderr interleaved.
    pub fn text(&self) -> String {
        self.lines()
            .iter()
            .map(|l| l.text.as_str())
            .collect::<Vec<_>>()
            .join("\n")
    }

    pub fn poll(&mut self) -> Option<ExitStatus> {
        if self.status.is_none() {
            self.status = self.child.try_wait().ok().flatten();
        }
        self.status
    }

    /// The first line containing `needle`, waiting up to `limit`; an error
    /// if the process exits first or `gone` says the wait is hopeless.
    pub fn wait_line(
        &mut self,
        needle: &str,
        limit: Duration,
        gone: impl Fn(&str) -> bool,
    ) -> Result<Line> {
        let t0 = Instant::now();
        loop {
            if let Some(l) = self.lines().into_iter().find(|l| l.text.contains(needle)) {
                return Ok(l);
            }
            let text = self.text();
            if gone(&text) {
                bail!("the {} will not print {needle:?}", self.name);
            }
            if let Some(st) = self.poll() {
                bail!(
                    "the {} exited ({st}) before printing {needle:?}:\n{}",
                    self.name,
                    tail(&text)
                );
            }
            if t0.elapsed() > limit {
                bail!(
                    "the {} did not print {needle:?} within {limit:?}:\n{}",
                    self.name,
                    tail(&text)
                );
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn signal(&self, sig: i32) -> Result<()> {
        if self.status.is_some() {
            bail!("the {} already exited", self.name);
        }
        // SAFETY: kill(2) on the pid of a child we own and have not reaped.
        let r = unsafe { libc::kill(self.child.id() as i32, sig) };
        if r != 0 {
            return Err(std::io::Error::last_os_error())
                .with_context(|| format!("signalling the {}", self.name));
        }
        Ok(())
    }

    /// SIGTERM and wait up to `limit` for the exit.
    pub fn stop(&mut self, limit: Duration) -> Result<ExitStatus> {
        self.signal(libc::SIGTERM)?;
        let t0 = Instant::now();
        loop {
            if let Some(st) = self.poll() {
                return Ok(st);
            }
            if t0.elapsed() > limit {
                bail!("the {} did not stop within {limit:?} of SIGTERM", self.name);
            }
            thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if self.poll().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// The last lines of `text`, for an error message.
pub fn tail(text: &str) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(30)..].join("\n")
}

/// `vmft` (and `arbiter`) next to the bench's own executable
/// (`target/release/`): `cargo build --release -p vmm -p arbiter` builds
/// them.
pub fn sibling(name: &str) -> Result<PathBuf> {
    let me = std::env::current_exe().context("the bench's own path")?;
    let bin = me
        .parent()
        .ok_or_else(|| anyhow!("{} has no folder", me.display()))?
        .join(name);
    if !bin.exists() {
        bail!(
            "{} is missing: run `cargo build --release -p vmm -p arbiter` first",
            bin.display()
        );
    }
    Ok(bin)
}

/// A TCP port free on this machine right now (bound, then released).
fn free_port() -> Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0").context("finding a free port")?;
    Ok(l.local_addr()?.port())
}

/// Where each party of a pair runs: a command that starts a program
/// there (e.g. inside a host's network namespace) and the address other
/// parties reach it at.
pub struct Place<'a> {
    pub command: &'a dyn Fn(&Path) -> Command,
    pub ip: String,
}

/// An FT pair as separate processes: the arbiter and the console (in
/// `services`), the backup and the primary, with `side_args` added to
/// both sides (`--restore`, `--workload`, ...) and `backup_args`,
/// `primary_args` to one (each side's own `--net` or `--disk` copy).
pub struct Pair {
    pub arbiter: Proc,
    pub console: Proc,
    pub backup: Proc,
    pub primary: Proc,
    /// The backup's channel address (`IP:PORT`).
    pub backup_addr: String,
}

impl Pair {
    pub fn start(
        dir: &Path,
        services: &Place,
        backup: &Place,
        primary: &Place,
        side_args: &[OsString],
        backup_args: &[OsString],
        primary_args: &[OsString],
    ) -> Result<Pair> {
        let vmft = sibling("vmft")?;
        let token = dir.join("channel.token");
        let atoken = dir.join("arbiter.token");
        let adata = dir.join("arbiter-data");
        std::fs::write(&token, b"bench-channel-secret")?;
        std::fs::write(&atoken, b"bench-arbiter-secret")?;
        std::fs::create_dir_all(&adata)?;
        let mut cmd = (services.command)(&sibling("arbiter")?);
        cmd.arg("serve")
            .arg("--listen")
            .arg(format!("{}:0", services.ip))
            .arg("--data")
            .arg(&adata)
            .arg("--token-file")
            .arg(&atoken);
        let mut arbiter = Proc::spawn("arbiter", cmd)?;
        let l = arbiter.wait_line("listening ", Duration::from_secs(60), |_| false)?;
        let arbiter_addr = l
            .text
            .split_once("listening ")
            .map(|(_, a)| a.trim().to_string())
            .unwrap_or_default();
        let console_addr = format!("{}:{}", services.ip, free_port()?);
        let mut cmd = (services.command)(&vmft);
        cmd.args(["console", "--listen", &console_addr, "--token-file"])
            .arg(&token)
            .arg("--no-stdin");
        let console = Proc::spawn("console", cmd)?;
        let side = |place: &Place, role: &[&str], own: &[OsString]| {
            let mut c = (place.command)(&vmft);
            c.args(role)
                .args(side_args)
                .args(own)
                .args(["--arbiter", &arbiter_addr, "--arbiter-token-file"])
                .arg(&atoken)
                .arg("--token-file")
                .arg(&token)
                .args(["--no-stdin", "--console", &console_addr, "--stats"]);
            c
        };
        let listen = format!("{}:0", backup.ip);
        let mut backup_p = Proc::spawn(
            "backup",
            side(backup, &["backup", "--listen", &listen], backup_args),
        )?;
        const WAITING: &str = "waiting for the primary on ";
        let l = backup_p.wait_line(WAITING, Duration::from_secs(60), |_| false)?;
        let backup_addr = l
            .text
            .split_once(WAITING)
            .map(|(_, a)| a.trim().to_string())
            .unwrap_or_default();
        let mut primary_p = Proc::spawn(
            "primary",
            side(
                primary,
                &["primary", "--backup", &backup_addr],
                primary_args,
            ),
        )?;
        primary_p.wait_line("connected to the backup", Duration::from_secs(120), |_| {
            false
        })?;
        info!("pair formed: backup on {backup_addr}");
        Ok(Pair {
            arbiter,
            console,
            backup: backup_p,
            primary: primary_p,
            backup_addr,
        })
    }

    /// Stop the pair cleanly (SIGTERM to the primary: the backup replays
    /// to the end and stops, the console ends with them).
    pub fn stop(&mut self) -> Result<()> {
        let st = self.primary.stop(Duration::from_secs(120))?;
        if !st.success() {
            bail!(
                "the primary exited {st} after SIGTERM:\n{}",
                tail(&self.primary.text())
            );
        }
        for p in [&mut self.backup, &mut self.console] {
            let t0 = Instant::now();
            while p.poll().is_none() && t0.elapsed() < Duration::from_secs(60) {
                thread::sleep(Duration::from_millis(50));
            }
        }
        let _ = self.arbiter.signal(libc::SIGTERM);
        Ok(())
    }
}
