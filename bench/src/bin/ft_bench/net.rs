//! `ft_bench net`: the guest's network, FT pair against the bare VM (and
//! against a recording without a backup) in one run, on a LAN of network
//! namespaces (`vmm::lab::netns`) as `vmm/tests/net.rs` builds it: TCP
//! receive and transmit rates (the `net-sink` and `net-source` servers),
//! request/response round trips of one byte on one connection
//! (`net-echo`), the log's rate while each runs, and the round trip FT
//! minus bare and minus record (the output rule's delay).

use std::ffi::OsString;
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use sha2::{Digest, Sha256};
use tracing::{info, warn};
use vmm::lab::netns::{fmt_ip, fmt_mac, net_problem, Lan, Netns};

use crate::procs::{sibling, Pair, Place, Proc};

/// Namespace prefix of the bench (not the tests', so neither sweeps the
/// other's).
const PREFIX: &str = "vmft-b";
const GUEST_MAC: [u8; 6] = [0x02, 0x76, 0x6d, 0x66, 0x74, 0x01];
const GUEST_IP: [u8; 4] = [10, 77, 0, 50];
const TAP: &str = "tap0";
const ECHO_PORT: u16 = 7000;
const SINK_PORT: u16 = 7001;
const SOURCE_PORT: u16 = 7002;
/// The guest's line once its last server listens.
const SERVERS_UP: &str = "net: source server on 7002";

/// Sizes of one run.
#[derive(Clone, Copy, Debug)]
pub struct Sizes {
    /// Bytes sent to the sink.
    pub sink_bytes: u64,
    /// Lines asked from the source.
    pub source_lines: u64,
    /// Round trips of one byte.
    pub round_trips: usize,
}

/// What one side (bare or FT) measured.
#[derive(Debug, Default)]
struct Figures {
    sink: Duration,
    source: Duration,
    source_bytes: u64,
    rr_total: Duration,
    /// Each round trip, sorted.
    rr: Vec<Duration>,
    /// Log bytes the primary sent during each phase (FT only).
    log: Option<[u64; 3]>,
}

fn net_opt() -> String {
    format!("tap={TAP},mac={}", fmt_mac(&GUEST_MAC))
}

fn in_ns(ns: &Netns) -> impl Fn(&Path) -> Command + '_ {
    move |program: &Path| ns.exec(&program.to_string_lossy())
}

/// Whether the guest crashed starting its servers (the known busybox
/// segfault after eth0 comes up): worth another start.
fn crashed_starting(text: &str) -> bool {
    text.contains("does not listen")
        && (text.contains("segfault at ") || text.contains("general protection fault"))
}

fn sha_hex(data: &[u8]) -> String {
    Sha256::digest(data)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn connect(ns: &Netns, port: u16) -> Result<TcpStream> {
    let addr = SocketAddr::from((GUEST_IP, port));
    let t0 = Instant::now();
    loop {
        match ns.enter(|| TcpStream::connect_timeout(&addr, Duration::from_secs(10)))? {
            Ok(s) => {
                s.set_nodelay(true)?;
                return Ok(s);
            }
            Err(e) if t0.elapsed() > Duration::from_secs(60) => {
                return Err(e).with_context(|| format!("connecting to {addr}"))
            }
            Err(_) => std::thread::sleep(Duration::from_millis(500)),
        }
    }
}

/// Send `n` bytes to the sink and wait for its answer (the guest has then
/// read and hashed all of them); checks the answer.
fn sink(ns: &Netns, n: u64) -> Result<Duration> {
    let data: Vec<u8> = (0..n)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 11) as u8)
        .collect();
    let want = format!("net-sink: bytes={n} sum={}\n", sha_hex(&data));
    let mut s = connect(ns, SINK_PORT)?;
    let t0 = Instant::now();
    s.write_all(&data)?;
    s.shutdown(Shutdown::Write)?;
    let mut answer = String::new();
    s.read_to_string(&mut answer)?;
    let took = t0.elapsed();
    if answer != want {
        bail!("the sink answered {answer:?}, not {want:?}");
    }
    Ok(took)
}

