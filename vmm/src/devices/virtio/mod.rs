//! Virtio devices behind the virtio-mmio transport (virtio 1.x, "modern"
//! only).
//!
//! - [`mmio`]: the register window a driver programs
//!   ([`MmioTransport`]): feature negotiation, the device status state
//!   machine, queue set-up, notification, the interrupt status and the
//!   device's configuration space.
//! - [`block`]: virtio-blk over a raw image file ([`Block`]).
//! - [`net`]: virtio-net ([`Net`]); frames go in and out through the
//!   monitor, which owns the host end, a [`tap`] device ([`Tap`]).
//!
//! A device model implements [`VirtioDevice`]; the transport owns its
//! queues (split virtqueues, `virtio_queue::Queue`) and hands a queue to the
//! device when the driver notifies it, or when the host has input for it
//! ([`MmioTransport::with_device_queue`]).
//!
//! # Where this sits in the monitor
//!
//! Like every other device, these live on the vCPU thread and act only when
//! the guest accesses their window (an MMIO exit): a QueueNotify write
//! processes the queue right there, synchronously, and its completions
//! (used-ring entries, data written into guest memory, the interrupt status)
//! are in place before the vCPU runs again. Nothing happens between exits,
//! so a device's effect on the guest is a pure function of the guest's own
//! accesses and of the backing data, which is what deterministic replay
//! needs (see [`block`] for the disk side of that argument). The one input
//! from outside, a received network frame, enters at an exit boundary as
//! logged input, and the backup delivers it at the same boundary (see
//! [`net`]).
//!
//! The interrupt is one level-triggered line per transport:
//! [`MmioTransport::irq_level`] is true while InterruptStatus is non-zero;
//! the caller feeds it into the 8259 PIC after every access, as it does for
//! the UART.
//!
//! Not offered: `VIRTIO_RING_F_EVENT_IDX`, `VIRTIO_RING_F_INDIRECT_DESC`,
//! `VIRTIO_F_RING_PACKED`, `VIRTIO_F_NOTIFICATION_DATA`, legacy (version 1)
//! MMIO. The driver's `VRING_AVAIL_F_NO_INTERRUPT` hint is honoured.

pub mod block;
pub mod mmio;
pub mod net;
pub mod tap;
pub mod written;

use crate::memory::GuestMemoryMmap;
use thiserror::Error;
use virtio_queue::Queue;

use crate::snapshot::{Decoder, Encoder, SnapshotError};

pub use self::block::{Block, BlockError, BlockStats};
pub use self::mmio::{MmioError, MmioTransport};
pub use self::net::{gratuitous_arp, Net, NetError, NetStats, RxOutcome};
pub use self::tap::{Tap, TapError};

/// Size of one device's MMIO window.
pub const MMIO_WINDOW: u64 = 0x1000;
/// MagicValue register contents: "virt" in little-endian.
pub const MMIO_MAGIC: u32 = 0x7472_6976;
/// Version register contents: 2, the virtio 1.x ("modern") MMIO layout.
pub const MMIO_VERSION: u32 = 2;
/// VendorID register contents: "vmft" in little-endian.
pub const VENDOR_ID: u32 = u32::from_le_bytes(*b"vmft");

/// InterruptStatus bit 0: the device used a buffer in a queue.
pub const INT_USED_BUFFER: u32 = virtio_bindings::virtio_mmio::VIRTIO_MMIO_INT_VRING;
/// InterruptStatus bit 1: the configuration changed (also raised when the
/// device sets DEVICE_NEEDS_RESET while DRIVER_OK).
pub const INT_CONFIG_CHANGE: u32 = virtio_bindings::virtio_mmio::VIRTIO_MMIO_INT_CONFIG;

/// Device status bits (virtio 1.x section 2.1).
pub mod status {
    use virtio_bindings::virtio_config as c;

