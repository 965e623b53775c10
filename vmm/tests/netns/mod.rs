//! The host-network tests' gate, over the namespaces of
//! `vmm::lab::netns` (hosts, a LAN, taps; see there), which this module
//! re-exports.
//!
//! A test that needs namespaces starts with `if !netns::require_net() {
//! return; }`: without root, /dev/net/tun or iproute2 it fails with a
//! message saying what is missing, unless `VMFT_SKIP_NET=1` asks to skip
//! it, and then it says so.
#![allow(dead_code, unused_imports)]

pub use vmm::lab::netns::*;

/// Whether to run a host-network test: yes if this machine can; if not,
/// skip (saying so) when `VMFT_SKIP_NET=1`, or fail saying what is
/// missing.
pub fn require_net() -> bool {
    let skip = std::env::var("VMFT_SKIP_NET").ok();
    match net_gate(net_problem(), skip.as_deref()) {
        Ok(run) => {
            if !run {
                let name = std::thread::current().name().unwrap_or("?").to_string();
                eprintln!(
                    "SKIPPED (VMFT_SKIP_NET=1): {name}: {}",
                    net_problem().unwrap_or_default()
                );
            }
            run
        }
        Err(why) => panic!("{why}"),
    }
}

/// The decision behind [`require_net`]: run, skip (asked for by name), or
/// fail.
pub fn net_gate(problem: Option<String>, skip_env: Option<&str>) -> Result<bool, String> {
    match (problem, skip_env) {
        (None, _) => Ok(true),
        (Some(_), Some("1")) => Ok(false),
        (Some(why), _) => Err(format!(
            "this host-network test cannot run here: {why}; it needs root, /dev/net/tun \
             and iproute2 (ip, bridge); set VMFT_SKIP_NET=1 to skip the host-network \
             tests on purpose"
        )),
    }
}
