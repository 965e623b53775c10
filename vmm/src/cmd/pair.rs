//! `vmft primary` and `vmft backup`: the two sides of a fault-tolerant pair.
//!
//! The primary dials the backup (`--backup ADDR`), runs the guest and
//! streams the log over the authenticated channel; its console output is
//! held until the backup has acknowledged the log behind it. The backup
//! (`--listen ADDR`) replays the log as it arrives and, when the primary
//! fails, replays everything it received, claims the VM's generation at the
//! arbiter and goes live only if it wins.

use std::io;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use clap::Args;

use ft_log::channel::{
    load_token_file, BackupLink, BackupListener, ChannelConfig, JoinListener, PrimaryLink,
};
use vmm::api::ApiServer;
use vmm::console::{read_token_file, ConsoleLink, Hello, Role as ConsoleRole};
use vmm::ft::claim::{ArbiterAddr, Claimant};
use vmm::ft::console_side::ConsoleSide;
use vmm::ft::output::{HeldOutput, IntoHeld, OutputTail, Release, ToWriter};
use vmm::ft::pair::{BackupHooks, LogLink, OnWon, PrimaryHooks, PrimaryStats, TakeOver};
use vmm::ft::status::{Role, State, StatusBoard};
use vmm::nondet::{DoorError, InputSource};
use vmm::record::{config_hash, config_hash_of_transfer, log_header, recorder_id, VmSource};
use vmm::replay::ReplayDoor;
use vmm::shared_disk::{FencedFlag, Fences, SharedDisks};
use vmm::stop::StopHandle;
use vmm::stop::StopReason;
use vmm::vm::{AfterTakeover, FtMode, LogSink, RunOptions, Vm};

use super::{boot_config, console_input, report_exit, BootArgs};

/// Options both sides take.
#[derive(Args, Clone)]
pub struct PairArgs {
    /// The VM's name: the arbiter's register is (name, generation).
    #[arg(long, default_value = "vmft")]
    pub vm: String,
    /// The arbiter: HOST:PORT (built-in server) or etcd://HOST:PORT,...
    #[arg(long)]
    pub arbiter: ArbiterAddr,
    /// The arbiter's token (default: $ARBITER_TOKEN).
    #[arg(long, value_name = "FILE")]
    pub arbiter_token_file: Option<PathBuf>,
    /// The logging channel's shared secret (both sides need the same file).
    #[arg(long, value_name = "FILE")]
    pub token_file: PathBuf,
    /// Heartbeat period on the channel, in ms.
    #[arg(long, default_value_t = 100)]
    pub heartbeat_ms: u64,
    /// Declare the other side failed after this long without hearing from
    /// it, in ms.
    #[arg(long, default_value_t = 2000)]
    pub timeout_ms: u64,
    /// Print statistics at the end.
    #[arg(long)]
    pub stats: bool,
    /// Start from this snapshot instead of booting (both sides need the
    /// same file).
    #[arg(long, value_name = "FILE")]
    pub restore: Option<PathBuf>,
    /// Do not read console input from stdin.
    #[arg(long)]
    pub no_stdin: bool,
    /// The console endpoint (`vmft console --listen`): output goes there,
    /// exactly once across failover, and input comes from there. Without
    /// it, the live side uses its own stdout and stdin.
    #[arg(long, value_name = "ADDR")]
    pub console: Option<String>,
    /// The control socket (HTTP/JSON; `vmft status` reads it). Default:
    /// VM-ROLE-PID.sock in $XDG_RUNTIME_DIR/vmft, else /run/vmft for root
    /// or /tmp/vmft-UID.
    #[arg(long, value_name = "PATH")]
    pub api_sock: Option<PathBuf>,
    /// Also serve the status as Prometheus metrics on ADDR (GET /metrics).
    #[arg(long, value_name = "ADDR")]
    pub metrics: Option<String>,
    /// Send a joining backup its state at most this fast, in MB/s
    /// (default: as fast as the link goes).
    #[arg(long, value_name = "MB_PER_S")]
    pub transfer_mbps: Option<f64>,
}

impl PairArgs {
    /// `--transfer-mbps` in bytes per second.
    fn transfer_rate(&self) -> Option<u64> {
        self.transfer_mbps.map(|m| (m * 1e6) as u64)
    }
}

/// Serve `board` on the control socket (and the metrics address).
fn start_api(pair: &PairArgs, role: &str, board: &StatusBoard) -> Result<ApiServer> {
    let path = pair
        .api_sock
        .clone()
        .unwrap_or_else(|| vmm::api::default_path(&pair.vm, role));
    let server = ApiServer::start(&path, board.clone())?;
    eprintln!("vmft: control socket at {}", path.display());
    if let Some(addr) = &pair.metrics {
        let bound = vmm::api::serve_metrics(addr, board.clone())?;
        eprintln!("vmft: Prometheus metrics at http://{bound}/metrics");
    }
    Ok(server)
}

/// Connect to the console endpoint, if one is given.
fn console_side(
    pair: &PairArgs,
    generation: u64,
    role: ConsoleRole,
    claimant: &str,
) -> Result<Option<ConsoleSide>> {
    let Some(addr) = &pair.console else {
        return Ok(None);
    };
    let token = read_token_file(&pair.token_file)?;
    let hello = Hello {
        vm: pair.vm.clone(),
        generation,
        role,
        claimant: claimant.to_string(),
        next_offset: 0,
        won_claim: false,
        input_resume_seq: 1,
    };
    let link = ConsoleLink::connect(addr, &token, hello)
        .with_context(|| format!("cannot reach the console at {addr}"))?;
    Ok(Some(ConsoleSide::new(link)))
}