    /// The guest found the device.
    pub const ACKNOWLEDGE: u32 = c::VIRTIO_CONFIG_S_ACKNOWLEDGE;
    /// The guest has a driver for it.
    pub const DRIVER: u32 = c::VIRTIO_CONFIG_S_DRIVER;
    /// The driver is set up and ready to drive the device.
    pub const DRIVER_OK: u32 = c::VIRTIO_CONFIG_S_DRIVER_OK;
    /// Feature negotiation is complete.
    pub const FEATURES_OK: u32 = c::VIRTIO_CONFIG_S_FEATURES_OK;
    /// The device hit an error it cannot recover from without a reset.
    pub const DEVICE_NEEDS_RESET: u32 = c::VIRTIO_CONFIG_S_NEEDS_RESET;
    /// The driver gave up on the device.
    pub const FAILED: u32 = c::VIRTIO_CONFIG_S_FAILED;
}

/// Feature bit `VIRTIO_F_VERSION_1`, always offered (and required) by the
/// transport.
pub const VIRTIO_F_VERSION_1: u64 = 1 << virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;

/// A host-side failure while the device served a request (the image file
/// could not be read, written or synced). The guest saw an error status for
/// that request; the caller learns of it through [`MmioError::HostIo`].
#[derive(Debug, Error)]
#[error("{what}: {source}")]
pub struct HostError {
    /// What the device was doing.
    pub what: String,
    /// Underlying error.
    #[source]
    pub source: std::io::Error,
}

/// What a device did with one queue at a notification.
#[derive(Debug, Default)]
pub struct QueueRun {
    /// Descriptor chains returned to the used ring.
    pub used: u32,
    /// The driver broke the ring itself (the available index jumped by more
    /// than the queue size, a head index out of range, a ring outside guest
    /// memory): the transport sets DEVICE_NEEDS_RESET and stops using the
    /// device until the driver resets it.
    pub broken: Option<String>,
    /// The first host-side failure (later ones are only counted by the
    /// device); every request it hit was completed with an error status.
    pub host_error: Option<HostError>,
}

/// A virtio device model behind [`MmioTransport`].
///
/// Everything here runs on the vCPU thread, inside the MMIO exit that
/// caused it.
pub trait VirtioDevice {
    /// Virtio device ID (1 for net, 2 for block).
    fn device_id(&self) -> u32;
    /// Device-type feature bits offered; the transport adds
    /// [`VIRTIO_F_VERSION_1`].
    fn features(&self) -> u64;
    /// Maximum size of each queue (a power of two, at most 32768); the
    /// number of entries is the number of queues.
    fn queue_max_sizes(&self) -> &[u16];
    /// Read `data.len()` bytes of the configuration space at `offset`;
    /// bytes past its end read as 0.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// The driver wrote the configuration space.
    fn write_config(&mut self, offset: u64, data: &[u8]);
    /// The driver set DRIVER_OK after negotiating `acked_features`.
    fn activate(&mut self, acked_features: u64);
    /// The driver notified queue `index`: serve every available chain.
    fn process_queue(&mut self, index: u16, queue: &mut Queue, mem: &GuestMemoryMmap) -> QueueRun;
    /// The driver reset the device (status 0): back to the power-on state.
    fn reset(&mut self);
    /// Serialise the device-specific state.
    fn encode(&self, e: &mut Encoder);
    /// Restore the device-specific state from [`VirtioDevice::encode`]
    /// output into this freshly built device. The transport does not call
    /// [`VirtioDevice::activate`] again after a restore, so whatever
    /// `activate` derives from the negotiated features belongs in this
    /// state. A device whose configuration differs from the one encoded
    /// (another disk size, for instance) refuses with
    /// [`SnapshotError::Invalid`].
    fn decode(&mut self, d: &mut Decoder) -> Result<(), SnapshotError>;
}

/// A test driver that programs a transport the way Linux's `virtio_mmio`
/// and `virtio_blk` do, over split rings laid out by hand in guest memory:
/// queue 0 at [`testing::DESC`], [`testing::AVAIL`], [`testing::USED`],
/// further queues from [`testing::EXTRA_RINGS`] on ([`testing::rings`]).
#[cfg(test)]
pub(crate) mod testing {
    use crate::memory::GuestMemoryMmap;
    use vm_memory::{Bytes, GuestAddress};

