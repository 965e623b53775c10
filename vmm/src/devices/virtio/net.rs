//! virtio-net: one receive and one transmit queue, frames in and out
//! through the monitor (the device never touches a tap itself).
//!
//! Queue 0 receives ([`RX_QUEUE`]), queue 1 transmits ([`TX_QUEUE`]), at
//! most [`QUEUE_SIZE`] entries each; no control queue, one queue pair.
//!
//! # Features offered
//!
//! `VIRTIO_F_VERSION_1` (added by the transport) and `VIRTIO_NET_F_MAC`,
//! nothing else. The configuration space is the `mac` field (6 bytes at
//! offset 0); every other byte reads as 0 and writes are ignored. What
//! that means for Linux's `virtio_net`:
//!
//! - no `VIRTIO_NET_F_STATUS`: the driver keeps the link up;
//! - no `VIRTIO_NET_F_MTU`: MTU 1500;
//! - no `VIRTIO_NET_F_MRG_RXBUF` and no guest offloads: the driver posts
//!   "small" receive buffers of 12 + 1518 bytes, one chain per frame;
//! - no checksum or segmentation offloads (`CSUM`, `GUEST_CSUM`, host and
//!   guest `TSO`/`UFO`/`USO`): every frame is a complete Ethernet frame
//!   with its checksums computed, in both directions;
//! - no `VIRTIO_NET_F_CTRL_VQ` (nor `CTRL_RX`, `CTRL_VLAN`,
//!   `GUEST_ANNOUNCE`, `MQ`, `CTRL_MAC_ADDR`, which need it): the device
//!   filters nothing; the guest cannot be asked to announce itself, so the
//!   monitor announces it ([`gratuitous_arp`]).
//!
//! Every buffer starts with the 12-byte `virtio_net_hdr_v1`
//! ([`NET_HDR_BYTES`]; with VERSION_1 the header has `num_buffers` even
//! without MRG_RXBUF).
//!
//! # Fault tolerance: frames in, frames out
//!
//! Like every device this one runs on the vCPU thread and changes guest
//! state only at exits, so the primary and the backup that replays its log
//! see the same thing at the same exit.
//!
//! **Transmitted frames are output.** At a QueueNotify of the TX queue the
//! device reads every available chain, strips the header, keeps the frame
//! and returns the chain to the used ring at once: both sides' guests see
//! the completion at that exit. The caller takes the frames
//! ([`Net::take_tx`]) after the exit; the primary holds them until the
//! backup has acknowledged the log up to that exit (the output rule) and
//! then writes them to its tap; the backup drops them (it sends them only
//! after going live, from where the primary's releases stopped).
//!
//! **Received frames are nondeterministic input.** The monitor reads
//! frames from the tap on another thread. At an exit boundary the primary
//! asks [`MmioTransport::rx_ready`] (pure: has the driver posted a receive
//! chain?); if so it logs the frame and calls
//! [`MmioTransport::deliver_rx`], which writes a zeroed header with
//! `num_buffers = 1` and the frame into the next chain, returns it to the
//! used ring and sets the used-buffer interrupt. The backup calls
//! `deliver_rx` with the logged frame at the same boundary; the outcome
//! ([`RxOutcome`]) depends only on guest memory and the frame, so it is the
//! same on both sides and can be checked.
//!
//! ```text
//! primary                                   backup
//! tap ─▶ reader thread ─▶ waiting frame
//! boundary after exit N:
//!   rx_ready(mem)? ─ no: keep waiting
//!   yes: log (N, frame) ══════════════════▶ boundary after exit N:
//!   deliver_rx(frame) ─▶ RX chain, IRQ        deliver_rx(frame from the log)
//! exit M: TX notify ─▶ take_tx() ─▶ held     exit M: TX notify ─▶ take_tx() ─▶ dropped
//!   acked ≥ M ─▶ tap
//! ```
//!
//! # Limits and malformed chains
//!
//! A frame is [`MIN_FRAME_BYTES`] (an Ethernet header) to
//! [`MAX_FRAME_BYTES`] (65550, so 65562 with the header) long. Nothing the
//! guest writes makes the device panic or allocate more than
//! [`MAX_TX_PENDING_BYTES`]:
//!
//! - Receive: a frame longer than the next chain's device-writable room
//!   (less the header) is **dropped and counted** (`rx_too_big`) and the
//!   chain stays available for the next frame, as QEMU does without
//!   MRG_RXBUF; [`RxOutcome::Dropped`]. A chain with a device-readable
//!   descriptor or a descriptor outside guest memory is returned with used
//!   length 0 (Linux counts a "short packet" and reposts the buffer) and
//!   the frame is dropped (`rx_malformed`). A frame outside the length
//!   bounds is the caller's mistake: [`NetError::FrameSize`], nothing
//!   touched.
//! - Transmit: the chain is returned with used length 0 whatever happens.
//!   A chain with a device-writable descriptor, a descriptor outside guest
//!   memory, or a length outside header + frame bounds is dropped
//!   (`tx_malformed`); so is a frame that would take the frames not yet
//!   taken by the caller past [`MAX_TX_PENDING_BYTES`] (`tx_overflow`; the
//!   caller takes them at every exit, so this never happens in practice).
//!   The header's contents are ignored (nothing that would give them a
//!   meaning was negotiated).
//! - A broken ring (available index jumped, head out of range, used ring
//!   outside memory) makes the transport ask for a reset, as for block.
//!
//! # Announcement at failover
//!
//! When a backup goes live its tap is a new port for the guest's MAC; the
//! monitor sends [`gratuitous_arp`] on the guest's behalf so that bridges
//! and switches learn the new port at once instead of when the guest next
//! transmits.

use std::num::Wrapping;
use std::sync::atomic::Ordering;

use thiserror::Error;
use tracing::{debug, warn};
use virtio_bindings::virtio_ids::VIRTIO_ID_NET;
use virtio_bindings::virtio_net as vnet;
use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

use crate::memory::GuestMemoryMmap;

use super::{MmioTransport, QueueRun, VirtioDevice, VIRTIO_F_VERSION_1};
use crate::snapshot::{Decoder, Encoder, SnapshotError};

/// The receive queue.
pub const RX_QUEUE: u16 = 0;
/// The transmit queue.
pub const TX_QUEUE: u16 = 1;
/// Maximum size of each queue.
pub const QUEUE_SIZE: u16 = 256;
/// Length of `virtio_net_hdr_v1`, in front of every frame in a buffer.
pub const NET_HDR_BYTES: usize = 12;
/// Offset of `num_buffers` (le16) in the header.
const NUM_BUFFERS_OFFSET: usize = 10;
/// Largest buffer: header and frame.
pub const MAX_BUFFER_BYTES: usize = 65562;
/// Largest frame (Ethernet header and payload, no FCS).
pub const MAX_FRAME_BYTES: usize = MAX_BUFFER_BYTES - NET_HDR_BYTES;
/// Smallest frame: an Ethernet header.
pub const MIN_FRAME_BYTES: usize = 14;
/// Most bytes of transmitted frames the device keeps until the caller
/// takes them ([`Net::take_tx`]): a full 256-entry ring of the largest
/// frames.
pub const MAX_TX_PENDING_BYTES: usize = QUEUE_SIZE as usize * MAX_FRAME_BYTES;
/// A locally administered unicast MAC ("vmft" in the middle). Every guest
/// on one LAN needs its own; primary and backup of one guest share theirs.
pub const DEFAULT_MAC: [u8; 6] = [0x02, 0x76, 0x6d, 0x66, 0x74, 0x00];

