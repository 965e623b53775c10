//! The host side of the guest's network, without a VM: a tap opened with
//! `vmm`'s [`Tap`] inside a host namespace, bridged to a LAN where other
//! hosts' kernels answer. The test plays the guest: it writes frames it
//! built by hand with [`Tap::write_frame`] and reads the answers back with
//! [`Tap::read_frame`].
//!
//! Needs root, /dev/net/tun and iproute2; see `netns::require_net`
//! (`VMFT_SKIP_NET=1` skips on purpose).

mod netns;

use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use netns::{fmt_ip, list_netns, net_gate, require_net, Lan, NetnsError, SUBNET};
use vmm::devices::virtio::net::{gratuitous_arp, MAX_FRAME_BYTES};
use vmm::devices::virtio::tap::{Tap, TapError, TapStep};

/// The guest's MAC and address on the test LAN.
const GUEST_MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];
const GUEST_IP: [u8; 4] = [SUBNET[0], SUBNET[1], SUBNET[2], 100];
/// How long to wait for an answer from a kernel on the LAN.
const PATIENCE: Duration = Duration::from_secs(5);

const ETH_ARP: u16 = 0x0806;
const ETH_IPV4: u16 = 0x0800;

fn ethernet(dst: [u8; 6], src: [u8; 6], ethertype: u16, payload: &[u8]) -> Vec<u8> {
    let mut f = Vec::with_capacity(14 + payload.len());
    f.extend_from_slice(&dst);
    f.extend_from_slice(&src);
    f.extend_from_slice(&ethertype.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

fn ethertype(frame: &[u8]) -> u16 {
    u16::from_be_bytes([frame[12], frame[13]])
}

/// An ARP packet's fields.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Arp {
    op: u16,
    sha: [u8; 6],
    spa: [u8; 4],
    tha: [u8; 6],
    tpa: [u8; 4],
}

impl Arp {
    /// As an Ethernet frame: requests broadcast, replies to `tha`.
    fn frame(&self) -> Vec<u8> {
        let mut p = Vec::with_capacity(28);
        p.extend_from_slice(&[0, 1, 8, 0, 6, 4]);
        p.extend_from_slice(&self.op.to_be_bytes());
        p.extend_from_slice(&self.sha);
        p.extend_from_slice(&self.spa);
        p.extend_from_slice(&self.tha);
        p.extend_from_slice(&self.tpa);
        let dst = if self.op == 1 { [0xff; 6] } else { self.tha };
        ethernet(dst, self.sha, ETH_ARP, &p)
    }

    fn parse(frame: &[u8]) -> Option<Arp> {
        if frame.len() < 42 || ethertype(frame) != ETH_ARP || frame[14..20] != [0, 1, 8, 0, 6, 4] {
            return None;
        }
        let p = &frame[14..];
        Some(Arp {
            op: u16::from_be_bytes([p[6], p[7]]),
            sha: p[8..14].try_into().unwrap(),
            spa: p[14..18].try_into().unwrap(),
            tha: p[18..24].try_into().unwrap(),
            tpa: p[24..28].try_into().unwrap(),
        })
    }
}

/// The Internet checksum (RFC 1071).
fn checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = data
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// An IPv4 packet (no options) carrying `payload` of `protocol`.
fn ipv4(src: [u8; 4], dst: [u8; 4], protocol: u8, payload: &[u8]) -> Vec<u8> {
    let mut h = vec![0x45, 0];
    h.extend_from_slice(&((20 + payload.len()) as u16).to_be_bytes());
    h.extend_from_slice(&[0x12, 0x34, 0x40, 0]); // id, don't fragment
    h.extend_from_slice(&[64, protocol, 0, 0]);
    h.extend_from_slice(&src);
    h.extend_from_slice(&dst);
    let c = checksum(&h);
    h[10..12].copy_from_slice(&c.to_be_bytes());
    h.extend_from_slice(payload);
    h
}

/// An ICMP echo request or reply (`kind` 8 or 0).
fn icmp_echo(kind: u8, id: u16, seq: u16, data: &[u8]) -> Vec<u8> {
    let mut m = vec![kind, 0, 0, 0];
    m.extend_from_slice(&id.to_be_bytes());
    m.extend_from_slice(&seq.to_be_bytes());
    m.extend_from_slice(data);
    let c = checksum(&m);
    m[2..4].copy_from_slice(&c.to_be_bytes());
    m
}

/// An IPv4 packet's addresses, protocol and payload.
struct Ipv4<'a> {
    src: [u8; 4],
    dst: [u8; 4],
    protocol: u8,
    payload: &'a [u8],
}

