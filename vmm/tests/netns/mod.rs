//! Host networks for tests, built from network namespaces with iproute2's
//! `ip`, and removed again when dropped (also when the test panics).
//!
//! ```text
//! netns <prefix>switch                 netns <prefix>primary   (a Host)
//!  bridge "lan" ── p-1 ═══ veth ═══ uplink ── br0 10.77.0.1/24 ── tap (Host::open_tap)
//!               ── p-2 ═══ veth ═══ uplink ── br0 10.77.0.2/24     netns <prefix>client
//!               ── ...
//! ```
//!
//! A [`Lan`] is a bridge alone in a "switch" namespace; [`Lan::host`] adds
//! a [`Host`]: a namespace whose bridge `br0` (fixed MAC, the host's
//! address on the LAN's private /24 [`SUBNET`]) holds the uplink to the
//! switch and whatever taps the test attaches, as a physical host bridges
//! its NIC and its guests' taps. Nothing is created in the test process's
//! own namespace.
//!
//! Names are `vmft-t-<pid>-<n>-<role>`: unique per process and per call,
//! and recognisable, so that a later run removes what a killed run left
//! behind (namespaces whose pid is gone).
//!
//! A test that needs this starts with `if !netns::require_net() { return; }`:
//! without root, /dev/net/tun or iproute2 it fails with a message saying
//! what is missing, unless `VMFT_SKIP_NET=1` asks to skip it, and then it
//! says so.
#![allow(dead_code)]

use std::fs::File;
use std::os::fd::AsRawFd;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Once;

use vmm::devices::virtio::tap::{Tap, TapError};

/// The first three bytes of every address on a [`Lan`]: 10.77.0.0/24.
pub const SUBNET: [u8; 3] = [10, 77, 0];

/// Where `ip netns` keeps its names.
const NETNS_DIR: &str = "/run/netns";

/// What these tests need, or why they cannot run here.
fn net_problem() -> Option<String> {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let euid = unsafe { libc::geteuid() };
    if euid != 0 {
        return Some(format!("not running as root (euid {euid})"));
    }
    if let Err(e) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/net/tun")
    {
        return Some(format!("/dev/net/tun is not usable: {e}"));
    }
    for tool in ["ip", "bridge"] {
        let ran = Command::new(tool)
            .arg("-V")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        if !matches!(ran, Ok(s) if s.success()) {
            return Some(format!("iproute2's `{tool}` command does not run"));
        }
    }
    None
}

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

/// Run `cmd`; its stdout, or an error with the command and its stderr.
pub fn run(cmd: &mut Command) -> Result<String, String> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("{cmd:?}: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "{cmd:?}: {}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The names `ip netns list` shows.
pub fn list_netns() -> Vec<String> {
    run(Command::new("ip").args(["netns", "list"]))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_string)
        .collect()
}

/// Remove namespaces of earlier test processes that are gone (killed
/// before their `Drop` ran). Only names of the form `vmft-t-<pid>-...`
/// whose process no longer exists are touched.
fn remove_stale() {
    for name in list_netns() {
        let Some(pid) = name
            .strip_prefix("vmft-t-")
            .and_then(|rest| rest.split('-').next())
            .and_then(|pid| pid.parse::<u32>().ok())
        else {
            continue;
        };
        if pid != std::process::id() && !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            let _ = run(Command::new("ip").args(["netns", "del", &name]));
        }
    }
}

/// A network namespace of its own, deleted on drop.
#[derive(Debug)]
pub struct Netns {
    name: String,
}

impl Netns {
    /// A fresh namespace named `vmft-t-<pid>-<n>-<role>`, with `lo` up and
    /// IPv6 off (fewer stray frames in the tests).
    ///
    /// # Panics
    ///
    /// If `ip netns add` fails.
    pub fn new(role: &str) -> Netns {
        static SWEEP: Once = Once::new();
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        SWEEP.call_once(remove_stale);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let role: String = role
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
            .collect();
        let name = format!("vmft-t-{}-{n}-{role}", std::process::id());
        if let Err(e) = run(Command::new("ip").args(["netns", "add", &name])) {
            panic!("creating network namespace {name}: {e}");
        }
        let ns = Netns { name };
        ns.ip(&["link", "set", "lo", "up"]);
        ns.enter(|| {
            for path in [
                "/proc/sys/net/ipv6/conf/all/disable_ipv6",
                "/proc/sys/net/ipv6/conf/default/disable_ipv6",
            ] {
                // Best effort: a kernel without IPv6 has no such file.
                let _ = std::fs::write(path, "1");
            }
        });
        ns
    }

