//! `vmft record`: run the VM as a primary that logs to a file.

use std::io;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Args;

use vmm::record::{log_header, VmSource};
use vmm::stop::StopHandle;
use vmm::vm::{FtMode, LogSink, RunOptions, Vm};

use super::{boot_config, console_input, report_exit, BootArgs};

#[derive(Args)]
pub struct RecordArgs {
    #[command(flatten)]
    pub boot: BootArgs,
    /// Log file to write.
    #[arg(long)]
    pub log: PathBuf,
    /// Longest exit-free stretch, in ms, before an epoch delivers a waiting interrupt.
    #[arg(long, default_value_t = 10)]
    pub epoch_ms: u64,
    /// Print boot, exit and log statistics at the end.
    #[arg(long)]
    pub stats: bool,
    /// Do not read console input from stdin.
    #[arg(long)]
    pub no_stdin: bool,
    /// Start from a snapshot instead of booting (the log names it; replay
    /// needs the same file).
    #[arg(long, value_name = "FILE", conflicts_with_all = ["kernel", "initrd", "append"])]
    pub restore: Option<PathBuf>,
}

pub fn record(args: RecordArgs, stop: StopHandle) -> Result<()> {
    let source = match &args.restore {
        Some(snap) => VmSource::Restore {
            snapshot: snap.clone(),
            disks: args.boot.disks.clone(),
            nets: args.boot.nets.clone(),
        },
        None => {
            let cfg = boot_config(args.boot)?;
            // A missing or foreign kernel is reported by boot; hash only what exists.
            vmm::boot::detect_format(&cfg.kernel).context("cannot boot")?;
            VmSource::Boot(cfg)
        }
    };
    let header = log_header(&source).context("cannot record")?;
    let (console_in, _raw) = console_input(args.no_stdin, &stop);
    let net = super::live_net(source.nets())?;
    let opts = RunOptions {
        net,
        shared_disk: None,
        ft: FtMode::Record {
            log: LogSink::File(args.log.clone()),
            header,
            epoch_bound: Duration::from_millis(args.epoch_ms),
        },
        snapshot_on_ready: None,
        console_in,
        console_out: Box::new(io::stdout()),
        stop: stop.clone(),
        pair: None,
    };
    let mut vm = Vm::start(&source, opts).context("cannot start the VM")?;
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
