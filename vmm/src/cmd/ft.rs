//! `vmft ft`: the whole fault-tolerant system on one machine, with embedded
//! defaults: a built-in arbiter (in this process, its data in a temporary
//! directory), a backup and a primary as two separate child processes on
//! loopback (so either can be killed), and the console in the foreground.
//!
//! Ctrl-A x stops the pair cleanly: the console asks the live side to stop,
//! the primary writes the log's end entry, the backup replays to it, both
//! exit 0. SIGTERM, SIGINT and SIGHUP to `vmft ft` do the same.

use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::Args;

use arbiter::server::{Server, ServerConfig};
use vmm::console::{Console, ConsoleConfig};
use vmm::stop::StopHandle;

use super::{boot_config, BootArgs};

/// `vmft ft`.
#[derive(Args)]
pub struct FtArgs {
    #[command(flatten)]
    pub boot: BootArgs,
    /// Start both sides from this snapshot instead of booting.
    #[arg(long, value_name = "FILE", conflicts_with_all = ["kernel", "initrd", "append"])]
    pub restore: Option<PathBuf>,
    /// The VM's name.
    #[arg(long, default_value = "vmft")]
    pub vm: String,
    /// Declare a side failed after this long without hearing from it, in ms.
    #[arg(long, default_value_t = 2000)]
    pub timeout_ms: u64,
    /// Heartbeat period, in ms.
    #[arg(long, default_value_t = 100)]
    pub heartbeat_ms: u64,
    /// Print both sides' statistics at the end.
    #[arg(long)]
    pub stats: bool,
    /// Do not read typed input from stdin.
    #[arg(long)]
    pub no_stdin: bool,
    /// Do not start a new backup after a failover (by default the side
    /// left alone gets a new backup, by a state transfer).
    #[arg(long)]
    pub no_reprotect: bool,
}

/// What a side says on stderr that the supervisor acts on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SideEvent {
    /// The side runs the VM alone: its peer failed and it won the claim.
    Alone,
}

/// The sides' stderr lines that are events.
fn side_event(line: &str) -> Option<SideEvent> {
    (line.contains("claim won: the backup is LIVE")
        || line.contains("claim won: the VM continues here, UNPROTECTED"))
    .then_some(SideEvent::Alone)
}

/// A temporary directory removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> Result<TempDir> {
        let base = std::env::var_os("XDG_RUNTIME_DIR")
            .map(PathBuf::from)
            .filter(|p| p.is_dir())
            .unwrap_or_else(std::env::temp_dir);
        let dir = base.join(format!("vmft-ft-{}-{:x}", std::process::id(), random_u64()));
        std::fs::create_dir_all(&dir)
            .with_context(|| format!("cannot create {}", dir.display()))?;
        Ok(TempDir(dir))
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn random_u64() -> u64 {
    use std::io::Read;
    let mut b = [0u8; 8];
    let _ = std::fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut b));
    u64::from_le_bytes(b) ^ std::process::id() as u64
}

/// A fresh random secret in a file only this user can read.
fn write_token(path: &Path) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let token = format!(
        "{:016x}{:016x}{:016x}\n",
        random_u64(),
        random_u64(),
        random_u64()
    );
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("cannot create {}", path.display()))?;
    f.write_all(token.as_bytes())?;
    Ok(())
}

fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// A side's name and its `--disk` arguments.
type SideDisks = (String, Vec<String>);