/// `vmft primary`.
#[derive(Args)]
pub struct PrimaryArgs {
    /// The backup's listening address.
    #[arg(long)]
    pub backup: String,
    /// Accept a new backup here (`vmft backup --join ADDR`) once the first
    /// one is lost: re-protection by a state transfer.
    #[arg(long, value_name = "ADDR")]
    pub listen: Option<String>,
    #[command(flatten)]
    pub pair: PairArgs,
    #[command(flatten)]
    pub boot: BootArgs,
    /// Longest exit-free stretch, in ms, before an epoch delivers a waiting interrupt.
    #[arg(long, default_value_t = 10)]
    pub epoch_ms: u64,
    /// Most log bytes sent and not yet acknowledged before the guest waits.
    #[arg(long, default_value_t = 64 << 20)]
    pub window: u64,
    /// Most exits the backup may trail before the guest waits.
    #[arg(long, default_value_t = 200_000)]
    pub max_lag_exits: u64,
}

/// `vmft backup`.
#[derive(Args, Clone)]
pub struct BackupArgs {
    /// Where to wait for the primary; once this side is live, new backups
    /// join it here (with `--join`: only the latter).
    #[arg(long, required_unless_present = "join")]
    pub listen: Option<String>,
    /// Join a running primary instead (`vmft primary --listen ADDR`): it
    /// sends its state, then its log (re-protection). The VM comes from
    /// the primary: kernel and `--restore` are not used.
    #[arg(long, value_name = "ADDR")]
    pub join: Option<String>,
    /// On a divergence, ask the primary listening here (its `--listen`)
    /// for a fresh state instead of stopping (default with `--join`: the
    /// address joined).
    #[arg(long, value_name = "ADDR")]
    pub repair_from: Option<String>,
    /// Once live, record for a future backup: the log goes to FILE and the
    /// state at the takeover to FILE.snap (`vmft replay --restore
    /// FILE.snap --log FILE` replays the run after the failover).
    #[arg(long, value_name = "FILE")]
    pub takeover_log: Option<PathBuf>,
    /// Once recording after a takeover: longest exit-free stretch, in ms,
    /// before an epoch delivers a waiting interrupt.
    #[arg(long, default_value_t = 10)]
    pub epoch_ms: u64,
    #[command(flatten)]
    pub pair: PairArgs,
    #[command(flatten)]
    pub boot: BootArgs,
}

fn arbiter_token(args: &PairArgs) -> Result<Vec<u8>> {
    match &args.arbiter_token_file {
        Some(p) => Ok(load_token_file(p)?),
        None => Ok(std::env::var("ARBITER_TOKEN")
            .map(String::into_bytes)
            .unwrap_or_default()),
    }
}

fn vm_source(pair: &PairArgs, boot: BootArgs) -> Result<VmSource> {
    Ok(match &pair.restore {
        Some(snap) => VmSource::Restore {
            snapshot: snap.clone(),
            disks: boot.disks.clone(),
            nets: boot.nets.clone(),
        },
        None => {
            let cfg = boot_config(boot)?;
            vmm::boot::detect_format(&cfg.kernel).context("cannot boot")?;
            VmSource::Boot(cfg)
        }
    })
}

fn channel_config(pair: &PairArgs, secret: Vec<u8>, hash: String) -> ChannelConfig {
    ChannelConfig::new(secret, pair.vm.clone(), hash).with_timing(
        Duration::from_millis(pair.heartbeat_ms),
        Duration::from_millis(pair.timeout_ms),
    )
}

/// The configuration hash both sides offer in a join's handshake: the
/// joining backup learns the real one from the state transfer.
fn join_hash(vm: &str) -> String {
    format!("join:{vm}")
}

/// The channel configuration for joins, from the pair's `cfg`.
fn join_config(pair: &PairArgs, cfg: ChannelConfig) -> ChannelConfig {
    ChannelConfig {
        config_hash: join_hash(&pair.vm),
        ..cfg
    }
}

/// How a held output stream learns that the backup has the log up to a
/// barrier. A backup that is gone acknowledges nothing more: the waiter
/// sleeps until the claim's outcome turns the release mode Free or Halt.
fn ack_waiter(link: &LogLink) -> Box<dyn Fn(u64, Duration) -> bool + Send> {
    let acks = link.clone();
    Box::new(move |barrier, t| match acks.wait_acked(barrier, t) {
        Ok(acked) => acked,
        Err(_) => {
            std::thread::sleep(t);
            false
        }
    })
}

/// The shared disks of `source`, if it has any, with their fences for a
/// side of `generation` named `me`.
fn shared_disks(
    source: &VmSource,
    generation: u64,
    me: &str,
) -> Result<Option<(SharedDisks, Fences)>> {
    let disks = SharedDisks::open(source.disks()).context("cannot open the shared disk")?;
    if !disks.any() {
        return Ok(None);
    }
    let fences = disks
        .fences(generation, me)
        .context("cannot open the shared disk's fence")?;
    Ok(Some((disks, fences)))
}

