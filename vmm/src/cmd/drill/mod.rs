//! `vmft drill`: run the whole system and attack it, round after round, on
//! one running guest, then print a verdict.
//!
//! ```text
//! drill ─┬─ arbiter (a child process; "killed" = kill -9, restarted on the same port and data)
//!        ├─ vmft console ─▶ OUT/transcript.txt      (the `drill` workload's chained lines)
//!        ├─ with --hosts netns: a TCP stream from the console's host to the guest's echo server
//!        ├─ vmft primary --listen J0 ──▶ relay ──▶ vmft backup --listen L0
//!        └─ after each failover: vmft backup --join (relay ──▶ survivor's J) --listen Ln
//! round: protected? ─▶ wait (seeded) ─▶ the next console line ─▶ fault ─▶ survivor's claim won
//!        ─▶ the other side gone or fenced ─▶ new backup joins ─▶ protected again
//! ```
//!
//! Every link between the sides goes through a relay of this process
//! ([`vmm::lab::relay`]), so a partition drops bytes silently (as a
//! firewall DROP does) and a killed side's bytes still in the network are
//! lost with it. At the end the pair is stopped cleanly and the transcript
//! audited ([`vmm::lab::audit::audit_drill`]): each line once, in order,
//! and chained, so output of two executions (the sign of output that
//! escaped the output rule) shows where the backup took over.
//!
//! With `--hosts netns` the guest also has a network card (a tap of the
//! same name on each side's host, one MAC) and serves TCP echo; one
//! connection from the console's host carries a numbered line every
//! 100 ms from the pair's forming to the end ([`stream`]): every byte must
//! come back once, in order, without a reset and without a stall past
//! `--tcp-stall-limit-s`. With `--hosts local` both sides would share one
//! network namespace, where the tap cannot exist twice: no stream, and
//! the report and verdict say it was not checked.

mod echo;
mod report;
mod sides;
mod stream;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::{Args, ValueEnum};

use vmm::lab::audit::audit_drill;
use vmm::stop::StopHandle;

use report::{Report, Round, Tcp};
use sides::{Cluster, Event};
use stream::TcpStream;

/// The tap each side's host gives the guest's card with `--hosts netns`.
pub const GUEST_TAP: &str = "vmft0";
/// The guest's MAC (both sides: it is the card's); vmft's default.
pub const GUEST_MAC: &str = "02:76:6d:66:74:00";
/// Where the `drill` workload's echo server listens: its default address
/// (`vmft.ip`, 10.77.0.50/24, on the namespaces' LAN) and port.
const GUEST_ECHO: ([u8; 4], u16) = ([10, 77, 0, 50], 7000);

/// The faults a drill injects.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, ValueEnum)]
pub enum Fault {
    /// `kill -9` of the primary (its bytes in flight are lost with it).
    Kill,
    /// `kill -9` of the backup.
    Backup,
    /// `SIGSTOP` of the primary past the failure timeout, then `SIGCONT`:
    /// it must find itself fenced.
    Stop,
    /// The logging channel partitioned while both sides live.
    Partition,
    /// The arbiter and the primary killed at once; the arbiter restarted
    /// (with `--arbiter etcd`: every member).
    Arbiter,
    /// One etcd member and the primary killed at once (the majority still
    /// decides); the member restarted.
    EtcdMember,
    /// Two of the three etcd members and the primary killed at once (no
    /// claim can be decided until they are back); the members restarted.
    EtcdMajority,
}

impl Fault {
    /// Its name in tables.
    pub fn name(self) -> &'static str {
        match self {
            Fault::Kill => "kill",
            Fault::Backup => "backup",
            Fault::Stop => "stop",
            Fault::Partition => "partition",
            Fault::Arbiter => "arbiter",
            Fault::EtcdMember => "etcd-member",
            Fault::EtcdMajority => "etcd-majority",
        }
    }
}

/// Which arbiter decides the claims.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ArbiterKind {
    /// `arbiter serve` (one process).
    Builtin,
    /// A three-member etcd cluster (`etcd` must be installed).
    Etcd,
}

/// Where the sides run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Hosts {
    /// Processes on this host, links through relays on loopback.
    Local,
    /// Hosts as network namespaces on one LAN (a bridge): the arbiter,
    /// the console and two hosts the sides take turns on; a partition is
    /// an `iptables` DROP between two of them (needs root and iptables).
    Netns,
}