/// Ethertype of ARP.
pub const ETHERTYPE_ARP: u16 = 0x0806;
/// Ethertype of RARP (what QEMU announces a migrated guest with).
pub const ETHERTYPE_RARP: u16 = 0x8035;
/// Length of the announcement frame: the Ethernet minimum without FCS.
pub const ANNOUNCE_BYTES: usize = 60;

const F_MAC: u64 = 1 << vnet::VIRTIO_NET_F_MAC;

/// Errors of the network device's API (never caused by the guest).
#[derive(Debug, Error, PartialEq, Eq)]
pub enum NetError {
    /// A MAC address that cannot be parsed or is not a unicast address.
    #[error("MAC address {text:?}: {why}")]
    BadMac {
        /// The address as given.
        text: String,
        /// What is wrong with it.
        why: &'static str,
    },
    /// The caller handed a frame outside the bounds every frame obeys.
    #[error(
        "frame of {len} bytes not delivered: frames are {MIN_FRAME_BYTES} to {MAX_FRAME_BYTES} bytes"
    )]
    FrameSize {
        /// Its length.
        len: usize,
    },
}

/// What [`MmioTransport::deliver_rx`] did with a frame. The same frame at
/// the same point of the guest's execution has the same outcome.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RxOutcome {
    /// Written into the next receive chain, which is in the used ring; the
    /// used-buffer interrupt is set (unless the driver suppressed it).
    Delivered,
    /// The driver has no receive chain posted (or the device is not live):
    /// nothing changed. Keep the frame or drop it, the caller's choice.
    NoBuffer,
    /// The frame is gone, counted in [`NetStats`]: it did not fit the next
    /// chain (which stays available), the chain was malformed (returned
    /// with used length 0), or the ring is broken (the device now needs a
    /// reset).
    Dropped,
}

/// Frame counters (not guest-visible, not in snapshots).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct NetStats {
    /// Frames transmitted by the guest and kept for the caller.
    pub tx_frames: u64,
    /// Their bytes (without the header).
    pub tx_bytes: u64,
    /// Transmit chains dropped as malformed.
    pub tx_malformed: u64,
    /// Transmitted frames dropped because the caller had not taken the
    /// earlier ones.
    pub tx_overflow: u64,
    /// Frames delivered into receive chains.
    pub rx_frames: u64,
    /// Their bytes (without the header).
    pub rx_bytes: u64,
    /// Frames dropped because they did not fit the next receive chain.
    pub rx_too_big: u64,
    /// Frames dropped on a malformed receive chain or a broken ring.
    pub rx_malformed: u64,
}

/// The virtio-net device model.
#[derive(Debug)]
pub struct Net {
    mac: [u8; 6],
    /// Features the driver negotiated (0 until DRIVER_OK, and after reset).
    acked_features: u64,
    /// Transmitted frames the caller has not taken yet.
    tx_pending: Vec<Vec<u8>>,
    tx_pending_bytes: usize,
    stats: NetStats,
    queue_sizes: [u16; 2],
}

/// Parse a MAC address written as six hexadecimal bytes separated by `:`
/// (or `-`), such as `02:76:6d:66:74:00`; it must be unicast and not zero.
pub fn parse_mac(text: &str) -> Result<[u8; 6], NetError> {
    let bad = |why| NetError::BadMac {
        text: text.to_string(),
        why,
    };
    let mut mac = [0u8; 6];
    let mut parts = text.split([':', '-']);
    for byte in &mut mac {
        let part = parts.next().ok_or_else(|| bad("fewer than six bytes"))?;
        if part.is_empty() || part.len() > 2 {
            return Err(bad("each byte is one or two hexadecimal digits"));
        }
        *byte = u8::from_str_radix(part, 16)
            .map_err(|_| bad("each byte is one or two hexadecimal digits"))?;
    }
    if parts.next().is_some() {
        return Err(bad("more than six bytes"));
    }
    check_mac(&mac).map_err(bad)?;
    Ok(mac)
}

/// `mac` as `02:76:6d:66:74:00`.
pub fn format_mac(mac: &[u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

fn check_mac(mac: &[u8; 6]) -> Result<(), &'static str> {
    if mac[0] & 1 != 0 {
        return Err("a multicast address cannot be a NIC's address");
    }
    if mac == &[0; 6] {
        return Err("the zero address cannot be a NIC's address");
    }
    Ok(())
}

/// The frame a monitor sends on the guest's behalf when a backup goes live,
/// so that bridges learn the guest's MAC on the new port at once. Always
/// [`ANNOUNCE_BYTES`] long (zero padding), to the broadcast address, from
/// `mac`:
///
/// - with the guest's IPv4 address: an ARP announcement (ethertype 0x0806,
///   RFC 5227): a request, sender `mac`/`ip`, target hardware address zero,
///   target protocol address `ip`; hosts that know the address refresh
///   their neighbour entry;
/// - without it: a RARP "reverse request" (ethertype 0x8035, opcode 3,
///   sender and target hardware address `mac`, protocol addresses zero),
///   byte for byte what QEMU sends after a migration. Nobody answers it;
///   bridges learn from its source address all the same.
pub fn gratuitous_arp(mac: [u8; 6], ip: Option<[u8; 4]>) -> Vec<u8> {
    let (ethertype, opcode, spa, tha, tpa) = match ip {
        Some(ip) => (ETHERTYPE_ARP, 1u16, ip, [0u8; 6], ip),
        None => (ETHERTYPE_RARP, 3u16, [0u8; 4], mac, [0u8; 4]),
    };
    let mut f = Vec::with_capacity(ANNOUNCE_BYTES);
    f.extend_from_slice(&[0xff; 6]);
    f.extend_from_slice(&mac);
    f.extend_from_slice(&ethertype.to_be_bytes());
    f.extend_from_slice(&1u16.to_be_bytes()); // hardware: Ethernet
    f.extend_from_slice(&0x0800u16.to_be_bytes()); // protocol: IPv4
    f.push(6);
    f.push(4);
    f.extend_from_slice(&opcode.to_be_bytes());
    f.extend_from_slice(&mac);
    f.extend_from_slice(&spa);
    f.extend_from_slice(&tha);
    f.extend_from_slice(&tpa);
    f.resize(ANNOUNCE_BYTES, 0);
    f
}

/// One descriptor's buffer.
#[derive(Debug, Clone, Copy)]
struct Seg {
    addr: GuestAddress,
    len: u32,
}

/// The buffers of `chain`, all of which must be device-writable
/// (`writable`) or all device-readable, and in guest memory; with their
/// total length (at most 2^32: `virtio_queue` ends a longer chain).
fn segments(
    chain: DescriptorChain<&GuestMemoryMmap>,
    mem: &GuestMemoryMmap,
    writable: bool,
) -> Result<(Vec<Seg>, u64), &'static str> {
    let mut segs = Vec::new();
    let mut total = 0u64;
    for desc in chain {
        if desc.is_write_only() != writable {
            return Err(if writable {
                "device-readable descriptor in a receive chain"
            } else {
                "device-writable descriptor in a transmit chain"
            });
        }
        if !mem.check_range(desc.addr(), desc.len() as usize) {
            return Err("descriptor outside guest memory");
        }
        total += u64::from(desc.len());
        segs.push(Seg {
            addr: desc.addr(),
            len: desc.len(),
        });
    }
    Ok((segs, total))
}