/// A side that ends as a primary with shared disks: its last writes are
/// released once the backup has the end entry. If the backup did not
/// acknowledge them, either it is gone (then this side claims the VM, at
/// the pair's current generation, and writes them) or it will go live
/// (then it wins the claim and writes them itself: a lost claim).
fn last_shared_writes(
    pair: &PairArgs,
    claimant: &Mutex<Claimant>,
    fences: &Fences,
    fenced: &FencedFlag,
    held: &HeldOutput,
) -> Result<(), DoorError> {
    if held.drain(Duration::from_secs(30)) {
        return Ok(());
    }
    let generation = fences.generation();
    eprintln!(
        "vmft: the backup did not acknowledge the last shared-disk writes: claiming \
         {} generation {generation} to write them",
        pair.vm
    );
    match vmm::ft::pair::claim_shared(claimant, &pair.vm, generation)? {
        arbiter::Decision::Won => {
            fences
                .claim()
                .map_err(|e| DoorError::Fenced(e.to_string()))?;
            held.set_mode(vmm::ft::output::ReleaseMode::Free);
            if held.drain(Duration::from_secs(30)) {
                return Ok(());
            }
            Err(match fenced.get() {
                Some(f) if f.fenced => DoorError::Fenced(f.message),
                why => DoorError::Ft(format!(
                    "{} bytes of shared-disk writes were not written{}",
                    held.held(),
                    why.map(|f| format!(": {}", f.message)).unwrap_or_default()
                )),
            })
        }
        arbiter::Decision::Lost { owner } => Err(DoorError::LostClaim {
            vm: pair.vm.clone(),
            generation,
            owner,
        }),
    }
}

/// What the console is told at the end of a side that was live (`result`,
/// then the last shared-disk writes, `shared_end`), if anything. `None`
/// when another side is live and speaks for the VM: this side lost a claim
/// (exit status 3) or was fenced off a shared disk (5). A live side that
/// lost the claim to its own new backup (a partition) must not end the
/// console's session before the winner says it is live.
fn last_word(
    result: &Result<vmm::vm::VmExit, vmm::vm::VmError>,
    shared_end: &Result<(), DoorError>,
) -> Option<(String, i32)> {
    let another_side_live = |status: u8| matches!(status, 3 | 5);
    let (why, status) = match (result, shared_end) {
        (_, Err(e)) => (e.to_string(), e.exit_status()),
        (Err(e), Ok(())) => (e.to_string(), e.exit_status()),
        (Ok(exit), Ok(())) => (exit.to_string(), 0),
    };
    (!another_side_live(status)).then_some((why, status as i32))
}

fn stdout_release() -> Box<dyn Release> {
    Box::new(ToWriter(io::stdout()))
}

