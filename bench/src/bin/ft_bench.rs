//! Record/replay cost of the Linux guest: the same workload run bare, run
//! as a recording primary, and replayed, in one run.
//!
//! `cargo run --release -p bench --bin ft_bench [-- sleep-seconds compute-count]`

use std::io;
use std::path::Path;
use std::time::{Duration, Instant};

use vmm::boot::BootConfig;
use vmm::image;
use vmm::record::{log_header, RecordStats};
use vmm::replay::ReplayDoor;
use vmm::vm::{FtMode, RunOptions, Vm};

struct Outcome {
    wall: Duration,
    digest: String,
    exits: u64,
    record: Option<RecordStats>,
}

fn config(workload: &str, count: u64) -> BootConfig {
    let img = image::default_image().expect("default guest image");
    BootConfig {
        kernel: img.kernel,
        initrd: Some(img.initrd),
        mem_mib: image::DEFAULT_MEM_MIB,
        cmdline: format!(
            "{} vmft.workload={workload} vmft.count={count}",
            image::base_cmdline()
        ),
    }
}

fn run(cfg: &BootConfig, ft: FtMode) -> Outcome {
    let t0 = Instant::now();
    let mut vm = Vm::boot(
        cfg,
        RunOptions {
            ft,
            snapshot_on_ready: None,
            console_in: None,
            console_out: Box::new(io::sink()),
        },
    )
    .expect("boot");
    vm.run().expect("run");
    Outcome {
        wall: t0.elapsed(),
        digest: vm.final_digest(),
        exits: vm.position().exit,
        record: vm.record_stats(),
    }
}

fn main() {
    let mut args = std::env::args().skip(1);
    let sleep_s: u64 = args.next().and_then(|a| a.parse().ok()).unwrap_or(10);
    let compute_n: u64 = args.next().and_then(|a| a.parse().ok()).unwrap_or(400);
    let dir = tempfile::tempdir().unwrap();
    println!("| workload | bare s | record s | record/bare | replay s | replay/record | exits | log bytes | log bytes/s | irqs at exits | irqs by epochs | epochs | pages/epoch (mean, max) | KiB/epoch (mean) | pause ms (mean, max) | digests equal |");
    println!("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |");
    let mut kinds = Vec::new();
    for (name, workload, count) in [
        (format!("idle (sleep {sleep_s} s)"), "sleep", sleep_s),
        (
            format!("compute ({} k iterations)", compute_n * 5),
            "compute",
            compute_n,
        ),
    ] {
        let cfg = config(workload, count);
        let bare = run(&cfg, FtMode::Live);
        let log = dir.path().join(format!("{workload}.log"));
        let header = log_header(&cfg).unwrap();
        let rec = run(
            &cfg,
            FtMode::Record {
                log: log.clone(),
                header,
                epoch_bound: Duration::from_millis(10),
            },
        );
        let door = ReplayDoor::open(Path::new(&log)).expect("open log");
        let rep = run(
            &cfg,
            FtMode::Replay {
                door: Box::new(door),
                live_out: None,
            },
        );
        let rs = rec.record.clone().unwrap();
        let n = rs.epochs.len().max(1) as f64;
        let pages_mean = rs.epochs.iter().map(|e| e.pages).sum::<usize>() as f64 / n;
        let pages_max = rs.epochs.iter().map(|e| e.pages).max().unwrap_or(0);
        let kib_mean = rs.epochs.iter().map(|e| e.bytes).sum::<usize>() as f64 / n / 1024.0;
        let pause_mean = rs.epochs.iter().map(|e| e.pause.as_secs_f64()).sum::<f64>() / n * 1e3;
        let pause_max = rs
            .epochs
            .iter()
            .map(|e| e.pause)
            .max()
            .unwrap_or_default()
            .as_secs_f64()
            * 1e3;
        let secs = |d: Duration| d.as_secs_f64();
        println!(
            "| {name} | {:.1} | {:.1} | {:.2} | {:.1} | {:.2} | {} | {} | {:.0} | {} | {} | {} | {:.0}, {} | {:.0} | {:.2}, {:.2} | {} |",
            secs(bare.wall),
            secs(rec.wall),
            secs(rec.wall) / secs(bare.wall),
            secs(rep.wall),
            secs(rep.wall) / secs(rec.wall),
            rec.exits,
            rs.bytes,
            rs.bytes as f64 / secs(rec.wall),
            rs.irqs_at_exits,
            rs.irqs_after_epochs,
            rs.epochs.len(),
            pages_mean,
            pages_max,
            kib_mean,
            pause_mean,
            pause_max,
            if rec.digest == rep.digest { "yes" } else { "NO" },
        );
        kinds.push((name, rs));
    }
    println!();
    println!("| workload | entry kind | entries | bytes |");
    println!("| --- | --- | --- | --- |");
    for (name, rs) in &kinds {
        for (k, (n, b)) in &rs.entries {
            println!("| {name} | {k} | {n} | {b} |");
        }
    }
}