/// Call `f(guest address, range of the caller's buffer)` for each piece of
/// `len` bytes of the stream `segs` starting at byte `skip`; false if the
/// stream is too short or `f` fails.
fn walk(
    segs: &[Seg],
    mut skip: u64,
    len: usize,
    mut f: impl FnMut(GuestAddress, std::ops::Range<usize>) -> bool,
) -> bool {
    let mut done = 0usize;
    for seg in segs {
        if done == len {
            break;
        }
        let seg_len = u64::from(seg.len);
        if skip >= seg_len {
            skip -= seg_len;
            continue;
        }
        let n = (seg_len - skip).min((len - done) as u64) as usize;
        let Some(addr) = seg.addr.0.checked_add(skip) else {
            return false;
        };
        if !f(GuestAddress(addr), done..done + n) {
            return false;
        }
        done += n;
        skip = 0;
    }
    done == len
}

/// Whether the driver has made a chain available that the device has not
/// taken. An available index more than the queue size ahead (a broken
/// ring) counts: delivering then finds the ring broken.
fn chain_available(queue: &Queue, mem: &GuestMemoryMmap) -> bool {
    match queue.avail_idx(mem, Ordering::Acquire) {
        Ok(idx) => idx != Wrapping(queue.next_avail()),
        Err(_) => false,
    }
}

fn check_frame(len: usize) -> Result<(), NetError> {
    if (MIN_FRAME_BYTES..=MAX_FRAME_BYTES).contains(&len) {
        Ok(())
    } else {
        Err(NetError::FrameSize { len })
    }
}

impl Net {
    /// A device whose configuration space announces `mac` (a unicast,
    /// non-zero address, the same on primary and backup).
    pub fn new(mac: [u8; 6]) -> Result<Net, NetError> {
        check_mac(&mac).map_err(|why| NetError::BadMac {
            text: format_mac(&mac),
            why,
        })?;
        Ok(Net {
            mac,
            acked_features: 0,
            tx_pending: Vec::new(),
            tx_pending_bytes: 0,
            stats: NetStats::default(),
            queue_sizes: [QUEUE_SIZE, QUEUE_SIZE],
        })
    }

    /// The MAC in the configuration space.
    pub fn mac(&self) -> [u8; 6] {
        self.mac
    }

    /// Features the driver negotiated (0 before DRIVER_OK).
    pub fn acked_features(&self) -> u64 {
        self.acked_features
    }

    /// Frame counters.
    pub fn stats(&self) -> NetStats {
        self.stats
    }

    /// The frames the guest transmitted since the last call, oldest first,
    /// without their header. Their chains are already back in the used
    /// ring. Call it after every exit that may have notified the TX queue.
    pub fn take_tx(&mut self) -> Vec<Vec<u8>> {
        self.tx_pending_bytes = 0;
        std::mem::take(&mut self.tx_pending)
    }

    /// Number of transmitted frames not taken yet.
    pub fn tx_pending(&self) -> usize {
        self.tx_pending.len()
    }

    /// Put `frame` (length already checked) into the next chain of the
    /// receive queue.
    fn receive(
        &mut self,
        queue: &mut Queue,
        frame: &[u8],
        mem: &GuestMemoryMmap,
    ) -> (QueueRun, RxOutcome) {
        let mut run = QueueRun::default();
        let chain = match queue.iter(mem) {
            Ok(mut avail) => avail.next(),
            Err(e) => {
                run.broken = Some(format!("receive queue, available ring: {e}"));
                self.stats.rx_malformed += 1;
                return (run, RxOutcome::Dropped);
            }
        };
        let Some(chain) = chain else {
            return (run, RxOutcome::NoBuffer);
        };
        let head = chain.head_index();
        if head >= queue.size() {
            run.broken = Some(format!(
                "receive queue: head index {head} out of a {}-entry queue",
                queue.size()
            ));
            self.stats.rx_malformed += 1;
            return (run, RxOutcome::Dropped);
        }
        let need = (NET_HDR_BYTES + frame.len()) as u64;
        let used_len = match segments(chain, mem, true) {
            Err(why) => {
                debug!(head, "virtio-net: malformed receive chain: {why}");
                None
            }
            Ok((_, room)) if room < need => {
                // Leave the chain for a frame that fits.
                queue.go_to_previous_position();
                self.stats.rx_too_big += 1;
                debug!(
                    head,
                    room,
                    frame = frame.len(),
                    "virtio-net: frame larger than the receive chain; dropped"
                );
                return (run, RxOutcome::Dropped);
            }
            Ok((segs, _)) => {
                let mut header = [0u8; NET_HDR_BYTES];
                header[NUM_BUFFERS_OFFSET..].copy_from_slice(&1u16.to_le_bytes());
                let written =
                    walk(&segs, 0, NET_HDR_BYTES, |addr, range| {
                        mem.write_slice(&header[range], addr).is_ok()
                    }) && walk(&segs, NET_HDR_BYTES as u64, frame.len(), |addr, range| {
                        mem.write_slice(&frame[range], addr).is_ok()
                    });
                // Checked above; only a change of the memory map fails.
                written.then_some(need as u32)
            }
        };
        if let Err(e) = queue.add_used(mem, head, used_len.unwrap_or(0)) {
            run.broken = Some(format!("receive queue, used ring: {e}"));
            self.stats.rx_malformed += 1;
            return (run, RxOutcome::Dropped);
        }
        run.used = 1;
        match used_len {
            Some(_) => {
                self.stats.rx_frames += 1;
                self.stats.rx_bytes += frame.len() as u64;
                (run, RxOutcome::Delivered)
            }
            None => {
                self.stats.rx_malformed += 1;
                (run, RxOutcome::Dropped)
            }
        }
    }

    /// Read one transmit chain; keep its frame unless it is dropped.
    fn transmit(&mut self, chain: DescriptorChain<&GuestMemoryMmap>, mem: &GuestMemoryMmap) {
        let head = chain.head_index();
        let (segs, total) = match segments(chain, mem, false) {
            Ok(s) => s,
            Err(why) => {
                self.stats.tx_malformed += 1;
                debug!(head, "virtio-net: malformed transmit chain: {why}");
                return;
            }
        };
        let len = total.saturating_sub(NET_HDR_BYTES as u64);
        let Some(len) = usize::try_from(len)
            .ok()
            .filter(|&l| check_frame(l).is_ok())
        else {
            self.stats.tx_malformed += 1;
            debug!(
                head,
                total, "virtio-net: transmit chain not header + frame of a valid length"
            );
            return;
        };
        if self.tx_pending_bytes + len > MAX_TX_PENDING_BYTES {
            self.stats.tx_overflow += 1;
            warn!(
                pending = self.tx_pending.len(),
                "virtio-net: transmitted frames not taken by the monitor; frame dropped"
            );
            return;
        }
        let mut frame = vec![0u8; len];
        if !walk(&segs, NET_HDR_BYTES as u64, len, |addr, range| {
            mem.read_slice(&mut frame[range], addr).is_ok()
        }) {
            self.stats.tx_malformed += 1;
            return;
        }
        self.tx_pending_bytes += len;
        self.stats.tx_frames += 1;
        self.stats.tx_bytes += len as u64;
        self.tx_pending.push(frame);
    }
}