/// `vmft primary`: run the guest, stream the log, hold output for acks.
pub fn primary(args: PrimaryArgs, stop: StopHandle) -> Result<()> {
    let pair = args.pair.clone();
    let source = vm_source(&pair, args.boot)?;
    let header = log_header(&source).context("cannot start the primary")?;
    let secret = load_token_file(&pair.token_file)?;
    let generation = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(1);
    let kick = stop.clone();
    let mut cfg = channel_config(&pair, secret, header.config_hash.clone())
        .with_generation(generation)
        .with_on_failure(move || kick.kick());
    cfg.window = args.window;
    eprintln!(
        "vmft: primary of {} generation {generation}: connecting to the backup at {}",
        pair.vm, args.backup
    );
    // Everything that can fail on this side before the pair forms: a
    // missing or busy tap, an unusable shared disk or control socket must
    // not cost a failover.
    let tap = super::open_tap(source.nets())?;
    let claimant = Claimant::new(pair.arbiter.clone(), arbiter_token(&pair)?, "primary")?;
    let claimant_id = claimant.identity();
    // Shared with the hooks: the clean end may have to claim too.
    let claimant = Arc::new(Mutex::new(claimant));
    let shared = shared_disks(&source, generation, &claimant_id)?;
    if let Some((_, fences)) = &shared {
        // Sides of older pairs may no longer write.
        fences.join().context("cannot use the shared disk")?;
    }
    let board = StatusBoard::new(&pair.vm, Role::Primary, Some(args.backup.clone()));
    let _api = start_api(&pair, "primary", &board)?;
    // Joining backups: the listener is bound now, so a busy address is
    // found before the pair forms.
    let joins = match &args.listen {
        Some(addr) => {
            let l = JoinListener::bind(addr.as_str())
                .with_context(|| format!("cannot listen for joining backups on {addr}"))?;
            eprintln!(
                "vmft: a new backup can join on {}",
                l.local_addr()
                    .map(|a| a.to_string())
                    .unwrap_or_else(|_| addr.clone())
            );
            Some(l)
        }
        None => None,
    };
    let join_cfg = cfg.clone().with_hello(Vec::new());
    let link = PrimaryLink::connect(args.backup.as_str(), &cfg)
        .with_context(|| format!("cannot connect to the backup at {}", args.backup))?;
    eprintln!("vmft: connected to the backup; the VM is protected");
    let link = LogLink::new(link);
    let console = console_side(&pair, generation, ConsoleRole::Primary, &claimant_id)?;
    if let Some(c) = &console {
        let s = stop.clone();
        c.on_stop(move || {
            s.request(StopReason::Escape);
        });
    }
    let release: Box<dyn Release> = match &console {
        Some(c) => Box::new(c.clone()),
        None => stdout_release(),
    };
    let held = HeldOutput::start(0, release, ack_waiter(&link));
    // Frames the guest transmits are outputs too: held like console output.
    let net_held = tap.map(|tap| {
        let held = HeldOutput::start(
            0,
            Box::new(vmm::netio::TapSink::new(tap.clone())),
            ack_waiter(&link),
        );
        (tap, held)
    });
    // So are its writes to shared disks, behind the disks' fences.
    let disk_held = match shared {
        Some((disks, fences)) => {
            let sink = disks.sink_fenced(fences.clone());
            let fenced = sink.fenced_flag();
            let held = HeldOutput::start_strict(0, Box::new(sink), ack_waiter(&link));
            Some((disks, fences, fenced, held))
        }
        None => None,
    };
    let stats = Arc::new(Mutex::new(PrimaryStats::default()));
    let mut hooks = PrimaryHooks::new(
        pair.vm.clone(),
        generation,
        link.clone(),
        held.clone(),
        claimant.clone(),
        args.max_lag_exits,
        stats.clone(),
    );
    hooks = hooks.with_status(board.clone());
    if let Some(l) = joins {
        hooks = hooks
            .with_joins(l, join_config(&pair, join_cfg))
            .with_transfer_rate(pair.transfer_rate())
            .with_epoch_bound(Duration::from_millis(args.epoch_ms));
    }
    if let Some(c) = &console {
        hooks = hooks.with_console(c.clone());
    }
    if let Some((_, held)) = &net_held {
        hooks = hooks.with_net(held.clone());
    }
    if let Some((_, fences, _, held)) = &disk_held {
        hooks = hooks.with_shared_disks(held.clone(), fences.clone());
    }
    let (console_in, _raw) = match &console {
        Some(c) => (Some(Box::new(c.input()) as Box<dyn InputSource>), None),
        None => console_input(pair.no_stdin, &stop),
    };
    let net = net_held.as_ref().map(|(tap, held)| vmm::vm::NetIo {
        tap: Some(tap.clone()),
        out: Box::new(held.capture()),
        live_out: None,
    });
    let shared_disk = disk_held
        .as_ref()
        .map(|(disks, _, fenced, held)| vmm::vm::SharedDiskIo {
            disks: disks.clone(),
            out: Box::new(held.capture()),
            live_out: None,
            fenced: Some(fenced.clone()),
        });
    let opts = RunOptions {
        net,
        shared_disk,
        ft: FtMode::Record {
            log: LogSink::Stream {
                sink: Box::new(link.sink()),
                name: format!("the channel to {}", args.backup),
            },
            header,
            epoch_bound: Duration::from_millis(args.epoch_ms),
        },
        snapshot_on_ready: None,
        console_in,
        console_out: Box::new(held.capture()),
        stop: stop.clone(),
        pair: Some(Box::new(hooks)),
    };
    let mut vm = Vm::start(&source, opts).context("cannot start the VM")?;
    let result = vm.run();
    board.set_state(if result.is_ok() {
        State::Stopped
    } else {
        State::Halted
    });
    // The end entry is in the log: release the last output once the backup
    // has it, then close the channel cleanly.
    // A state transfer in progress finishes first: the end entry follows it.
    link.wait_transfer(Duration::from_secs(120));
    held.mark(link.written());
    if let Some((_, h)) = &net_held {
        h.mark(link.written());
    }
    if let Some((_, _, _, h)) = &disk_held {
        h.mark(link.written());
    }
    // A clean end closes the channel with End (the backup replays to the
    // end entry and stops); after an error the link is dropped without End,
    // so the backup takes over.
    let unprotected = link.is_dropped();
    let finished = match (&result, link.take()) {
        (Ok(_), Some(l)) if !unprotected => Some(l.finish()),
        _ => None,
    };
    if result.is_ok() && !held.drain(Duration::from_secs(30)) {
        eprintln!("vmft: warning: some console output was never acknowledged by the backup");
    }
    if let (Ok(_), Some((_, h))) = (&result, &net_held) {
        if !h.drain(Duration::from_secs(30)) {
            eprintln!(
                "vmft: warning: some transmitted frames were never acknowledged by the backup"
            );
        }
    }
    let shared_end = match (&result, &disk_held) {
        (Ok(_), Some((_, fences, fenced, h))) => {
            last_shared_writes(&pair, &claimant, fences, fenced, h)
        }
        _ => Ok(()),
    };
    if pair.stats {
        eprint!("{}", vm.stats.report(vm.unknown_ports()));
        let ls = link.stats();
        let ps = stats.lock().unwrap_or_else(|e| e.into_inner()).clone();
        eprintln!("vmft pair statistics (primary)\n  {ls:?}\n  {ps:?}");
        let os = held.stats();
        let mut d = os.delays.clone();
        d.sort();
        let pct = |p: f64| {
            d.get(((d.len() as f64 - 1.0) * p) as usize)
                .copied()
                .unwrap_or_default()
        };
        eprintln!(
            "  output delay added by the rule: p50 {:?} p99 {:?} ({} chunks, {} bytes)",
            pct(0.5),
            pct(0.99),
            d.len(),
            os.released
        );
    }
    // Only a clean end speaks for the VM: a primary that failed or lost
    // its claim leaves the console to the side that goes (or went) live.
    if let (Some(c), Ok(_)) = (&console, &result) {
        if let Some((why, status)) = last_word(&result, &shared_end) {
            c.done(&why, status);
        }
    }
    shared_end.context("the last shared-disk writes")?;
    let exit = result.context("the primary stopped")?;
    if let Some(Err(e)) = finished {
        eprintln!("vmft: the channel did not close cleanly: {e}");
    }
    report_exit(exit, &stop);
    eprintln!("vmft: exits {} epochs {}", vm.position().exit, vm.epochs());
    eprintln!("vmft: final state digest {}", vm.final_digest());
    Ok(())
}

