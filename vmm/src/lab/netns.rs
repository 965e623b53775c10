//! Hosts and a LAN built from network namespaces with iproute2's `ip`,
//! removed again when dropped (also when the caller panics).
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
//! switch and whatever taps the caller attaches, as a physical host
//! bridges its NIC and its guests' taps. Nothing is created in the calling
//! process's own namespace.
//!
//! Names are `<prefix>-<pid>-<n>-<role>` (prefix [`TEST_PREFIX`] unless
//! given): unique per process and per call, and recognisable, so that a
//! later run removes what a killed run left behind (namespaces of that
//! prefix whose pid is gone).
//!
//! Everything here needs root, `/dev/net/tun` and iproute2 (`ip`,
//! `bridge`); [`net_problem`] says which is missing.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::process::{Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use thiserror::Error;
use tracing::warn;

use crate::devices::virtio::tap::{Tap, TapError};

/// The first three bytes of every address on a [`Lan`]: 10.77.0.0/24.
pub const SUBNET: [u8; 3] = [10, 77, 0];

/// Name prefix of the tests' namespaces.
pub const TEST_PREFIX: &str = "vmft-t";

/// Name of the LAN's bridge in the switch namespace.
pub const LAN_BRIDGE: &str = "lan";

/// Where `ip netns` keeps its names.
const NETNS_DIR: &str = "/run/netns";

/// Most hosts on one [`Lan`].
const MAX_HOSTS: u8 = 200;