/// Wait up to `limit` for side `name`'s process to end; whether it did
/// (or is not known).
fn wait_ended(kids: &Mutex<Vec<(String, Child)>>, name: &str, limit: Duration) -> bool {
    let t0 = Instant::now();
    loop {
        let running = kids
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter_mut()
            .any(|(n, c)| n == name && matches!(c.try_wait(), Ok(None)));
        if !running {
            return true;
        }
        if t0.elapsed() >= limit {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Children killed (and reaped) when dropped, so an error leaves none.
struct Children(Arc<Mutex<Vec<(String, Child)>>>);

impl Drop for Children {
    fn drop(&mut self) {
        for (_, c) in self.0.lock().unwrap_or_else(|e| e.into_inner()).iter_mut() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Spawn `vmft <args>` with its stderr lines prefixed by `name`; events
/// among them go to `events`.
fn spawn_side(
    name: &str,
    args: &[String],
    events: std::sync::mpsc::Sender<(String, SideEvent)>,
) -> Result<Child> {
    let exe = std::env::current_exe().context("cannot find the vmft binary")?;
    let mut child = Command::new(exe)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot start the {name}"))?;
    if let Some(err) = child.stderr.take() {
        let name = name.to_string();
        std::thread::spawn(move || {
            for line in BufReader::new(err).lines().map_while(Result::ok) {
                eprint!("[{name}] {line}\r\n");
                if let Some(e) = side_event(&line) {
                    let _ = events.send((name.clone(), e));
                }
            }
        });
    }
    Ok(child)
}

/// `vmft ft`: run the pair; exit with the console's status.
pub fn ft(args: FtArgs, stop: StopHandle) -> Result<u8> {
    let dir = TempDir::new()?;
    let token = dir.0.join("channel.token");
    let arbiter_token = dir.0.join("arbiter.token");
    write_token(&token)?;
    write_token(&arbiter_token)?;

    // The VM both sides run: resolved once here (the image is built on
    // first use), then passed to both as explicit paths.
    if !args.boot.nets.is_empty() {
        anyhow::bail!(
            "vmft ft runs both sides on this host, and each side needs its own tap with the \
             guest's MAC: run `vmft primary` and `vmft backup` in separate network namespaces \
             or hosts (see docs/NETWORK.md)"
        );
    }
    // Writable images of each side's own: a new backup takes the failed
    // side's once its process ended (a shared image is nobody's to take).
    let writable = args.boot.disks.iter().any(|d| !d.read_only && !d.shared);
    let mut vm_args: Vec<String> = Vec::new();
    // Separate disks (VMware FT's default): the backup gets its own copy,
    // next to the original, and executes the same reads and writes on it.
    // A shared disk is the same image for both sides.
    let mut primary_disks: Vec<String> = Vec::new();
    let mut backup_disks: Vec<String> = Vec::new();
    for d in &args.boot.disks {
        if d.shared {
            // One image for both: only the live side writes it.
            let arg = format!("{},shared", d.path.display());
            primary_disks.extend(["--disk".into(), arg.clone()]);
            backup_disks.extend(["--disk".into(), arg]);
            continue;
        }
        let mut copy = d.path.clone().into_os_string();
        copy.push(".vmft-backup");
        let copy = PathBuf::from(copy);
        eprintln!(
            "vmft ft: the backup's copy of {} is {} (after a failover it is the current disk)",
            d.path.display(),
            copy.display()
        );
        if copy.exists() && std::fs::read(&copy).ok() != std::fs::read(&d.path).ok() {
            anyhow::bail!(
                "{} exists and differs from {}: after a failover it is the current disk; \
                 move the one you want to keep to {} and remove the other",
                copy.display(),
                d.path.display(),
                d.path.display()
            );
        }
        std::fs::copy(&d.path, &copy).with_context(|| {
            format!(
                "cannot copy disk {} to {} for the backup",
                d.path.display(),
                copy.display()
            )
        })?;
        let mode = if d.read_only { "ro" } else { "rw" };
        primary_disks.extend(["--disk".into(), format!("{},{mode}", d.path.display())]);
        backup_disks.extend(["--disk".into(), format!("{},{mode}", copy.display())]);
    }
    match &args.restore {
        Some(snap) => vm_args.extend(["--restore".into(), snap.display().to_string()]),
        None => {
            let workload = args.boot.workload.clone();
            let cfg = boot_config(args.boot)?;
            vm_args.extend(["--kernel".into(), cfg.kernel.display().to_string()]);
            if let Some(i) = &cfg.initrd {
                vm_args.extend(["--initrd".into(), i.display().to_string()]);
            }
            vm_args.extend(["--mem".into(), cfg.mem_mib.to_string()]);
            vm_args.extend(["--workload".into(), workload]);
            // The command line beyond the defaults and the workload.
            let base = format!("{} vmft.workload=", vmm::image::base_cmdline());
            if let Some(extra) = cfg
                .cmdline
                .strip_prefix(&base)
                .and_then(|rest| rest.split_once(' ').map(|(_, e)| e.to_string()))
            {
                vm_args.extend(["--append".into(), extra]);
            }
        }
    }

    // The arbiter, in this process.
    let atoken = std::fs::read(&arbiter_token)?.trim_ascii().to_vec();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .context("cannot start the arbiter's runtime")?;
    let server = runtime
        .block_on(Server::bind(
            "127.0.0.1:0",
            &dir.0.join("arbiter"),
            ServerConfig::new(atoken),
        ))
        .context("cannot start the built-in arbiter")?;
    let arbiter_addr = server.local_addr().to_string();
    runtime.spawn(async move {
        if let Err(e) = server.run().await {
            eprintln!("vmft: the built-in arbiter stopped: {e}");
        }
    });

    // The console, in the foreground once the sides are started.
    let ctoken = std::fs::read(&token)?.trim_ascii().to_vec();
    let mut ccfg = ConsoleConfig::new("127.0.0.1:0", ctoken);
    ccfg.escape_stops_pair = true;
    if args.no_stdin {
        ccfg.input = vmm::console::ConsoleInput::None;
    }
    let console = Console::bind(ccfg).context("cannot start the console")?;
    let console_addr = console.local_addr().to_string();

    let backup_addr = format!("127.0.0.1:{}", free_port()?);
    let common = |extra: &[String]| -> Vec<String> {
        let mut v: Vec<String> = extra.to_vec();
        v.extend([
            "--vm".into(),
            args.vm.clone(),
            "--arbiter".into(),
            arbiter_addr.clone(),
            "--arbiter-token-file".into(),
            arbiter_token.display().to_string(),
            "--token-file".into(),
            token.display().to_string(),
            "--console".into(),
            console_addr.clone(),
            "--timeout-ms".into(),
            args.timeout_ms.to_string(),
            "--heartbeat-ms".into(),
            args.heartbeat_ms.to_string(),
            "--no-stdin".into(),
        ]);
        if args.stats {
            v.push("--stats".into());
        }
        v.extend(vm_args.iter().cloned());
        v
    };
    eprintln!(
        "vmft ft: arbiter {arbiter_addr}, backup {backup_addr}, console {console_addr} (files in {})",
        dir.0.display()
    );
    let children = Children(Arc::new(Mutex::new(Vec::new())));
    let (events, side_events) = std::sync::mpsc::channel();
    let mut backup_args = vec!["backup".into(), "--listen".into(), backup_addr.clone()];
    backup_args.extend(backup_disks.iter().cloned());
    let backup = spawn_side("backup", &common(&backup_args), events.clone())?;
    children
        .0
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .push(("backup".into(), backup));
    // Where each side takes a new backup once it is alone.
    let primary_join = format!("127.0.0.1:{}", free_port()?);
    let mut primary_args = vec![
        "primary".into(),
        "--backup".into(),
        backup_addr.clone(),
        "--listen".into(),
        primary_join.clone(),
    ];
    primary_args.extend(primary_disks.iter().cloned());
    let primary = spawn_side("primary", &common(&primary_args), events.clone())?;
    children
        .0
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .push(("primary".into(), primary));
    // The side that runs the VM: the stop request goes to it.
    let live = Arc::new(Mutex::new("primary".to_string()));

    // Re-protection: a side left alone gets a new backup, which joins it
    // and listens for the next one.
    if !args.no_reprotect {
        // The pair now: each side with its disk images. A new backup takes
        // the failed side's images (the state transfer overwrites them),
        // once that side's process has ended: it wrote them until then.
        let pair: Arc<Mutex<[SideDisks; 2]>> = Arc::new(Mutex::new([
            ("primary".into(), primary_disks.clone()),
            ("backup".into(), backup_disks.clone()),
        ]));
        let joins: Arc<Mutex<Vec<(String, String)>>> = Arc::new(Mutex::new(vec![
            ("primary".into(), primary_join),
            ("backup".into(), backup_addr.clone()),
        ]));
        let (kids, live, tail) = (children.0.clone(), live.clone(), common(&[]));
        std::thread::spawn(move || {
            let mut n = 1;
            for (name, SideEvent::Alone) in side_events {
                *live.lock().unwrap_or_else(|e| e.into_inner()) = name.clone();
                let Some(join) = joins
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .iter()
                    .find(|(n, _)| *n == name)
                    .map(|(_, a)| a.clone())
                else {
                    continue;
                };
                n += 1;
                let new = format!("backup-{n}");
                let (dead, disks) = {
                    let p = pair.lock().unwrap_or_else(|e| e.into_inner());
                    match p.iter().position(|(s, _)| *s == name) {
                        Some(i) => p[1 - i].clone(),
                        None => continue,
                    }
                };
                if writable && !wait_ended(&kids, &dead, Duration::from_secs(30)) {
                    eprint!(
                        "vmft ft: {dead} has not ended within 30 s: its disk images are not \
                         given to a new backup; {name} runs UNPROTECTED\r\n"
                    );
                    continue;
                }
                let Ok(port) = free_port() else { continue };
                let listen = format!("127.0.0.1:{port}");
                let mut a: Vec<String> = vec![
                    "backup".into(),
                    "--join".into(),
                    join.clone(),
                    "--listen".into(),
                    listen.clone(),
                ];
                a.extend(disks.iter().cloned());
                a.extend(tail.iter().cloned());
                eprint!("vmft ft: {name} runs alone: starting {new}, which joins it at {join}\r\n");
                match spawn_side(&new, &a, events.clone()) {
                    Ok(child) => {
                        kids.lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .push((new.clone(), child));
                        joins
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .push((new.clone(), listen));
                        let mut p = pair.lock().unwrap_or_else(|e| e.into_inner());
                        if let Some(slot) = p.iter_mut().find(|(s, _)| *s == dead) {
                            *slot = (new, disks);
                        }
                    }
                    Err(e) => eprint!("vmft ft: cannot start {new}: {e:#}\r\n"),
                }
            }
        });
    }

    // A stop signal to `vmft ft` stops the pair cleanly: pass it on to the
    // live side (the primary while it runs: it writes the end entry and the
    // backup replays to it; else the backup that took over). Children are
    // looked at under the lock, so a reaped child's pid is never signalled.
    let kids = children.0.clone();
    let live_side = live.clone();
    stop.on_request(move |_| {
        let mut kids = kids.lock().unwrap_or_else(|e| e.into_inner());
        let running: Vec<(String, u32)> = kids
            .iter_mut()
            .filter_map(|(n, c)| match c.try_wait() {
                Ok(None) => Some((n.clone(), c.id())),
                _ => None,
            })
            .collect();
        let live = live_side.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let target = running
            .iter()
            .find(|(n, _)| *n == live)
            .or_else(|| running.iter().find(|(n, _)| n == "primary"))
            .or_else(|| running.first());
        if let Some((_, pid)) = target {
            // SAFETY: kill on the pid of a child of this process that
            // try_wait just found running, under the lock that reaping
            // also takes, so it cannot have been reaped and reused since.
            unsafe { libc::kill(*pid as i32, libc::SIGTERM) };
        }
    });

    let outcome = console.run().context("the console failed")?;
    // Give the sides time to finish, then stop what is left.
    let t0 = Instant::now();
    loop {
        let mut all = true;
        for (_, c) in children
            .0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter_mut()
        {
            if c.try_wait().ok().flatten().is_none() {
                all = false;
            }
        }
        if all || t0.elapsed() > Duration::from_secs(30) {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    drop(children);
    Ok(outcome.exit_status().clamp(0, 255) as u8)
}
