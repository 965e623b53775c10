//! `vmft run`: one VM, no fault tolerance.

use std::io;
use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;

use vmm::stop::StopHandle;
use vmm::vm::{FtMode, RunOptions, Vm};

use super::{boot_config, console_input, report_exit, BootArgs};

#[derive(Args)]
pub struct RunArgs {
    #[command(flatten)]
    pub boot: BootArgs,
    /// Print boot time and exit counts at the end.
    #[arg(long)]
    pub stats: bool,
    /// Save a snapshot of the whole VM when the guest prints its ready marker.
    #[arg(long, value_name = "FILE")]
    pub snapshot_on_ready: Option<PathBuf>,
    /// Resume from a snapshot instead of booting.
    #[arg(long, value_name = "FILE", conflicts_with_all = ["kernel", "initrd", "append", "snapshot_on_ready"])]
    pub restore: Option<PathBuf>,
    /// Do not read console input from stdin.
    #[arg(long)]
    pub no_stdin: bool,
}

pub fn run(args: RunArgs, stop: StopHandle) -> Result<()> {
    let disks = args.boot.disks.clone();
    let nets = args.boot.nets.clone();
    let cfg = match &args.restore {
        Some(_) => None,
        None => Some(boot_config(args.boot)?),
    };
    let (console_in, _raw) = console_input(args.no_stdin, &stop);
    let net = super::live_net(&nets)?;
    let opts = RunOptions {
        net,
        shared_disk: None,
        ft: FtMode::Live,
        snapshot_on_ready: args.snapshot_on_ready.clone(),
        console_in,
        console_out: Box::new(io::stdout()),
        stop: stop.clone(),
        pair: None,
    };
    let mut vm = match (&args.restore, &cfg) {
        (Some(snap), _) => Vm::restore(snap, &disks, &nets, opts).context("cannot restore")?,
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