/// Errors building or using namespaces.
#[derive(Debug, Error)]
pub enum NetnsError {
    /// A command could not be started.
    #[error("{command}: {source}")]
    Spawn {
        /// The command, as debug-printed.
        command: String,
        /// Underlying error.
        source: std::io::Error,
    },
    /// A command failed.
    #[error("{command}: {status}: {stderr}")]
    Failed {
        /// The command, as debug-printed.
        command: String,
        /// Its exit status.
        status: ExitStatus,
        /// What it printed on stderr.
        stderr: String,
    },
    /// A thread could not join the namespace.
    #[error("joining network namespace {path}: {source}")]
    Enter {
        /// The namespace's file.
        path: String,
        /// Underlying error.
        source: std::io::Error,
    },
    /// A [`Lan`] is full.
    #[error("a LAN holds at most {MAX_HOSTS} hosts")]
    LanFull,
    /// Opening a tap failed.
    #[error(transparent)]
    Tap(#[from] TapError),
}

/// Why this machine cannot build namespaces and taps, if it cannot: not
/// root, no usable `/dev/net/tun`, or no iproute2.
pub fn net_problem() -> Option<String> {
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

/// Run `cmd`; its stdout, or an error with the command and its stderr.
pub fn run(cmd: &mut Command) -> Result<String, NetnsError> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(|source| NetnsError::Spawn {
            command: format!("{cmd:?}"),
            source,
        })?;
    if !out.status.success() {
        return Err(NetnsError::Failed {
            command: format!("{cmd:?}"),
            status: out.status,
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The names `ip netns list` shows (none if it fails).
pub fn list_netns() -> Vec<String> {
    run(Command::new("ip").args(["netns", "list"]))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_string)
        .collect()
}

/// Remove namespaces named `<prefix>-<pid>-...` whose process is gone
/// (killed before its `Drop` ran). Other names are not touched.
fn remove_stale(prefix: &str) {
    let head = format!("{prefix}-");
    for name in list_netns() {
        let Some(pid) = name
            .strip_prefix(&head)
            .and_then(|rest| rest.split('-').next())
            .and_then(|pid| pid.parse::<u32>().ok())
        else {
            continue;
        };
        if pid != std::process::id() && !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            if let Err(e) = run(Command::new("ip").args(["netns", "del", &name])) {
                warn!("removing the stale namespace {name}: {e}");
            }
        }
    }
}

/// A network namespace of its own, deleted on drop.
#[derive(Debug)]
pub struct Netns {
    name: String,
}

impl Netns {
    /// A fresh namespace named `vmft-t-<pid>-<n>-<role>` (the tests'
    /// prefix); see [`Netns::with_prefix`].
    pub fn new(role: &str) -> Result<Netns, NetnsError> {
        Netns::with_prefix(TEST_PREFIX, role)
    }

    /// A fresh namespace named `<prefix>-<pid>-<n>-<role>`, with `lo` up
    /// and IPv6 off (fewer stray frames). The first call for a prefix
    /// removes that prefix's namespaces left by dead processes.
    pub fn with_prefix(prefix: &str, role: &str) -> Result<Netns, NetnsError> {
        static SWEPT: Mutex<Vec<String>> = Mutex::new(Vec::new());
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        {
            let mut swept = SWEPT.lock().unwrap_or_else(|e| e.into_inner());
            if !swept.iter().any(|p| p == prefix) {
                remove_stale(prefix);
                swept.push(prefix.to_string());
            }
        }
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let role: String = role
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
            .collect();
        let name = format!("{prefix}-{}-{n}-{role}", std::process::id());
        run(Command::new("ip").args(["netns", "add", &name]))?;
        let ns = Netns { name };
        ns.ip(&["link", "set", "lo", "up"])?;
        ns.enter(|| {
            for path in [
                "/proc/sys/net/ipv6/conf/all/disable_ipv6",
                "/proc/sys/net/ipv6/conf/default/disable_ipv6",
            ] {
                // Best effort: a kernel without IPv6 has no such file.
                let _ = std::fs::write(path, "1");
            }
        })?;
        Ok(ns)
    }

    /// Its name, for `ip netns exec` and `ip -n`.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// `ip -n NAME args...`; its stdout, or the error with `ip`'s message.
    pub fn ip(&self, args: &[&str]) -> Result<String, NetnsError> {
        run(Command::new("ip").arg("-n").arg(&self.name).args(args))
    }

    /// `bridge -n NAME args...`; its stdout.
    pub fn bridge(&self, args: &[&str]) -> Result<String, NetnsError> {
        run(Command::new("bridge").arg("-n").arg(&self.name).args(args))
    }

    /// A command that runs `program` inside the namespace
    /// (`ip netns exec NAME program`, which execs the program: the child
    /// is the program itself, so signals reach it); add arguments and run
    /// it as any `Command`.
    pub fn exec(&self, program: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name, program]);
        c
    }

    /// Run `f` on a thread that has joined the namespace (only that thread
    /// does: the calling process stays where it is). Anything `f` opens
    /// there (a socket, a tap) stays in the namespace when used from
    /// elsewhere. A panic in `f` is resumed in the caller.
    pub fn enter<R: Send>(&self, f: impl FnOnce() -> R + Send) -> Result<R, NetnsError> {
        let path = format!("{NETNS_DIR}/{}", self.name);
        let ns = File::open(&path).map_err(|source| NetnsError::Enter {
            path: path.clone(),
            source,
        })?;
        std::thread::scope(|s| {
            s.spawn(|| {
                // SAFETY: `ns` is an open namespace file for the duration of
                // the call; setns changes only this thread's network
                // namespace, and this thread ends when `f` returns.
                let ret = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
                if ret != 0 {
                    return Err(NetnsError::Enter {
                        path: path.clone(),
                        source: std::io::Error::last_os_error(),
                    });
                }
                Ok(f())
            })
            .join()
            .unwrap_or_else(|e| std::panic::resume_unwind(e))
        })
    }

    /// Open (create) the tap `name` inside the namespace and bring it up;
    /// it lives as long as the returned descriptor.
    pub fn open_tap(&self, name: &str) -> Result<Tap, NetnsError> {
        self.enter(|| {
            let tap = Tap::open(name)?;
            tap.set_up()?;
            Ok(tap)
        })?
    }

    /// Make the persistent tap `name` (`ip tuntap add dev NAME mode tap
    /// vnet_hdr`, as a host does for the guest a monitor will run), put it
    /// in `bridge` if given, and bring it up. A monitor in this namespace
    /// then attaches to it by name.
    pub fn make_tap(&self, name: &str, bridge: Option<&str>) -> Result<(), NetnsError> {
        self.ip(&["tuntap", "add", "dev", name, "mode", "tap", "vnet_hdr"])?;
        if let Some(br) = bridge {
            self.ip(&["link", "set", name, "master", br])?;
        }
        self.ip(&["link", "set", name, "up"])?;
        Ok(())
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Deleting the namespace deletes every interface in it (a veth's
        // peer with it); a tap whose descriptor is still open keeps the
        // namespace alive, nameless, until it is closed.
        if let Err(e) = run(Command::new("ip").args(["netns", "del", &self.name])) {
            warn!("removing network namespace {}: {e}", self.name);
        }
    }
}

/// A LAN: a bridge alone in a "switch" namespace, and the hosts on it.
#[derive(Debug)]
pub struct Lan {
    switch: Netns,
    prefix: String,
    hosts: u8,
}

impl Lan {
    /// An empty LAN whose namespaces have the tests' prefix.
    pub fn new() -> Result<Lan, NetnsError> {
        Lan::with_prefix(TEST_PREFIX)
    }

    /// An empty LAN whose namespaces are named `<prefix>-...`.
    pub fn with_prefix(prefix: &str) -> Result<Lan, NetnsError> {
        let switch = Netns::with_prefix(prefix, "switch")?;
        switch.ip(&["link", "add", LAN_BRIDGE, "type", "bridge"])?;
        switch.ip(&["link", "set", LAN_BRIDGE, "up"])?;
        Ok(Lan {
            switch,
            prefix: prefix.to_string(),
            hosts: 0,
        })
    }

    /// The switch's namespace (its bridge is [`LAN_BRIDGE`]).
    pub fn switch(&self) -> &Netns {
        &self.switch
    }

    /// A new host on the LAN: namespace `...-<role>`, bridge `br0` with MAC
    /// `02:00:00:4d:00:<k>` and address 10.77.0.<k>/24 (k = 1, 2, ...),
    /// uplink `uplink` to the switch's port `p-<k>`.
    pub fn host(&mut self, role: &str) -> Result<Host, NetnsError> {
        if self.hosts >= MAX_HOSTS {
            return Err(NetnsError::LanFull);
        }
        self.hosts += 1;
        let k = self.hosts;
        let ns = Netns::with_prefix(&self.prefix, role)?;
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
        ])?;
        sw.ip(&["link", "set", &port, "master", LAN_BRIDGE])?;
        sw.ip(&["link", "set", &port, "up"])?;
        let mac_text = fmt_mac(&mac);
        ns.ip(&["link", "add", "br0", "address", &mac_text, "type", "bridge"])?;
        ns.ip(&["link", "set", "uplink", "master", "br0"])?;
        ns.ip(&["link", "set", "uplink", "up"])?;
        ns.ip(&["link", "set", "br0", "up"])?;
        let cidr = format!("{}/24", fmt_ip(&addr));
        ns.ip(&["addr", "add", &cidr, "dev", "br0"])?;
        Ok(Host {
            ns,
            port,
            mac,
            addr,
        })
    }