/// `vmft drill`.
#[derive(Args)]
pub struct DrillArgs {
    /// Rounds (one fault each).
    #[arg(long, default_value_t = 10)]
    pub rounds: u32,
    /// The faults, in rotation.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "kill,backup,stop,partition,arbiter"
    )]
    pub faults: Vec<Fault>,
    /// Seed of the moments and delays (printed; the same seed repeats the
    /// drill's choices).
    #[arg(long)]
    pub seed: Option<u64>,
    /// Where the report, picture, transcript and logs go.
    #[arg(long, default_value = "drill-out")]
    pub out: PathBuf,
    /// Start from this snapshot of the `drill` workload instead of booting
    /// the default guest with it (with --hosts netns and no --no-tcp, taken
    /// with the card the sides give the guest: `vmft run --workload drill
    /// --append vmft.count=0 --net tap=vmft0,mac=02:76:6d:66:74:00
    /// --snapshot-on-ready FILE`, with a tap vmft0 in that namespace).
    #[arg(long, value_name = "FILE")]
    pub restore: Option<PathBuf>,
    /// Declare a side failed after this long without hearing from it, ms.
    #[arg(long, default_value_t = 2000)]
    pub timeout_ms: u64,
    /// Heartbeat period, ms.
    #[arg(long, default_value_t = 100)]
    pub heartbeat_ms: u64,
    /// Delay the relays add to the channel, each way, ms.
    #[arg(long, default_value_t = 0)]
    pub channel_delay_ms: u64,
    /// Up to this much more, drawn per chunk, ms.
    #[arg(long, default_value_t = 0)]
    pub channel_jitter_ms: u64,
    /// Where the sides run.
    #[arg(long, value_enum, default_value = "local")]
    pub hosts: Hosts,
    /// Which arbiter decides the claims.
    #[arg(long, value_enum, default_value = "builtin")]
    pub arbiter: ArbiterKind,
    /// Longest wait for any one step (the pair to form, a failover, a
    /// re-protection), s.
    #[arg(long, default_value_t = 300)]
    pub step_timeout_s: u64,
    /// With --hosts netns: no network card for the guest and no TCP
    /// stream. Otherwise the guest gets --net tap=vmft0,mac=02:76:6d:66:74:00
    /// (a --restore snapshot must have been taken with that card) and the
    /// drill keeps one TCP connection to its echo server (10.77.0.50:7000)
    /// across every round. With --hosts local there is never a stream.
    #[arg(long)]
    pub no_tcp: bool,
    /// The longest the TCP stream may wait for an echo before the drill
    /// calls it broken, s.
    #[arg(long, default_value_t = 30)]
    pub tcp_stall_limit_s: u64,
}

impl DrillArgs {
    /// The guest's `--net` option, when it has a network card (and the
    /// drill a TCP stream).
    pub fn guest_net(&self) -> Option<String> {
        (self.hosts == Hosts::Netns && !self.no_tcp)
            .then(|| format!("tap={GUEST_TAP},mac={GUEST_MAC}"))
    }

    /// Why there is no TCP stream, if there is none.
    fn no_stream_reason(&self) -> Option<&'static str> {
        match (self.hosts, self.no_tcp) {
            (Hosts::Netns, false) => None,
            (Hosts::Netns, true) => Some("--no-tcp"),
            (Hosts::Local, _) => Some(
                "needs --hosts netns: with --hosts local both sides share one network \
                 namespace, where the guest's tap cannot exist twice",
            ),
        }
    }
}

/// The longest the `drill` workload may go without a line (it prints
/// every 100 ms of guest time) before the drill calls output stalled.
const OUTPUT_STALL: Duration = Duration::from_secs(30);

/// A small seeded generator (xorshift64*): the drill's choices.
pub struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Self {
        Rng(seed | 1)
    }

    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Uniform in `lo..=hi` ms.
    fn ms(&mut self, lo: u64, hi: u64) -> Duration {
        Duration::from_millis(lo + self.next() % (hi - lo + 1))
    }
}

/// The TCP stream: one connection to the guest's echo server from the
/// console's host, once the guest answers (a guest booting rather than
/// restored takes a while: up to `step`).
fn open_stream(c: &Cluster, t0: Instant, args: &DrillArgs, step: Duration) -> Result<TcpStream> {
    let target = std::net::SocketAddr::from(GUEST_ECHO);
    let (sock, from) = c.connect_guest(target, step)?;
    let limit = Duration::from_secs(args.tcp_stall_limit_s);
    let s = TcpStream::start(sock, target, &from, t0, limit)
        .with_context(|| format!("cannot start the stream to {target}"))?;
    eprintln!(
        "vmft drill: TCP stream to {target} from host {from} after {:.1} s (a line every {} ms)",
        t0.elapsed().as_secs_f64(),
        stream::PERIOD.as_millis()
    );
    Ok(s)
}