impl MmioTransport<Net> {
    /// Whether the driver has posted a receive chain the device has not
    /// used, and the device is live: [`MmioTransport::deliver_rx`] would
    /// not answer [`RxOutcome::NoBuffer`]. Pure: reads guest memory, changes
    /// nothing. A posted chain may still be too small for a given frame.
    pub fn rx_ready(&self, mem: &GuestMemoryMmap) -> bool {
        self.live_queue(RX_QUEUE)
            .is_some_and(|queue| chain_available(queue, mem))
    }

    /// Deliver `frame` (an Ethernet frame without FCS, no header) into the
    /// next receive chain: a zeroed `virtio_net_hdr_v1` with
    /// `num_buffers = 1`, then the frame; the chain goes to the used ring
    /// with that length and the used-buffer interrupt is set (unless the
    /// driver suppressed it). See [`RxOutcome`] for the other cases; an
    /// `Err` for a frame outside [`MIN_FRAME_BYTES`]..=[`MAX_FRAME_BYTES`]
    /// leaves everything untouched.
    pub fn deliver_rx(
        &mut self,
        frame: &[u8],
        mem: &GuestMemoryMmap,
    ) -> Result<RxOutcome, NetError> {
        check_frame(frame.len())?;
        let mut outcome = RxOutcome::NoBuffer;
        let ran = self.with_device_queue(RX_QUEUE, mem, |net, queue| {
            let (run, o) = net.receive(queue, frame, mem);
            outcome = o;
            run
        });
        if let Err(e) = ran {
            // `receive` reports no host failure; if it ever does, say so.
            warn!("virtio-net: {e}");
        }
        Ok(outcome)
    }
}

impl VirtioDevice for Net {
    fn device_id(&self) -> u32 {
        VIRTIO_ID_NET
    }

    fn features(&self) -> u64 {
        F_MAC
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        for (i, b) in data.iter_mut().enumerate() {
            *b = usize::try_from(offset)
                .ok()
                .and_then(|o| o.checked_add(i))
                .and_then(|o| self.mac.get(o))
                .copied()
                .unwrap_or(0);
        }
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        debug!(
            offset,
            len = data.len(),
            "virtio-net: configuration space is read-only; write ignored"
        );
    }

    fn activate(&mut self, acked_features: u64) {
        self.acked_features = acked_features;
    }

    fn process_queue(&mut self, index: u16, queue: &mut Queue, mem: &GuestMemoryMmap) -> QueueRun {
        let mut run = QueueRun::default();
        if index != TX_QUEUE {
            // RX: the driver posted buffers; they wait for frames.
            return run;
        }
        // At most `size` chains wait (see block.rs); the bound makes it
        // explicit.
        for _ in 0..queue.size() {
            let chain = match queue.iter(mem) {
                Ok(mut avail) => avail.next(),
                Err(e) => {
                    run.broken = Some(format!("transmit queue, available ring: {e}"));
                    break;
                }
            };
            let Some(chain) = chain else {
                break;
            };
            let head = chain.head_index();
            if head >= queue.size() {
                run.broken = Some(format!(
                    "transmit queue: head index {head} out of a {}-entry queue",
                    queue.size()
                ));
                break;
            }
            self.transmit(chain, mem);
            if let Err(e) = queue.add_used(mem, head, 0) {
                run.broken = Some(format!("transmit queue, used ring: {e}"));
                break;
            }
            run.used += 1;
        }
        run
    }

    /// Back to power-on. Transmitted frames not taken yet stay: their
    /// chains were completed, so for the guest they are sent.
    fn reset(&mut self) {
        self.acked_features = 0;
    }

    fn encode(&self, e: &mut Encoder) {
        e.raw(&self.mac);
        e.u64(self.acked_features);
        e.u32(self.tx_pending.len() as u32);
        for frame in &self.tx_pending {
            e.bytes(frame);
        }
    }

    fn decode(&mut self, d: &mut Decoder) -> Result<(), SnapshotError> {
        let invalid = |what: String| SnapshotError::Invalid(format!("virtio-net: {what}"));
        let mac = d.bytes_exact(6)?;
        if mac != self.mac {
            let mut m = [0u8; 6];
            m.copy_from_slice(mac);
            return Err(invalid(format!(
                "snapshot taken with MAC {}, this device has {}",
                format_mac(&m),
                format_mac(&self.mac)
            )));
        }
        let acked = d.u64()?;
        let offered = self.features() | VIRTIO_F_VERSION_1;
        if acked & !offered != 0 {
            return Err(invalid(format!(
                "negotiated features {acked:#x} beyond the offered {offered:#x}"
            )));
        }
        let count = d.u32()?;
        let mut pending = Vec::new();
        let mut bytes = 0usize;
        for _ in 0..count {
            let frame = d.bytes()?;
            check_frame(frame.len()).map_err(|e| invalid(e.to_string()))?;
            bytes += frame.len();
            if bytes > MAX_TX_PENDING_BYTES {
                return Err(invalid(format!(
                    "more than {MAX_TX_PENDING_BYTES} bytes of pending transmitted frames"
                )));
            }
            pending.push(frame.to_vec());
        }
        self.acked_features = acked;
        self.tx_pending = pending;
        self.tx_pending_bytes = bytes;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::testing::*;
    use crate::devices::virtio::{status, INT_CONFIG_CHANGE, INT_USED_BUFFER};

    const MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];
    /// Receive buffers.
    const RXBUF: u64 = 0x10000;
    /// Transmit buffers.
    const TXBUF: u64 = 0x40000;
    /// Linux's small receive buffer: header + ETH_HLEN + VLAN_HLEN + 1500.
    const SMALL: u32 = 12 + 1518;

    struct Rig {
        t: MmioTransport<Net>,
        mem: GuestMemoryMmap,
        rx: Driver,
        tx: Driver,
    }

    fn rig_with(refuse: u64) -> Rig {
        let mut t = MmioTransport::new(Net::new(MAC).unwrap());
        let mem = memory();
        let mut d = Driver::init_queues(&mut t, &mem, &[16, 16], refuse);
        let tx = d.pop().unwrap();
        let rx = d.pop().unwrap();
        Rig { t, mem, rx, tx }
    }

    fn rig() -> Rig {
        rig_with(0)
    }

    /// An Ethernet frame of `len` bytes: to MAC, from 02:..:seed, a local
    /// ethertype, a pattern.
    fn frame(seed: u8, len: usize) -> Vec<u8> {
        let mut f: Vec<u8> = (0..len)
            .map(|i| (i as u8).wrapping_mul(13).wrapping_add(seed))
            .collect();
        f[..6].copy_from_slice(&MAC);
        f[6..12].copy_from_slice(&[2, 0, 0, 0, 0, seed]);
        f[12..14].copy_from_slice(&0x88b5u16.to_be_bytes());
        f
    }

    fn read(mem: &GuestMemoryMmap, addr: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        mem.read_slice(&mut v, GuestAddress(addr)).unwrap();
        v
    }

