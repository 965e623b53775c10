//! The `vmft` command.

use std::io;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use tracing_subscriber::EnvFilter;

use vmm::boot::BootConfig;
use vmm::image::{self, DEFAULT_MEM_MIB, DEFAULT_WORKLOAD};
use vmm::record::{config_hash, log_header, recorder_id};
use vmm::replay::ReplayDoor;
use vmm::stop::{self, StopHandle, StopReason};
use vmm::terminal::{EscapeReader, RawTerminal, ESCAPE_HELP};
use vmm::vm::{FtMode, RunOptions, Vm, VmExit};

/// vmft: a fault-tolerant Linux VM on KVM.
#[derive(Parser)]
#[command(
    name = "vmft",
    version,
    about,
    after_help = "Console: while a VM runs with its console on a terminal, every key goes to the \
guest (Ctrl-C, Ctrl-Z and Ctrl-\\ included). Ctrl-A x leaves: the VM stops cleanly and a \
recording is closed with its end entry. Ctrl-A Ctrl-A sends Ctrl-A. SIGTERM, SIGINT and SIGHUP \
stop the VM the same way."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Boot one VM (no fault tolerance). With no options, boots the default guest image.
    Run(RunArgs),
    /// Run the VM as the primary and log every nondeterministic input it is handed.
    Record(RecordArgs),
    /// Re-execute a recorded log, checking every exit against the primary's.
    Replay(ReplayArgs),
    /// Print the entries of a log (optionally only those around some exits).
    Log(LogArgs),
    /// Build the default guest image if needed and print its paths.
    Image,
}

#[derive(Args)]
struct LogArgs {
    /// Log file.
    #[arg(long)]
    log: PathBuf,
    /// First exit number to show.
    #[arg(long, default_value_t = 0)]
    from: u64,
    /// Last exit number to show.
    #[arg(long, default_value_t = u64::MAX)]
    to: u64,
}

fn show_log(args: LogArgs) -> Result<()> {
    use ft_log::Entry;
    use std::io::Read;
    let mut f = std::fs::File::open(&args.log)
        .with_context(|| format!("cannot open {}", args.log.display()))?;
    let mut d = ft_log::Decoder::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut header_shown = false;
    loop {
        let n = f.read(&mut buf)?;
        d.push(&buf[..n]);
        if !header_shown {
            if let Some(h) = d
                .header()
                .with_context(|| format!("log {}", args.log.display()))?
            {
                println!("header: {h:?}");
                header_shown = true;
            }
        }
        while let Some(fr) = d
            .next_frame()
            .with_context(|| format!("log {}", args.log.display()))?
        {
            let (lo, hi) = match &fr.entry {
                Entry::Exits { first, exits } => (
                    *first,
                    first.saturating_add((exits.len() as u64).saturating_sub(1)),
                ),
                Entry::Value { pos, .. }
                | Entry::Timer { pos, .. }
                | Entry::ConsoleInput { pos, .. }
                | Entry::Interrupt { pos, .. }
                | Entry::Check { pos, .. }
                | Entry::End { pos, .. } => (*pos, *pos),
                Entry::Epoch(e) => (e.pos, e.pos),
                Entry::EpochPages { pos, .. } => (*pos, *pos),
            };
            if hi < args.from || lo > args.to {
                continue;
            }
            match &fr.entry {
                Entry::Exits { first, exits } => {
                    for (i, x) in exits.iter().enumerate() {
                        let n = first.saturating_add(i as u64);
                        if n >= args.from && n <= args.to {
                            println!(
                                "#{} exit {n}: {:?} {:#x} {:#x}",
                                fr.seq, x.kind, x.addr, x.data
                            );
                        }
                    }
                }
                Entry::Epoch(e) => println!(
                    "#{} epoch {} after exit {}: {} pages, {:x?}",
                    fr.seq,
                    e.index,
                    e.pos,
                    e.pages.len(),
                    e.fingerprint
                ),
                Entry::EpochPages { pos, index, pages } => println!(
                    "#{} part of epoch {index} after exit {pos}: {} pages",
                    fr.seq,
                    pages.len()
                ),
                other => println!("#{} {other:?}", fr.seq),
            }
        }
        if n == 0 {
            d.finish()
                .with_context(|| format!("log {}", args.log.display()))?;
            return Ok(());
        }
    }
}

