//! The drill's cluster: the arbiter (a child process, so it can be
//! killed), the console (in this process, its transcript in a file), the
//! sides (child processes whose stderr is logged and read for events) and
//! the relays between them.

use std::collections::HashSet;
use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use vmm::console::{Console, ConsoleConfig, ConsoleInput};
use vmm::ft::status::State;
use vmm::lab::relay::{Delay, Relay};
use vmm::stop::StopHandle;

use super::report::Round;
use super::DrillArgs;

/// What a side's stderr says that the drill acts on.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// It runs the VM alone: its peer failed and it won the claim.
    Alone,
    /// A new backup has its state: protected again.
    Protected,
    /// It lost a claim (another side is live).
    LostClaim,
    /// The guest paused this long (ms) for a state transfer.
    Pause(f64),
    /// A backup's replay diverged from its primary (a determinism bug:
    /// repaired by a fresh state, but the drill fails on it).
    Diverged(String),
}

fn event_of(line: &str) -> Option<Event> {
    if line.contains("divergence at exit") {
        return Some(Event::Diverged(line.to_string()));
    }
    if line.contains("claim won: the backup is LIVE")
        || line.contains("claim won: the VM continues here, UNPROTECTED")
    {
        return Some(Event::Alone);
    }
    if line.contains("the VM is PROTECTED again") {
        return Some(Event::Protected);
    }
    if line.contains("claim lost") {
        return Some(Event::LostClaim);
    }
    line.split("after a pause of ")
        .nth(1)
        .and_then(|r| r.split(' ').next())
        .and_then(|ms| ms.parse().ok())
        .map(Event::Pause)
}

/// A re-protection as the survivor reported it.
pub struct Reprotected {
    /// The guest's pause, ms.
    pub pause: Option<f64>,
    /// Bytes of state moved.
    pub bytes: u64,
    /// Copy rounds, the pause's included.
    pub rounds: Option<u32>,
}

/// Events seen so far: when, which side, what.
type Events = Arc<Mutex<Vec<(Instant, String, Event)>>>;

struct Side {
    name: String,
    child: Child,
    /// Where a new backup joins it once it is alone.
    join: String,
    api: PathBuf,
    status: Option<ExitStatus>,
}

/// A relay between two sides.
struct Link {
    relay: Relay,
    ends: [String; 2],
}

/// Hosts as network namespaces on one LAN (`--hosts netns`).
struct Lan {
    /// Declared first: the hosts' namespaces go before the switch's.
    hosts: Vec<vmm::lab::netns::Host>,
    arbiter: vmm::lab::netns::Host,
    console: vmm::lab::netns::Host,
    _lan: vmm::lab::netns::Lan,
    /// Which host each side runs on.
    place: Vec<(String, usize)>,
    /// The next port handed out (each host has its own port space).
    next_port: u16,
}

