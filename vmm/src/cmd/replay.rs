//! `vmft replay`: re-execute a log as a backup would.

use std::io;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Args;

use vmm::boot::BootConfig;
use vmm::record::{config_hash, recorder_id, VmSource};
use vmm::replay::ReplayDoor;
use vmm::stop::StopHandle;
use vmm::vm::{AfterTakeover, FtMode, RunOptions, Vm};

use super::{console_input, report_exit};

#[derive(Args)]
pub struct ReplayArgs {
    /// Log file to replay (`-` reads the log as a stream from stdin).
    #[arg(long)]
    pub log: PathBuf,
    /// Write the guest's console output here (default: suppressed).
    #[arg(long, value_name = "FILE")]
    pub serial_out: Option<PathBuf>,
    /// Use this kernel instead of the one named in the log (must match its hash).
    #[arg(long)]
    pub kernel: Option<PathBuf>,
    /// Use this snapshot instead of the one named in the log (must match its hash).
    #[arg(long, value_name = "FILE")]
    pub restore: Option<PathBuf>,
    /// Use this initramfs instead of the one named in the log (must match its hash).
    #[arg(long)]
    pub initrd: Option<PathBuf>,
    /// The guest's disks, in the order they were given when recording,
    /// each as it was when the recording started (PATH or PATH,ro).
    #[arg(long = "disk", value_name = "PATH[,ro]")]
    pub disks: Vec<vmm::boot::DiskSpec>,
    /// The guest's network cards as recorded (only the MAC matters: a
    /// replay sends nothing; with --go-live the tap is used once live).
    #[arg(long = "net", value_name = "tap=NAME[,mac=MAC]")]
    pub nets: Vec<vmm::boot::NetSpec>,
    /// Print exit statistics at the end.
    #[arg(long)]
    pub stats: bool,
    /// If the log ends without an end entry (the primary stopped), continue
    /// the VM live from there: console on stdout and stdin.
    #[arg(long)]
    pub go_live: bool,
}

/// The first 16 characters of a hash (all of it if shorter: it may come
/// from a damaged log header).
fn short(hash: &str) -> &str {
    hash.get(..16).unwrap_or(hash)
}

/// What a configuration was built from, for an error message.
fn describe(source: &VmSource) -> String {
    let disks = match source.disks().len() {
        0 => "no disk".to_string(),
        1 => "1 disk".to_string(),
        n => format!("{n} disks"),
    };
    let what = match source {
        VmSource::Boot(cfg) => format!(
            "kernel {}, initramfs {}, same host CPU",
            cfg.kernel.display(),
            cfg.initrd
                .as_ref()
                .map(|p| p.display().to_string())
                .unwrap_or_else(|| "none".into())
        ),
        VmSource::Restore { snapshot, .. } => {
            format!("snapshot {}, same host CPU", snapshot.display())
        }
    };
    format!("{what}, {disks} (the disks as they were when the recording started)")
}

pub fn replay(args: ReplayArgs, stop: StopHandle) -> Result<()> {
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
    let source = match &h.snapshot {
        Some(snap) => VmSource::Restore {
            snapshot: args.restore.clone().unwrap_or_else(|| PathBuf::from(snap)),
            disks: args.disks.clone(),
            nets: args.nets.clone(),
        },
        None => {
            let cfg = BootConfig {
                kernel: args
                    .kernel
                    .clone()
                    .unwrap_or_else(|| PathBuf::from(&h.kernel)),
                initrd: args
                    .initrd
                    .clone()
                    .or_else(|| h.initrd.as_ref().map(PathBuf::from)),
                mem_mib: h.mem_mib,
                cmdline: h.cmdline.clone(),
                disks: args.disks.clone(),
                nets: args.nets.clone(),
            };
            vmm::boot::detect_format(&cfg.kernel).context("cannot replay")?;
            VmSource::Boot(cfg)
        }
    };
    let hash = config_hash(&source).context("cannot replay")?;
    if hash != h.config_hash {
        bail!(
            "log {} was recorded for another VM configuration ({}): \
             its configuration hash is {}, this one's is {}",
            args.log.display(),
            describe(&source),
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
    // A replay sends no frame; once live (--go-live) its tap takes over.
    let net = match (source.nets().is_empty(), args.go_live) {
        (true, _) => None,
        (false, false) => Some(vmm::vm::NetIo {
            tap: None,
            out: Box::new(io::sink()),
            live_out: None,
        }),
        (false, true) => super::open_tap(source.nets())?.map(|tap| vmm::vm::NetIo {
            out: Box::new(io::sink()),
            live_out: Some(Box::new(vmm::netio::TapSink::new(tap.clone()))),
            tap: Some(tap),
        }),
    };
    let opts = RunOptions {
        net,
        shared_disk: None,
        ft: FtMode::Replay {
            then: AfterTakeover::Live,
            door: Box::new(door),
            go_live: args.go_live,
            live_out,
        },
        snapshot_on_ready: None,
        console_in,
        console_out,
        stop: stop.clone(),
        pair: None,
    };
    let mut vm = Vm::start(&source, opts).context("cannot start the VM")?;
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