#[derive(Args)]
struct BootArgs {
    /// Kernel: uncompressed vmlinux ELF (default) or bzImage.
    #[arg(long)]
    kernel: Option<PathBuf>,
    /// Initramfs (cpio). Defaults to the default image's when --kernel is not given.
    #[arg(long)]
    initrd: Option<PathBuf>,
    /// Guest memory in MiB.
    #[arg(long, default_value_t = DEFAULT_MEM_MIB)]
    mem: u64,
    /// Extra kernel command line, appended to the defaults.
    #[arg(long)]
    append: Option<String>,
    /// Workload the default guest runs: compute, counter, echo, shell or sleep
    /// (the default initramfs's; any name with --initrd).
    #[arg(long, default_value = DEFAULT_WORKLOAD)]
    workload: String,
}

#[derive(Args)]
struct RunArgs {
    #[command(flatten)]
    boot: BootArgs,
    /// Print boot time and exit counts at the end.
    #[arg(long)]
    stats: bool,
    /// Save a snapshot of the whole VM when the guest prints its ready marker.
    #[arg(long, value_name = "FILE")]
    snapshot_on_ready: Option<PathBuf>,
    /// Resume from a snapshot instead of booting.
    #[arg(long, value_name = "FILE", conflicts_with_all = ["kernel", "initrd", "append", "snapshot_on_ready"])]
    restore: Option<PathBuf>,
    /// Do not read console input from stdin.
    #[arg(long)]
    no_stdin: bool,
}

#[derive(Args)]
struct RecordArgs {
    #[command(flatten)]
    boot: BootArgs,
    /// Log file to write.
    #[arg(long)]
    log: PathBuf,
    /// Longest exit-free stretch, in ms, before an epoch delivers a waiting interrupt.
    #[arg(long, default_value_t = 10)]
    epoch_ms: u64,
    /// Print boot, exit and log statistics at the end.
    #[arg(long)]
    stats: bool,
    /// Do not read console input from stdin.
    #[arg(long)]
    no_stdin: bool,
}

#[derive(Args)]
struct ReplayArgs {
    /// Log file to replay (`-` reads the log as a stream from stdin).
    #[arg(long)]
    log: PathBuf,
    /// Write the guest's console output here (default: suppressed).
    #[arg(long, value_name = "FILE")]
    serial_out: Option<PathBuf>,
    /// Use this kernel instead of the one named in the log (must match its hash).
    #[arg(long)]
    kernel: Option<PathBuf>,
    /// Use this initramfs instead of the one named in the log (must match its hash).
    #[arg(long)]
    initrd: Option<PathBuf>,
    /// Print exit statistics at the end.
    #[arg(long)]
    stats: bool,
    /// If the log ends without an end entry (the primary stopped), continue
    /// the VM live from there: console on stdout and stdin.
    #[arg(long)]
    go_live: bool,
}

fn boot_config(args: BootArgs) -> Result<BootConfig> {
    if args.initrd.is_none() {
        image::check_workload(&args.workload)?;
    }
    let (kernel, initrd) = match args.kernel {
        Some(k) => (k, args.initrd),
        None => {
            let img = image::default_image().context("cannot prepare the default guest image")?;
            (img.kernel, Some(args.initrd.unwrap_or(img.initrd)))
        }
    };
    let mut cmdline = format!("{} vmft.workload={}", image::base_cmdline(), args.workload);
    if let Some(extra) = &args.append {
        cmdline.push(' ');
        cmdline.push_str(extra);
    }
    Ok(BootConfig {
        kernel,
        initrd,
        mem_mib: args.mem,
        cmdline,
    })
}