    /// Cut `host` off the LAN (its switch port goes down), as a pulled
    /// cable would.
    pub fn partition(&self, host: &Host) -> Result<(), NetnsError> {
        self.switch
            .ip(&["link", "set", &host.port, "down"])
            .map(drop)
    }

    /// Undo [`Lan::partition`].
    pub fn heal(&self, host: &Host) -> Result<(), NetnsError> {
        self.switch.ip(&["link", "set", &host.port, "up"]).map(drop)
    }

    /// The switch port (`p-<k>`) where the LAN's bridge last saw `mac`, if
    /// it knows it.
    pub fn port_of(&self, mac: &[u8; 6]) -> Result<Option<String>, NetnsError> {
        fdb_port(&self.switch, LAN_BRIDGE, mac)
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
    /// as a host does for the guest it runs; it lives as long as the
    /// returned descriptor.
    pub fn open_tap(&self, name: &str) -> Result<Tap, NetnsError> {
        let tap = self.ns.open_tap(name)?;
        self.ns.ip(&["link", "set", tap.name(), "master", "br0"])?;
        Ok(tap)
    }

    /// The port of `br0` (`uplink` or a tap) where it last saw `mac`.
    pub fn port_of(&self, mac: &[u8; 6]) -> Result<Option<String>, NetnsError> {
        fdb_port(&self.ns, "br0", mac)
    }
}

/// The port of `bridge` in `ns` whose learned entry is `mac`.
fn fdb_port(ns: &Netns, bridge: &str, mac: &[u8; 6]) -> Result<Option<String>, NetnsError> {
    let want = fmt_mac(mac);
    let table = ns.bridge(&["fdb", "show", "br", bridge])?;
    Ok(table.lines().find_map(|line| {
        let mut words = line.split_whitespace();
        if words.next() != Some(want.as_str()) {
            return None;
        }
        (words.next() == Some("dev")).then(|| words.next().map(str::to_string))?
    }))
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_print_as_ip_and_bridge_show_them() {
        assert_eq!(fmt_mac(&[0x02, 0, 0, 0x4d, 0, 0x0a]), "02:00:00:4d:00:0a");
        assert_eq!(fmt_ip(&[10, 77, 0, 50]), "10.77.0.50");
    }

    #[test]
    fn a_failed_command_names_itself_and_its_complaint() {
        let e = run(Command::new("sh").args(["-c", "echo nope >&2; exit 3"])).unwrap_err();
        let text = e.to_string();
        assert!(matches!(e, NetnsError::Failed { .. }), "{text}");
        assert!(
            text.contains("\"sh\"") && text.ends_with(": nope"),
            "{text}"
        );
        let e = run(&mut Command::new("/nonexistent/vmft-tool")).unwrap_err();
        assert!(matches!(e, NetnsError::Spawn { .. }), "{e}");
        assert_eq!(run(Command::new("echo").arg("hi")).unwrap(), "hi\n");
    }
}
