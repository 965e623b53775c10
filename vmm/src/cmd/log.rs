//! `vmft log`: print the entries of a log.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;

#[derive(Args)]
pub struct LogArgs {
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

pub fn show_log(args: LogArgs) -> Result<()> {
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
                | Entry::NetRx { pos, .. }
                | Entry::DiskRead { pos, .. }
                | Entry::End { pos, .. } => (*pos, *pos),
                Entry::Epoch(e) => (e.pos, e.pos),
                Entry::EpochPages { pos, .. } => (*pos, *pos),
                // Not tied to an exit: shown with any range.
                Entry::Released { .. } | Entry::NetReleased { .. } | Entry::DiskReleased { .. } => {
                    (args.from, args.from)
                }
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
                Entry::DiskRead { pos, disk, data } => println!(
                    "#{} shared disk {disk} read at exit {pos}: {} bytes",
                    fr.seq,
                    data.len()
                ),
                Entry::NetRx { pos, frame } => println!(
                    "#{} frame received at exit {pos}: {} bytes",
                    fr.seq,
                    frame.len()
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