/// Ask the source for `k` lines and read them to the close; checks them.
fn source(ns: &Netns, k: u64) -> Result<(Duration, u64)> {
    let want: Vec<u8> = (1..=k)
        .flat_map(|i| format!("{i}\n").into_bytes())
        .collect();
    let mut s = connect(ns, SOURCE_PORT)?;
    let t0 = Instant::now();
    s.write_all(format!("{k}\n").as_bytes())?;
    let mut got = Vec::with_capacity(want.len());
    s.read_to_end(&mut got)?;
    let took = t0.elapsed();
    if got != want {
        bail!(
            "the source sent {} bytes (sha256 {}), not the {} of seq 1 {k}",
            got.len(),
            sha_hex(&got),
            want.len()
        );
    }
    Ok((took, got.len() as u64))
}

/// `n` round trips of one byte to the echo server on one connection.
fn round_trips(ns: &Netns, n: usize) -> Result<(Duration, Vec<Duration>)> {
    let mut s = connect(ns, ECHO_PORT)?;
    let mut rr = Vec::with_capacity(n);
    let t0 = Instant::now();
    for i in 0..n {
        let b = [b'a' + (i % 26) as u8];
        let t = Instant::now();
        s.write_all(&b)?;
        let mut back = [0u8; 1];
        s.read_exact(&mut back)?;
        rr.push(t.elapsed());
        if back != b {
            bail!("round trip {i}: sent {:?}, got {:?}", b[0], back[0]);
        }
    }
    let total = t0.elapsed();
    rr.sort();
    Ok((total, rr))
}

/// Log bytes the primary has sent to the backup so far: `bytes_acked` of
/// its TCP connections to `backup_addr`, from `ss` inside its namespace.
fn log_bytes(primary: &Netns, backup_addr: &str) -> Result<u64> {
    let out = vmm::lab::netns::run(primary.exec("ss").args(["-tinH", "dst", backup_addr]))?;
    Ok(out
        .split_whitespace()
        .filter_map(|w| w.strip_prefix("bytes_acked:"))
        .filter_map(|n| n.parse::<u64>().ok())
        .sum())
}

/// Where a run's log bytes can be read.
enum LogProbe<'a> {
    /// No log (bare).
    None,
    /// A log file (`vmft record`): its size.
    File(&'a Path),
    /// The channel of a primary (its namespace, the backup's address).
    Channel(&'a Netns, &'a str),
}

/// The three phases, one after the other, from the client's namespace,
/// with the log bytes of each phase when there is a log.
fn measure(client: &Netns, sizes: Sizes, log: LogProbe) -> Result<Figures> {
    let mut f = Figures::default();
    let mut marks = Vec::new();
    let mut mark = || -> Result<()> {
        match log {
            LogProbe::None => {}
            LogProbe::File(p) => marks.push(std::fs::metadata(p)?.len()),
            LogProbe::Channel(ns, addr) => marks.push(log_bytes(ns, addr)?),
        }
        Ok(())
    };
    mark()?;
    f.sink = sink(client, sizes.sink_bytes)?;
    mark()?;
    (f.source, f.source_bytes) = source(client, sizes.source_lines)?;
    mark()?;
    (f.rr_total, f.rr) = round_trips(client, sizes.round_trips)?;
    mark()?;
    if marks.len() == 4 {
        f.log = Some([
            marks[1] - marks[0],
            marks[2] - marks[1],
            marks[3] - marks[2],
        ]);
    }
    Ok(f)
}

/// Boot the default guest running `net-all` once and snapshot it at its
/// ready marker (in a namespace of its own, its tap in no bridge).
fn snapshot(dir: &Path) -> Result<PathBuf> {
    let snap = dir.join("net.snap");
    let ns = Netns::with_prefix(PREFIX, "snap")?;
    ns.make_tap(TAP, None)?;
    let img = vmm::image::default_image().context("the default guest image")?;
    let mut cmd = ns.exec(&sibling("vmft")?.to_string_lossy());
    cmd.args(["run", "--workload", "net-all", "--append"])
        .arg(format!("vmft.ip={}/24 vmft.count=0", fmt_ip(&GUEST_IP)))
        .args(["--net", &net_opt(), "--no-stdin", "--snapshot-on-ready"])
        .arg(&snap)
        .arg("--kernel")
        .arg(&img.kernel)
        .arg("--initrd")
        .arg(&img.initrd);
    let t0 = Instant::now();
    let mut boot = Proc::spawn("boot", cmd)?;
    boot.wait_line("snapshot saved to", Duration::from_secs(600), |_| false)?;
    info!("snapshot after {:.1} s of boot", t0.elapsed().as_secs_f64());
    Ok(snap)
}

