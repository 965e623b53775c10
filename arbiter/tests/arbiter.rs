//! The built-in arbiter under load, crash and bad input.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use arbiter::client::{Client, ClientConfig};
use arbiter::protocol::{frame_len, ErrorCode, Request, Response, VERSION};
use arbiter::server::{Server, ServerConfig};
use arbiter::{Arbiter, ArbiterError, Decision};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const TOKEN: &[u8] = b"test-secret-token";
mod common;
use common::*;

async fn start_in_process(dir: &std::path::Path) -> String {
    let server = Server::bind("127.0.0.1:0", dir, ServerConfig::new(TOKEN))
        .await
        .unwrap();
    let addr = server.local_addr().to_string();
    tokio::spawn(server.run());
    addr
}

fn tcp_backend(addr: &str, budget: Duration) -> Client {
    let mut cfg = ClientConfig::new(addr, TOKEN);
    cfg.retry_budget = budget;
    Client::new(cfg)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn race_200_claimants_on_50_keys_has_one_winner_each() {
    let dir = tempfile::tempdir().unwrap();
    let addr = start_in_process(dir.path()).await;
    let answers: Answers = Default::default();
    let a = addr.clone();
    race(
        move || tcp_backend(&a, Duration::from_secs(30)),
        answers.clone(),
        Default::default(),
    )
    .await;
    let answers = answers.lock().unwrap().clone();
    assert_eq!(answers.len(), KEYS * CLAIMANTS);
    let winners = check_one_winner(&answers);
    let mut c = Client::new(ClientConfig::new(addr, TOKEN));
    for (key, w) in &winners {
        assert_eq!(
            c.owner(&format!("vm-{key}"), 1).await.unwrap().as_ref(),
            Some(w)
        );
    }
    assert_eq!(
        c.owner("vm-0", 2).await.unwrap(),
        None,
        "other generation undecided"
    );
}

fn spawn_server(dir: &std::path::Path, addr: &str) -> (Child, String) {
    spawn_server_with(dir, addr, &[])
}

fn spawn_server_with(dir: &std::path::Path, addr: &str, extra: &[&str]) -> (Child, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_arbiter"))
        .args(["serve", "--listen", addr, "--data"])
        .arg(dir)
        .args(extra)
        .env("ARBITER_TOKEN", std::str::from_utf8(TOKEN).unwrap())
        .env("ARBITER_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let bound = line
        .trim()
        .strip_prefix("listening ")
        .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
        .to_string();
    (child, bound)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kill_9_mid_load_loses_no_answered_decision() {
    let dir = tempfile::tempdir().unwrap();
    let (mut child, addr) = spawn_server(dir.path(), "127.0.0.1:0");
    let answers: Answers = Default::default();
    let won = Arc::new(AtomicUsize::new(0));
    let a = addr.clone();
    let load = tokio::spawn(race(
        move || tcp_backend(&a, Duration::from_secs(60)),
        answers.clone(),
        won.clone(),
    ));
    // Kill once some, not all, decisions have been answered.
    while won.load(Ordering::SeqCst) < 5 {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    let before_kill: Vec<_> = answers.lock().unwrap().clone();
    let (mut child2, addr2) = spawn_server(dir.path(), &addr);
    assert_eq!(addr2, addr);
    load.await.unwrap();
    let all = answers.lock().unwrap().clone();
    let winners = check_one_winner(&all);
    // Every decision answered before the kill is unchanged after restart.
    let mut c = Client::new(ClientConfig::new(addr, TOKEN));
    for (key, who, d) in &before_kill {
        let owner = c.owner(&format!("vm-{key}"), 1).await.unwrap();
        let expected = match d {
            Decision::Won => who.clone(),
            Decision::Lost { owner } => owner.clone(),
        };
        assert_eq!(
            owner.as_ref(),
            Some(&expected),
            "vm-{key} changed across the crash"
        );
        assert_eq!(&winners[key], &expected);
    }
    assert!(!before_kill.is_empty());
    child2.kill().unwrap();
    child2.wait().unwrap();
}

async fn raw_connect(addr: &str) -> TcpStream {
    TcpStream::connect(addr).await.unwrap()
}

async fn read_response(s: &mut TcpStream) -> Option<Response> {
    let mut prefix = [0u8; 4];
    let r = tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut prefix))
        .await
        .expect("server answers or closes within 5 s");
    r.ok()?;
    let mut body = vec![0u8; frame_len(prefix).unwrap()];
    s.read_exact(&mut body).await.ok()?;
    Some(Response::decode(&body).unwrap())
}

async fn closed(s: &mut TcpStream) -> bool {
    let mut b = [0u8; 1];
    matches!(
        tokio::time::timeout(Duration::from_secs(5), s.read(&mut b)).await,
        Ok(Ok(0)) | Ok(Err(_))
    )
}

async fn good_client_still_works(addr: &str, vm: &str) {
    let mut c = Client::new(ClientConfig::new(addr, TOKEN));
    assert_eq!(c.test_and_set(vm, 1, "good").await.unwrap(), Decision::Won);
}

#[tokio::test]
async fn bad_input_is_refused_and_the_server_keeps_serving() {
    let dir = tempfile::tempdir().unwrap();
    let addr = start_in_process(dir.path()).await;

    // Garbage bytes: an error answer (bad request or bad version) or a close.
    let mut s = raw_connect(&addr).await;
    s.write_all(b"\x00\x00\x00\x05GARBAGE GARBAGE")
        .await
        .unwrap();
    assert!(matches!(
        read_response(&mut s).await,
        Some(Response::Error { .. }) | None
    ));
    assert!(closed(&mut s).await);
    good_client_still_works(&addr, "after-garbage").await;

    // Oversized frame.
    let mut s = raw_connect(&addr).await;
    s.write_all(&(1u32 << 30).to_be_bytes()).await.unwrap();
    match read_response(&mut s).await {
        Some(Response::Error { code, message, .. }) => {
            assert_eq!(code, ErrorCode::BadRequest);
            assert!(message.contains("exceeds"), "{message}");
        }
        other => panic!("expected an error, got {other:?}"),
    }
    assert!(closed(&mut s).await);
    good_client_still_works(&addr, "after-oversized").await;

    // Truncated frame: promise 100 bytes, send 10, hang up.
    let mut s = raw_connect(&addr).await;
    s.write_all(&100u32.to_be_bytes()).await.unwrap();
    s.write_all(&[VERSION, 1, 0, 0, 0, 0, 0, 0, 0, 0])
        .await
        .unwrap();
    s.shutdown().await.unwrap();
    assert!(closed(&mut s).await);
    good_client_still_works(&addr, "after-truncated").await;

    // Wrong token, and a request without any Hello.
    let mut s = raw_connect(&addr).await;
    s.write_all(
        &Request::Hello {
            token: b"wrong".to_vec(),
        }
        .encode(),
    )
    .await
    .unwrap();
    assert!(matches!(
        read_response(&mut s).await,
        Some(Response::Error {
            code: ErrorCode::Unauthenticated,
            ..
        })
    ));
    assert!(closed(&mut s).await);
    let mut s = raw_connect(&addr).await;
    let req = Request::TestAndSet {
        id: 1,
        vm: "sneaky".into(),
        generation: 1,
        claimant: "x".into(),
    };
    s.write_all(&req.encode()).await.unwrap();
    assert!(matches!(
        read_response(&mut s).await,
        Some(Response::Error {
            code: ErrorCode::Unauthenticated,
            ..
        })
    ));
    let mut c = Client::new(ClientConfig::new(&addr, TOKEN));
    assert_eq!(
        c.owner("sneaky", 1).await.unwrap(),
        None,
        "unauthenticated claim had no effect"
    );

    // The client reports a wrong token as a refusal, not a decision.
    let mut bad = Client::new(ClientConfig::new(&addr, b"nope".to_vec()));
    assert!(matches!(
        bad.test_and_set("vm", 1, "x").await,
        Err(ArbiterError::Rejected { .. })
    ));
    good_client_still_works(&addr, "after-bad-token").await;
}

#[tokio::test]
async fn unreachable_arbiter_is_an_error_not_a_decision() {
    // A port nobody listens on.
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap().to_string();
    drop(l);
    let mut cfg = ClientConfig::new(&addr, TOKEN);
    cfg.retry_budget = Duration::from_millis(300);
    let mut c = Client::new(cfg);
    match c.test_and_set("vm", 1, "me").await {
        Err(ArbiterError::Unreachable {
            attempts, addr: a, ..
        }) => {
            assert!(attempts >= 2, "retried ({attempts})");
            assert_eq!(a, addr);
        }
        other => panic!("expected Unreachable, got {other:?}"),
    }
}

#[tokio::test]
async fn invalid_names_are_rejected_before_sending() {
    let mut c = Client::new(ClientConfig::new("127.0.0.1:1", TOKEN));
    assert!(matches!(
        c.test_and_set("", 1, "me").await,
        Err(ArbiterError::Invalid(_))
    ));
    assert!(matches!(
        c.test_and_set("vm", 1, "bad\nname").await,
        Err(ArbiterError::Invalid(_))
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_clients_with_the_same_name_never_both_win() {
    let dir = tempfile::tempdir().unwrap();
    let addr = start_in_process(dir.path()).await;
    same_name_race(|| tcp_backend(&addr, Duration::from_secs(10))).await;
}

/// Run `arbiter claim` as its own process; its stdout lines.
fn cli_claim(addr: &str, vm: &str, name: &str) -> Vec<String> {
    let out = Command::new(env!("CARGO_BIN_EXE_arbiter"))
        .args(["claim", "--server", addr, "--vm", vm, "--generation", "1"])
        .args(["--claimant", name])
        .env("ARBITER_TOKEN", std::str::from_utf8(TOKEN).unwrap())
        .env("ARBITER_LOG", "warn")
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(str::to_string)
        .collect()
}

#[tokio::test]
async fn two_claim_processes_with_the_same_name_never_both_win() {
    let dir = tempfile::tempdir().unwrap();
    let (mut child, addr) = spawn_server(dir.path(), "127.0.0.1:0");
    let first = cli_claim(&addr, "cli-vm", "backup");
    let second = cli_claim(&addr, "cli-vm", "backup");
    let id = |lines: &[String]| {
        lines[0]
            .strip_prefix("claimant backup:")
            .unwrap_or_else(|| panic!("first line names the identity: {lines:?}"))
            .to_string()
    };
    let (id1, id2) = (id(&first), id(&second));
    assert_ne!(id1, id2);
    assert_eq!(first[1], "won", "{first:?}");
    assert_eq!(second[1], format!("lost backup:{id1}"), "{second:?}");
    assert_eq!(first.len(), 2);
    let mut c = Client::new(ClientConfig::new(&addr, TOKEN));
    assert_eq!(
        c.owner("cli-vm", 1).await.unwrap(),
        Some(format!("backup:{id1}"))
    );
    child.kill().unwrap();
    child.wait().unwrap();
}

#[tokio::test]
async fn claimant_names_too_long_for_an_identity_are_rejected() {
    let mut c = Client::new(ClientConfig::new("127.0.0.1:1", TOKEN));
    let long = "n".repeat(arbiter::MAX_CLAIMANT_NAME + 1);
    assert!(matches!(
        c.test_and_set("vm", 1, &long).await,
        Err(ArbiterError::Invalid(_))
    ));
    let longest = "n".repeat(arbiter::MAX_CLAIMANT_NAME);
    assert!(c.identity(&longest).len() <= arbiter::protocol::MAX_NAME);
}

/// A raw connection that completed the handshake.
async fn authenticated(addr: &str) -> TcpStream {
    let mut s = raw_connect(addr).await;
    let hello = Request::Hello {
        token: TOKEN.to_vec(),
    };
    s.write_all(&hello.encode()).await.unwrap();
    assert_eq!(read_response(&mut s).await, Some(Response::HelloOk));
    s
}

/// A connection over the cap: told "busy", then closed.
async fn assert_refused_busy(addr: &str, cap: usize) {
    let mut s = raw_connect(addr).await;
    let hello = Request::Hello {
        token: TOKEN.to_vec(),
    };
    s.write_all(&hello.encode()).await.unwrap();
    match read_response(&mut s).await {
        Some(Response::Error { code, message, .. }) => {
            assert_eq!(code, ErrorCode::Busy);
            assert!(message.contains("too many connections"), "{message}");
            assert!(message.contains(&format!("cap is {cap}")), "{message}");
        }
        other => panic!("expected a busy refusal, got {other:?}"),
    }
    assert!(closed(&mut s).await);
}

#[tokio::test]
async fn connections_over_the_cap_are_refused_busy() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = ServerConfig::new(TOKEN);
    cfg.max_connections = 2;
    let server = Server::bind("127.0.0.1:0", dir.path(), cfg).await.unwrap();
    let addr = server.local_addr().to_string();
    tokio::spawn(server.run());

    let mut a = authenticated(&addr).await;
    let b = authenticated(&addr).await;
    assert_refused_busy(&addr, 2).await;
    assert_refused_busy(&addr, 2).await;

    // A client meets "busy" as a retryable failure, never as a decision.
    let mut cfg = ClientConfig::new(&addr, TOKEN);
    cfg.retry_budget = Duration::from_millis(300);
    match Client::new(cfg).test_and_set("capped", 1, "x").await {
        Err(ArbiterError::Unreachable { last, .. }) => {
            assert!(last.contains("busy"), "{last}")
        }
        other => panic!("expected Unreachable (busy), got {other:?}"),
    }

    // The connections inside the cap are served.
    let owner = Request::Owner {
        id: 9,
        vm: "capped".into(),
        generation: 1,
    };
    a.write_all(&owner.encode()).await.unwrap();
    assert_eq!(
        read_response(&mut a).await,
        Some(Response::OwnerIs { id: 9, owner: None })
    );

    // A closed connection frees its slot (once the server has seen the close).
    drop(b);
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let mut probe = loop {
        let mut probe = raw_connect(&addr).await;
        let hello = Request::Hello {
            token: TOKEN.to_vec(),
        };
        probe.write_all(&hello.encode()).await.unwrap();
        if read_response(&mut probe).await == Some(Response::HelloOk) {
            break probe;
        }
        assert!(std::time::Instant::now() < deadline, "slot never freed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let claim = Request::TestAndSet {
        id: 10,
        vm: "capped".into(),
        generation: 1,
        claimant: "y".into(),
    };
    probe.write_all(&claim.encode()).await.unwrap();
    assert_eq!(
        read_response(&mut probe).await,
        Some(Response::Won { id: 10 })
    );
}

#[tokio::test]
async fn serve_max_connections_flag_sets_the_cap() {
    let dir = tempfile::tempdir().unwrap();
    let (mut child, addr) =
        spawn_server_with(dir.path(), "127.0.0.1:0", &["--max-connections", "1"]);
    let a = authenticated(&addr).await;
    assert_refused_busy(&addr, 1).await;
    drop(a);
    child.kill().unwrap();
    child.wait().unwrap();
}
