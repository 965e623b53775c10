//! Record/replay cost of the Linux guest: the same workload run bare, run
//! as a recording primary, and replayed, in one run.
//!
//! `cargo run --release -p bench --bin ft_bench [-- sleep-seconds compute-count]`
//! `cargo run --release -p bench --bin ft_bench -- quick`: the quick check
//! after a change to the run loop or the devices: the default guest booted
//! bare and recorded, one after the other, with record/bare and kicks per
//! second of each (a change that kicks the vCPU needlessly shows at once).
//! `cargo run --release -p bench --bin ft_bench -- disk [MiB]`: the `disk`
//! workload on a blank image, bare, recorded, and as an FT pair (processes
//! on loopback, a disk copy each): write and read-back MB/s.
//! `cargo run --release -p bench --bin ft_bench -- net [sink-kB] [source-lines] [round-trips] [rounds]`
//! (as root): the guest's network, bare `vmft run`, `vmft record` and an FT
//! pair (`vmft primary`/`backup`, arbiter, console) on network namespaces,
//! in rounds of one each: TCP receive and transmit Mbit/s, one-byte round
//! trips per second, the log's rate and the output delay added by the rule
//! (see `net.rs`).
//! `cargo run --release -p bench --bin ft_bench -- io` (as root): both
//! device tables in one run, `disk 4` then `net` with its defaults.

mod net;
mod procs;

use std::io;
use std::path::Path;
use std::time::{Duration, Instant};

use vmm::boot::BootConfig;
use vmm::image;
use vmm::record::{log_header, RecordStats};
use vmm::replay::ReplayDoor;
use vmm::vm::{AfterTakeover, FtMode, RunOptions, Vm};

struct Outcome {
    wall: Duration,
    digest: String,
    exits: u64,
    kicks: u64,
    record: Option<RecordStats>,
}

impl Outcome {
    fn kicks_per_s(&self) -> f64 {
        self.kicks as f64 / self.wall.as_secs_f64()
    }
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
        disks: Vec::new(),
        nets: Vec::new(),
    }
}

fn run(cfg: &BootConfig, ft: FtMode) -> Outcome {
    run_to(cfg, ft, Box::new(io::sink()))
}

/// The line being written and the finished lines with their end times.
type LineLog = (Vec<u8>, Vec<(Instant, String)>);

/// Console lines with the time each one ended.
#[derive(Clone, Default)]
struct Lines(std::sync::Arc<std::sync::Mutex<LineLog>>);