/// Up to three starts of `start`, again when the guest crashed starting
/// its servers.
fn with_retries<T>(what: &str, mut start: impl FnMut() -> Result<Option<T>>) -> Result<T> {
    for attempt in 1..=3 {
        if let Some(t) = start()? {
            return Ok(t);
        }
        warn!("RETRY {what}: the guest crashed starting its servers (known defect), attempt {attempt}");
    }
    bail!("{what}: the guest crashed starting its servers three times")
}

/// One monitor on its own: `vmft run` (bare), or `vmft record` to a log
/// file when `record` names one (recording without a backup: what
/// recording alone changes, without the channel and the output rule).
fn single(snap: &Path, sizes: Sizes, record: Option<&Path>) -> Result<Figures> {
    let what = if record.is_some() { "record" } else { "bare" };
    with_retries(what, || {
        let mut lan = Lan::with_prefix(PREFIX)?;
        let vm = lan.host("vm")?;
        let client = lan.host("client")?;
        vm.ns().make_tap(TAP, Some("br0"))?;
        let mut cmd = vm.ns().exec(&sibling("vmft")?.to_string_lossy());
        cmd.arg(if record.is_some() { "record" } else { "run" })
            .arg("--restore")
            .arg(snap)
            .args(["--net", &net_opt(), "--no-stdin"]);
        if let Some(log) = record {
            cmd.arg("--log").arg(log);
        }
        let mut p = Proc::spawn("vm", cmd)?;
        match p.wait_line(SERVERS_UP, Duration::from_secs(300), crashed_starting) {
            Ok(_) => {}
            Err(_) if crashed_starting(&p.text()) => return Ok(None),
            Err(e) => return Err(e),
        }
        info!("{what}: the guest serves; measuring");
        let probe = match record {
            Some(log) => LogProbe::File(log),
            None => LogProbe::None,
        };
        let f = measure(client.ns(), sizes, probe)?;
        let st = p.stop(Duration::from_secs(60))?;
        if !st.success() {
            bail!("the {what} vmft exited {st} after SIGTERM");
        }
        Ok(Some(f))
    })
}

/// The FT figures and the primary's own line on the output delay.
fn ft(dir: &Path, snap: &Path, sizes: Sizes) -> Result<(Figures, String)> {
    with_retries("ft", || {
        let mut lan = Lan::with_prefix(PREFIX)?;
        let primary = lan.host("primary")?;
        let backup = lan.host("backup")?;
        let client = lan.host("client")?;
        let services = lan.host("services")?;
        for h in [&primary, &backup] {
            h.ns().make_tap(TAP, Some("br0"))?;
        }
        let (sc, bc, pc) = (
            in_ns(services.ns()),
            in_ns(backup.ns()),
            in_ns(primary.ns()),
        );
        let side_args: Vec<OsString> = vec![
            "--restore".into(),
            snap.into(),
            "--net".into(),
            net_opt().into(),
        ];
        let mut pair = Pair::start(
            dir,
            &Place {
                command: &sc,
                ip: fmt_ip(&services.addr()),
            },
            &Place {
                command: &bc,
                ip: fmt_ip(&backup.addr()),
            },
            &Place {
                command: &pc,
                ip: fmt_ip(&primary.addr()),
            },
            &side_args,
            &[],
            &[],
        )?;
        match pair
            .console
            .wait_line(SERVERS_UP, Duration::from_secs(300), crashed_starting)
        {
            Ok(_) => {}
            Err(_) if crashed_starting(&pair.console.text()) => return Ok(None),
            Err(e) => return Err(e),
        }
        info!("FT: the guest serves; measuring");
        let f = measure(
            client.ns(),
            sizes,
            LogProbe::Channel(primary.ns(), pair.backup_addr.as_str()),
        )?;
        pair.stop()?;
        let text = pair.primary.text();
        let delay = text
            .lines()
            .find(|l| l.contains("output delay added by the rule"))
            .map(|l| l.trim().to_string())
            .unwrap_or_else(|| "(the primary printed no output-delay line)".into());
        Ok(Some((f, delay)))
    })
}