/// The IPv4 packet in `frame`, if its header checksum is right.
fn parse_ipv4(frame: &[u8]) -> Option<Ipv4<'_>> {
    if frame.len() < 34 || ethertype(frame) != ETH_IPV4 {
        return None;
    }
    let ip = &frame[14..];
    let ihl = usize::from(ip[0] & 0xf) * 4;
    let total = usize::from(u16::from_be_bytes([ip[2], ip[3]]));
    if ip[0] >> 4 != 4 || ihl < 20 || total < ihl || total > ip.len() || checksum(&ip[..ihl]) != 0 {
        return None;
    }
    Some(Ipv4 {
        src: ip[12..16].try_into().unwrap(),
        dst: ip[16..20].try_into().unwrap(),
        protocol: ip[9],
        payload: &ip[ihl..total],
    })
}

/// The test playing the guest behind a tap: sends frames, and while
/// waiting for one answers ARP requests for its address as a guest would
/// (unless it plays a failed side, `answers` false).
struct Guest {
    tap: Tap,
    mac: [u8; 6],
    ip: [u8; 4],
    answers: bool,
    buf: Vec<u8>,
}

impl Guest {
    fn new(tap: Tap) -> Guest {
        Guest {
            tap,
            mac: GUEST_MAC,
            ip: GUEST_IP,
            answers: true,
            buf: vec![0; MAX_FRAME_BYTES],
        }
    }

    fn send(&self, frame: &[u8]) {
        self.tap.write_frame(frame).unwrap();
    }

    /// Frames read within `within` until `want` picks one out; ARP
    /// requests for the guest's address are answered on the way.
    fn wait_for<T>(
        &mut self,
        within: Duration,
        mut want: impl FnMut(&[u8]) -> Option<T>,
    ) -> Option<T> {
        let deadline = Instant::now() + within;
        loop {
            match self.tap.read_frame(&mut self.buf).unwrap() {
                Some(n) => {
                    let frame = &self.buf[..n];
                    if let Some(t) = want(frame) {
                        return Some(t);
                    }
                    let asked = Arp::parse(frame).filter(|a| a.op == 1 && a.tpa == self.ip);
                    if let Some(a) = asked.filter(|_| self.answers) {
                        let reply = Arp {
                            op: 2,
                            sha: self.mac,
                            spa: self.ip,
                            tha: a.sha,
                            tpa: a.spa,
                        };
                        self.tap.write_frame(&reply.frame()).unwrap();
                    }
                }
                None => {
                    let left = deadline.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        return None;
                    }
                    wait_readable(&self.tap, left.min(Duration::from_millis(100)));
                }
            }
        }
    }

    /// Ask who has `ip` and wait for the answer: its MAC.
    fn resolve(&mut self, ip: [u8; 4]) -> Option<[u8; 6]> {
        let ask = Arp {
            op: 1,
            sha: self.mac,
            spa: self.ip,
            tha: [0; 6],
            tpa: ip,
        };
        self.send(&ask.frame());
        let me = self.mac;
        self.wait_for(PATIENCE, |f| {
            Arp::parse(f)
                .filter(|a| a.op == 2 && a.spa == ip && a.tha == me)
                .map(|a| a.sha)
        })
    }
}