/// The console on stdin and stdout: when stdin is a terminal, raw mode
/// (every key to the guest) and the escape (Ctrl-A x stops the VM cleanly
/// through `stop`); otherwise stdin as it is. Enter it right before the VM
/// starts: until then Ctrl-C still interrupts vmft itself.
fn console_input(
    no_stdin: bool,
    stop: &StopHandle,
) -> (Option<Box<dyn io::Read + Send>>, Option<RawTerminal>) {
    if no_stdin {
        return (None, None);
    }
    match RawTerminal::enter() {
        Some(raw) => {
            eprintln!("vmft: {ESCAPE_HELP}");
            let stop = stop.clone();
            let on_leave = Box::new(move || {
                stop.request(StopReason::Escape);
            });
            (
                Some(Box::new(EscapeReader::new(io::stdin(), on_leave))),
                Some(raw),
            )
        }
        None => (Some(Box::new(io::stdin())), None),
    }
}

/// How a run ended, for the user.
fn report_exit(exit: VmExit, stop: &StopHandle) {
    match (exit, stop.requested()) {
        (VmExit::Stopped, Some(reason)) => eprintln!("vmft: {exit} ({reason})"),
        _ => eprintln!("vmft: {exit}"),
    }
}

fn run(args: RunArgs, stop: StopHandle) -> Result<()> {
    let cfg = match &args.restore {
        Some(_) => None,
        None => Some(boot_config(args.boot)?),
    };
    let (console_in, _raw) = console_input(args.no_stdin, &stop);
    let opts = RunOptions {
        ft: FtMode::Live,
        snapshot_on_ready: args.snapshot_on_ready.clone(),
        console_in,
        console_out: Box::new(io::stdout()),
        stop: stop.clone(),
    };
    let mut vm = match (&args.restore, &cfg) {
        (Some(snap), _) => Vm::restore(snap, opts).context("cannot restore")?,
        (None, Some(cfg)) => Vm::boot(cfg, opts).context("cannot boot")?,
        (None, None) => unreachable!("a boot configuration when not restoring"),
    };
    let result = vm.run();
    if args.stats {
        eprint!("{}", vm.stats.report(vm.unknown_ports()));
    }
    report_exit(result?, &stop);
    Ok(())
}

fn record(args: RecordArgs, stop: StopHandle) -> Result<()> {
    let cfg = boot_config(args.boot)?;
    // A missing or foreign kernel is reported by boot; hash only what exists.
    vmm::boot::detect_format(&cfg.kernel).context("cannot boot")?;
    let header = log_header(&cfg).context("cannot read the kernel or initramfs")?;
    let (console_in, _raw) = console_input(args.no_stdin, &stop);
    let opts = RunOptions {
        ft: FtMode::Record {
            log: args.log.clone(),
            header,
            epoch_bound: Duration::from_millis(args.epoch_ms),
        },
        snapshot_on_ready: None,
        console_in,
        console_out: Box::new(io::stdout()),
        stop: stop.clone(),
    };
    let mut vm = Vm::boot(&cfg, opts).context("cannot boot")?;
    let result = vm.run();
    let elapsed = vm.stats.started.elapsed().as_secs_f64();
    if args.stats {
        eprint!("{}", vm.stats.report(vm.unknown_ports()));
        if let Some(rs) = vm.record_stats() {
            eprint!("{}", rs.report(elapsed));
        }
    }
    let exit = result.with_context(|| format!("recording to {} failed", args.log.display()))?;
    report_exit(exit, &stop);
    eprintln!("vmft: exits {} epochs {}", vm.position().exit, vm.epochs());
    eprintln!("vmft: final state digest {}", vm.final_digest());
    Ok(())
}

/// The first 16 characters of a hash (all of it if shorter: it may come
/// from a damaged log header).
fn short(hash: &str) -> &str {
    hash.get(..16).unwrap_or(hash)
}