    /// Its name, for `ip netns exec` and `ip -n`.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// `ip -n NAME args...`; its stdout, or the error with `ip`'s message.
    pub fn try_ip(&self, args: &[&str]) -> Result<String, String> {
        run(Command::new("ip").arg("-n").arg(&self.name).args(args))
    }

    /// `ip -n NAME args...`; its stdout.
    ///
    /// # Panics
    ///
    /// If `ip` fails.
    pub fn ip(&self, args: &[&str]) -> String {
        self.try_ip(args).unwrap_or_else(|e| panic!("{e}"))
    }

    /// `bridge -n NAME args...`; its stdout.
    ///
    /// # Panics
    ///
    /// If `bridge` fails.
    pub fn bridge(&self, args: &[&str]) -> String {
        run(Command::new("bridge").arg("-n").arg(&self.name).args(args))
            .unwrap_or_else(|e| panic!("{e}"))
    }

    /// A command that runs `program` inside the namespace
    /// (`ip netns exec NAME program`), e.g. a monitor that opens its tap
    /// there; add arguments and run it as any `Command`.
    pub fn exec(&self, program: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name, program]);
        c
    }

    /// Run `f` on a thread that has joined the namespace (only that thread
    /// does: the test process stays where it is). Anything `f` opens there
    /// (a socket, a tap) stays in the namespace when used from elsewhere.
    ///
    /// # Panics
    ///
    /// If the namespace cannot be joined, or `f` panics.
    pub fn enter<R: Send>(&self, f: impl FnOnce() -> R + Send) -> R {
        let path = format!("{NETNS_DIR}/{}", self.name);
        let ns = File::open(&path).unwrap_or_else(|e| panic!("opening {path}: {e}"));
        std::thread::scope(|s| {
            s.spawn(|| {
                // SAFETY: `ns` is an open namespace file for the duration of
                // the call; setns changes only this thread's network
                // namespace, and this thread ends when `f` returns.
                let ret = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
                if ret != 0 {
                    panic!("joining {path}: {}", std::io::Error::last_os_error());
                }
                f()
            })
            .join()
            .unwrap_or_else(|e| std::panic::resume_unwind(e))
        })
    }

    /// Open (create) the tap `name` inside the namespace and bring it up.
    pub fn open_tap(&self, name: &str) -> Result<Tap, TapError> {
        self.enter(|| {
            let tap = Tap::open(name)?;
            tap.set_up()?;
            Ok(tap)
        })
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Deleting the namespace deletes every interface in it (a veth's
        // peer with it); a tap whose descriptor is still open keeps the
        // namespace alive, nameless, until it is closed.
        if let Err(e) = run(Command::new("ip").args(["netns", "del", &self.name])) {
            eprintln!("warning: {e}");
        }
    }
}

/// A LAN: a bridge alone in a "switch" namespace, and the hosts on it.
#[derive(Debug)]
pub struct Lan {
    switch: Netns,
    hosts: u8,
}

/// Name of the LAN's bridge in the switch namespace.
pub const LAN_BRIDGE: &str = "lan";

impl Lan {
    /// An empty LAN.
    ///
    /// # Panics
    ///
    /// If `ip` fails.
    pub fn new() -> Lan {
        let switch = Netns::new("switch");
        switch.ip(&["link", "add", LAN_BRIDGE, "type", "bridge"]);
        switch.ip(&["link", "set", LAN_BRIDGE, "up"]);
        Lan { switch, hosts: 0 }
    }

    /// The switch's namespace (its bridge is [`LAN_BRIDGE`]).
    pub fn switch(&self) -> &Netns {
        &self.switch
    }