/// Wait until `tap` is readable or `timeout` passes.
fn wait_readable(tap: &Tap, timeout: Duration) {
    let mut pfd = libc::pollfd {
        fd: tap.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: `pfd` is one live pollfd, and poll is told there is one.
    unsafe { libc::poll(&mut pfd, 1, timeout.as_millis() as libc::c_int) };
}

/// Fail unless none of `names` is still a network namespace.
fn assert_removed(names: &[String]) {
    let left: Vec<String> = list_netns()
        .into_iter()
        .filter(|n| names.contains(n))
        .collect();
    assert!(left.is_empty(), "namespaces left behind: {left:?}");
}

#[test]
fn net_gate_runs_skips_or_fails() {
    assert_eq!(net_gate(None, None), Ok(true));
    assert_eq!(net_gate(None, Some("1")), Ok(true));
    assert_eq!(net_gate(Some("no tun".into()), Some("1")), Ok(false));
    for env in [None, Some("0"), Some("")] {
        let err = net_gate(Some("no tun".into()), env).unwrap_err();
        assert!(
            err.contains("no tun") && err.contains("VMFT_SKIP_NET=1"),
            "{err}"
        );
    }
}

#[test]
fn arp_through_the_tap_reaches_the_client_and_its_answer_comes_back() {
    if !require_net() {
        return;
    }
    let mut lan = Lan::new().unwrap();
    let primary = lan.host("primary").unwrap();
    let client = lan.host("client").unwrap();
    let mut guest = Guest::new(primary.open_tap("vmft0").unwrap());
    assert_eq!(guest.tap.name(), "vmft0");
    let mac = guest.resolve(client.addr());
    assert_eq!(
        mac,
        Some(client.mac()),
        "no ARP answer from {} through tap, bridge and veth",
        fmt_ip(&client.addr())
    );
    // Both bridges learned where the guest is.
    assert_eq!(
        primary.port_of(&GUEST_MAC).unwrap().as_deref(),
        Some("vmft0")
    );
    assert_eq!(
        lan.port_of(&GUEST_MAC).unwrap().as_deref(),
        Some(primary.port())
    );
}

#[test]
fn a_hand_made_ping_gets_its_echo_reply() {
    if !require_net() {
        return;
    }
    let mut lan = Lan::new().unwrap();
    let primary = lan.host("primary").unwrap();
    let client = lan.host("client").unwrap();
    let mut guest = Guest::new(primary.open_tap("vmft0").unwrap());
    let client_mac = guest.resolve(client.addr()).expect("client's MAC");
    let data = b"vmft ping through a tap".to_vec();
    let request = ipv4(GUEST_IP, client.addr(), 1, &icmp_echo(8, 0x7666, 1, &data));
    guest.send(&ethernet(client_mac, GUEST_MAC, ETH_IPV4, &request));
    let reply = guest.wait_for(PATIENCE, |f| {
        let ip = parse_ipv4(f)?;
        (f[..6] == GUEST_MAC && ip.src == client.addr() && ip.dst == GUEST_IP && ip.protocol == 1)
            .then(|| ip.payload.to_vec())
    });
    let reply = reply.expect("no echo reply");
    assert_eq!(checksum(&reply), 0, "ICMP checksum");
    assert_eq!(reply, icmp_echo(0, 0x7666, 1, &data));
}

#[test]
fn a_frame_longer_than_the_read_buffer_is_skipped_not_cut() {
    if !require_net() {
        return;
    }
    let mut lan = Lan::new().unwrap();
    let primary = lan.host("primary").unwrap();
    let client = lan.host("client").unwrap();
    let tap = primary.open_tap("vmft0").unwrap();
    let ask = Arp {
        op: 1,
        sha: GUEST_MAC,
        spa: GUEST_IP,
        tha: [0; 6],
        tpa: client.addr(),
    };
    // The answer is 42 bytes; read with room for 41, then for all.
    tap.write_frame(&ask.frame()).unwrap();
    let mut short = [0u8; 41];
    let deadline = Instant::now() + Duration::from_millis(500);
    while Instant::now() < deadline {
        if let Some(n) = tap.read_frame(&mut short).unwrap() {
            assert!(
                Arp::parse(&short[..n]).is_none(),
                "a cut ARP frame of {n} bytes came back"
            );
        }
        wait_readable(&tap, Duration::from_millis(20));
    }
    tap.write_frame(&ask.frame()).unwrap();
    let mut guest = Guest::new(tap);
    let answer = guest.wait_for(PATIENCE, |f| Arp::parse(f).map(|a| (a.op, f.len())));
    assert_eq!(answer, Some((2, 42)));
}

#[test]
fn the_failover_announcement_moves_the_guest_to_the_backup_port() {
    if !require_net() {
        return;
    }
    let mut lan = Lan::new().unwrap();
    let primary_host = lan.host("primary").unwrap();
    let backup_host = lan.host("backup").unwrap();
    let client = lan.host("client").unwrap();
    // Both sides have a tap for the same guest (same MAC); only the
    // primary's guest speaks.
    let mut primary = Guest::new(primary_host.open_tap("vmft0").unwrap());
    let mut backup = Guest::new(backup_host.open_tap("vmft0").unwrap());
    // The client learns the guest's address from the guest's question.
    assert_eq!(primary.resolve(client.addr()), Some(client.mac()));
    assert_eq!(
        lan.port_of(&GUEST_MAC).unwrap().as_deref(),
        Some(primary_host.port())
    );

    // A datagram from the client to the guest goes to the primary's tap.
    let datagram = |text: &str| {
        let script = format!("echo {text} > /dev/udp/{}/9", fmt_ip(&GUEST_IP));
        netns::run(client.ns().exec("bash").args(["-c", &script])).unwrap();
    };
    let udp_with = |text: &'static str| {
        move |f: &[u8]| {
            let ip = parse_ipv4(f)?;
            let udp = ip.payload;
            (ip.dst == GUEST_IP
                && ip.protocol == 17
                && udp.len() > 8
                && udp[8..].starts_with(text.as_bytes()))
            .then_some(())
        }
    };
    datagram("before");
    assert!(primary.wait_for(PATIENCE, udp_with("before")).is_some());

    // The primary fails (its guest falls silent); the backup goes live and
    // announces the guest.
    primary.answers = false;
    let announcement = gratuitous_arp(GUEST_MAC, None);
    backup.send(&announcement);
    let deadline = Instant::now() + PATIENCE;
    while lan.port_of(&GUEST_MAC).unwrap().as_deref() != Some(backup_host.port()) {
        assert!(
            Instant::now() < deadline,
            "the switch did not learn the new port"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(
        backup_host.port_of(&GUEST_MAC).unwrap().as_deref(),
        Some("vmft0")
    );
    // The primary's side saw the broadcast announcement come in through
    // its uplink; its bridge now sends the guest's frames to the LAN.
    assert_eq!(
        primary_host.port_of(&GUEST_MAC).unwrap().as_deref(),
        Some("uplink")
    );

    // The client's next datagram, unchanged (same MAC, same neighbour
    // entry), reaches the backup's tap and not the primary's.
    datagram("after");
    assert!(backup.wait_for(PATIENCE, udp_with("after")).is_some());
    assert!(
        primary
            .wait_for(Duration::from_millis(300), udp_with("after"))
            .is_none(),
        "the old port still got the guest's traffic"
    );
}

#[test]
fn the_kernel_names_a_tap_opened_without_a_name() {
    if !require_net() {
        return;
    }
    let host = netns::Netns::new("naming").unwrap();
    let tap = host.open_tap("").unwrap();
    assert!(tap.name().starts_with("tap"), "{}", tap.name());
    let links = host.ip(&["-o", "link", "show", "dev", tap.name()]).unwrap();
    assert!(links.contains("UP"), "{links}");
    // Opened again by name while the first is open: busy.
    let name = tap.name().to_string();
    let err = host.open_tap(&name).unwrap_err();
    let busy = match &err {
        NetnsError::Tap(TapError::Io {
            step: TapStep::SetIff,
            source,
            ..
        }) => source.raw_os_error() == Some(libc::EBUSY),
        _ => false,
    };
    assert!(busy, "{err}");
    assert!(
        err.to_string().contains("in use by another process"),
        "{err}"
    );
    drop(tap);
    // Not persistent: gone with its descriptor.
    assert!(host.ip(&["link", "show", "dev", &name]).is_err());
}

#[test]
fn tap_errors_name_the_tap_and_the_step() {
    if !require_net() {
        return;
    }
    let host = netns::Netns::new("errors").unwrap();
    host.ip(&["link", "add", "notatap", "type", "bridge"])
        .unwrap();
    let err = host.open_tap("notatap").unwrap_err();
    let text = err.to_string();
    assert!(
        matches!(
            err,
            NetnsError::Tap(TapError::Io {
                step: TapStep::SetIff,
                ..
            })
        ),
        "{text}"
    );
    assert!(text.starts_with("tap notatap: TUNSETIFF"), "{text}");
    let err = Tap::open("name-that-is-too-long").unwrap_err();
    assert!(matches!(err, TapError::Name { .. }), "{err}");
}

#[test]
fn everything_is_removed_on_drop_and_on_panic() {
    if !require_net() {
        return;
    }
    let build = || {
        let mut lan = Lan::new().unwrap();
        let a = lan.host("a").unwrap();
        let b = lan.host("b").unwrap();
        let tap = a.open_tap("vmft0").unwrap();
        let names = vec![
            lan.switch().name().to_string(),
            a.ns().name().to_string(),
            b.ns().name().to_string(),
        ];
        let listed = list_netns();
        for n in &names {
            assert!(listed.contains(n), "{n} not in {listed:?}");
            assert!(
                n.starts_with(&format!("vmft-t-{}-", std::process::id())),
                "{n}"
            );
        }
        (lan, a, b, tap, names)
    };
    let (lan, a, b, tap, names) = build();
    drop((tap, a, b, lan));
    assert_removed(&names);

    let mut names = Vec::new();
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let (_lan, _a, _b, _tap, n) = build();
        names = n;
        panic!("a test failing half-way");
    }));
    assert!(result.is_err());
    assert_eq!(names.len(), 3);
    assert_removed(&names);
}

