//! `vmft status`: what the monitors on this machine say about themselves,
//! read from their control sockets (`vmm::api`).

use std::path::PathBuf;

use anyhow::{bail, Result};
use clap::Args;
use vmm::api;
use vmm::ft::status::MonitorStatus;

/// `vmft status`.
#[derive(Args)]
pub struct StatusArgs {
    /// Ask this monitor (repeat for more). Default: every control socket
    /// in the default directory ($XDG_RUNTIME_DIR/vmft, else /run/vmft for
    /// root or /tmp/vmft-UID).
    #[arg(long = "api-sock", value_name = "PATH")]
    pub api_socks: Vec<PathBuf>,
    /// One JSON object per monitor, one per line, for tools.
    #[arg(long)]
    pub json: bool,
}

/// Ask the monitors and print their status; an error if none answers.
pub fn status(args: StatusArgs) -> Result<()> {
    let asked_for = !args.api_socks.is_empty();
    let socks = if asked_for {
        args.api_socks
    } else {
        api::sockets_in(&api::default_dir())
    };
    let mut found = Vec::new();
    for p in &socks {
        match api::query(p) {
            Ok(s) => found.push((p.clone(), s)),
            // A socket named on the command line must answer; a leftover
            // of a killed monitor in the directory is only mentioned.
            Err(e) if asked_for => bail!(e),
            Err(e) => eprintln!("vmft status: skipping {}: {e}", p.display()),
        }
    }
    if found.is_empty() {
        bail!(
            "no monitor answers in {} (start one, or name its socket with --api-sock)",
            api::default_dir().display()
        );
    }
    if args.json {
        for (_, s) in &found {
            println!("{}", serde_json::to_string(s)?);
        }
    } else {
        print!(
            "{}",
            table(&found.iter().map(|(_, s)| s.clone()).collect::<Vec<_>>())
        );
    }
    Ok(())
}

/// The status of each monitor as a table for people.
fn table(rows: &[MonitorStatus]) -> String {
    let head = [
        "VM",
        "ROLE",
        "STATE",
        "PROTECTED",
        "GENERATION",
        "PEER",
        "EXITS",
        "LAG",
        "LOG",
        "OUT-DELAY p50/p99",
        "LAST FAILOVER",
        "TRANSFER",
        "PID",
    ];
    let mut cells: Vec<Vec<String>> = vec![head.iter().map(|s| s.to_string()).collect()];
    for s in rows {
        cells.push(vec![
            s.vm.clone(),
            format!("{:?}", s.role).to_lowercase(),
            format!("{:?}", s.state).to_lowercase(),
            if s.protected { "yes" } else { "NO" }.into(),
            s.generation.to_string(),
            s.peer.clone().unwrap_or_else(|| "-".into()),
            s.exits.to_string(),
            s.lag_exits
                .map(|l| l.to_string())
                .unwrap_or_else(|| "-".into()),
            format!("{:.0} kB/s", s.log_bytes_per_s / 1000.0),
            s.output_delay_ms
                .map(|(a, b)| format!("{a:.1}/{b:.1} ms"))
                .unwrap_or_else(|| "-".into()),
            s.last_failover
                .as_ref()
                .map(|f| format!("{} failed, claim {} ms", f.failed, f.claim_ms))
                .unwrap_or_else(|| "-".into()),
            s.transfer
                .as_ref()
                .map(|t| {
                    if t.done {
                        format!("done, pause {:.0} ms", t.pause_ms)
                    } else {
                        format!("{}/{} MB", t.bytes >> 20, t.total >> 20)
                    }
                })
                .unwrap_or_else(|| "-".into()),
            s.pid.to_string(),
        ]);
    }
    let widths: Vec<usize> = (0..head.len())
        .map(|c| cells.iter().map(|r| r[c].len()).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    for r in &cells {
        let line: Vec<String> = r
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        out.push_str(line.join("  ").trim_end());
        out.push('\n');
    }
    out
}