/// `vmft backup`: wait for the primary, replay its log live, take over
/// when it fails.
pub fn backup(args: BackupArgs, stop: StopHandle) -> Result<()> {
    let repair_from = args.repair_from.clone().or_else(|| args.join.clone());
    let mut result = match args.join.clone() {
        Some(addr) => join(args.clone(), &addr, stop.clone(), Vec::new()),
        None => listen(args.clone(), stop.clone()),
    };
    // Divergence repair: instead of stopping, ask the primary for a fresh
    // state (a join at its --listen address) and carry on from it.
    let mut recent: std::collections::VecDeque<std::time::Instant> = Default::default();
    while let (Err(e), Some(addr)) = (&result, &repair_from) {
        if !is_divergence(e) || stop.requested().is_some() {
            break;
        }
        recent.retain(|t| t.elapsed() < Duration::from_secs(60));
        if recent.len() >= MAX_REPAIRS_PER_MINUTE {
            eprintln!(
                "vmft: {MAX_REPAIRS_PER_MINUTE} repairs within a minute: the guest diverges \
                 faster than it can be repaired; stopping"
            );
            break;
        }
        recent.push_back(std::time::Instant::now());
        let why = format!("{e:#}");
        eprintln!(
            "vmft: {why}: asking the primary at {addr} for a fresh state (divergence repair)"
        );
        result = join(
            args.clone(),
            addr,
            stop.clone(),
            format!("repair: {why}").into_bytes(),
        );
    }
    result
}

/// Most divergence repairs in a minute before a backup gives up.
const MAX_REPAIRS_PER_MINUTE: usize = 5;

/// Whether `e` is a divergence (exit status 4).
fn is_divergence(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<vmm::nondet::DoorError>()
            .is_some_and(|d| d.exit_status() == 4)
            || c.downcast_ref::<vmm::vm::VmError>()
                .is_some_and(|v| v.exit_status() == 4)
    })
}

/// `vmft backup --listen`: wait for the primary, then follow it.
fn listen(args: BackupArgs, stop: StopHandle) -> Result<()> {
    let pair = args.pair.clone();
    let listen = args.listen.clone().unwrap_or_default();
    let source = vm_source(&pair, args.boot.clone())?;
    if let Some(log) = &args.takeover_log {
        // A takeover log starts from the state at the takeover; a writable
        // disk would have to be copied at that instant too, which this
        // version does not do: refuse rather than write an unreplayable log.
        if source.disks().iter().any(|d| !d.read_only) {
            bail!(
                "--takeover-log with a writable --disk is not supported yet (the disk at the \
                 takeover would have to be kept with the log)"
            );
        }
        // Find a log that cannot be written now, not after the takeover
        // (an error then would end the VM that just survived).
        for p in [log.clone(), vmm::vm::takeover_snapshot_path(log)] {
            std::fs::File::create(&p)
                .with_context(|| format!("cannot create the takeover log file {}", p.display()))?;
        }
    }
    let hash = config_hash(&source).context("cannot start the backup")?;
    // The backup's own tap: opened now, so a missing or busy one is found
    // before the pair forms; read from and written to only once live.
    let tap = super::open_tap(source.nets())?;
    let secret = load_token_file(&pair.token_file)?;
    let listener = BackupListener::bind(listen.as_str())
        .with_context(|| format!("cannot listen on {listen}"))?;
    eprintln!(
        "vmft: backup of {}: waiting for the primary on {}",
        pair.vm,
        listener
            .local_addr()
            .map(|a| a.to_string())
            .unwrap_or_else(|_| listen.clone())
    );
    let cfg = channel_config(&pair, secret.clone(), hash.clone());
    let board = StatusBoard::new(&pair.vm, Role::Backup, None);
    let api = start_api(&pair, "backup", &board)?;
    // A peer that fails the handshake (no secret, garbage, another VM) is
    // refused and the backup keeps waiting for its primary.
    let link = loop {
        match listener.accept(&cfg) {
            Ok(link) => break Arc::new(link),
            Err(e) => eprintln!("vmft: refused a connection: {e}; still waiting for the primary"),
        }
    };
    eprintln!(
        "vmft: the primary connected: generation {}; replaying",
        link.generation()
    );
    let reader = link.log_reader();
    follow(
        args,
        Following {
            source,
            hash,
            tap,
            link,
            reader: Box::new(reader),
            board,
            _api: api,
            offsets: Default::default(),
            joins: Some((JoinListener::from_backup_listener(listener), secret)),
            state_file: None,
        },
        stop,
    )
}

/// A backup's outputs once it went live and may take a new backup: held
/// like a primary's, free until one joins.
struct PromotedOutputs {
    loglink: LogLink,
    held: HeldOutput,
    net_held: Option<HeldOutput>,
    /// Shared-disk writes, where their sink says it was fenced off, and
    /// the disks' fences.
    disk_held: Option<(HeldOutput, FencedFlag, Fences)>,
}

/// Where a backup's copies of the output streams begin.
#[derive(Debug, Clone, Copy, Default)]
struct Offsets {
    console: u64,
    frames: u64,
    disk: u64,
}

/// A backup whose pair has formed, ready to replay.
struct Following {
    /// What the VM starts from.
    source: VmSource,
    /// Its configuration hash (the log's must agree).
    hash: String,
    /// The backup's own tap.
    tap: Option<Arc<vmm::devices::virtio::Tap>>,
    link: Arc<BackupLink>,
    /// The log.
    reader: Box<dyn io::Read + Send>,
    board: StatusBoard,
    _api: ApiServer,
    offsets: Offsets,
    /// Where new backups join once this side went live, and the channel's
    /// secret for them.
    joins: Option<(JoinListener, Vec<u8>)>,
    /// A transferred state's file: removed once the VM is restored from it.
    state_file: Option<PathBuf>,
}

