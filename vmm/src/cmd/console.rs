//! `vmft console`: the guest's console as its users see it, outside both
//! fault domains: every byte of output exactly once and in order, whichever
//! side is live; typed keys to the live side.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;

use vmm::console::{read_token_file, serve, ConsoleConfig, ConsoleInput};

/// `vmft console`.
#[derive(Args)]
pub struct ConsoleArgs {
    /// Where the pair's sides connect (`--console` on `vmft primary` and
    /// `vmft backup`).
    #[arg(long)]
    pub listen: String,
    /// The shared secret (the same file as the pair's `--token-file`).
    #[arg(long, value_name = "FILE")]
    pub token_file: PathBuf,
    /// Do not read typed input from stdin.
    #[arg(long)]
    pub no_stdin: bool,
}

/// Serve until the live side says the VM ended (exit with its status) or
/// the user leaves with Ctrl-A x (exit 0; the VM keeps running).
pub fn console(args: ConsoleArgs) -> Result<u8> {
    let token = read_token_file(&args.token_file)?;
    let mut cfg = ConsoleConfig::new(args.listen.clone(), token);
    if args.no_stdin {
        cfg.input = ConsoleInput::None;
    }
    let outcome = serve(cfg).with_context(|| format!("console on {}", args.listen))?;
    Ok(outcome.exit_status().clamp(0, 255) as u8)
}
