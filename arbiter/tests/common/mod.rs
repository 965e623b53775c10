//! Helpers shared by the arbiter integration tests: the claim race and its
//! checks, and an etcd cluster on loopback.
#![allow(dead_code)]

use std::collections::HashMap;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arbiter::etcd::{EtcdArbiter, EtcdConfig};
use arbiter::{Arbiter, Decision};

pub const KEYS: usize = 50;
pub const CLAIMANTS: usize = 200;

/// (key, claimant identity, decision) of every answered claim.
pub type Answers = Arc<Mutex<Vec<(usize, String, Decision)>>>;

/// `CLAIMANTS` claimants, each claiming all `KEYS` keys starting at a
/// different key, each with its own backend connection from `make`.
pub async fn race<A, F>(make: F, answers: Answers, won: Arc<AtomicUsize>)
where
    A: Arbiter + Send + 'static,
    F: Fn() -> A,
{
    let mut tasks = Vec::new();
    for c in 0..CLAIMANTS {
        let mut backend = make();
        let answers = answers.clone();
        let won = won.clone();
        tasks.push(tokio::spawn(async move {
            let me = format!("claimant-{c}");
            let id = backend.identity(&me);
            for k in 0..KEYS {
                let key = (k + c) % KEYS;
                let d = backend
                    .test_and_set(&format!("vm-{key}"), 1, &me)
                    .await
                    .unwrap_or_else(|e| panic!("{me} on vm-{key}: {e}"));
                if d == Decision::Won {
                    won.fetch_add(1, Ordering::SeqCst);
                }
                answers.lock().unwrap().push((key, id.clone(), d));
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
}

/// Two backends made one after the other, both claiming as "backup",
/// race for the same registers: exactly one of them wins each, the other
/// is told the winner's identity, and a retry by either gives it the same
/// answer again (the winner wins again).
pub async fn same_name_race<A, F>(make: F)
where
    A: Arbiter + Send + 'static,
    F: Fn() -> A,
{
    const REGISTERS: usize = 20;
    let (a, b) = (make(), make());
    let (ia, ib) = (a.identity("backup"), b.identity("backup"));
    assert_ne!(ia, ib, "same name, different identities");
    for id in [&ia, &ib] {
        let parts: Vec<&str> = id.rsplitn(3, ':').collect();
        assert_eq!(parts.len(), 3, "{id}");
        assert_eq!(parts[2], "backup", "{id}");
        assert_eq!(parts[1], std::process::id().to_string(), "{id}");
        assert!(
            parts[0].len() == 16 && parts[0].chars().all(|c| c.is_ascii_hexdigit()),
            "{id}"
        );
    }
    assert_eq!(a.identity("backup"), ia, "an identity is fixed per client");
    let claim_all = |mut x: A| {
        tokio::spawn(async move {
            let mut answers = Vec::new();
            for r in 0..REGISTERS {
                let d = x
                    .test_and_set(&format!("same-name-{r}"), 1, "backup")
                    .await
                    .unwrap();
                answers.push(d);
            }
            (x, answers)
        })
    };
    let (ta, tb) = (claim_all(a), claim_all(b));
    let ((mut a, da), (mut b, db)) = (ta.await.unwrap(), tb.await.unwrap());
    let mut wins = [0, 0];
    for r in 0..REGISTERS {
        match (&da[r], &db[r]) {
            (Decision::Won, Decision::Lost { owner }) => {
                assert_eq!(owner, &ia);
                wins[0] += 1;
            }
            (Decision::Lost { owner }, Decision::Won) => {
                assert_eq!(owner, &ib);
                wins[1] += 1;
            }
            other => panic!("same-name-{r}: not exactly one winner: {other:?}"),
        }
        let vm = format!("same-name-{r}");
        assert_eq!(
            a.test_and_set(&vm, 1, "backup").await.unwrap(),
            da[r],
            "retry"
        );
        assert_eq!(
            b.test_and_set(&vm, 1, "backup").await.unwrap(),
            db[r],
            "retry"
        );
    }
    assert_eq!(wins[0] + wins[1], REGISTERS);
}

/// Exactly one winner per key; every loser was told that winner.
pub fn check_one_winner(answers: &[(usize, String, Decision)]) -> HashMap<usize, String> {
    let mut winners: HashMap<usize, String> = HashMap::new();
    for (key, who, d) in answers {
        if *d == Decision::Won {
            if let Some(w) = winners.get(key) {
                assert_eq!(w, who, "vm-{key} has two winners: {w} and {who}");
            }
            winners.insert(*key, who.clone());
        }
    }
    assert_eq!(winners.len(), KEYS, "every key has a winner");
    for (key, _, d) in answers {
        if let Decision::Lost { owner } = d {
            assert_eq!(owner, &winners[key], "vm-{key}: loser told the wrong owner");
        }
    }
    winners
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Whether the etcd test `test` is to run. etcd (Debian's `etcd-server`,
/// which scripts/test.sh installs) must be runnable; if it is not, the test
/// fails with a message saying so. The only way around that is to ask for it:
/// with `VMFT_SKIP_ETCD=1` in the environment the etcd tests are skipped,
/// and each says so on stderr (written past libtest's output capture, so the
/// line shows in a normal `cargo test` run).
pub fn require_etcd(test: &str) -> bool {
    let skip = std::env::var("VMFT_SKIP_ETCD").ok();
    match etcd_gate(skip.as_deref(), "etcd", test) {
        Ok(run) => {
            if !run {
                use std::io::Write;
                let _ = writeln!(std::io::stderr(), "SKIPPED (VMFT_SKIP_ETCD=1): {test}");
            }
            run
        }
        Err(why) => panic!("{why}"),
    }
}

/// The decision behind [`require_etcd`]: `Ok(false)` to skip (asked for
/// with `skip == Some("1")`), `Ok(true)` if `program --version` runs, and
/// otherwise the error the test fails with.
pub fn etcd_gate(skip: Option<&str>, program: &str, test: &str) -> Result<bool, String> {
    if skip == Some("1") {
        return Ok(false);
    }
    let how = "install Debian's etcd-server (scripts/test.sh does), \
               or set VMFT_SKIP_ETCD=1 to skip the etcd tests";
    match Command::new(program)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
    {
        Ok(s) if s.success() => Ok(true),
        Ok(s) => Err(format!(
            "{test} needs etcd, but `{program} --version` failed ({s}); {how}"
        )),
        Err(e) => Err(format!(
            "{test} needs etcd, which is not installed (running `{program}`: {e}); {how}"
        )),
    }
}

pub struct EtcdMember {
    pub child: Child,
    pub client_url: String,
}

impl Drop for EtcdMember {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Start an `n`-member etcd cluster on loopback, data under `dir`.
pub fn start_etcd(n: usize, dir: &std::path::Path) -> Vec<EtcdMember> {
    let ports: Vec<(u16, u16)> = (0..n).map(|_| (free_port(), free_port())).collect();
    let cluster = ports
        .iter()
        .enumerate()
        .map(|(i, (_, p))| format!("m{i}=http://127.0.0.1:{p}"))
        .collect::<Vec<_>>()
        .join(",");
    ports
        .iter()
        .enumerate()
        .map(|(i, (c, p))| {
            let client_url = format!("http://127.0.0.1:{c}");
            let peer_url = format!("http://127.0.0.1:{p}");
            let log = std::fs::File::create(dir.join(format!("m{i}.log"))).unwrap();
            let child = Command::new("etcd")
                .arg("--name")
                .arg(format!("m{i}"))
                .arg("--data-dir")
                .arg(dir.join(format!("m{i}")))
                .args(["--listen-client-urls", &client_url])
                .args(["--advertise-client-urls", &client_url])
                .args(["--listen-peer-urls", &peer_url])
                .args(["--initial-advertise-peer-urls", &peer_url])
                .args(["--initial-cluster", &cluster])
                .args(["--initial-cluster-state", "new"])
                .args(["--initial-cluster-token", "vmft-test"])
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .expect("start etcd");
            EtcdMember { child, client_url }
        })
        .collect()
}

pub fn etcd_backend(urls: &[String]) -> EtcdArbiter {
    let mut cfg = EtcdConfig::new(urls.to_vec());
    cfg.retry_budget = Duration::from_secs(30);
    EtcdArbiter::new(cfg)
}

/// Wait until the cluster answers reads.
pub async fn wait_ready(urls: &[String]) {
    let mut a = etcd_backend(urls);
    a.owner("ready-probe", 0)
        .await
        .expect("etcd cluster did not come up");
}