    /// A 12-byte header as Linux's driver sends it (all zero).
    fn header() -> [u8; 12] {
        [0; 12]
    }

    impl Rig {
        fn notify_tx(&mut self) {
            self.t
                .write(QUEUE_NOTIFY, &u32::from(TX_QUEUE).to_le_bytes(), &self.mem)
                .unwrap();
        }

        /// Post one small receive buffer (one descriptor) at `addr`.
        fn post_rx(&mut self, addr: u64, len: u32) -> u16 {
            self.mem
                .write_slice(&vec![0xee; len as usize], GuestAddress(addr))
                .unwrap();
            self.rx.submit(&self.mem, &[(addr, len, true)])
        }

        fn encoded(&self) -> Vec<u8> {
            let mut e = Encoder::new();
            self.t.encode(&mut e);
            e.into_bytes()
        }
    }

    #[test]
    fn offers_mac_and_version_1_only() {
        let mut r = rig();
        assert_eq!(rd(&mut r.t, DEVICE_ID), 1);
        assert_eq!(r.t.offered_features(), VIRTIO_F_VERSION_1 | (1 << 5));
        for bit in [
            vnet::VIRTIO_NET_F_CSUM,
            vnet::VIRTIO_NET_F_GUEST_CSUM,
            vnet::VIRTIO_NET_F_GUEST_TSO4,
            vnet::VIRTIO_NET_F_HOST_TSO4,
            vnet::VIRTIO_NET_F_MRG_RXBUF,
            vnet::VIRTIO_NET_F_STATUS,
            vnet::VIRTIO_NET_F_CTRL_VQ,
            vnet::VIRTIO_NET_F_MQ,
        ] {
            assert_eq!(r.t.offered_features() & (1 << bit), 0, "bit {bit}");
        }
        assert_eq!(r.t.acked_features(), VIRTIO_F_VERSION_1 | F_MAC);
        assert_eq!(r.t.device().acked_features(), VIRTIO_F_VERSION_1 | F_MAC);
        // Two queues of 256 at most, no third.
        for (q, max) in [(0, 256), (1, 256), (2, 0)] {
            wr(&mut r.t, &r.mem, QUEUE_SEL, q);
            assert_eq!(rd(&mut r.t, QUEUE_NUM_MAX), max, "queue {q}");
        }
        // A driver asking for mergeable buffers is refused.
        wr(&mut r.t, &r.mem, STATUS, 0);
        add_status(&mut r.t, &r.mem, status::ACKNOWLEDGE);
        add_status(&mut r.t, &r.mem, status::DRIVER);
        write_driver_features(
            &mut r.t,
            &r.mem,
            VIRTIO_F_VERSION_1 | F_MAC | (1 << vnet::VIRTIO_NET_F_MRG_RXBUF),
        );
        add_status(&mut r.t, &r.mem, status::FEATURES_OK);
        assert_eq!(rd(&mut r.t, STATUS) & status::FEATURES_OK, 0);
        // One that does not take the MAC works too.
        let r = rig_with(F_MAC);
        assert_eq!(r.t.device().acked_features(), VIRTIO_F_VERSION_1);
    }

    #[test]
    fn config_space_holds_the_mac() {
        let mut r = rig();
        // Linux reads the MAC byte by byte.
        for (i, &b) in MAC.iter().enumerate() {
            let mut one = [0u8; 1];
            r.t.read(CONFIG + i as u64, &mut one);
            assert_eq!(one[0], b, "byte {i}");
        }
        assert_eq!(
            rd(&mut r.t, CONFIG),
            u32::from_le_bytes([0x52, 0x54, 0, 0x12])
        );
        assert_eq!(
            rd(&mut r.t, CONFIG + 4),
            u32::from_le_bytes([0x34, 0x56, 0, 0])
        );
        let mut eight = [0u8; 8];
        r.t.read(CONFIG, &mut eight);
        assert_eq!(&eight[..6], &MAC);
        assert_eq!(&eight[6..], &[0, 0], "no status field");
        assert_eq!(rd(&mut r.t, CONFIG + 8), 0);
        assert_eq!(rd(&mut r.t, 0xffc), 0);
        // Read-only.
        r.t.write(CONFIG, &[1, 2, 3, 4], &r.mem).unwrap();
        r.t.read(CONFIG, &mut eight);
        assert_eq!(&eight[..6], &MAC);
    }

    #[test]
    fn mac_addresses_parse_format_and_must_be_unicast() {
        assert_eq!(parse_mac("52:54:00:12:34:56"), Ok(MAC));
        assert_eq!(parse_mac("52-54-0-12-34-56"), Ok(MAC));
        assert_eq!(format_mac(&MAC), "52:54:00:12:34:56");
        assert_eq!(format_mac(&DEFAULT_MAC), "02:76:6d:66:74:00");
        assert_eq!(parse_mac(&format_mac(&DEFAULT_MAC)), Ok(DEFAULT_MAC));
        for bad in [
            "",
            "52:54:00:12:34",
            "52:54:00:12:34:56:78",
            "52:54:00:12:34:5g",
            "52:54:00:12:34:",
            "52:54:00:12:34:567",
            "01:00:5e:00:00:01",
            "ff:ff:ff:ff:ff:ff",
            "00:00:00:00:00:00",
        ] {
            assert!(
                matches!(parse_mac(bad), Err(NetError::BadMac { .. })),
                "{bad:?}"
            );
        }
        assert!(Net::new([1, 0, 0, 0, 0, 0]).is_err());
        assert!(Net::new([0; 6]).is_err());
        let err = Net::new([0xff; 6]).unwrap_err().to_string();
        assert!(
            err.contains("ff:ff:ff:ff:ff:ff") && err.contains("multicast"),
            "{err}"
        );
    }

    #[test]
    fn tx_frames_across_descriptors_lose_their_header() {
        let mut r = rig();
        let (a, b, c) = (frame(1, 60), frame(2, 1514), frame(3, 300));
        // Header and frame in one descriptor (Linux with any_header_sg).
        let mut buf = header().to_vec();
        buf.extend_from_slice(&a);
        r.mem.write_slice(&buf, GuestAddress(TXBUF)).unwrap();
        let h1 = r.tx.submit(&r.mem, &[(TXBUF, buf.len() as u32, false)]);
        // Header alone, then the frame.
        r.mem
            .write_slice(&header(), GuestAddress(TXBUF + 0x1000))
            .unwrap();
        r.mem.write_slice(&b, GuestAddress(TXBUF + 0x2000)).unwrap();
        let h2 = r.tx.submit(
            &r.mem,
            &[(TXBUF + 0x1000, 12, false), (TXBUF + 0x2000, 1514, false)],
        );
        // Split anywhere: 5 bytes of header, 7 of header + 20 of frame, the rest.
        let mut buf = header().to_vec();
        buf.extend_from_slice(&c);
        r.mem
            .write_slice(&buf[..5], GuestAddress(TXBUF + 0x3000))
            .unwrap();
        r.mem
            .write_slice(&buf[5..32], GuestAddress(TXBUF + 0x3100))
            .unwrap();
        r.mem
            .write_slice(&buf[32..], GuestAddress(TXBUF + 0x3200))
            .unwrap();
        let h3 = r.tx.submit(
            &r.mem,
            &[
                (TXBUF + 0x3000, 5, false),
                (TXBUF + 0x3100, 27, false),
                (TXBUF + 0x3200, (buf.len() - 32) as u32, false),
            ],
        );
        assert!(!r.t.irq_level());
        r.notify_tx();
        for h in [h1, h2, h3] {
            assert_eq!(r.tx.pop_used(&r.mem), Some((u32::from(h), 0)));
        }
        assert_eq!(r.tx.pop_used(&r.mem), None);
        assert_eq!(rd(&mut r.t, INTERRUPT_STATUS), INT_USED_BUFFER);
        assert_eq!(r.t.device().tx_pending(), 3);
        assert_eq!(r.t.device_mut().take_tx(), vec![a, b, c]);
        assert!(r.t.device_mut().take_tx().is_empty());
        let stats = r.t.device().stats();
        assert_eq!((stats.tx_frames, stats.tx_bytes), (3, 60 + 1514 + 300));
        // A notify of the RX queue transmits nothing and uses nothing.
        wr(&mut r.t, &r.mem, INTERRUPT_ACK, INT_USED_BUFFER);
        r.post_rx(RXBUF, SMALL);
        wr(&mut r.t, &r.mem, QUEUE_NOTIFY, u32::from(RX_QUEUE));
        assert!(!r.t.irq_level());
        assert_eq!(r.rx.pop_used(&r.mem), None);
    }

