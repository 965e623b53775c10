//! The `vmft` command.

use std::io::{self, IsTerminal};
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};
use tracing_subscriber::EnvFilter;

use vmm::boot::BootConfig;
use vmm::image::{self, DEFAULT_MEM_MIB, DEFAULT_WORKLOAD};
use vmm::vm::{RunOptions, Vm};

/// vmft: a fault-tolerant Linux VM on KVM.
#[derive(Parser)]
#[command(name = "vmft", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Boot one VM (no fault tolerance). With no options, boots the default guest image.
    Run(RunArgs),
    /// Build the default guest image if needed and print its paths.
    Image,
}

#[derive(Args)]
struct RunArgs {
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
    /// Workload the default guest runs (counter, echo, sleep, shell).
    #[arg(long, default_value = DEFAULT_WORKLOAD)]
    workload: String,
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

fn run(args: RunArgs) -> Result<()> {
    let console_in: Option<Box<dyn io::Read + Send>> = if args.no_stdin {
        None
    } else {
        Some(Box::new(io::stdin()))
    };
    let opts = RunOptions {
        snapshot_on_ready: args.snapshot_on_ready.clone(),
        console_in,
        console_out: Box::new(io::stdout()),
    };
    if io::stdin().is_terminal() && args.workload == "shell" {
        eprintln!("vmft: console input is line-buffered by the terminal");
    }
    let mut vm = if let Some(snap) = &args.restore {
        Vm::restore(snap, opts).context("cannot restore")?
    } else {
        let (kernel, initrd) = match args.kernel {
            Some(k) => (k, args.initrd),
            None => {
                let img =
                    image::default_image().context("cannot prepare the default guest image")?;
                (img.kernel, Some(args.initrd.unwrap_or(img.initrd)))
            }
        };
        let mut cmdline = format!("{} vmft.workload={}", image::base_cmdline(), args.workload);
        if let Some(extra) = &args.append {
            cmdline.push(' ');
            cmdline.push_str(extra);
        }
        let cfg = BootConfig {
            kernel,
            initrd,
            mem_mib: args.mem,
            cmdline,
        };
        Vm::boot(&cfg, opts).context("cannot boot")?
    };
    let result = vm.run();
    if args.stats {
        eprint!("{}", vm.stats.report(vm.unknown_ports()));
    }
    let exit = result?;
    eprintln!("vmft: {exit}");
    Ok(())
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_env("VMFT_LOG").unwrap_or_else(|_| EnvFilter::new("warn")),
        )
        .with_writer(io::stderr)
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run(args) => run(args),
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
            // One line: the context chain joined.
            let msg = e
                .chain()
                .map(|c| c.to_string())
                .collect::<Vec<_>>()
                .join(": ");
            eprintln!("vmft: error: {msg}");
            ExitCode::FAILURE
        }
    }
}