    /// A new host on the LAN: namespace `...-<role>`, bridge `br0` with MAC
    /// `02:00:00:4d:00:<k>` and address 10.77.0.<k>/24 (k = 1, 2, ...),
    /// uplink `uplink` to the switch's port `p-<k>`.
    ///
    /// # Panics
    ///
    /// If `ip` fails, or past 200 hosts.
    pub fn host(&mut self, role: &str) -> Host {
        assert!(self.hosts < 200, "a Lan holds at most 200 hosts");
        self.hosts += 1;
        let k = self.hosts;
        let ns = Netns::new(role);
        let port = format!("p-{k}");
        let mac = [0x02, 0, 0, 0x4d, 0, k];
        let addr = [SUBNET[0], SUBNET[1], SUBNET[2], k];
        let sw = &self.switch;
        sw.ip(&[
            "link",
            "add",
            &port,
            "type",
            "veth",
            "peer",
            "name",
            "uplink",
            "netns",
            ns.name(),
        ]);
        sw.ip(&["link", "set", &port, "master", LAN_BRIDGE]);
        sw.ip(&["link", "set", &port, "up"]);
        let mac_text = fmt_mac(&mac);
        ns.ip(&["link", "add", "br0", "address", &mac_text, "type", "bridge"]);
        ns.ip(&["link", "set", "uplink", "master", "br0"]);
        ns.ip(&["link", "set", "uplink", "up"]);
        ns.ip(&["link", "set", "br0", "up"]);
        let cidr = format!("{}/24", fmt_ip(&addr));
        ns.ip(&["addr", "add", &cidr, "dev", "br0"]);
        Host {
            ns,
            port,
            mac,
            addr,
        }
    }

    /// Cut `host` off the LAN (its switch port goes down), as a pulled
    /// cable would.
    pub fn partition(&self, host: &Host) {
        self.switch.ip(&["link", "set", &host.port, "down"]);
    }

    /// Undo [`Lan::partition`].
    pub fn heal(&self, host: &Host) {
        self.switch.ip(&["link", "set", &host.port, "up"]);
    }

    /// The switch port (`p-<k>`) where the LAN's bridge last saw `mac`, if
    /// it knows it.
    pub fn port_of(&self, mac: &[u8; 6]) -> Option<String> {
        fdb_port(&self.switch, LAN_BRIDGE, mac)
    }
}

impl Default for Lan {
    fn default() -> Self {
        Lan::new()
    }
}

/// A host on a [`Lan`].
#[derive(Debug)]
pub struct Host {
    ns: Netns,
    /// Its port on the switch.
    port: String,
    mac: [u8; 6],
    addr: [u8; 4],
}

impl Host {
    /// Its namespace.
    pub fn ns(&self) -> &Netns {
        &self.ns
    }

    /// Its MAC (that of `br0`).
    pub fn mac(&self) -> [u8; 6] {
        self.mac
    }

    /// Its IPv4 address.
    pub fn addr(&self) -> [u8; 4] {
        self.addr
    }

    /// Its port on the switch (`p-<k>`).
    pub fn port(&self) -> &str {
        &self.port
    }

    /// Create the tap `name` in this host, bring it up and put it in `br0`,
    /// as a host does for the guest it runs.
    ///
    /// # Panics
    ///
    /// If the tap cannot be opened or attached.
    pub fn open_tap(&self, name: &str) -> Tap {
        let tap = self
            .ns
            .open_tap(name)
            .unwrap_or_else(|e| panic!("in {}: {e}", self.ns.name()));
        self.ns.ip(&["link", "set", tap.name(), "master", "br0"]);
        tap
    }

    /// The port of `br0` (`uplink` or a tap) where it last saw `mac`.
    pub fn port_of(&self, mac: &[u8; 6]) -> Option<String> {
        fdb_port(&self.ns, "br0", mac)
    }
}

/// The port of `bridge` in `ns` whose learned entry is `mac`.
fn fdb_port(ns: &Netns, bridge: &str, mac: &[u8; 6]) -> Option<String> {
    let want = fmt_mac(mac);
    ns.bridge(&["fdb", "show", "br", bridge])
        .lines()
        .find_map(|line| {
            let mut words = line.split_whitespace();
            if words.next() != Some(want.as_str()) {
                return None;
            }
            (words.next() == Some("dev")).then(|| words.next().map(str::to_string))?
        })
}

/// `02:00:00:4d:00:01`.
pub fn fmt_mac(mac: &[u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// `10.77.0.1`.
pub fn fmt_ip(ip: &[u8; 4]) -> String {
    format!("{}.{}.{}.{}", ip[0], ip[1], ip[2], ip[3])
}