impl io::Write for Lines {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let mut g = self.0.lock().unwrap();
        for &b in buf {
            if b == b'\n' {
                let line = String::from_utf8_lossy(&g.0).trim_end().to_string();
                g.0.clear();
                g.1.push((Instant::now(), line));
            } else {
                g.0.push(b);
            }
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Lines {
    fn at(&self, prefix: &str) -> Option<Instant> {
        let g = self.0.lock().unwrap();
        g.1.iter()
            .find(|(_, l)| l.starts_with(prefix))
            .map(|(t, _)| *t)
    }
}

fn run_to(cfg: &BootConfig, ft: FtMode, console: Box<dyn io::Write + Send>) -> Outcome {
    let t0 = Instant::now();
    let mut vm = Vm::boot(
        cfg,
        RunOptions {
            net: None,
            shared_disk: None,
            ft,
            snapshot_on_ready: None,
            console_in: None,
            console_out: console,
            stop: Default::default(),
            pair: None,
        },
    )
    .expect("boot");
    vm.run().expect("run");
    Outcome {
        wall: t0.elapsed(),
        digest: vm.final_digest(),
        exits: vm.position().exit,
        kicks: vm.stats.exits.get("kick").copied().unwrap_or(0),
        record: vm.record_stats(),
    }
}

fn record_mode(cfg: &BootConfig, log: &Path) -> FtMode {
    FtMode::Record {
        log: vmm::vm::LogSink::File(log.to_path_buf()),
        header: log_header(&vmm::record::VmSource::Boot(cfg.clone())).unwrap(),
        epoch_bound: Duration::from_millis(10),
    }
}

/// Bare against recorded, boot included, with kicks per second.
fn quick() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config("counter", 20);
    let bare = run(&cfg, FtMode::Live);
    let rec = run(&cfg, record_mode(&cfg, &dir.path().join("counter.log")));
    let rs = rec.record.clone().unwrap();
    println!("| run | wall s | record/bare | kicks | kicks/s | epochs | log Mbit/s |");
    println!("| --- | --- | --- | --- | --- | --- | --- |");
    println!(
        "| bare | {:.1} | 1.00 | {} | {:.0} | | |",
        bare.wall.as_secs_f64(),
        bare.kicks,
        bare.kicks_per_s()
    );
    println!(
        "| record | {:.1} | {:.2} | {} | {:.0} | {} | {:.2} |",
        rec.wall.as_secs_f64(),
        rec.wall.as_secs_f64() / bare.wall.as_secs_f64(),
        rec.kicks,
        rec.kicks_per_s(),
        rs.epochs.len(),
        rs.bytes as f64 * 8.0 / rec.wall.as_secs_f64() / 1e6,
    );
}

/// The `disk` workload on a blank image, bare, recorded and as an FT pair
/// (`vmft primary`/`backup` with an arbiter and a console, on loopback,
/// each side with its own copy of the blank image), in one run: write and
/// read-back MB/s from the guest's console lines.
fn disk(mib: u64) {
    let dir = tempfile::tempdir().unwrap();
    println!("| run | write MB/s | read MB/s | write ratio | read ratio | log Mbit/s (whole run) | digest |");
    println!("| --- | --- | --- | --- | --- | --- | --- |");
    let blank = |name: &str| {
        let img = dir.path().join(name);
        std::fs::File::create(&img)
            .unwrap()
            .set_len((mib + 1) << 20)
            .unwrap();
        img
    };
    let rates = |ready: Instant, written: Instant, read: Instant| {
        let w = mib as f64 * 1.048576 / (written - ready).as_secs_f64();
        let r = mib as f64 * 1.048576 / (read - written).as_secs_f64();
        (w, r)
    };
    let mut bare_rates = None;
    let mut row = |name: &str, (w, r): (f64, f64), log: String, digest: &str| {
        let (wr, rr) = match bare_rates {
            None => {
                bare_rates = Some((w, r));
                (1.0, 1.0)
            }
            Some((bw, br)) => (w / bw, r / br),
        };
        println!(
            "| {name} | {w:.2} | {r:.2} | {wr:.2} | {rr:.2} | {log} | {} |",
            &digest[..16.min(digest.len())]
        );
    };
    for recorded in [false, true] {
        let mut cfg = config("disk", mib);
        cfg.disks = vec![vmm::boot::DiskSpec {
            path: blank(&format!("disk-{recorded}.img")),
            read_only: false,
            shared: false,
        }];
        let lines = Lines::default();
        let ft = if recorded {
            record_mode(&cfg, &dir.path().join("disk.log"))
        } else {
            FtMode::Live
        };
        let out = run_to(&cfg, ft, Box::new(lines.clone()));
        let ready = lines.at("VMFT-READY").expect("ready marker");
        let written = lines
            .at(&format!("disk {mib} written"))
            .expect("all written");
        let read = lines.at("disk done").expect("read back");
        let log = out
            .record
            .as_ref()
            .map(|rs| {
                format!(
                    "{:.2}",
                    rs.bytes as f64 * 8.0 / out.wall.as_secs_f64() / 1e6
                )
            })
            .unwrap_or_default();
        let name = if recorded { "record" } else { "bare" };
        row(name, rates(ready, written, read), log, &out.digest);
    }
    let images = (blank("disk-ft-primary.img"), blank("disk-ft-backup.img"));
    match disk_ft(mib, dir.path(), images) {
        Ok((times, log, digest)) => row("FT pair", rates(times.0, times.1, times.2), log, &digest),
        Err(e) => println!("| FT pair | failed: {e:#} | | | | | |"),
    }
}

/// The `disk` workload under FT as separate processes on loopback; when
/// the guest printed its ready, last-written and done lines, the log rate
/// over the primary's run, and the final digest.
fn disk_ft(
    mib: u64,
    dir: &Path,
    (primary_img, backup_img): (std::path::PathBuf, std::path::PathBuf),
) -> anyhow::Result<((Instant, Instant, Instant), String, String)> {
    use procs::{Pair, Place};
    use std::ffi::OsString;
    let local = |program: &Path| std::process::Command::new(program);
    let place = Place {
        command: &local,
        ip: "127.0.0.1".into(),
    };
    let side: Vec<OsString> = vec![
        "--workload".into(),
        "disk".into(),
        "--append".into(),
        format!("vmft.count={mib}").into(),
    ];
    let t0 = Instant::now();
    let mut pair = Pair::start(
        dir,
        &place,
        &place,
        &place,
        &side,
        &["--disk".into(), backup_img.into()],
        &["--disk".into(), primary_img.into()],
    )?;
    let long = Duration::from_secs(900);
    let ready = pair.console.wait_line("VMFT-READY", long, |_| false)?.at;
    let written = pair
        .console
        .wait_line(&format!("disk {mib} written"), long, |_| false)?
        .at;
    let read = pair.console.wait_line("disk done", long, |_| false)?.at;
    let end = pair
        .primary
        .wait_line("final state digest", Duration::from_secs(120), |_| false)?;
    let wall = end.at - t0;
    let text = pair.primary.text();
    let digest = end.text.rsplit(' ').next().unwrap_or_default().to_string();
    let sent = text
        .lines()
        .find_map(|l| {
            let rest = &l[l.find("bytes_sent: ")? + "bytes_sent: ".len()..];
            rest.split(|c: char| !c.is_ascii_digit())
                .next()?
                .parse::<u64>()
                .ok()
        })
        .unwrap_or(0);
    let log = format!("{:.2}", sent as f64 * 8.0 / wall.as_secs_f64() / 1e6);
    Ok(((ready, written, read), log, digest))
}

fn main() {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    if std::env::args().nth(1).as_deref() == Some("net") {
        let arg = |i: usize, default: u64| {
            std::env::args()
                .nth(i)
                .and_then(|a| a.parse().ok())
                .unwrap_or(default)
        };
        let sizes = net::Sizes {
            sink_bytes: arg(2, 400) * 1000,
            source_lines: arg(3, 60_000),
            round_trips: arg(4, 300) as usize,
        };
        if let Err(e) = net::run(sizes, arg(5, 2) as usize) {
            eprintln!("ft_bench net: {e:#}");
            std::process::exit(1);
        }
        return;
    }
    if std::env::args().nth(1).as_deref() == Some("quick") {
        return quick();
    }
    if std::env::args().nth(1).as_deref() == Some("io") {
        // The devices under FT in one command: the disk table, then the
        // network table (as root: it builds network namespaces).
        disk(4);
        let sizes = net::Sizes {
            sink_bytes: 400_000,
            source_lines: 60_000,
            round_trips: 300,
        };
        if let Err(e) = net::run(sizes, 2) {
            eprintln!("ft_bench io: {e:#}");
            std::process::exit(1);
        }
        return;
    }
    if std::env::args().nth(1).as_deref() == Some("disk") {
        let mib = std::env::args()
            .nth(2)
            .and_then(|a| a.parse().ok())
            .unwrap_or(4);
        return disk(mib);
    }
    let mut args = std::env::args().skip(1);
    let sleep_s: u64 = args.next().and_then(|a| a.parse().ok()).unwrap_or(10);
    let compute_n: u64 = args.next().and_then(|a| a.parse().ok()).unwrap_or(400);
    let dir = tempfile::tempdir().unwrap();
    println!("| workload | bare s | record s | record/bare | kicks/s bare | kicks/s record | replay s | replay/record | exits | log bytes | log bytes/s | irqs at exits | irqs by epochs | epochs | pages/epoch (mean, max) | KiB/epoch (mean) | pause ms (mean, max) | digests equal |");
    println!("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |");
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
        let rec = run(&cfg, record_mode(&cfg, &log));
        let door = ReplayDoor::open(Path::new(&log)).expect("open log");
        let rep = run(
            &cfg,
            FtMode::Replay {
                door: Box::new(door),
                go_live: false,
                then: AfterTakeover::Live,
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
            "| {name} | {:.1} | {:.1} | {:.2} | {:.0} | {:.0} | {:.1} | {:.2} | {} | {} | {:.0} | {} | {} | {} | {:.0}, {} | {:.0} | {:.2}, {:.2} | {} |",
            secs(bare.wall),
            secs(rec.wall),
            secs(rec.wall) / secs(bare.wall),
            bare.kicks_per_s(),
            rec.kicks_per_s(),
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