/// `vmft drill`: returns the exit status (0 only when every invariant
/// held).
pub fn drill(args: DrillArgs, stop: StopHandle) -> Result<u8> {
    if args.faults.is_empty() {
        bail!("--faults names no fault");
    }
    if args.arbiter != ArbiterKind::Etcd
        && args
            .faults
            .iter()
            .any(|f| matches!(f, Fault::EtcdMember | Fault::EtcdMajority))
    {
        bail!("the etcd-member and etcd-majority faults need --arbiter etcd");
    }
    let seed = args.seed.unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1)
    });
    let mut rng = Rng::new(seed);
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("cannot create {}", args.out.display()))?;
    let out = args.out.canonicalize()?;
    eprintln!(
        "vmft drill: {} rounds of {}, seed {seed}, hosts {:?}, report in {}",
        args.rounds,
        args.faults
            .iter()
            .map(|f| f.name())
            .collect::<Vec<_>>()
            .join(","),
        args.hosts,
        out.display()
    );
    let step = Duration::from_secs(args.step_timeout_s);
    let t0 = Instant::now();
    let mut c = Cluster::start(&args, &out, seed)?;
    let mut report = Report::new(seed, t0);
    report.channel = (
        Duration::from_millis(args.channel_delay_ms),
        Duration::from_millis(args.channel_jitter_ms),
    );
    report.hosts = match args.hosts {
        Hosts::Local => "local (processes on this host)",
        Hosts::Netns => "netns (namespaces on one LAN)",
    };
    c.wait_protected(step, &stop).with_context(|| {
        let card = match (args.guest_net(), &args.restore) {
            (Some(net), Some(_)) => format!(
                " (the sides give the guest --net {net}: the snapshot must have been taken \
                 with that card, or run with --no-tcp)"
            ),
            (None, Some(_)) if args.hosts == Hosts::Netns => {
                " (with --no-tcp the guest has no network card: the snapshot must have none)".into()
            }
            _ => String::new(),
        };
        format!("the pair did not form{card}")
    })?;
    eprintln!(
        "vmft drill: the pair is protected after {:.1} s",
        t0.elapsed().as_secs_f64()
    );
    let mut problem: Option<String> = None;
    let mut tcp = match args.no_stream_reason() {
        Some(why) => {
            eprintln!("vmft drill: no TCP stream ({why})");
            report.tcp = Tcp::NotChecked(why.into());
            None
        }
        None => match open_stream(&c, t0, &args, step) {
            Ok(s) => Some(s),
            Err(e) => {
                let why = format!("{e:#}");
                problem = Some(format!("tcp stream: no connection: {why}"));
                report.tcp = Tcp::NoConnection(why);
                None
            }
        },
    };
    for n in 1..=args.rounds {
        if problem.is_some() {
            break;
        }
        if stop.requested().is_some() {
            problem.get_or_insert("the drill was stopped".into());
            break;
        }
        let fault = args.faults[(n as usize - 1) % args.faults.len()];
        // A random moment, then right after the next line of output: the
        // moment the output rule matters most.
        std::thread::sleep(rng.ms(300, 2500));
        if !c.wait_for_output(OUTPUT_STALL) {
            problem.get_or_insert(format!(
                "before round {n}: the guest printed nothing for {} s (output stalled)",
                OUTPUT_STALL.as_secs()
            ));
            break;
        }
        std::thread::sleep(rng.ms(0, 50));
        let mut round = Round::new(n, fault, t0.elapsed());
        let r = c.round(fault, &mut round, step, &mut rng);
        round.lag = c.take_lag_samples();
        eprintln!("vmft drill: {}", round.line());
        let failed = r
            .as_ref()
            .err()
            .map(|e| format!("round {n} ({}): {e:#}", fault.name()));
        report.rounds.push(round);
        if let Some(p) = failed {
            problem.get_or_insert(p);
            break;
        }
        if let Some(d) = c.divergence() {
            problem.get_or_insert(format!("round {n}: a backup diverged: {d}"));
            break;
        }
        if let Some(why) = tcp.as_ref().and_then(TcpStream::problem) {
            problem.get_or_insert(format!("round {n} ({}): tcp stream: {why}", fault.name()));
            break;
        }
    }
    // Output goes on after the last round too.
    if problem.is_none() && !c.wait_for_output(OUTPUT_STALL) {
        problem = Some(format!(
            "after the last round the guest printed nothing for {} s (output stalled)",
            OUTPUT_STALL.as_secs()
        ));
    }
    // The stream's end while the guest still runs: every line echoed,
    // then a clean close.
    if let Some(s) = tcp.as_mut() {
        s.finish();
        let f = s.figures();
        if let Some(why) = &f.broken {
            problem.get_or_insert(format!("tcp stream: {why}"));
        }
        report.tcp = Tcp::Checked(f);
    }
    drop(tcp);
    // The end: a clean stop, then the transcript's audit.
    let stopped = c.stop_cleanly(step);
    if let Err(e) = &stopped {
        problem.get_or_insert(format!("the clean stop at the end: {e:#}"));
    }
    let transcript = c.transcript();
    let audit = audit_drill(&transcript);
    report.audit = Some(audit.clone());
    report.elapsed = t0.elapsed();
    if let Some(p) = &audit.first_problem {
        problem.get_or_insert(format!("transcript: {p}"));
    }
    if audit.lines == 0 {
        problem.get_or_insert(
            "the transcript has no drill line: is the guest running the `drill` workload?".into(),
        );
    }
    report.problem = problem;
    let (table, verdict) = (report.table(), report.verdict());
    print!("{table}");
    std::fs::write(out.join("report.txt"), format!("{table}{verdict}\n"))?;
    std::fs::write(out.join("rounds.tsv"), report.tsv())?;
    std::fs::write(out.join("drill.svg"), report.svg())?;
    println!("picture: {}", out.join("drill.svg").display());
    println!("{verdict}");
    drop(c);
    Ok(if report.passed() { 0 } else { 1 })
}