    #[test]
    fn malformed_tx_chains_are_returned_and_dropped() {
        let mut r = rig();
        let f = frame(4, 100);
        let mut buf = header().to_vec();
        buf.extend_from_slice(&f);
        r.mem.write_slice(&buf, GuestAddress(TXBUF)).unwrap();
        let len = buf.len() as u32;
        let chains: Vec<Vec<(u64, u32, bool)>> = vec![
            // A device-writable descriptor.
            vec![(TXBUF, 12, false), (TXBUF + 12, len - 12, true)],
            // Outside guest memory.
            vec![(TXBUF, 12, false), (1 << 40, 100, false)],
            // Header only; header + 13 bytes (shorter than Ethernet's).
            vec![(TXBUF, 12, false)],
            vec![(TXBUF, 12 + 13, false)],
            // Longer than the largest frame.
            vec![(TXBUF, 12 + MAX_FRAME_BYTES as u32 + 1, false)],
        ];
        let heads: Vec<u16> = chains.iter().map(|c| r.tx.submit(&r.mem, c)).collect();
        // And a good one after them.
        let good = r.tx.submit(&r.mem, &[(TXBUF, len, false)]);
        r.notify_tx();
        for h in heads.into_iter().chain([good]) {
            assert_eq!(r.tx.pop_used(&r.mem), Some((u32::from(h), 0)));
        }
        assert_eq!(r.t.device_mut().take_tx(), vec![f]);
        let stats = r.t.device().stats();
        assert_eq!((stats.tx_malformed, stats.tx_frames), (5, 1));
        // Exactly the largest frame is fine.
        let big = frame(5, MAX_FRAME_BYTES);
        r.mem.write_slice(&header(), GuestAddress(TXBUF)).unwrap();
        r.mem.write_slice(&big, GuestAddress(TXBUF + 12)).unwrap();
        r.tx.submit(&r.mem, &[(TXBUF, MAX_BUFFER_BYTES as u32, false)]);
        r.notify_tx();
        assert_eq!(r.t.device_mut().take_tx(), vec![big]);
    }

    #[test]
    fn untaken_tx_frames_are_bounded() {
        let mut r = rig();
        let big = frame(6, MAX_FRAME_BYTES);
        r.mem.write_slice(&header(), GuestAddress(TXBUF)).unwrap();
        r.mem.write_slice(&big, GuestAddress(TXBUF + 12)).unwrap();
        // 16-entry queue: 16 frames per notify; 256 fit, the next is dropped.
        for _ in 0..QUEUE_SIZE / 16 + 1 {
            for _ in 0..16 {
                r.tx.submit(&r.mem, &[(TXBUF, MAX_BUFFER_BYTES as u32, false)]);
            }
            r.notify_tx();
        }
        let stats = r.t.device().stats();
        assert_eq!(stats.tx_frames, u64::from(QUEUE_SIZE));
        assert_eq!(stats.tx_overflow, 16);
        assert_eq!(r.t.device_mut().take_tx().len(), usize::from(QUEUE_SIZE));
        // Taken: room again.
        r.tx.submit(&r.mem, &[(TXBUF, MAX_BUFFER_BYTES as u32, false)]);
        r.notify_tx();
        assert_eq!(r.t.device().tx_pending(), 1);
    }

    #[test]
    fn rx_delivery_writes_header_and_frame_and_raises_the_interrupt() {
        let mut r = rig();
        let head = r.post_rx(RXBUF, SMALL);
        assert!(r.t.rx_ready(&r.mem));
        assert!(!r.t.irq_level());
        let f = frame(7, 1514);
        assert_eq!(r.t.deliver_rx(&f, &r.mem), Ok(RxOutcome::Delivered));
        assert_eq!(r.rx.pop_used(&r.mem), Some((u32::from(head), 12 + 1514)));
        let hdr = read(&r.mem, RXBUF, 12);
        assert_eq!(hdr, [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0], "num_buffers = 1");
        assert_eq!(read(&r.mem, RXBUF + 12, 1514), f);
        assert_eq!(
            read(&r.mem, RXBUF + 12 + 1514, 4),
            [0xee; 4],
            "nothing past the frame"
        );
        assert_eq!(rd(&mut r.t, INTERRUPT_STATUS), INT_USED_BUFFER);
        assert!(!r.t.rx_ready(&r.mem), "the only buffer is used");

        // A chain split inside the header and inside the frame.
        wr(&mut r.t, &r.mem, INTERRUPT_ACK, INT_USED_BUFFER);
        let (a, b, c) = (RXBUF + 0x1000, RXBUF + 0x2000, RXBUF + 0x3000);
        r.mem.write_slice(&[0xee; 0x3000], GuestAddress(a)).unwrap();
        let head =
            r.rx.submit(&r.mem, &[(a, 7, true), (b, 100, true), (c, 2000, true)]);
        let g = frame(8, 600);
        assert_eq!(r.t.deliver_rx(&g, &r.mem), Ok(RxOutcome::Delivered));
        assert_eq!(r.rx.pop_used(&r.mem), Some((u32::from(head), 612)));
        let mut back = read(&r.mem, a, 7);
        back.extend(read(&r.mem, b, 100));
        back.extend(read(&r.mem, c, 505));
        assert_eq!(&back[..12], &hdr[..]);
        assert_eq!(&back[12..], &g[..]);
        assert!(r.t.irq_level());
        let stats = r.t.device().stats();
        assert_eq!((stats.rx_frames, stats.rx_bytes), (2, 1514 + 600));
        // The smallest frame fits exactly in header + 14 bytes.
        let head = r.post_rx(RXBUF, 12 + 14);
        assert_eq!(
            r.t.deliver_rx(&frame(9, 14), &r.mem),
            Ok(RxOutcome::Delivered)
        );
        assert_eq!(r.rx.pop_used(&r.mem), Some((u32::from(head), 26)));
    }