    use super::{status, MmioTransport, VirtioDevice, VIRTIO_F_VERSION_1};

    /// Guest memory size for the tests.
    pub const MEM_BYTES: usize = 4 << 20;
    /// Descriptor table (16 bytes × up to 256 entries).
    pub const DESC: u64 = 0x1000;
    /// Available ring (flags, idx, ring[256], used_event).
    pub const AVAIL: u64 = 0x3000;
    /// Used ring (flags, idx, ring[256] of 8 bytes, avail_event).
    pub const USED: u64 = 0x4000;
    /// Rings of queues 1, 2, ...: 0x4000 bytes each from here (descriptor
    /// table, then available ring at +0x1000, used ring at +0x2000), out of
    /// the way of the buffers the tests use below 3 MiB.
    pub const EXTRA_RINGS: u64 = 0x30_0000;

    /// Where one queue's three parts are.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub struct Rings {
        pub desc: u64,
        pub avail: u64,
        pub used: u64,
    }

    /// The rings of queue `index` in the tests' layout.
    pub fn rings(index: u16) -> Rings {
        if index == 0 {
            return Rings {
                desc: DESC,
                avail: AVAIL,
                used: USED,
            };
        }
        let base = EXTRA_RINGS + 0x4000 * u64::from(index - 1);
        Rings {
            desc: base,
            avail: base + 0x1000,
            used: base + 0x2000,
        }
    }

    pub const MAGIC: u64 = 0x000;
    pub const VERSION: u64 = 0x004;
    pub const DEVICE_ID: u64 = 0x008;
    pub const VENDOR: u64 = 0x00c;
    pub const DEVICE_FEATURES: u64 = 0x010;
    pub const DEVICE_FEATURES_SEL: u64 = 0x014;
    pub const DRIVER_FEATURES: u64 = 0x020;
    pub const DRIVER_FEATURES_SEL: u64 = 0x024;
    pub const QUEUE_SEL: u64 = 0x030;
    pub const QUEUE_NUM_MAX: u64 = 0x034;
    pub const QUEUE_NUM: u64 = 0x038;
    pub const QUEUE_READY: u64 = 0x044;
    pub const QUEUE_NOTIFY: u64 = 0x050;
    pub const INTERRUPT_STATUS: u64 = 0x060;
    pub const INTERRUPT_ACK: u64 = 0x064;
    pub const STATUS: u64 = 0x070;
    pub const QUEUE_DESC_LOW: u64 = 0x080;
    pub const QUEUE_DESC_HIGH: u64 = 0x084;
    pub const QUEUE_DRIVER_LOW: u64 = 0x090;
    pub const QUEUE_DRIVER_HIGH: u64 = 0x094;
    pub const QUEUE_DEVICE_LOW: u64 = 0x0a0;
    pub const QUEUE_DEVICE_HIGH: u64 = 0x0a4;
    pub const CONFIG_GENERATION: u64 = 0x0fc;
    pub const CONFIG: u64 = 0x100;

    /// Descriptor flag: another descriptor follows.
    pub const F_NEXT: u16 = 1;
    /// Descriptor flag: device-writable.
    pub const F_WRITE: u16 = 2;

    pub fn memory() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_BYTES)]).unwrap()
    }

    /// 32-bit register read.
    pub fn rd<D: VirtioDevice>(t: &mut MmioTransport<D>, offset: u64) -> u32 {
        let mut data = [0u8; 4];
        t.read(offset, &mut data);
        u32::from_le_bytes(data)
    }

    /// 32-bit register write; panics on a host error.
    pub fn wr<D: VirtioDevice>(
        t: &mut MmioTransport<D>,
        mem: &GuestMemoryMmap,
        offset: u64,
        value: u32,
    ) {
        t.write(offset, &value.to_le_bytes(), mem).unwrap();
    }

    /// Read-modify-write of Status, like Linux's `virtio_add_status`.
    pub fn add_status<D: VirtioDevice>(t: &mut MmioTransport<D>, mem: &GuestMemoryMmap, bit: u32) {
        let s = rd(t, STATUS);
        wr(t, mem, STATUS, s | bit);
    }

    /// The 64 offered feature bits, read as Linux does (high word first).
    pub fn device_features<D: VirtioDevice>(
        t: &mut MmioTransport<D>,
        mem: &GuestMemoryMmap,
    ) -> u64 {
        wr(t, mem, DEVICE_FEATURES_SEL, 1);
        let high = u64::from(rd(t, DEVICE_FEATURES));
        wr(t, mem, DEVICE_FEATURES_SEL, 0);
        (high << 32) | u64::from(rd(t, DEVICE_FEATURES))
    }

    /// Write both halves of DriverFeatures.
    pub fn write_driver_features<D: VirtioDevice>(
        t: &mut MmioTransport<D>,
        mem: &GuestMemoryMmap,
        features: u64,
    ) {
        wr(t, mem, DRIVER_FEATURES_SEL, 1);
        wr(t, mem, DRIVER_FEATURES, (features >> 32) as u32);
        wr(t, mem, DRIVER_FEATURES_SEL, 0);
        wr(t, mem, DRIVER_FEATURES, features as u32);
    }

    /// Program queue 0 with `size` entries at DESC/AVAIL/USED and make it
    /// ready.
    pub fn setup_queue<D: VirtioDevice>(
        t: &mut MmioTransport<D>,
        mem: &GuestMemoryMmap,
        size: u16,
    ) {
        setup_queue_at(t, mem, 0, size);
    }

    /// Program queue `index` with `size` entries at [`rings`]`(index)` and
    /// make it ready.
    pub fn setup_queue_at<D: VirtioDevice>(
        t: &mut MmioTransport<D>,
        mem: &GuestMemoryMmap,
        index: u16,
        size: u16,
    ) {
        let r = rings(index);
        wr(t, mem, QUEUE_SEL, u32::from(index));
        assert_eq!(rd(t, QUEUE_READY), 0, "queue already live");
        assert!(rd(t, QUEUE_NUM_MAX) >= u32::from(size));
        wr(t, mem, QUEUE_NUM, u32::from(size));
        wr(t, mem, QUEUE_DESC_LOW, r.desc as u32);
        wr(t, mem, QUEUE_DESC_HIGH, 0);
        wr(t, mem, QUEUE_DRIVER_LOW, r.avail as u32);
        wr(t, mem, QUEUE_DRIVER_HIGH, 0);
        wr(t, mem, QUEUE_DEVICE_LOW, r.used as u32);
        wr(t, mem, QUEUE_DEVICE_HIGH, 0);
        wr(t, mem, QUEUE_READY, 1);
    }

    /// The driver side of one split queue.
    #[derive(Debug, Clone)]
    pub struct Driver {
        pub size: u16,
        rings: Rings,
        next_desc: u16,
        pub avail_idx: u16,
        used_seen: u16,
    }

    impl Driver {
        /// Reset, ACKNOWLEDGE, DRIVER, negotiate (all offered features but
        /// the ones in `refuse`), FEATURES_OK, queue 0 with `size`
        /// entries, DRIVER_OK; as Linux probes a device.
        pub fn init<D: VirtioDevice>(
            t: &mut MmioTransport<D>,
            mem: &GuestMemoryMmap,
            size: u16,
            refuse: u64,
        ) -> Driver {
            Self::init_queues(t, mem, &[size], refuse).remove(0)
        }

        /// As [`Driver::init`], setting up queues 0, 1, ... with `sizes`
        /// entries (at [`rings`]); one driver per queue.
        pub fn init_queues<D: VirtioDevice>(
            t: &mut MmioTransport<D>,
            mem: &GuestMemoryMmap,
            sizes: &[u16],
            refuse: u64,
        ) -> Vec<Driver> {
            // Clean rings: a re-initialisation starts from index 0.
            mem.write_slice(&[0u8; 0x4000], GuestAddress(DESC)).unwrap();
            for index in 1..sizes.len() as u16 {
                mem.write_slice(&[0u8; 0x3000], GuestAddress(rings(index).desc))
                    .unwrap();
            }
            assert_eq!(rd(t, MAGIC), u32::from_le_bytes(*b"virt"));
            assert_eq!(rd(t, VERSION), 2);
            wr(t, mem, STATUS, 0);
            assert_eq!(rd(t, STATUS), 0);
            add_status(t, mem, status::ACKNOWLEDGE);
            add_status(t, mem, status::DRIVER);
            let offered = device_features(t, mem);
            assert_ne!(offered & VIRTIO_F_VERSION_1, 0);
            write_driver_features(t, mem, offered & !refuse);
            add_status(t, mem, status::FEATURES_OK);
            assert_ne!(rd(t, STATUS) & status::FEATURES_OK, 0, "features refused");
            for (index, &size) in sizes.iter().enumerate() {
                setup_queue_at(t, mem, index as u16, size);
            }
            add_status(t, mem, status::DRIVER_OK);
            (0..sizes.len() as u16)
                .zip(sizes)
                .map(|(index, &size)| Driver::for_queue(index, size))
                .collect()
        }

        /// The driver state of a freshly set-up queue 0 of `size` entries
        /// (rings zeroed), for tests that program the registers themselves.
        pub fn new(size: u16) -> Driver {
            Self::for_queue(0, size)
        }

        /// As [`Driver::new`] for queue `index` (rings at [`rings`]).
        pub fn for_queue(index: u16, size: u16) -> Driver {
            Driver {
                size,
                rings: rings(index),
                next_desc: 0,
                avail_idx: 0,
                used_seen: 0,
            }
        }

        /// Write one descriptor table entry.
        pub fn write_desc(
            &self,
            mem: &GuestMemoryMmap,
            index: u16,
            addr: u64,
            len: u32,
            flags: u16,
            next: u16,
        ) {
            let at = GuestAddress(self.rings.desc + 16 * u64::from(index));
            let mut raw = [0u8; 16];
            raw[0..8].copy_from_slice(&addr.to_le_bytes());
            raw[8..12].copy_from_slice(&len.to_le_bytes());
            raw[12..14].copy_from_slice(&flags.to_le_bytes());
            raw[14..16].copy_from_slice(&next.to_le_bytes());
            mem.write_slice(&raw, at).unwrap();
        }

        /// Put `head` in the available ring and publish the new index.
        pub fn publish(&mut self, mem: &GuestMemoryMmap, head: u16) {
            let avail = self.rings.avail;
            let slot = avail + 4 + 2 * u64::from(self.avail_idx % self.size);
            mem.write_obj(head.to_le(), GuestAddress(slot)).unwrap();
            self.avail_idx = self.avail_idx.wrapping_add(1);
            mem.write_obj(self.avail_idx.to_le(), GuestAddress(avail + 2))
                .unwrap();
        }

        /// Chain `bufs` (address, length, device-writable) into free
        /// descriptors and make the chain available; returns its head.
        pub fn submit(&mut self, mem: &GuestMemoryMmap, bufs: &[(u64, u32, bool)]) -> u16 {
            let head = self.next_desc;
            for (i, &(addr, len, writable)) in bufs.iter().enumerate() {
                let index = self.next_desc;
                self.next_desc = (self.next_desc + 1) % self.size;
                let mut flags = if writable { F_WRITE } else { 0 };
                if i + 1 < bufs.len() {
                    flags |= F_NEXT;
                }
                self.write_desc(mem, index, addr, len, flags, self.next_desc);
            }
            self.publish(mem, head);
            head
        }

        /// Next used element (id, len) not seen yet.
        pub fn pop_used(&mut self, mem: &GuestMemoryMmap) -> Option<(u32, u32)> {
            let used = self.rings.used;
            let idx = u16::from_le(mem.read_obj(GuestAddress(used + 2)).unwrap());
            if idx == self.used_seen {
                return None;
            }
            let at = used + 4 + 8 * u64::from(self.used_seen % self.size);
            let id = u32::from_le(mem.read_obj(GuestAddress(at)).unwrap());
            let len = u32::from_le(mem.read_obj(GuestAddress(at + 4)).unwrap());
            self.used_seen = self.used_seen.wrapping_add(1);
            Some((id, len))
        }
    }
}
