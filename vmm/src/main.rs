//! The `vmft` command: parsing, dispatch to [`cmd`], and errors on one line.

mod cmd;

use std::io;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use tracing_subscriber::EnvFilter;

use vmm::image;
use vmm::stop::{self, StopHandle};

/// vmft: a fault-tolerant Linux VM on KVM.
#[derive(Parser)]
#[command(
    name = "vmft",
    version,
    about,
    after_help = "Console: while a VM runs with its console on a terminal, every key goes to the \
guest (Ctrl-C, Ctrl-Z and Ctrl-\\ included). Ctrl-A x leaves: the VM stops cleanly and a \
recording is closed with its end entry. Ctrl-A Ctrl-A sends Ctrl-A. SIGTERM, SIGINT and SIGHUP \
stop the VM the same way.\n\nExit status: 0 done; 1 error; 2 bad usage; 3 lost the claim (another side \
is live); 4 divergence between primary and backup."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the default guest fault-tolerant on this machine: a built-in arbiter, a backup and a
    /// primary as separate processes, and the console in the foreground (Ctrl-A x stops the pair).
    Ft(cmd::ft::FtArgs),
    /// Boot one VM (no fault tolerance). With no options, boots the default guest image.
    Run(cmd::run::RunArgs),
    /// Run the VM as the primary and log every nondeterministic input it is handed.
    Record(cmd::record::RecordArgs),
    /// Re-execute a recorded log, checking every exit against the primary's.
    Replay(cmd::replay::ReplayArgs),
    /// Run the guest as the primary of a fault-tolerant pair, streaming its log to a backup.
    Primary(cmd::pair::PrimaryArgs),
    /// Wait for a primary, replay its log live, and take over when it fails.
    Backup(cmd::pair::BackupArgs),
    /// The console of a pair: prints the guest's output exactly once across failover, types to the live side.
    Console(cmd::console::ConsoleArgs),
    /// Print the entries of a log (optionally only those around some exits).
    Log(cmd::log::LogArgs),
    /// What the primaries and backups on this machine say: role, state, protection, lag, log rate,
    /// output delay, last failover (from their control sockets).
    Status(cmd::status::StatusArgs),
    /// Attack the whole system round after round (kill, stop, partition, arbiter faults), re-protect
    /// after each failover, audit the console's transcript, and print a verdict (exit 0 only when
    /// every invariant held).
    Drill(cmd::drill::DrillArgs),
    /// Build the default guest image if needed and print its paths.
    Image,
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

/// The exit status for an error: 3 lost the claim (another side is live),
/// 4 divergence, 1 anything else (2, bad usage, is clap's).
fn exit_status(e: &anyhow::Error) -> u8 {
    use vmm::nondet::DoorError;
    use vmm::vm::VmError;
    for cause in e.chain() {
        if let Some(d) = cause.downcast_ref::<DoorError>() {
            return d.exit_status();
        }
        if let Some(v) = cause.downcast_ref::<VmError>() {
            return v.exit_status();
        }
    }
    1
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_env("VMFT_LOG").unwrap_or_else(|_| EnvFilter::new("warn")),
        )
        .with_writer(io::stderr)
        .with_ansi(io::IsTerminal::is_terminal(&io::stderr()))
        .init();
    // Before any thread starts: stop signals go to one watcher thread.
    stop::block_stop_signals();
    let cli = Cli::parse();
    let mut cli_command = None;
    let stop = StopHandle::new();
    stop::watch_signals(stop.clone(), |reason| {
        eprintln!("vmft: stopped by {reason} before the VM started");
        std::process::exit(1);
    });
    let status = match cli.command {
        Command::Console(args) => Some(cmd::console::console(args)),
        Command::Ft(args) => Some(cmd::ft::ft(args, stop.clone())),
        Command::Drill(args) => Some(cmd::drill::drill(args, stop.clone())),
        other => {
            cli_command = Some(other);
            None
        }
    };
    if let Some(status) = status {
        return match status {
            Ok(status) => ExitCode::from(status),
            Err(e) => {
                eprintln!("vmft: error: {}", one_line(&e));
                ExitCode::FAILURE
            }
        };
    }
    let result = match cli_command.expect("dispatched above") {
        Command::Run(args) => cmd::run::run(args, stop),
        Command::Record(args) => cmd::record::record(args, stop),
        Command::Replay(args) => cmd::replay::replay(args, stop),
        Command::Primary(args) => cmd::pair::primary(args, stop),
        Command::Backup(args) => cmd::pair::backup(args, stop),
        Command::Log(args) => cmd::log::show_log(args),
        Command::Status(args) => cmd::status::status(args),
        Command::Console(_) | Command::Ft(_) | Command::Drill(_) => {
            unreachable!("handled above")
        }
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
            ExitCode::from(exit_status(&e))
        }
    }
}