impl Cluster {
    /// One round: inject `fault`, wait for the survivor to go live, check
    /// the other side, re-protect.
    fn round(
        &mut self,
        fault: Fault,
        round: &mut Round,
        step: Duration,
        rng: &mut Rng,
    ) -> Result<()> {
        let (live, backup) = (self.live(), self.backup());
        round.out_delay = self.status_of(&live).and_then(|s| s.output_delay_ms);
        let at = Instant::now();
        let survivor = match fault {
            Fault::Kill => {
                self.kill9(&live);
                self.cut_links_of(&live);
                backup.clone()
            }
            Fault::Backup => {
                self.kill9(&backup);
                self.cut_links_of(&backup);
                live.clone()
            }
            Fault::Stop => {
                self.signal(&live, libc::SIGSTOP);
                backup.clone()
            }
            Fault::Partition => {
                self.partition_pair()?;
                String::new()
            }
            Fault::Arbiter | Fault::EtcdMember | Fault::EtcdMajority => {
                // The arbiter first: the backup must find it down.
                match fault {
                    Fault::EtcdMember => self.kill_etcd_members(1),
                    Fault::EtcdMajority => self.kill_etcd_members(2),
                    _ => self.stop_arbiter(),
                }
                self.kill9(&live);
                self.cut_links_of(&live);
                std::thread::sleep(self.timeout() + rng.ms(500, 1500));
                self.start_arbiter()?;
                backup.clone()
            }
        };
        // The survivor goes live: its claim is won.
        let (winner, won_at) = self
            .wait_event(step, |e, side| {
                matches!(e, Event::Alone) && (survivor.is_empty() || side == survivor)
            })
            .with_context(|| format!("no side went live after the fault ({} s)", step.as_secs()))?;
        round.go_live = Some(won_at.saturating_duration_since(at));
        round.survivor = winner.clone();
        let other = if winner == live { backup } else { live };
        // The other side: gone, or it must stop itself (claim lost or
        // fenced) without releasing anything more.
        match fault {
            Fault::Stop => {
                std::thread::sleep(Duration::from_millis(500));
                self.signal(&other, libc::SIGCONT);
                self.expect_fenced(&other, step, round)?;
            }
            Fault::Partition => {
                self.expect_fenced(&other, step, round)?;
                self.heal()?;
            }
            _ => {}
        }
        // Two sides won a claim for one generation? The arbiter forbids
        // it; the drill checks.
        if self.winners_since(at) > 1 {
            round.double_live += 1;
            bail!("two sides won a claim in this round");
        }
        self.set_live(&winner);
        // Re-protection: a new backup joins the survivor.
        let t = Instant::now();
        let done = self.reprotect(&winner, step)?;
        round.reprotect = Some(t.elapsed());
        round.pause = done.pause;
        round.transfer_bytes = done.bytes;
        round.copy_rounds = done.rounds;
        Ok(())
    }
}
