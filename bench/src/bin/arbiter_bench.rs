//! Claims per second and latency of the arbiter backends with 100
//! concurrent clients, built-in server and etcd measured in one run.
//!
//! `cargo run --release -p bench --bin arbiter_bench [-- SECONDS]`

use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arbiter::client::{Client, ClientConfig};
use arbiter::etcd::{EtcdArbiter, EtcdConfig};
use arbiter::server::{Server, ServerConfig};
use arbiter::Arbiter;
use bench::percentile;

const CLIENTS: usize = 100;
const TOKEN: &[u8] = b"bench-token";

#[derive(Clone, Copy)]
enum Workload {
    /// Every claim is a new register: a durable decision each time.
    NewKeys,
    /// All clients claim the same 100 registers over and over: after the
    /// first round every answer is "lost" (a read).
    Contended,
}

async fn run<A, F>(make: F, workload: Workload, secs: u64) -> (usize, f64, Duration, Duration)
where
    A: Arbiter + Send + 'static,
    F: Fn() -> A,
{
    let samples = Arc::new(Mutex::new(Vec::new()));
    let deadline = Instant::now() + Duration::from_secs(secs);
    let start = Instant::now();
    let mut tasks = Vec::new();
    for c in 0..CLIENTS {
        let mut a = make();
        let samples = samples.clone();
        tasks.push(tokio::spawn(async move {
            let mut local = Vec::new();
            let mut i = 0u64;
            while Instant::now() < deadline {
                let (vm, gen) = match workload {
                    Workload::NewKeys => (format!("new-{c}-{i}"), 1),
                    Workload::Contended => (format!("hot-{}", i % 100), 1),
                };
                let t = Instant::now();
                a.test_and_set(&vm, gen, &format!("c{c}"))
                    .await
                    .expect("claim");
                local.push(t.elapsed());
                i += 1;
            }
            samples.lock().unwrap().extend(local);
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let elapsed = start.elapsed().as_secs_f64();
    let mut s = samples.lock().unwrap().clone();
    s.sort();
    (
        s.len(),
        s.len() as f64 / elapsed,
        percentile(&s, 50.0),
        percentile(&s, 99.0),
    )
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn ms(d: Duration) -> String {
    format!("{:.2}", d.as_secs_f64() * 1000.0)
}

#[tokio::main(flavor = "multi_thread")]
async fn main() {
    let secs: u64 = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(5);
    let dir = tempfile::tempdir().unwrap();
    let server = Server::bind(
        "127.0.0.1:0",
        &dir.path().join("builtin"),
        ServerConfig::new(TOKEN),
    )
    .await
    .unwrap();
    let addr = server.local_addr().to_string();
    tokio::spawn(server.run());

    let (cport, pport) = (free_port(), free_port());
    let curl = format!("http://127.0.0.1:{cport}");
    let purl = format!("http://127.0.0.1:{pport}");
    let etcd = Command::new("etcd")
        .args(["--name", "b0", "--data-dir"])
        .arg(dir.path().join("etcd"))
        .args([
            "--listen-client-urls",
            &curl,
            "--advertise-client-urls",
            &curl,
        ])
        .args([
            "--listen-peer-urls",
            &purl,
            "--initial-advertise-peer-urls",
            &purl,
        ])
        .args(["--initial-cluster", &format!("b0={purl}")])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn();
    let mut etcd = match etcd {
        Ok(c) => Some(c),
        Err(e) => {
            eprintln!("etcd not available ({e}); its rows are skipped");
            None
        }
    };
    let etcd_cfg = EtcdConfig::new(vec![curl.clone()]);
    if etcd.is_some() {
        let mut probe = EtcdArbiter::new(etcd_cfg.clone());
        probe.owner("probe", 0).await.expect("etcd came up");
    }

    println!("| backend | workload | claims | claims/s | p50 ms | p99 ms |");
    println!("| --- | --- | --- | --- | --- | --- |");
    for (wname, w) in [
        ("new register each claim", Workload::NewKeys),
        ("100 hot registers", Workload::Contended),
    ] {
        let a = addr.clone();
        let (n, rate, p50, p99) = run(
            move || Client::new(ClientConfig::new(a.clone(), TOKEN)),
            w,
            secs,
        )
        .await;
        println!(
            "| built-in | {wname} | {n} | {rate:.0} | {} | {} |",
            ms(p50),
            ms(p99)
        );
        if etcd.is_some() {
            let cfg = etcd_cfg.clone();
            let (n, rate, p50, p99) = run(move || EtcdArbiter::new(cfg.clone()), w, secs).await;
            println!(
                "| etcd 3.4 (1 member) | {wname} | {n} | {rate:.0} | {} | {} |",
                ms(p50),
                ms(p99)
            );
        }
    }
    if let Some(c) = etcd.as_mut() {
        let _ = c.kill();
        let _ = c.wait();
    }
}
