//! The etcd backend against a real etcd (Debian's etcd-server) on loopback.

mod common;

use std::sync::Arc;

use arbiter::{Arbiter, Decision};
use common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn etcd_race_200_claimants_on_50_keys_has_one_winner_each() {
    if !require_etcd("etcd_race_200_claimants_on_50_keys_has_one_winner_each") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let members = start_etcd(1, dir.path());
    let urls: Vec<String> = members.iter().map(|m| m.client_url.clone()).collect();
    wait_ready(&urls).await;
    let answers: Answers = Default::default();
    let u = urls.clone();
    race(
        move || etcd_backend(&u),
        answers.clone(),
        Default::default(),
    )
    .await;
    let answers = answers.lock().unwrap().clone();
    let winners = check_one_winner(&answers);
    let mut a = etcd_backend(&urls);
    for (key, w) in &winners {
        assert_eq!(
            a.owner(&format!("vm-{key}"), 1).await.unwrap().as_ref(),
            Some(w)
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_member_cluster_keeps_answering_with_one_member_killed() {
    if !require_etcd("three_member_cluster_keeps_answering_with_one_member_killed") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut members = start_etcd(3, dir.path());
    let urls: Vec<String> = members.iter().map(|m| m.client_url.clone()).collect();
    wait_ready(&urls).await;
    let mut first = etcd_backend(&urls);
    for k in 0..20 {
        let who = format!("before-{}", k % 3);
        assert_eq!(
            first
                .test_and_set(&format!("vm-{k}"), 7, &who)
                .await
                .unwrap(),
            Decision::Won
        );
    }
    // SIGKILL one member.
    members[0].child.kill().unwrap();
    members[0].child.wait().unwrap();
    let mut a = etcd_backend(&urls);
    for k in 0..20 {
        let expected = first.identity(&format!("before-{}", k % 3));
        assert_eq!(
            a.owner(&format!("vm-{k}"), 7).await.unwrap(),
            Some(expected.clone())
        );
        assert_eq!(
            a.test_and_set(&format!("vm-{k}"), 7, "after")
                .await
                .unwrap(),
            Decision::Lost { owner: expected },
            "decision changed after the kill"
        );
    }
    // New decisions are still made, one winner each.
    let answers: Answers = Default::default();
    let mut tasks = Vec::new();
    for c in 0..10 {
        let urls = urls.clone();
        let answers = answers.clone();
        tasks.push(tokio::spawn(async move {
            let mut a = etcd_backend(&urls);
            let id = a.identity(&format!("c{c}"));
            for k in 0..KEYS {
                let d = a
                    .test_and_set(&format!("new-{k}"), 1, &format!("c{c}"))
                    .await
                    .unwrap();
                answers.lock().unwrap().push((k, id.clone(), d));
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    check_one_winner(&Arc::try_unwrap(answers).unwrap().into_inner().unwrap());
}

#[test]
fn missing_etcd_fails_the_test_unless_skipping_was_asked_for() {
    let why = etcd_gate(None, "/nonexistent/etcd", "some_test").unwrap_err();
    assert!(why.contains("some_test needs etcd"), "{why}");
    assert!(why.contains("VMFT_SKIP_ETCD=1"), "{why}");
    assert!(
        etcd_gate(Some("0"), "/nonexistent/etcd", "t").is_err(),
        "only VMFT_SKIP_ETCD=1 skips"
    );
    assert!(etcd_gate(Some(""), "/nonexistent/etcd", "t").is_err());
    let why = etcd_gate(None, "false", "t").unwrap_err();
    assert!(why.contains("--version` failed"), "{why}");
    assert_eq!(etcd_gate(Some("1"), "/nonexistent/etcd", "t"), Ok(false));
    assert_eq!(etcd_gate(None, "true", "t"), Ok(true));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn etcd_two_backends_with_the_same_name_never_both_win() {
    if !require_etcd("etcd_two_backends_with_the_same_name_never_both_win") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let members = start_etcd(1, dir.path());
    let urls: Vec<String> = members.iter().map(|m| m.client_url.clone()).collect();
    wait_ready(&urls).await;
    same_name_race(|| etcd_backend(&urls)).await;
}