    #[test]
    fn rx_ready_is_false_without_buffers_and_before_driver_ok() {
        let mut t = MmioTransport::new(Net::new(MAC).unwrap());
        let mem = memory();
        let f = frame(1, 64);
        assert!(!t.rx_ready(&mem));
        assert_eq!(t.deliver_rx(&f, &mem), Ok(RxOutcome::NoBuffer));
        let mut d = Driver::init_queues(&mut t, &mem, &[16, 16], 0);
        let mut rx = d.remove(0);
        // Live, but nothing posted.
        assert!(!t.rx_ready(&mem));
        let before = {
            let mut e = Encoder::new();
            t.encode(&mut e);
            e.into_bytes()
        };
        assert_eq!(t.deliver_rx(&f, &mem), Ok(RxOutcome::NoBuffer));
        let mut after = Encoder::new();
        t.encode(&mut after);
        assert_eq!(after.into_bytes(), before, "nothing changed");
        assert!(!t.irq_level());
        assert_eq!(t.device().stats(), NetStats::default());
        // rx_ready changes nothing either: asked twice, same answer.
        rx.submit(&mem, &[(RXBUF, SMALL, true)]);
        assert!(t.rx_ready(&mem));
        assert!(t.rx_ready(&mem));
        assert_eq!(t.deliver_rx(&f, &mem), Ok(RxOutcome::Delivered));
        assert!(!t.rx_ready(&mem));
        // A driver that failed, or a reset device, gets nothing.
        rx.submit(&mem, &[(RXBUF, SMALL, true)]);
        add_status(&mut t, &mem, status::FAILED);
        assert!(!t.rx_ready(&mem));
        assert_eq!(t.deliver_rx(&f, &mem), Ok(RxOutcome::NoBuffer));
    }

    #[test]
    fn oversize_frame_is_dropped_and_the_buffer_kept() {
        let mut r = rig();
        let head = r.post_rx(RXBUF, 12 + 100);
        assert_eq!(
            r.t.deliver_rx(&frame(1, 101), &r.mem),
            Ok(RxOutcome::Dropped)
        );
        assert_eq!(r.rx.pop_used(&r.mem), None);
        assert!(!r.t.irq_level());
        assert_eq!(read(&r.mem, RXBUF, 4), [0xee; 4], "buffer untouched");
        assert_eq!(r.t.device().stats().rx_too_big, 1);
        // The same chain takes the next frame that fits.
        assert!(r.t.rx_ready(&r.mem));
        let f = frame(2, 100);
        assert_eq!(r.t.deliver_rx(&f, &r.mem), Ok(RxOutcome::Delivered));
        assert_eq!(r.rx.pop_used(&r.mem), Some((u32::from(head), 112)));
        assert_eq!(read(&r.mem, RXBUF + 12, 100), f);
        // Frames outside the bounds are the caller's mistake.
        r.post_rx(RXBUF, SMALL);
        let e = r.t.deliver_rx(&[0u8; 13], &r.mem);
        assert_eq!(e, Err(NetError::FrameSize { len: 13 }));
        let huge = vec![0u8; MAX_FRAME_BYTES + 1];
        assert!(r.t.deliver_rx(&huge, &r.mem).is_err());
        assert_eq!(r.rx.pop_used(&r.mem), None);
        let stats = r.t.device().stats();
        assert_eq!((stats.rx_frames, stats.rx_too_big), (1, 1));
        // The largest frame goes into a chain large enough.
        let head = r.post_rx(0x100000, MAX_BUFFER_BYTES as u32);
        let largest = frame(3, MAX_FRAME_BYTES);
        // The small chain posted above comes first, and is too small.
        assert_eq!(r.t.deliver_rx(&largest, &r.mem), Ok(RxOutcome::Dropped));
        assert_eq!(
            r.t.deliver_rx(&frame(4, 60), &r.mem),
            Ok(RxOutcome::Delivered)
        );
        r.rx.pop_used(&r.mem).unwrap();
        assert_eq!(r.t.deliver_rx(&largest, &r.mem), Ok(RxOutcome::Delivered));
        assert_eq!(
            r.rx.pop_used(&r.mem),
            Some((u32::from(head), MAX_BUFFER_BYTES as u32))
        );
        assert_eq!(read(&r.mem, 0x100000 + 12, MAX_FRAME_BYTES), largest);
    }

    #[test]
    fn malformed_rx_chain_is_returned_empty() {
        let mut r = rig();
        // A device-readable descriptor in a receive chain.
        let head = r.rx.submit(&r.mem, &[(RXBUF, SMALL, false)]);
        assert_eq!(
            r.t.deliver_rx(&frame(1, 60), &r.mem),
            Ok(RxOutcome::Dropped)
        );
        assert_eq!(r.rx.pop_used(&r.mem), Some((u32::from(head), 0)));
        // Outside guest memory.
        let head =
            r.rx.submit(&r.mem, &[(RXBUF, 12, true), (1 << 40, 1518, true)]);
        assert_eq!(
            r.t.deliver_rx(&frame(2, 60), &r.mem),
            Ok(RxOutcome::Dropped)
        );
        assert_eq!(r.rx.pop_used(&r.mem), Some((u32::from(head), 0)));
        assert_eq!(r.t.device().stats().rx_malformed, 2);
        assert!(r.t.irq_level(), "the driver gets its buffers back");
        // The device still works.
        r.post_rx(RXBUF, SMALL);
        assert_eq!(
            r.t.deliver_rx(&frame(3, 60), &r.mem),
            Ok(RxOutcome::Delivered)
        );
    }

    #[test]
    fn rx_interrupt_honours_no_interrupt() {
        let mut r = rig();
        r.mem
            .write_obj(1u16.to_le(), GuestAddress(rings(RX_QUEUE).avail))
            .unwrap();
        r.post_rx(RXBUF, SMALL);
        assert_eq!(
            r.t.deliver_rx(&frame(1, 60), &r.mem),
            Ok(RxOutcome::Delivered)
        );
        assert!(r.rx.pop_used(&r.mem).is_some());
        assert!(!r.t.irq_level());
    }

    #[test]
    fn broken_rx_ring_asks_for_reset() {
        let mut r = rig();
        r.mem
            .write_obj(100u16.to_le(), GuestAddress(rings(RX_QUEUE).avail + 2))
            .unwrap();
        assert!(r.t.rx_ready(&r.mem), "delivering finds out");
        assert_eq!(
            r.t.deliver_rx(&frame(1, 60), &r.mem),
            Ok(RxOutcome::Dropped)
        );
        assert_ne!(rd(&mut r.t, STATUS) & status::DEVICE_NEEDS_RESET, 0);
        assert_eq!(rd(&mut r.t, INTERRUPT_STATUS), INT_CONFIG_CHANGE);
        assert!(!r.t.rx_ready(&r.mem));
        assert_eq!(
            r.t.deliver_rx(&frame(1, 60), &r.mem),
            Ok(RxOutcome::NoBuffer)
        );
        // A head index out of range, after a reset and a new probe.
        let mut d = Driver::init_queues(&mut r.t, &r.mem, &[16, 16], 0);
        let rx = &mut d[0];
        rx.publish(&r.mem, 16);
        assert_eq!(
            r.t.deliver_rx(&frame(1, 60), &r.mem),
            Ok(RxOutcome::Dropped)
        );
        assert_ne!(rd(&mut r.t, STATUS) & status::DEVICE_NEEDS_RESET, 0);
    }