impl Lan {
    /// The LAN and its hosts; with `tap`, each side's host gets that tap
    /// in its bridge, for the guest's network card (the same name on
    /// both: a monitor opens it by name).
    fn build(tap: Option<&str>) -> Result<Lan> {
        if let Some(p) = vmm::lab::netns::net_problem() {
            bail!("--hosts netns: {p}");
        }
        if Command::new("iptables")
            .arg("--version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .map(|s| !s.success())
            .unwrap_or(true)
        {
            bail!("--hosts netns needs iptables (Debian: apt-get install iptables) for partitions");
        }
        let mut lan = vmm::lab::netns::Lan::with_prefix("vmft-drill")?;
        let arbiter = lan.host("arbiter")?;
        let console = lan.host("console")?;
        let hosts = vec![lan.host("host-a")?, lan.host("host-b")?];
        if let Some(tap) = tap {
            for h in &hosts {
                h.ns()
                    .make_tap(tap, Some("br0"))
                    .with_context(|| format!("cannot make the tap {tap} in {}", h.ns().name()))?;
            }
        }
        Ok(Lan {
            hosts,
            arbiter,
            console,
            _lan: lan,
            place: Vec::new(),
            next_port: 7100,
        })
    }

    fn ip(h: &vmm::lab::netns::Host) -> String {
        vmm::lab::netns::fmt_ip(&h.addr())
    }

    /// A fresh address on host `i`.
    fn addr(&mut self, i: usize) -> String {
        self.next_port += 1;
        format!("{}:{}", Self::ip(&self.hosts[i]), self.next_port)
    }

    fn host_of(&self, side: &str) -> Option<usize> {
        self.place.iter().find(|(s, _)| s == side).map(|(_, i)| *i)
    }

    /// `iptables` in the namespace of host `i`.
    fn iptables(&self, i: usize, args: &[&str]) -> Result<()> {
        let st = self.hosts[i]
            .ns()
            .exec("iptables")
            .args(args)
            .status()
            .context("cannot run iptables")?;
        if !st.success() {
            bail!("iptables {} in host {i}: {st}", args.join(" "));
        }
        Ok(())
    }
}

pub struct Cluster {
    /// The namespaces, with `--hosts netns`.
    lan: Option<Lan>,
    exe: PathBuf,
    out: PathBuf,
    arbiter_bin: PathBuf,
    arbiter: Option<Child>,
    arbiter_addr: String,
    /// With `--arbiter etcd`: the members (name, client and peer
    /// addresses) and their processes.
    etcd: Vec<(String, String, String, Option<Child>)>,
    console: Option<std::thread::JoinHandle<()>>,
    transcript: PathBuf,
    sides: Vec<Side>,
    links: Vec<Link>,
    live: String,
    backup: String,
    events: Events,
    /// The live side's control socket, for the lag sampler.
    live_api: Arc<Mutex<PathBuf>>,
    lag: Arc<Mutex<Vec<(f64, u64)>>>,
    common: Vec<String>,
    delay: Delay,
    timeout: Duration,
    backups: u32,
    t0: Instant,
}

fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn write_secret(path: &Path, seed: u64) -> Result<()> {
    let mut v = seed ^ std::process::id() as u64;
    let mut s = String::new();
    for _ in 0..4 {
        v ^= v << 13;
        v ^= v >> 7;
        v ^= v << 17;
        s.push_str(&format!("{v:016x}"));
    }
    std::fs::write(path, s)?;
    Ok(())
}

impl Cluster {
    pub fn start(args: &DrillArgs, out: &Path, seed: u64) -> Result<Cluster> {
        let exe = std::env::current_exe().context("cannot find the vmft binary")?;
        let arbiter_bin = exe.with_file_name("arbiter");
        if !arbiter_bin.exists() {
            bail!(
                "the drill needs the `arbiter` binary next to vmft ({}): build it with `cargo build --release -p arbiter`",
                arbiter_bin.display()
            );
        }
        let logs = out.join("logs");
        std::fs::create_dir_all(&logs)?;
        let token = out.join("channel.token");
        let atoken = out.join("arbiter.token");
        write_secret(&token, seed)?;
        write_secret(&atoken, seed.rotate_left(32))?;
        let adata = out.join("arbiter-data");
        let _ = std::fs::remove_dir_all(&adata);
        std::fs::create_dir_all(&adata)?;
        let lan = match args.hosts {
            super::Hosts::Local => None,
            super::Hosts::Netns => Some(Lan::build(
                args.guest_net().is_some().then_some(super::GUEST_TAP),
            )?),
        };
        let arbiter_host = match &lan {
            Some(l) => Lan::ip(&l.arbiter),
            None => "127.0.0.1".into(),
        };
        let port = |n: u16| -> Result<u16> {
            Ok(match &lan {
                Some(_) => n,
                None => free_port()?,
            })
        };
        let mut etcd = Vec::new();
        let arbiter_addr = match args.arbiter {
            super::ArbiterKind::Builtin => format!("{arbiter_host}:{}", port(7420)?),
            super::ArbiterKind::Etcd => {
                let ok = Command::new("etcd")
                    .arg("--version")
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .status()
                    .map(|s| s.success())
                    .unwrap_or(false);
                if !ok {
                    bail!("--arbiter etcd needs etcd (Debian: apt-get install etcd-server)");
                }
                for i in 0..3u16 {
                    etcd.push((
                        format!("m{i}"),
                        format!("{arbiter_host}:{}", port(12379 + i)?),
                        format!("{arbiter_host}:{}", port(12479 + i)?),
                        None,
                    ));
                }
                let _ = std::fs::remove_dir_all(out.join("etcd"));
                format!(
                    "etcd://{}",
                    etcd.iter()
                        .map(|m| m.1.clone())
                        .collect::<Vec<_>>()
                        .join(",")
                )
            }
        };

        // The console, in this process (in its host's namespace with
        // `--hosts netns`): the transcript goes to a file.
        let transcript = out.join("transcript.txt");
        let mut ccfg = ConsoleConfig::new(
            &match &lan {
                Some(l) => format!("{}:7000", Lan::ip(&l.console)),
                None => "127.0.0.1:0".into(),
            },
            std::fs::read(&token)?.trim_ascii().to_vec(),
        );
        ccfg.input = ConsoleInput::None;
        ccfg.output = Box::new(File::create(&transcript)?);
        ccfg.notes = Box::new(File::create(logs.join("console.log"))?);
        let console = match &lan {
            Some(l) => l.console.ns().enter(|| Console::bind(ccfg))?,
            None => Console::bind(ccfg),
        }
        .context("cannot start the console")?;
        let console_addr = console.local_addr().to_string();
        let console = std::thread::spawn(move || {
            let _ = console.run();
        });

        let mut vm_args: Vec<String> = match &args.restore {
            Some(s) => vec!["--restore".into(), s.display().to_string()],
            // Until stopped (the workload's default is 200 lines).
            None => vec![
                "--workload".into(),
                "drill".into(),
                "--append".into(),
                "vmft.count=0".into(),
            ],
        };
        // The guest's network card, on each host's tap.
        if let Some(net) = args.guest_net() {
            vm_args.extend(["--net".into(), net]);
        }
        let mut common: Vec<String> = vec![
            "--vm".into(),
            "drill".into(),
            "--arbiter".into(),
            arbiter_addr.clone(),
            "--arbiter-token-file".into(),
            atoken.display().to_string(),
            "--token-file".into(),
            token.display().to_string(),
            "--console".into(),
            console_addr,
            "--timeout-ms".into(),
            args.timeout_ms.to_string(),
            "--heartbeat-ms".into(),
            args.heartbeat_ms.to_string(),
            "--no-stdin".into(),
        ];
        common.extend(vm_args);
        let mut c = Cluster {
            lan,
            exe,
            out: out.to_path_buf(),
            arbiter_bin,
            arbiter: None,
            arbiter_addr,
            etcd,
            console: Some(console),
            transcript,
            sides: Vec::new(),
            links: Vec::new(),
            live: "primary".into(),
            backup: "backup-1".into(),
            events: Arc::default(),
            live_api: Arc::new(Mutex::new(out.join("primary.sock"))),
            lag: Arc::default(),
            common,
            delay: Delay {
                delay: Duration::from_millis(args.channel_delay_ms),
                jitter: Duration::from_millis(args.channel_jitter_ms),
                seed,
            },
            timeout: Duration::from_millis(args.timeout_ms),
            backups: 1,
            t0: Instant::now(),
        };
        c.start_arbiter()?;
        let backup_listen = c.addr_on(1)?;
        c.spawn(
            "backup-1",
            &["backup", "--listen", &backup_listen],
            &backup_listen,
            1,
        )?;
        // The relay connects through to the backup at once: it must listen.
        let api = c.out.join("backup-1.sock");
        let t = Instant::now();
        while vmm::api::query(&api).is_err() {
            if let Some(st) = c.sides[0].child.try_wait()? {
                c.sides[0].status = Some(st);
                bail!(
                    "the first backup ended ({st}) before it listened: {}",
                    c.last_log_line("backup-1")
                );
            }
            if t.elapsed() > Duration::from_secs(120) {
                bail!(
                    "the first backup did not start; see {}",
                    c.out.join("logs").display()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let relay = c.relay(0, &backup_listen)?;
        let via = relay.local_addr().to_string();
        c.links.push(Link {
            relay,
            ends: ["primary".into(), "backup-1".into()],
        });
        let join = c.addr_on(0)?;
        c.spawn(
            "primary",
            &["primary", "--backup", &via, "--listen", &join],
            &join,
            0,
        )?;
        c.start_lag_sampler();
        Ok(c)
    }

    /// A fresh address for a side on host `i` (any host when local).
    fn addr_on(&mut self, i: usize) -> Result<String> {
        match self.lan.as_mut() {
            Some(l) => Ok(l.addr(i)),
            None => Ok(format!("127.0.0.1:{}", free_port()?)),
        }
    }

    /// A relay for a side on host `i` that dials `target` (with
    /// namespaces, the relay lives in that host's namespace).
    fn relay(&self, i: usize, target: &str) -> Result<Relay> {
        let delay = self.delay;
        Ok(match &self.lan {
            Some(l) => l.hosts[i]
                .ns()
                .enter(|| Relay::start("127.0.0.1:0", target, delay))??,
            None => Relay::start("127.0.0.1:0", target, delay)?,
        })
    }

    /// Start `vmft <args>` as side `name` on host `host`, which takes new
    /// backups at `join`.
    fn spawn(&mut self, name: &str, args: &[&str], join: &str, host: usize) -> Result<()> {
        let api = self.out.join(format!("{name}.sock"));
        let log = File::create(self.out.join("logs").join(format!("{name}.log")))?;
        let mut cmd = match self.lan.as_mut() {
            Some(l) => {
                l.place.push((name.to_string(), host));
                let mut c = Command::new("ip");
                c.args(["netns", "exec", l.hosts[host].ns().name()])
                    .arg(&self.exe);
                c
            }
            None => Command::new(&self.exe),
        };
        let mut child = cmd
            .args(args)
            .args(&self.common)
            .arg("--api-sock")
            .arg(&api)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("cannot start {name}"))?;
        if let Some(err) = child.stderr.take() {
            let (events, name) = (self.events.clone(), name.to_string());
            let mut log = log;
            std::thread::spawn(move || {
                for line in BufReader::new(err).lines().map_while(Result::ok) {
                    let _ = writeln!(log, "{line}");
                    if let Some(e) = event_of(&line) {
                        events.lock().unwrap_or_else(|e| e.into_inner()).push((
                            Instant::now(),
                            name.clone(),
                            e,
                        ));
                    }
                }
            });
        }
        self.sides.push(Side {
            name: name.to_string(),
            child,
            join: join.to_string(),
            api,
            status: None,
        });
        Ok(())
    }

    /// Every 250 ms: the live side's lag (exits), for the picture.
    fn start_lag_sampler(&self) {
        let (api, lag, t0) = (self.live_api.clone(), self.lag.clone(), self.t0);
        std::thread::spawn(move || loop {
            let path = api.lock().unwrap_or_else(|e| e.into_inner()).clone();
            if let Ok(s) = vmm::api::query(&path) {
                if let Some(l) = s.lag_exits {
                    lag.lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .push((t0.elapsed().as_secs_f64(), l));
                }
            }
            std::thread::sleep(Duration::from_millis(250));
        });
    }

    /// The lag samples since the last call.
    pub fn take_lag_samples(&self) -> Vec<(f64, u64)> {
        std::mem::take(&mut *self.lag.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// A command that runs `program` where the arbiter runs.
    fn arbiter_command(&self, program: &Path) -> Command {
        match &self.lan {
            Some(l) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", l.arbiter.ns().name()])
                    .arg(program);
                c
            }
            None => Command::new(program),
        }
    }

    /// Start the etcd members that do not run.
    fn start_etcd(&mut self) -> Result<()> {
        let cluster = self
            .etcd
            .iter()
            .map(|(n, _, p, _)| format!("{n}=http://{p}"))
            .collect::<Vec<_>>()
            .join(",");
        for i in 0..self.etcd.len() {
            if self.etcd[i].3.is_some() {
                continue;
            }
            let (name, client, peer) = (
                self.etcd[i].0.clone(),
                self.etcd[i].1.clone(),
                self.etcd[i].2.clone(),
            );
            let log = File::options()
                .create(true)
                .append(true)
                .open(self.out.join("logs").join(format!("etcd-{name}.log")))?;
            let child = self
                .arbiter_command(Path::new("etcd"))
                .args(["--name", &name, "--data-dir"])
                .arg(self.out.join("etcd").join(&name))
                .args(["--listen-client-urls", &format!("http://{client}")])
                .args(["--advertise-client-urls", &format!("http://{client}")])
                .args(["--listen-peer-urls", &format!("http://{peer}")])
                .args(["--initial-advertise-peer-urls", &format!("http://{peer}")])
                .args(["--initial-cluster", &cluster])
                .args(["--initial-cluster-state", "new"])
                .args(["--initial-cluster-token", "vmft-drill"])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .context("cannot start etcd")?;
            self.etcd[i].3 = Some(child);
        }
        Ok(())
    }

    /// Kill `n` running etcd members (kill -9).
    pub fn kill_etcd_members(&mut self, n: usize) {
        for m in self.etcd.iter_mut().filter(|m| m.3.is_some()).take(n) {
            if let Some(mut c) = m.3.take() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }

    pub fn start_arbiter(&mut self) -> Result<()> {
        if !self.etcd.is_empty() {
            return self.start_etcd();
        }
        let log = File::options()
            .create(true)
            .append(true)
            .open(self.out.join("logs").join("arbiter.log"))?;
        let mut cmd = match &self.lan {
            Some(l) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", l.arbiter.ns().name()])
                    .arg(&self.arbiter_bin);
                c
            }
            None => Command::new(&self.arbiter_bin),
        };
        let child = cmd
            .args(["serve", "--listen", &self.arbiter_addr, "--data"])
            .arg(self.out.join("arbiter-data"))
            .arg("--token-file")
            .arg(self.out.join("arbiter.token"))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("cannot start the arbiter")?;
        self.arbiter = Some(child);
        Ok(())
    }

    pub fn stop_arbiter(&mut self) {
        let n = self.etcd.len();
        self.kill_etcd_members(n);
        if let Some(mut a) = self.arbiter.take() {
            let _ = a.kill();
            let _ = a.wait();
        }
    }

    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    pub fn live(&self) -> String {
        self.live.clone()
    }

    pub fn backup(&self) -> String {
        self.backup.clone()
    }

    pub fn set_live(&mut self, name: &str) {
        self.live = name.to_string();
        if let Some(s) = self.side(name) {
            *self.live_api.lock().unwrap_or_else(|e| e.into_inner()) = s.api.clone();
        }
    }

    fn side(&self, name: &str) -> Option<&Side> {
        self.sides.iter().find(|s| s.name == name)
    }

    fn side_mut(&mut self, name: &str) -> Option<&mut Side> {
        self.sides.iter_mut().find(|s| s.name == name)
    }

    pub fn kill9(&mut self, name: &str) {
        if let Some(s) = self.side_mut(name) {
            let _ = s.child.kill();
            s.status = s.child.wait().ok();
        }
    }

    pub fn signal(&mut self, name: &str, sig: i32) {
        if let Some(s) = self.side_mut(name) {
            if s.status.is_none() {
                // SAFETY: kill on the pid of a child of this process that
                // has not been reaped (its status is not taken), so the
                // pid still names it.
                unsafe { libc::kill(s.child.id() as i32, sig) };
            }
        }
    }

    /// Close the links of `name`: its bytes still in the network are lost
    /// with it.
    pub fn cut_links_of(&self, name: &str) {
        for l in self
            .links
            .iter()
            .filter(|l| l.ends.iter().any(|e| e == name))
        {
            l.relay.cut();
        }
    }

    /// Partition the live side from its backup (bytes dropped, silently):
    /// in the relay between them, or with namespaces an `iptables` DROP
    /// in the live side's host for the backup's host.
    pub fn partition_pair(&self) -> Result<()> {
        let (a, b) = (&self.live, &self.backup);
        if let Some(l) = &self.lan {
            let (Some(la), Some(lb)) = (l.host_of(a), l.host_of(b)) else {
                bail!("the sides' hosts are unknown");
            };
            let other = Lan::ip(&l.hosts[lb]);
            l.iptables(la, &["-I", "INPUT", "-s", &other, "-j", "DROP"])?;
            l.iptables(la, &["-I", "OUTPUT", "-d", &other, "-j", "DROP"])?;
            return Ok(());
        }
        for l in self
            .links
            .iter()
            .filter(|l| l.ends.contains(a) && l.ends.contains(b))
        {
            l.relay.partition(true);
        }
        Ok(())
    }

    /// Undo every partition (the hosts' firewall rules).
    pub fn heal(&self) -> Result<()> {
        if let Some(l) = &self.lan {
            for i in 0..l.hosts.len() {
                l.iptables(i, &["-F"])?;
            }
        }
        Ok(())
    }

    /// Wait (up to `limit`) for an event that `want` accepts, from any
    /// side, seen after the call began... or before it, within the round
    /// (events are kept): the first one not yet consumed is taken.
    pub fn wait_event(
        &self,
        limit: Duration,
        want: impl Fn(&Event, &str) -> bool,
    ) -> Result<(String, Instant)> {
        let start = Instant::now();
        loop {
            {
                let mut ev = self.events.lock().unwrap_or_else(|e| e.into_inner());
                if let Some(i) = ev.iter().position(|(_, s, e)| want(e, s)) {
                    let (at, side, _) = ev.remove(i);
                    return Ok((side, at));
                }
            }
            if start.elapsed() > limit {
                bail!("not within {} s", limit.as_secs());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Sides that won a claim since `at` (their events are kept).
    pub fn winners_since(&self, at: Instant) -> usize {
        let ev = self.events.lock().unwrap_or_else(|e| e.into_inner());
        let won: HashSet<&str> = ev
            .iter()
            .filter(|(t, _, e)| *t >= at && *e == Event::Alone)
            .map(|(_, s, _)| s.as_str())
            .collect();
        // The winner's own event was taken by `wait_event`: count it.
        won.len() + 1
    }

    /// `name` must stop by itself, with the status of a side that lost
    /// the VM (3: claim lost, 5: fenced), within `limit`; a side that goes
    /// on, or ends otherwise, is a second live side.
    pub fn expect_fenced(&mut self, name: &str, limit: Duration, round: &mut Round) -> Result<()> {
        let start = Instant::now();
        loop {
            let Some(s) = self.side_mut(name) else {
                return Ok(());
            };
            if s.status.is_none() {
                s.status = s.child.try_wait().ok().flatten();
            }
            if let Some(st) = s.status {
                return match st.code() {
                    Some(3) | Some(5) => Ok(()),
                    _ => {
                        round.double_live += 1;
                        bail!("{name}, which lost the VM, ended with {st}, not 3 or 5 (fenced)")
                    }
                };
            }
            if start.elapsed() > limit {
                round.double_live += 1;
                bail!(
                    "{name} still runs {} s after another side went live",
                    limit.as_secs()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The pair is formed and protected: the live side says so, and the
    /// backup replays.
    pub fn wait_protected(&mut self, limit: Duration, stop: &StopHandle) -> Result<()> {
        let start = Instant::now();
        loop {
            let state = |name: &str| {
                self.side(name)
                    .and_then(|s| vmm::api::query(&s.api).ok())
                    .map(|s| s.state)
            };
            if state(&self.live) == Some(State::Protected)
                && state(&self.backup) == Some(State::Replaying)
            {
                return Ok(());
            }
            let mut ended = None;
            for s in &mut self.sides {
                if s.status.is_none() {
                    if let Ok(Some(st)) = s.child.try_wait() {
                        s.status = Some(st);
                        if s.name == self.live || s.name == self.backup {
                            ended = Some((s.name.clone(), st));
                        }
                    }
                }
            }
            if let Some((name, st)) = ended {
                // What each side of the pair last said: the one that
                // ended may only have followed the other.
                bail!(
                    "{name} ended ({st}); {}: {}; {}: {}",
                    self.live,
                    self.last_log_line(&self.live),
                    self.backup,
                    self.last_log_line(&self.backup)
                );
            }
            if start.elapsed() > limit || stop.requested().is_some() {
                bail!("not protected within {} s", limit.as_secs());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// A new backup joins `survivor` (through a new relay); returns the
    /// pause the survivor reported, the bytes of state moved and the copy
    /// rounds.
    pub fn reprotect(&mut self, survivor: &str, limit: Duration) -> Result<Reprotected> {
        let join = self
            .side(survivor)
            .map(|s| s.join.clone())
            .context("the survivor is unknown")?;
        self.backups += 1;
        let name = format!("backup-{}", self.backups);
        // The new backup runs on the other host (where the failed side ran).
        let host = match &self.lan {
            Some(l) => 1 - l.host_of(survivor).unwrap_or(0),
            None => 0,
        };
        let relay = self.relay(host, &join)?;
        let via = relay.local_addr().to_string();
        self.links.push(Link {
            relay,
            ends: [survivor.to_string(), name.clone()],
        });
        let listen = self.addr_on(host)?;
        self.spawn(
            &name,
            &["backup", "--join", &via, "--listen", &listen],
            &listen,
            host,
        )?;
        self.backup = name;
        let (_, _) = self
            .wait_event(limit, |e, s| *e == Event::Protected && s == survivor)
            .context("the survivor was not protected again")?;
        let pause = self
            .wait_event(Duration::from_secs(5), |e, s| {
                matches!(e, Event::Pause(_)) && s == survivor
            })
            .ok()
            .and_then(|_| self.last_pause(survivor));
        self.wait_protected(limit, &StopHandle::new())?;
        let transfer = self
            .side(survivor)
            .and_then(|s| vmm::api::query(&s.api).ok())
            .and_then(|s| s.transfer);
        Ok(Reprotected {
            pause,
            bytes: transfer.as_ref().map_or(0, |t| t.total),
            rounds: transfer.map(|t| t.rounds),
        })
    }

    /// What side `name` says on its control socket.
    pub fn status_of(&self, name: &str) -> Option<vmm::ft::status::MonitorStatus> {
        self.side(name).and_then(|s| vmm::api::query(&s.api).ok())
    }

    /// The pause in the survivor's status (the event was consumed).
    fn last_pause(&self, side: &str) -> Option<f64> {
        self.side(side)
            .and_then(|s| vmm::api::query(&s.api).ok())
            .and_then(|s| s.transfer)
            .map(|t| t.pause_ms)
    }

    /// Wait until the transcript grows (a new line), at most `limit`;
    /// whether it did.
    pub fn wait_for_output(&self, limit: Duration) -> bool {
        let len = || {
            std::fs::metadata(&self.transcript)
                .map(|m| m.len())
                .unwrap_or(0)
        };
        let (start, before) = (Instant::now(), len());
        while len() == before {
            if start.elapsed() > limit {
                return false;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        true
    }

    /// A divergence any side reported, if one did.
    pub fn divergence(&self) -> Option<String> {
        self.events
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .find_map(|(_, side, e)| match e {
                Event::Diverged(line) => Some(format!("{side}: {line}")),
                _ => None,
            })
    }

    /// Stop the pair cleanly (a stop request to the live side: its backup
    /// replays to the end entry); both must exit 0.
    pub fn stop_cleanly(&mut self, limit: Duration) -> Result<()> {
        let (live, backup) = (self.live.clone(), self.backup.clone());
        self.signal(&live, libc::SIGTERM);
        let start = Instant::now();
        for name in [live, backup] {
            while let Some(s) = self.side_mut(&name) {
                if s.status.is_none() {
                    s.status = s.child.try_wait().ok().flatten();
                }
                if let Some(st) = s.status {
                    if !st.success() {
                        bail!("{name} ended with {st} at the clean stop");
                    }
                    break;
                }
                if start.elapsed() > limit {
                    bail!("{name} did not stop within {} s", limit.as_secs());
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        // The console ends when the live side says it is done.
        if let Some(c) = self.console.take() {
            let start = Instant::now();
            while !c.is_finished() && start.elapsed() < Duration::from_secs(30) {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        Ok(())
    }

    /// The console's transcript.
    pub fn transcript(&self) -> String {
        std::fs::read_to_string(&self.transcript).unwrap_or_default()
    }

    /// The last line side `name` logged that says what went wrong (an
    /// error line, else the last line), with where its log is.
    fn last_log_line(&self, name: &str) -> String {
        // The stderr reader may still be writing the last lines.
        std::thread::sleep(Duration::from_millis(200));
        let path = self.out.join("logs").join(format!("{name}.log"));
        let log = std::fs::read_to_string(&path).unwrap_or_default();
        let line = log
            .lines()
            .rev()
            .find(|l| l.contains("error"))
            .or_else(|| log.lines().last())
            .unwrap_or("(nothing logged)");
        format!("{} (log: {})", line.trim(), path.display())
    }

    /// Connect to `target`, the guest's TCP server, from the console's
    /// host, trying again until it answers or `limit` passes. A
    /// `net: error` line of the guest ends the wait at once.
    pub fn connect_guest(
        &self,
        target: std::net::SocketAddr,
        limit: Duration,
    ) -> Result<(std::net::TcpStream, String)> {
        let Some(lan) = &self.lan else {
            bail!("the TCP stream needs --hosts netns");
        };
        let start = Instant::now();
        loop {
            let tried = lan
                .console
                .ns()
                .enter(|| std::net::TcpStream::connect_timeout(&target, Duration::from_secs(1)))?;
            let e = match tried {
                Ok(sock) => return Ok((sock, "console".into())),
                Err(e) => e,
            };
            if let Some(line) = self
                .transcript()
                .lines()
                .find(|l| l.starts_with("net: error"))
            {
                bail!("the guest says {:?}", line.trim_end());
            }
            if start.elapsed() > limit {
                bail!(
                    "{target} did not accept a connection within {} s (last: {e}); the guest \
                     must run the `drill` workload with a network card: a --restore snapshot \
                     taken with --net tap={},mac={}, or --no-tcp",
                    limit.as_secs(),
                    super::GUEST_TAP,
                    super::GUEST_MAC
                );
            }
            std::thread::sleep(Duration::from_millis(250));
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for s in &mut self.sides {
            if s.status.is_none() {
                // SAFETY: kill on the pid of an unreaped child (its
                // status was never taken), so the pid still names it.
                unsafe { libc::kill(s.child.id() as i32, libc::SIGCONT) };
                let _ = s.child.kill();
                let _ = s.child.wait();
            }
        }
        self.stop_arbiter();
    }
}