fn replay(args: ReplayArgs, stop: StopHandle) -> Result<()> {
    let door = if args.log.as_os_str() == "-" {
        ReplayDoor::from_reader(Box::new(io::stdin()), "stdin".into())
    } else {
        ReplayDoor::open(&args.log)
    }
    .context("cannot replay")?;
    let h = door.header().clone();
    if h.recorder != recorder_id() {
        bail!(
            "cannot replay: log {} was recorded by {:?}, this is {}; replay it with the vmft that recorded it",
            args.log.display(),
            h.recorder,
            recorder_id()
        );
    }
    let cfg = BootConfig {
        kernel: args.kernel.unwrap_or_else(|| PathBuf::from(&h.kernel)),
        initrd: args.initrd.or_else(|| h.initrd.as_ref().map(PathBuf::from)),
        mem_mib: h.mem_mib,
        cmdline: h.cmdline.clone(),
    };
    vmm::boot::detect_format(&cfg.kernel).context("cannot replay")?;
    let hash = config_hash(&cfg).context("cannot read the kernel or initramfs")?;
    if hash != h.config_hash {
        bail!(
            "log {} was recorded for another VM configuration (kernel {}, initramfs {}): \
             its configuration hash is {}, this one's is {}",
            args.log.display(),
            cfg.kernel.display(),
            cfg.initrd
                .as_ref()
                .map(|p| p.display().to_string())
                .unwrap_or_else(|| "none".into()),
            short(&h.config_hash),
            short(&hash)
        );
    }
    let console_out: Box<dyn io::Write + Send> = match &args.serial_out {
        Some(p) => Box::new(
            std::fs::File::create(p).with_context(|| format!("cannot create {}", p.display()))?,
        ),
        None => Box::new(io::sink()),
    };
    let live_out: Option<Box<dyn io::Write + Send>> = if args.go_live {
        Some(Box::new(io::stdout()))
    } else {
        None
    };
    if args.go_live && args.log.as_os_str() == "-" {
        bail!("--go-live needs stdin for the console; give the log as a file");
    }
    let (console_in, _raw) = console_input(!args.go_live, &stop);
    let opts = RunOptions {
        ft: FtMode::Replay {
            door: Box::new(door),
            live_out,
        },
        snapshot_on_ready: None,
        console_in,
        console_out,
        stop: stop.clone(),
    };
    let mut vm = Vm::boot(&cfg, opts).context("cannot boot")?;
    let result = vm.run();
    if args.stats {
        eprint!("{}", vm.stats.report(vm.unknown_ports()));
    }
    let exit = result.with_context(|| format!("replay of {} failed", args.log.display()))?;
    report_exit(exit, &stop);
    eprintln!("vmft: exits {} epochs {}", vm.position().exit, vm.epochs());
    eprintln!("vmft: final state digest {}", vm.final_digest());
    Ok(())
}

/// An error and its causes on one line, each cause once: an error whose
/// message already includes its source's text (`... : {source}`) does not
/// repeat it.
fn one_line(e: &anyhow::Error) -> String {
    let mut msg = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if msg.contains(&text) {
            continue;
        }
        if !msg.is_empty() {
            msg.push_str(": ");
        }
        msg.push_str(&text);
    }
    msg
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_env("VMFT_LOG").unwrap_or_else(|_| EnvFilter::new("warn")),
        )
        .with_writer(io::stderr)
        .init();
    // Before any thread starts: stop signals go to one watcher thread.
    stop::block_stop_signals();
    let cli = Cli::parse();
    let stop = StopHandle::new();
    stop::watch_signals(stop.clone(), |reason| {
        eprintln!("vmft: stopped by {reason} before the VM started");
        std::process::exit(1);
    });
    let result = match cli.command {
        Command::Run(args) => run(args, stop),
        Command::Record(args) => record(args, stop),
        Command::Replay(args) => replay(args, stop),
        Command::Log(args) => show_log(args),
        Command::Image => image::default_image()
            .map(|img| {
                println!("kernel={}", img.kernel.display());
                println!("initrd={}", img.initrd.display());
            })
            .map_err(Into::into),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("vmft: error: {}", one_line(&e));
            ExitCode::FAILURE
        }
    }
}