/// `vmft backup --join`: dial the running primary, receive its state, then
/// follow its log like any backup.
fn join(args: BackupArgs, addr: &str, stop: StopHandle, hello: Vec<u8>) -> Result<()> {
    let pair = args.pair.clone();
    if args.takeover_log.is_some() {
        bail!("--join and --takeover-log cannot be combined yet");
    }
    let tap = super::open_tap(&args.boot.nets)?;
    let secret = load_token_file(&pair.token_file)?;
    // Where new backups join once this side is live.
    let joins = match &args.listen {
        Some(l) => Some((
            JoinListener::bind(l.as_str())
                .with_context(|| format!("cannot listen for joining backups on {l}"))?,
            secret.clone(),
        )),
        None => None,
    };
    let cfg = join_config(&pair, channel_config(&pair, secret, String::new())).with_hello(hello);
    let board = StatusBoard::new(&pair.vm, Role::Backup, Some(addr.to_string()));
    let api = start_api(&pair, "backup", &board)?;
    eprintln!("vmft: backup of {}: joining the primary at {addr}", pair.vm);
    let link = Arc::new(
        BackupLink::join(addr, &cfg)
            .with_context(|| format!("cannot join the primary at {addr}"))?,
    );
    let generation = link.generation();
    board.set_generation(generation);
    board.set_state(State::Transfer);
    let t0 = std::time::Instant::now();
    let mut reader = link.log_reader();
    let mut last = t0;
    let mut round = 0;
    // The writable disks of this side's own take the primary's contents
    // (a shared disk is the primary's own image: nothing to copy).
    let own = |d: &&vmm::boot::DiskSpec| !d.read_only && !d.shared;
    let mut images = Vec::new();
    for d in args.boot.disks.iter().filter(own) {
        images.push(
            std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(&d.path)
                .with_context(|| {
                    format!("cannot open the disk {} for the copy", d.path.display())
                })?,
        );
    }
    if !images.is_empty() {
        eprintln!(
            "vmft: the writable disks ({}) are overwritten with the primary's",
            args.boot
                .disks
                .iter()
                .filter(own)
                .map(|d| d.path.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    let got = vmm::ft::transfer::receive(
        &mut reader,
        &images,
        &mut |p: &vmm::ft::transfer::Progress| {
            if last.elapsed() >= Duration::from_millis(500) || p.round != round {
                last = std::time::Instant::now();
                round = p.round;
                board.transfer(vmm::ft::status::TransferStatus {
                    generation,
                    bytes: p.bytes,
                    total: p.memory,
                    rounds: p.round + 1,
                    pause_ms: 0.0,
                    done: false,
                });
                eprintln!(
                    "vmft: state transfer: round {}, {} MB received ({:.0} MB/s; memory {} MB)",
                    p.round,
                    p.bytes >> 20,
                    p.bytes as f64 / 1e6 / t0.elapsed().as_secs_f64().max(1e-3),
                    p.memory >> 20
                );
            }
        },
    )
    .with_context(|| {
        format!(
            "the primary at {addr} did not send its state (it may have a backup already, \
             or it failed)"
        )
    })?;
    if got.generation != generation {
        bail!(
            "the state is for generation {}, the link for {generation}",
            got.generation
        );
    }
    board.transfer(vmm::ft::status::TransferStatus {
        generation,
        bytes: got.bytes,
        total: got.bytes,
        rounds: got.rounds,
        pause_ms: 0.0,
        done: true,
    });
    let dir = vmm::api::default_dir();
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let snap = dir.join(format!("{}-joined-{}.snap", pair.vm, std::process::id()));
    vmm::snapshot::write_file_bytes(&snap, &got.snapshot)
        .with_context(|| format!("cannot keep the state in {}", snap.display()))?;
    let source = VmSource::Restore {
        snapshot: snap.clone(),
        disks: args.boot.disks.clone(),
        nets: args.boot.nets.clone(),
    };
    // The log's header hashes the state the primary took in its pause
    // (vCPU and devices); memory came in checked batches.
    let hash = config_hash_of_transfer(&got.state, source.disks(), source.nets())
        .context("cannot start the backup")?;
    eprintln!(
        "vmft: state received ({} MB in {:.1} s, {} rounds, {} pages, {} disk chunks): generation {generation}; replaying",
        got.bytes >> 20,
        t0.elapsed().as_secs_f64(),
        got.rounds,
        got.pages,
        got.chunks
    );
    drop(images);
    let offsets = Offsets {
        console: got.offsets.console,
        frames: got.offsets.frames,
        disk: got.offsets.disk,
    };
    drop(got);
    let r = follow(
        args,
        Following {
            source,
            hash,
            tap,
            link,
            reader: Box::new(reader),
            board,
            _api: api,
            offsets,
            joins,
            state_file: Some(snap.clone()),
        },
        stop,
    );
    let _ = std::fs::remove_file(&snap);
    r
}

/// Replay the log of a formed pair, and take over when the primary fails.
fn follow(args: BackupArgs, f: Following, stop: StopHandle) -> Result<()> {
    let pair = args.pair.clone();
    let Following {
        source,
        hash,
        tap,
        link,
        reader,
        board,
        _api,
        offsets,
        joins,
        state_file,
    } = f;
    let generation = link.generation();
    board.set_generation(generation);
    board.set_state(State::Replaying);
    let mut door = ReplayDoor::from_reader(reader, "the channel".into())
        .context("cannot read the primary's log")?;
    let h = door.header().clone();
    if h.recorder != recorder_id() {
        bail!(
            "the primary is {:?}, this backup is {}",
            h.recorder,
            recorder_id()
        );
    }
    if h.config_hash != hash {
        bail!("the primary's log is for another VM configuration");
    }
    let tail = OutputTail::new(offsets.console);
    let t = tail.clone();
    door.on_released(Box::new(move |off| t.set_released(off)));
    let claimant = Claimant::new(pair.arbiter.clone(), arbiter_token(&pair)?, "backup")?;
    let claimant_id = claimant.identity();
    let claimant = Arc::new(Mutex::new(claimant));
    let console = console_side(&pair, generation, ConsoleRole::Backup, &claimant_id)?;
    if let Some(c) = &console {
        let s = stop.clone();
        c.on_stop(move || {
            s.request(StopReason::Escape);
        });
    }
    let went_live = Arc::new(AtomicBool::new(false));
    let live = went_live.clone();
    let (sink, on_won): (Box<dyn Release>, Option<OnWon>) = match &console {
        Some(c) => {
            let c2 = c.clone();
            let on_won: OnWon = Box::new(move |input_next| {
                live.store(true, Ordering::Release);
                if let Some(next) = input_next {
                    c2.resume_input(next);
                }
                c2.claimed(generation);
            });
            (Box::new(c.clone()), Some(on_won))
        }
        None => (stdout_release(), None),
    };
    // Once live, a new backup may join (re-protection): output then goes
    // through held output, free until a backup joins.
    let promoted = Arc::new(AtomicBool::new(false));
    let shared = shared_disks(&source, generation, &claimant_id)?;
    let reprotect = match joins {
        Some(_) if args.takeover_log.is_some() => {
            eprintln!("vmft: with --takeover-log, no backup can join once this side is live");
            None
        }
        Some((listener, secret)) => {
            let loglink = LogLink::none();
            let release: Box<dyn Release> = match &console {
                Some(c) => Box::new(c.clone()),
                None => stdout_release(),
            };
            let held = HeldOutput::start(0, release, ack_waiter(&loglink));
            let net_held = tap.as_ref().map(|tap| {
                HeldOutput::start(
                    0,
                    Box::new(vmm::netio::TapSink::new(tap.clone())),
                    ack_waiter(&loglink),
                )
            });
            let mut hooks = PrimaryHooks::new(
                pair.vm.clone(),
                generation,
                loglink.clone(),
                held.clone(),
                claimant.clone(),
                200_000,
                Arc::default(),
            )
            .unprotected()
            .with_status(board.clone())
            .with_epoch_bound(Duration::from_millis(args.epoch_ms));
            if let Some(c) = &console {
                hooks = hooks.with_console(c.clone());
            }
            if let Some(h) = &net_held {
                hooks = hooks.with_net(h.clone());
            }
            // Shared-disk writes too, behind the fences (moved to each new
            // pair's generation as a backup joins).
            let disk_held = shared.as_ref().map(|(disks, fences)| {
                let sink = disks.sink_fenced(fences.clone());
                let fenced = sink.fenced_flag();
                let held = HeldOutput::start_strict(0, Box::new(sink), ack_waiter(&loglink));
                (held, fenced, fences.clone())
            });
            if let Some((held, _, fences)) = &disk_held {
                hooks = hooks.with_shared_disks(held.clone(), fences.clone());
            }
            let kick = stop.clone();
            let cfg = join_config(&pair, channel_config(&pair, secret, String::new()))
                .with_on_failure(move || kick.kick());
            hooks = hooks
                .with_joins(listener, cfg)
                .with_transfer_rate(pair.transfer_rate());
            Some((
                PromotedOutputs {
                    loglink,
                    held,
                    net_held,
                    disk_held,
                },
                hooks,
            ))
        }
        None => None,
    };
    let sink: Box<dyn Release> = match &reprotect {
        Some((r, _)) => Box::new(IntoHeld(r.held.capture())),
        None => sink,
    };
    // Shared disks: the primary's writes not known to be written, kept;
    // written (behind the fences, claimed first) if this side goes live.
    let disk_tail = match shared {
        Some((disks, fences)) => {
            let tail = OutputTail::for_records(offsets.disk);
            let t = tail.clone();
            door.on_disk_released(Box::new(move |off| t.set_released(off)));
            let sink = disks.sink_fenced(fences.clone());
            // Once live, a side that may take a new backup writes through
            // its held output's sink: that one says if it was fenced off.
            let fenced = match reprotect.as_ref().and_then(|(r, _)| r.disk_held.as_ref()) {
                Some((_, f, _)) => f.clone(),
                None => sink.fenced_flag(),
            };
            Some((disks, fences, sink, fenced, tail))
        }
        None => None,
    };
    let shared_disk = disk_tail
        .as_ref()
        .map(|(disks, _, _, fenced, tail)| vmm::vm::SharedDiskIo {
            disks: disks.clone(),
            out: Box::new(tail.clone()),
            live_out: None,
            fenced: Some(fenced.clone()),
        });
    let net_tail = match tap {
        Some(tap) => {
            let tail = OutputTail::for_records(offsets.frames);
            let t = tail.clone();
            door.on_net_released(Box::new(move |off| t.set_released(off)));
            Some((tap, tail))
        }
        None => None,
    };
    let claimant_for_end = claimant.clone();
    let mut takeover = TakeOver {
        status: Some(board.clone()),
        disk: disk_tail
            .map(|(_, fences, sink, _, tail)| (tail, Box::new(sink) as Box<dyn Release>, fences)),
        net: net_tail.as_ref().map(|(tap, tail)| {
            let sink: Box<dyn Release> =
                match reprotect.as_ref().and_then(|(r, _)| r.net_held.as_ref()) {
                    Some(h) => Box::new(IntoHeld(h.capture())),
                    None => Box::new(vmm::netio::TapSink::new(tap.clone())),
                };
            (tail.clone(), sink)
        }),
        held: reprotect.as_ref().map(|(r, _)| r.held.clone()),
        net_held: reprotect.as_ref().and_then(|(r, _)| r.net_held.clone()),
        disk_held: reprotect
            .as_ref()
            .and_then(|(r, _)| r.disk_held.as_ref().map(|(h, f, _)| (h.clone(), f.clone()))),
        live: Some(promoted.clone()),
        vm: pair.vm.clone(),
        generation,
        link: link.clone(),
        claimant,
        tail: tail.clone(),
        sink: Some(sink),
        on_won,
    };
    door.gate_go_live(Box::new(move |end| takeover.gate(end)));
    let (console_in, _raw) = match &console {
        Some(c) => (Some(Box::new(c.input()) as Box<dyn InputSource>), None),
        None => console_input(pair.no_stdin, &stop),
    };
    let net = net_tail.map(|(tap, tail)| vmm::vm::NetIo {
        tap: Some(tap),
        out: Box::new(tail),
        live_out: None,
    });
    let promoted_outputs;
    let opts = RunOptions {
        net,
        shared_disk,
        ft: FtMode::Replay {
            door: Box::new(door),
            go_live: true,
            then: match args.takeover_log {
                Some(log) => AfterTakeover::Record {
                    log,
                    epoch_bound: Duration::from_millis(args.epoch_ms),
                },
                None => AfterTakeover::Live,
            },
            live_out: None,
        },
        snapshot_on_ready: None,
        console_in,
        console_out: Box::new(tail),
        stop: stop.clone(),
        pair: Some(Box::new({
            let mut hooks = BackupHooks::new(link.clone()).with_status(board.clone());
            if let Some(c) = &console {
                hooks = hooks.with_console(c.clone(), went_live.clone());
            }
            promoted_outputs = match reprotect {
                Some((outputs, primary)) => {
                    hooks = hooks.then_primary(primary, promoted.clone());
                    Some(outputs)
                }
                None => None,
            };
            hooks
        })),
    };
    let mut vm = Vm::start(&source, opts).context("cannot start the VM")?;
    if let Some(f) = &state_file {
        // The state is in the VM now; its file would hold a copy of guest
        // memory for the backup's whole life.
        let _ = std::fs::remove_file(f);
    }
    let result = vm.run();
    if result.is_ok() {
        board.set_state(State::Stopped);
    } else if board.snapshot().state != State::Halted {
        board.set_state(State::Halted);
    }
    // A side that went live and was joined by a new backup ends like a
    // primary: the last output once the new backup has the end entry, then
    // the channel closed cleanly (the new backup stops without a claim).
    let mut shared_end = Ok(());
    if let Some(p) = &promoted_outputs {
        let loglink = &p.loglink;
        loglink.wait_transfer(Duration::from_secs(120));
        p.held.mark(loglink.written());
        if let Some(h) = &p.net_held {
            h.mark(loglink.written());
        }
        if let Some((h, _, _)) = &p.disk_held {
            h.mark(loglink.written());
        }
        let unprotected = loglink.is_dropped();
        if let (Ok(_), Some(l), false) = (&result, loglink.take(), unprotected) {
            if let Err(e) = l.finish() {
                eprintln!("vmft: the channel to the new backup did not close cleanly: {e}");
            }
        }
        if result.is_ok() && !p.held.drain(Duration::from_secs(30)) {
            eprintln!(
                "vmft: warning: some console output was never acknowledged by the new backup"
            );
        }
        if let (Ok(_), Some(h)) = (&result, &p.net_held) {
            h.drain(Duration::from_secs(30));
        }
        if let (Ok(_), Some((h, fenced, fences))) = (&result, &p.disk_held) {
            shared_end = last_shared_writes(&pair, &claimant_for_end, fences, fenced, h);
        }
    }
    if pair.stats {
        eprint!("{}", vm.stats.report(vm.unknown_ports()));
        eprintln!("vmft pair statistics (backup)\n  {:?}", link.stats());
    }
    // Only a backup that went live speaks for the VM at the end.
    if let (Some(c), true) = (&console, went_live.load(Ordering::Acquire)) {
        if let Some((why, status)) = last_word(&result, &shared_end) {
            c.done(&why, status);
        }
    }
    shared_end.context("the last shared-disk writes")?;
    let exit = result.context("the backup stopped")?;
    report_exit(exit, &stop);
    eprintln!("vmft: exits {} epochs {}", vm.position().exit, vm.epochs());
    eprintln!("vmft: final state digest {}", vm.final_digest());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmm::vm::{VmError, VmExit};

    #[test]
    fn the_console_hears_the_end_only_from_a_side_when_no_other_is_live() {
        let halted = Ok(VmExit::Halted);
        assert_eq!(
            last_word(&halted, &Ok(())),
            Some(("guest halted (powered off)".to_string(), 0))
        );
        let failed = Err(DoorError::Ft(
            "3 bytes of shared-disk writes were not written".into(),
        ));
        assert_eq!(
            last_word(&halted, &failed).map(|(w, s)| (w.contains("not written"), s)),
            Some((true, 1))
        );
        // Another side is live and speaks: the backup won the claim for
        // those writes, or a newer side owns the disk.
        let lost = || DoorError::LostClaim {
            vm: "db".into(),
            generation: 12,
            owner: "backup:3:c".into(),
        };
        assert_eq!(last_word(&halted, &Err(lost())), None);
        let fenced = Err(DoorError::Fenced("generation 12 has spoken since".into()));
        assert_eq!(last_word(&halted, &fenced), None);
        // A live side that lost the claim to its new backup (a partition)
        // leaves the console to the winner.
        assert_eq!(last_word(&Err(VmError::Door(lost())), &Ok(())), None);
        let other = Err(VmError::Door(DoorError::Ft("the log broke".into())));
        assert_eq!(last_word(&other, &Ok(())).map(|(_, s)| s), Some(1));
    }
}