    #[test]
    fn reset_returns_to_power_on() {
        let mut r = rig();
        r.post_rx(RXBUF, SMALL);
        r.t.deliver_rx(&frame(1, 60), &r.mem).unwrap();
        r.mem.write_slice(&header(), GuestAddress(TXBUF)).unwrap();
        r.mem
            .write_slice(&frame(2, 60), GuestAddress(TXBUF + 12))
            .unwrap();
        r.tx.submit(&r.mem, &[(TXBUF, 72, false)]);
        r.notify_tx();
        r.post_rx(RXBUF, SMALL);
        assert!(r.t.rx_ready(&r.mem));
        wr(&mut r.t, &r.mem, STATUS, 0);
        assert_eq!(r.t.device().acked_features(), 0);
        assert!(!r.t.irq_level());
        assert!(!r.t.rx_ready(&r.mem));
        assert_eq!(
            r.t.deliver_rx(&frame(3, 60), &r.mem),
            Ok(RxOutcome::NoBuffer)
        );
        // Frames the guest sent before the reset are still handed over.
        assert_eq!(r.t.device_mut().take_tx(), vec![frame(2, 60)]);
        let fresh = MmioTransport::new(Net::new(MAC).unwrap());
        let mut e = Encoder::new();
        fresh.encode(&mut e);
        assert_eq!(r.encoded(), e.into_bytes(), "as never touched");
        // Probed again, it works.
        let mut d = Driver::init_queues(&mut r.t, &r.mem, &[16, 16], 0);
        d[0].submit(&r.mem, &[(RXBUF, SMALL, true)]);
        assert_eq!(
            r.t.deliver_rx(&frame(4, 60), &r.mem),
            Ok(RxOutcome::Delivered)
        );
    }

    #[test]
    fn snapshot_mid_way_round_trips_and_continues() {
        let mut r = rig();
        // Two receive buffers posted, one used; one frame transmitted and
        // not taken; an interrupt pending.
        r.post_rx(RXBUF, SMALL);
        let second = r.post_rx(RXBUF + 0x1000, SMALL);
        r.t.deliver_rx(&frame(1, 200), &r.mem).unwrap();
        r.rx.pop_used(&r.mem).unwrap();
        r.mem.write_slice(&header(), GuestAddress(TXBUF)).unwrap();
        r.mem
            .write_slice(&frame(2, 90), GuestAddress(TXBUF + 12))
            .unwrap();
        r.tx.submit(&r.mem, &[(TXBUF, 102, false)]);
        r.notify_tx();
        assert!(r.t.irq_level());

        let bytes = r.encoded();
        let restored =
            MmioTransport::decode(&mut Decoder::new(&bytes), Net::new(MAC).unwrap()).unwrap();
        let mut again = Encoder::new();
        restored.encode(&mut again);
        assert_eq!(again.into_bytes(), bytes, "encode(decode(x)) == x");
        assert!(restored.irq_level());
        assert_eq!(
            restored.device().acked_features(),
            VIRTIO_F_VERSION_1 | F_MAC
        );

        // Continue on the restored device with the same memory and drivers.
        r.t = restored;
        assert_eq!(r.t.device_mut().take_tx(), vec![frame(2, 90)]);
        assert!(r.t.rx_ready(&r.mem));
        assert_eq!(
            r.t.deliver_rx(&frame(3, 300), &r.mem),
            Ok(RxOutcome::Delivered)
        );
        assert_eq!(r.rx.pop_used(&r.mem), Some((u32::from(second), 312)));
        assert_eq!(read(&r.mem, RXBUF + 0x1000 + 12, 300), frame(3, 300));
        r.mem
            .write_slice(&frame(4, 64), GuestAddress(TXBUF + 12))
            .unwrap();
        r.tx.submit(&r.mem, &[(TXBUF, 76, false)]);
        r.notify_tx();
        assert_eq!(r.t.device_mut().take_tx(), vec![frame(4, 64)]);
        assert_eq!(r.tx.pop_used(&r.mem).map(|(_, len)| len), Some(0));
    }

    #[test]
    fn snapshot_refuses_another_mac_or_bad_content() {
        let r = rig();
        let bytes = r.encoded();
        let other = Net::new(DEFAULT_MAC).unwrap();
        let err = MmioTransport::decode(&mut Decoder::new(&bytes), other).unwrap_err();
        assert!(matches!(err, SnapshotError::Invalid(_)), "{err}");
        assert!(err.to_string().contains("02:76:6d:66:74:00"), "{err}");
        let truncated = &bytes[..bytes.len() - 1];
        let same = Net::new(MAC).unwrap();
        assert!(MmioTransport::decode(&mut Decoder::new(truncated), same).is_err());
        // A pending frame shorter than an Ethernet header.
        let mut e = Encoder::new();
        e.raw(&MAC);
        e.u64(0);
        e.u32(1);
        e.bytes(&[1, 2, 3]);
        let mut net = Net::new(MAC).unwrap();
        assert!(net.decode(&mut Decoder::new(&e.into_bytes())).is_err());
        // Features never offered.
        let mut e = Encoder::new();
        e.raw(&MAC);
        e.u64(1 << vnet::VIRTIO_NET_F_MRG_RXBUF);
        e.u32(0);
        assert!(net.decode(&mut Decoder::new(&e.into_bytes())).is_err());
    }

    #[test]
    fn gratuitous_arp_with_an_address_is_an_arp_announcement() {
        let f = gratuitous_arp(MAC, Some([10, 77, 0, 100]));
        #[rustfmt::skip]
        let want: [u8; 42] = [
            0xff, 0xff, 0xff, 0xff, 0xff, 0xff, // to everyone
            0x52, 0x54, 0x00, 0x12, 0x34, 0x56, // from the guest
            0x08, 0x06,                         // ARP
            0x00, 0x01, 0x08, 0x00, 6, 4,       // Ethernet, IPv4
            0x00, 0x01,                         // request
            0x52, 0x54, 0x00, 0x12, 0x34, 0x56, 10, 77, 0, 100, // sender
            0, 0, 0, 0, 0, 0, 10, 77, 0, 100,   // target: nobody, the same address
        ];
        assert_eq!(f.len(), ANNOUNCE_BYTES);
        assert_eq!(&f[..42], &want[..]);
        assert!(f[42..].iter().all(|&b| b == 0), "zero padding");
    }

    #[test]
    fn gratuitous_arp_without_an_address_is_qemus_rarp() {
        let f = gratuitous_arp(MAC, None);
        #[rustfmt::skip]
        let want: [u8; 42] = [
            0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
            0x52, 0x54, 0x00, 0x12, 0x34, 0x56,
            0x80, 0x35,                         // RARP
            0x00, 0x01, 0x08, 0x00, 6, 4,
            0x00, 0x03,                         // reverse request
            0x52, 0x54, 0x00, 0x12, 0x34, 0x56, 0, 0, 0, 0,
            0x52, 0x54, 0x00, 0x12, 0x34, 0x56, 0, 0, 0, 0,
        ];
        assert_eq!(f.len(), 60);
        assert_eq!(&f[..42], &want[..]);
        assert!(f[42..].iter().all(|&b| b == 0));
    }
}