/// `vmft run` with `--net` in namespace `host`; its stderr, after it ends.
fn vmft_with_tap(host: &netns::Netns, tap: &str) -> (bool, String) {
    let out = host
        .exec(env!("CARGO_BIN_EXE_vmft"))
        .args(["run", "--no-stdin", "--kernel", "/nonexistent-kernel"])
        .arg("--net")
        .arg(format!("tap={tap}"))
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn vmft_refuses_a_tap_that_does_not_exist_or_is_busy() {
    if !require_net() {
        return;
    }
    let host = netns::Netns::new("vmft-taps").unwrap();
    // No such tap: named, with what to do, before anything boots.
    let (ok, err) = vmft_with_tap(&host, "nosuchtap");
    assert!(!ok);
    assert!(
        err.contains("tap nosuchtap does not exist") && err.contains("ip tuntap add"),
        "{err}"
    );
    assert_eq!(err.trim().lines().count(), 1, "one line:\n{err}");
    // A tap another process holds: busy.
    let held = host.open_tap("busytap").unwrap();
    let (ok, err) = vmft_with_tap(&host, "busytap");
    assert!(!ok);
    assert!(err.contains("tap busytap"), "{err}");
    assert!(err.to_lowercase().contains("busy"), "{err}");
    drop(held);
}