fn mbit(bytes: u64, d: Duration) -> f64 {
    bytes as f64 * 8.0 / d.as_secs_f64() / 1e6
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn mean(v: &[Duration]) -> Duration {
    if v.is_empty() {
        return Duration::ZERO;
    }
    v.iter().sum::<Duration>() / v.len() as u32
}

/// The whole bench: one snapshot, then `rounds` times a bare run, a
/// recording without a backup and an FT run, one after the other (so
/// that load from elsewhere on the machine falls on all alike), and the
/// table: one row per measure and round, FT against the bare run and the
/// recording of the same round.
pub fn run(sizes: Sizes, rounds: usize) -> Result<()> {
    if let Some(why) = net_problem() {
        bail!("the network bench needs root, /dev/net/tun and iproute2: {why}");
    }
    let dir = tempfile::tempdir()?;
    info!("network bench, {sizes:?}, {rounds} rounds");
    let snap = snapshot(dir.path())?;
    let mut results = Vec::new();
    for round in 1..=rounds {
        info!("round {round}/{rounds}: bare");
        let b = single(&snap, sizes, None).context("bare run")?;
        info!("round {round}/{rounds}: record");
        let log = dir.path().join(format!("record-{round}.log"));
        let r = single(&snap, sizes, Some(&log)).context("recording")?;
        let _ = std::fs::remove_file(&log);
        info!("round {round}/{rounds}: FT");
        let (f, delay) = ft(dir.path(), &snap, sizes).context("FT run")?;
        results.push((b, r, f, delay));
    }
    let p99 = |v: &[Duration]| bench::percentile(v, 99.0);
    let p50 = |v: &[Duration]| bench::percentile(v, 50.0);
    let rr_rate = |x: &Figures| x.rr.len() as f64 / x.rr_total.as_secs_f64();
    println!(
        "| measure | round | bare | record | FT | FT/bare | FT/record | log Mbit/s (record, FT) |"
    );
    println!("| --- | --- | --- | --- | --- | --- | --- | --- |");
    let row = |name: &str, round: usize, v: [f64; 3], log: String| {
        println!(
            "| {name} | {round} | {:.3} | {:.3} | {:.3} | {:.2} | {:.2} | {log} |",
            v[0],
            v[1],
            v[2],
            v[2] / v[0],
            v[2] / v[1]
        );
    };
    for (i, (b, r, f, _)) in results.iter().enumerate() {
        let rl = r.log.ok_or_else(|| anyhow!("no log figures"))?;
        let fl = f.log.ok_or_else(|| anyhow!("no log figures"))?;
        let runs = [b, r, f];
        row(
            &format!(
                "TCP receive, net-sink ({} kB), Mbit/s",
                sizes.sink_bytes / 1000
            ),
            i + 1,
            runs.map(|x| mbit(sizes.sink_bytes, x.sink)),
            format!("{:.2}, {:.2}", mbit(rl[0], r.sink), mbit(fl[0], f.sink)),
        );
        row(
            &format!(
                "TCP transmit, net-source ({} kB), Mbit/s",
                b.source_bytes / 1000
            ),
            i + 1,
            runs.map(|x| mbit(x.source_bytes, x.source)),
            format!("{:.2}, {:.2}", mbit(rl[1], r.source), mbit(fl[1], f.source)),
        );
        row(
            &format!(
                "request/response, net-echo (1 byte, {} on one connection), per s",
                sizes.round_trips
            ),
            i + 1,
            runs.map(rr_rate),
            format!(
                "{:.2}, {:.2}",
                mbit(rl[2], r.rr_total),
                mbit(fl[2], f.rr_total)
            ),
        );
        for (name, pick) in [
            ("mean", mean as fn(&[Duration]) -> Duration),
            ("p50", p50 as fn(&[Duration]) -> Duration),
            ("p99", p99 as fn(&[Duration]) -> Duration),
        ] {
            row(
                &format!("round trip {name}, ms"),
                i + 1,
                runs.map(|x| ms(pick(&x.rr))),
                String::new(),
            );
        }
    }
    println!();
    for (i, (b, r, f, delay)) in results.iter().enumerate() {
        let d = |x: &Figures, pick: fn(&[Duration]) -> Duration| ms(pick(&f.rr)) - ms(pick(&x.rr));
        println!(
            "Round {}: round trip FT minus bare: mean {:.2} ms, p99 {:.2} ms; FT minus record \
             (the channel and the output rule): mean {:.2} ms, p99 {:.2} ms; the primary's own \
             measure (console output, whole run): {delay}",
            i + 1,
            d(b, mean),
            d(b, p99_of),
            d(r, mean),
            d(r, p99_of),
        );
    }
    Ok(())
}

fn p99_of(v: &[Duration]) -> Duration {
    bench::percentile(v, 99.0)
}
