//! The virtio-mmio transport, virtio 1.x layout only (Version = 2), as in
//! section 4.2.2 of the virtio specification.
//!
//! | offset | register | access |
//! | --- | --- | --- |
//! | 0x000 | MagicValue, "virt" | R |
//! | 0x004 | Version, 2 | R |
//! | 0x008 | DeviceID | R |
//! | 0x00c | VendorID, "vmft" | R |
//! | 0x010 / 0x014 | DeviceFeatures / DeviceFeaturesSel | R / W |
//! | 0x020 / 0x024 | DriverFeatures / DriverFeaturesSel | W / W |
//! | 0x030 | QueueSel | W |
//! | 0x034 | QueueNumMax (0: no such queue) | R |
//! | 0x038 | QueueNum | W |
//! | 0x044 | QueueReady | RW |
//! | 0x050 | QueueNotify | W |
//! | 0x060 / 0x064 | InterruptStatus / InterruptACK | R / W |
//! | 0x070 | Status (write 0: reset) | RW |
//! | 0x080..0x0a4 | QueueDesc, QueueDriver, QueueDevice (low, high) | W |
//! | 0x0fc | ConfigGeneration | R |
//! | 0x100.. | device configuration space | RW |
//!
//! Registers below 0x100 take aligned 32-bit accesses only; the
//! configuration space takes 1, 2, 4 or 8 bytes. Anything else, and any
//! register not in the table, reads as 0 and ignores writes (with a
//! `tracing::debug!`), as do writes the current state forbids (features
//! after FEATURES_OK, queue addresses of a ready queue, ...).
//!
//! # Status state machine
//!
//! The driver only adds bits; writing 0 resets the device: queues, status,
//! features, selectors and the interrupt status return to power-on, and the
//! device model is reset. Bits are accepted in the order the specification
//! gives (3.1.1): ACKNOWLEDGE, DRIVER, FEATURES_OK (only if the driver
//! acknowledged `VIRTIO_F_VERSION_1` and nothing that was not offered;
//! otherwise the bit stays clear and the driver, reading it back, gives
//! up), DRIVER_OK (only after FEATURES_OK; the device is activated with the
//! negotiated features). FAILED is accepted at any time. A write that
//! would clear a bit is ignored. DEVICE_NEEDS_RESET belongs to the device:
//! it is set when the driver breaks a ring ([`super::QueueRun::broken`]),
//! together with a configuration-change interrupt if DRIVER_OK is set, and
//! from then on notifications are ignored until the reset.
//!
//! # Queues
//!
//! A queue's size and addresses can be written while it is not ready.
//! QueueReady = 1 makes it ready only if its size is a power of two no
//! larger than QueueNumMax and its three parts lie in guest memory with the
//! alignment split rings need (and the available ring is not at address 0,
//! which `virtio_queue` reads as "not set up"); otherwise it stays not ready (QueueReady
//! reads 0). A QueueNotify write, once DRIVER_OK is set, makes the device
//! serve that queue at once; if it used any buffer and the driver did not
//! set `VRING_AVAIL_F_NO_INTERRUPT`, InterruptStatus bit 0 is set.
//! InterruptACK clears the bits written.
//!
//! A device whose input comes from the host rather than from the driver
//! (virtio-net's receive queue) uses a queue outside a notification
//! through [`MmioTransport::with_device_queue`], with the same
//! consequences as a notify, and only while the queue is live
//! ([`MmioTransport::live_queue`]).

use std::fmt;

use tracing::{debug, warn};
use virtio_bindings::virtio_mmio as reg;
use virtio_bindings::virtio_ring::VRING_AVAIL_F_NO_INTERRUPT;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};

use crate::memory::GuestMemoryMmap;

use super::{
    status, HostError, QueueRun, VirtioDevice, INT_CONFIG_CHANGE, INT_USED_BUFFER, MMIO_MAGIC,
    MMIO_VERSION, MMIO_WINDOW, VENDOR_ID, VIRTIO_F_VERSION_1,
};
use crate::snapshot::{Decoder, Encoder, SnapshotError};

/// Offset of the device configuration space in the window.
pub const CONFIG_OFFSET: u64 = reg::VIRTIO_MMIO_CONFIG as u64;

/// Errors the caller of [`MmioTransport::write`] must act on. Everything the
/// guest can cause is handled inside the device model and is not an error
/// here.
#[derive(Debug, thiserror::Error)]
pub enum MmioError {
    /// The host failed to serve a request. The guest saw an error status for
    /// it (the access itself completed), but under fault tolerance this
    /// side's disk may now differ from its peer's copy.
    #[error("virtio device {device_id}, queue {queue}: host I/O failed: {source}")]
    HostIo {
        /// Virtio device ID.
        device_id: u32,
        /// Queue being served.
        queue: u16,
        /// What failed.
        #[source]
        source: HostError,
    },
}

/// Per-queue state the transport keeps beside `virtio_queue::Queue`.
#[derive(Debug)]
struct QueueSlot {
    queue: Queue,
    /// The driver wrote a QueueNum the queue refused; QueueReady = 1 is then
    /// refused too.
    bad_size: bool,
}

/// One virtio device behind its MMIO register window.
pub struct MmioTransport<D> {
    device: D,
    /// Offered features: the device's plus `VIRTIO_F_VERSION_1`.
    offered: u64,
    device_features_sel: u32,
    driver_features_sel: u32,
    /// What the driver wrote to DriverFeatures (both halves).
    driver_features: u64,
    queue_sel: u32,
    queues: Vec<QueueSlot>,
    interrupt_status: u32,
    status: u32,
    config_generation: u32,
}

impl<D: fmt::Debug> fmt::Debug for MmioTransport<D> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MmioTransport")
            .field("device", &self.device)
            .field("status", &self.status)
            .field("driver_features", &self.driver_features)
            .field("interrupt_status", &self.interrupt_status)
            .field("queues", &self.queues)
            .finish_non_exhaustive()
    }
}

fn new_queue(max: u16) -> Queue {
    // The device promises a power of two in 1..=32768; anything else is a
    // bug in the device model, not something a guest can cause.
    <Queue as QueueT>::new(max).unwrap_or_else(|e| panic!("virtio queue max size {max}: {e}"))
}

fn le_u32(data: &[u8]) -> Option<u32> {
    Some(u32::from_le_bytes(data.try_into().ok()?))
}

impl<D: VirtioDevice> MmioTransport<D> {
    /// `device` behind a window in its power-on state.
    ///
    /// # Panics
    ///
    /// If the device reports a queue maximum size that is not a power of two
    /// in 1..=32768 (a bug in the device model).
    pub fn new(device: D) -> Self {
        let queues = device
            .queue_max_sizes()
            .iter()
            .map(|&max| QueueSlot {
                queue: new_queue(max),
                bad_size: false,
            })
            .collect();
        let offered = device.features() | VIRTIO_F_VERSION_1;
        MmioTransport {
            device,
            offered,
            device_features_sel: 0,
            driver_features_sel: 0,
            driver_features: 0,
            queue_sel: 0,
            queues,
            interrupt_status: 0,
            status: 0,
            config_generation: 0,
        }
    }

    /// The device model.
    pub fn device(&self) -> &D {
        &self.device
    }

    /// The device, without the transport (to restore it into a fresh one).
    pub fn into_device(self) -> D {
        self.device
    }

    /// The device model, mutably.
    pub fn device_mut(&mut self) -> &mut D {
        &mut self.device
    }

    /// The device status register.
    pub fn status(&self) -> u32 {
        self.status
    }

    /// The InterruptStatus register.
    pub fn interrupt_status(&self) -> u32 {
        self.interrupt_status
    }

    /// Features offered to the driver.
    pub fn offered_features(&self) -> u64 {
        self.offered
    }

    /// Features negotiated (valid once FEATURES_OK is set; 0 before).
    pub fn acked_features(&self) -> u64 {
        if self.status & status::FEATURES_OK != 0 {
            self.driver_features
        } else {
            0
        }
    }

    /// The level of the device's interrupt line: high while InterruptStatus
    /// is non-zero. Feed it to the PIC after every access.
    pub fn irq_level(&self) -> bool {
        self.interrupt_status != 0
    }

    /// Guest read of `data.len()` bytes at `offset` in the window.
    pub fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if offset >= MMIO_WINDOW {
            debug!(offset, "virtio-mmio: read outside the window");
            return;
        }
        if offset >= CONFIG_OFFSET {
            if matches!(data.len(), 1 | 2 | 4 | 8) {
                self.device.read_config(offset - CONFIG_OFFSET, data);
            } else {
                debug!(offset, len = data.len(), "virtio-mmio: odd config read");
            }
            return;
        }
        if data.len() != 4 || !offset.is_multiple_of(4) {
            debug!(
                offset,
                len = data.len(),
                "virtio-mmio: register read not 32-bit"
            );
            return;
        }
        let value = match offset as u32 {
            reg::VIRTIO_MMIO_MAGIC_VALUE => MMIO_MAGIC,
            reg::VIRTIO_MMIO_VERSION => MMIO_VERSION,
            reg::VIRTIO_MMIO_DEVICE_ID => self.device.device_id(),
            reg::VIRTIO_MMIO_VENDOR_ID => VENDOR_ID,
            reg::VIRTIO_MMIO_DEVICE_FEATURES => match self.device_features_sel {
                0 => self.offered as u32,
                1 => (self.offered >> 32) as u32,
                _ => 0,
            },
            reg::VIRTIO_MMIO_QUEUE_NUM_MAX => {
                self.selected().map_or(0, |q| u32::from(q.queue.max_size()))
            }
            reg::VIRTIO_MMIO_QUEUE_READY => {
                self.selected().map_or(0, |q| u32::from(q.queue.ready()))
            }
            reg::VIRTIO_MMIO_INTERRUPT_STATUS => self.interrupt_status,
            reg::VIRTIO_MMIO_STATUS => self.status,
            reg::VIRTIO_MMIO_CONFIG_GENERATION => self.config_generation,
            _ => {
                debug!(
                    offset,
                    "virtio-mmio: read of a write-only or unknown register"
                );
                0
            }
        };
        data.copy_from_slice(&value.to_le_bytes());
    }

    /// Guest write of `data` at `offset` in the window. A QueueNotify write
    /// serves the queue through the device before it returns.
    ///
    /// An `Err` means the host failed while serving a request (see
    /// [`MmioError`]); the access is complete and the device consistent
    /// either way.
    pub fn write(
        &mut self,
        offset: u64,
        data: &[u8],
        mem: &GuestMemoryMmap,
    ) -> Result<(), MmioError> {
        if offset >= MMIO_WINDOW {
            debug!(offset, "virtio-mmio: write outside the window");
            return Ok(());
        }
        if offset >= CONFIG_OFFSET {
            if matches!(data.len(), 1 | 2 | 4 | 8) {
                self.device.write_config(offset - CONFIG_OFFSET, data);
            } else {
                debug!(offset, len = data.len(), "virtio-mmio: odd config write");
            }
            return Ok(());
        }
        let value = match le_u32(data) {
            Some(v) if offset.is_multiple_of(4) => v,
            _ => {
                debug!(
                    offset,
                    len = data.len(),
                    "virtio-mmio: register write not 32-bit"
                );
                return Ok(());
            }
        };
        match offset as u32 {
            reg::VIRTIO_MMIO_DEVICE_FEATURES_SEL => self.device_features_sel = value,
            reg::VIRTIO_MMIO_DRIVER_FEATURES_SEL => self.driver_features_sel = value,
            reg::VIRTIO_MMIO_DRIVER_FEATURES => self.write_driver_features(value),
            reg::VIRTIO_MMIO_QUEUE_SEL => self.queue_sel = value,
            reg::VIRTIO_MMIO_QUEUE_NUM => self.write_queue_num(value),
            reg::VIRTIO_MMIO_QUEUE_READY => self.write_queue_ready(value, mem),
            reg::VIRTIO_MMIO_QUEUE_DESC_LOW
            | reg::VIRTIO_MMIO_QUEUE_DESC_HIGH
            | reg::VIRTIO_MMIO_QUEUE_AVAIL_LOW
            | reg::VIRTIO_MMIO_QUEUE_AVAIL_HIGH
            | reg::VIRTIO_MMIO_QUEUE_USED_LOW
            | reg::VIRTIO_MMIO_QUEUE_USED_HIGH => self.write_queue_address(offset as u32, value),
            reg::VIRTIO_MMIO_QUEUE_NOTIFY => return self.notify(value, mem),
            reg::VIRTIO_MMIO_INTERRUPT_ACK => self.interrupt_status &= !value,
            reg::VIRTIO_MMIO_STATUS => self.write_status(value),
            _ => debug!(
                offset,
                value, "virtio-mmio: write to a read-only or unknown register"
            ),
        }
        Ok(())
    }

    fn selected(&self) -> Option<&QueueSlot> {
        self.queues.get(self.queue_sel as usize)
    }

    /// The selected queue if the driver may configure it (exists, not ready).
    fn configurable(&mut self, what: &str) -> Option<&mut QueueSlot> {
        let sel = self.queue_sel;
        match self.queues.get_mut(sel as usize) {
            Some(q) if !q.queue.ready() => Some(q),
            Some(_) => {
                debug!(
                    queue = sel,
                    what, "virtio-mmio: write to a ready queue ignored"
                );
                None
            }
            None => {
                debug!(
                    queue = sel,
                    what, "virtio-mmio: write to a missing queue ignored"
                );
                None
            }
        }
    }

    fn write_driver_features(&mut self, value: u32) {
        if self.status & status::DRIVER == 0 || self.status & status::FEATURES_OK != 0 {
            debug!(
                status = self.status,
                "virtio-mmio: DriverFeatures write outside negotiation ignored"
            );
            return;
        }
        match self.driver_features_sel {
            0 => self.driver_features = (self.driver_features & !0xffff_ffff) | u64::from(value),
            1 => {
                self.driver_features =
                    (self.driver_features & 0xffff_ffff) | (u64::from(value) << 32)
            }
            sel => debug!(
                sel,
                value, "virtio-mmio: DriverFeatures beyond bit 63 ignored"
            ),
        }
    }

    fn write_queue_num(&mut self, value: u32) {
        if let Some(q) = self.configurable("QueueNum") {
            let ok = u16::try_from(value)
                .ok()
                .is_some_and(|size| q.queue.try_set_size(size).is_ok());
            q.bad_size = !ok;
            if !ok {
                debug!(value, "virtio-mmio: invalid QueueNum");
            }
        }
    }

    fn write_queue_address(&mut self, register: u32, value: u32) {
        let Some(q) = self.configurable("queue address") else {
            return;
        };
        let queue = &mut q.queue;
        let (old, high) = match register {
            reg::VIRTIO_MMIO_QUEUE_DESC_LOW => (queue.desc_table(), false),
            reg::VIRTIO_MMIO_QUEUE_DESC_HIGH => (queue.desc_table(), true),
            reg::VIRTIO_MMIO_QUEUE_AVAIL_LOW => (queue.avail_ring(), false),
            reg::VIRTIO_MMIO_QUEUE_AVAIL_HIGH => (queue.avail_ring(), true),
            reg::VIRTIO_MMIO_QUEUE_USED_LOW => (queue.used_ring(), false),
            _ => (queue.used_ring(), true),
        };
        let addr = if high {
            (old & 0xffff_ffff) | (u64::from(value) << 32)
        } else {
            (old & !0xffff_ffff) | u64::from(value)
        };
        let addr = GuestAddress(addr);
        let result = match register {
            reg::VIRTIO_MMIO_QUEUE_DESC_LOW | reg::VIRTIO_MMIO_QUEUE_DESC_HIGH => {
                queue.try_set_desc_table_address(addr)
            }
            reg::VIRTIO_MMIO_QUEUE_AVAIL_LOW | reg::VIRTIO_MMIO_QUEUE_AVAIL_HIGH => {
                queue.try_set_avail_ring_address(addr)
            }
            _ => queue.try_set_used_ring_address(addr),
        };
        if let Err(e) = result {
            debug!(register, value, "virtio-mmio: queue address refused: {e}");
        }
    }

    fn write_queue_ready(&mut self, value: u32, mem: &GuestMemoryMmap) {
        let sel = self.queue_sel;
        let Some(q) = self.queues.get_mut(sel as usize) else {
            debug!(
                queue = sel,
                "virtio-mmio: QueueReady of a missing queue ignored"
            );
            return;
        };
        if value == 0 {
            q.queue.set_ready(false);
            return;
        }
        q.queue.set_ready(true);
        // virtio-queue takes an available ring at address 0 for "not set up".
        if q.bad_size || q.queue.avail_ring() == 0 || !q.queue.is_valid(mem) {
            q.queue.set_ready(false);
            debug!(
                queue = sel,
                size = q.queue.size(),
                desc = q.queue.desc_table(),
                avail = q.queue.avail_ring(),
                used = q.queue.used_ring(),
                "virtio-mmio: QueueReady refused: bad size or rings outside guest memory"
            );
        }
    }

    fn write_status(&mut self, value: u32) {
        if value == 0 {
            self.reset();
            return;
        }
        let old = self.status;
        // DEVICE_NEEDS_RESET is the device's; a driver writing back what it
        // read may include it.
        let asked = value & !status::DEVICE_NEEDS_RESET;
        let kept = old & !status::DEVICE_NEEDS_RESET;
        if asked & kept != kept {
            debug!(
                old,
                value, "virtio-mmio: status write clearing bits ignored (only 0 resets)"
            );
            return;
        }
        let mut new = old;
        let adding = |bit: u32| asked & bit != 0 && old & bit == 0;
        if adding(status::ACKNOWLEDGE) {
            new |= status::ACKNOWLEDGE;
        }
        if adding(status::DRIVER) {
            if new & status::ACKNOWLEDGE != 0 {
                new |= status::DRIVER;
            } else {
                debug!(value, "virtio-mmio: DRIVER before ACKNOWLEDGE ignored");
            }
        }
        if adding(status::FEATURES_OK) {
            let unoffered = self.driver_features & !self.offered;
            if new & status::DRIVER == 0 {
                debug!(value, "virtio-mmio: FEATURES_OK before DRIVER ignored");
            } else if self.driver_features & VIRTIO_F_VERSION_1 == 0 || unoffered != 0 {
                debug!(
                    driver = self.driver_features,
                    offered = self.offered,
                    "virtio-mmio: features refused (VERSION_1 missing or not offered bits)"
                );
            } else {
                new |= status::FEATURES_OK;
            }
        }
        if adding(status::DRIVER_OK) {
            if new & status::FEATURES_OK != 0 {
                new |= status::DRIVER_OK;
                self.device.activate(self.driver_features);
            } else {
                debug!(value, "virtio-mmio: DRIVER_OK before FEATURES_OK ignored");
            }
        }
        if adding(status::FAILED) {
            debug!("virtio-mmio: driver set FAILED");
            new |= status::FAILED;
        }
        let unknown = asked
            & !(status::ACKNOWLEDGE
                | status::DRIVER
                | status::FEATURES_OK
                | status::DRIVER_OK
                | status::FAILED);
        if unknown != 0 {
            debug!(unknown, "virtio-mmio: unknown status bits ignored");
        }
        self.status = new;
    }

    /// Back to power-on (the driver wrote 0 to Status).
    fn reset(&mut self) {
        for q in &mut self.queues {
            q.queue.reset();
            q.bad_size = false;
        }
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.driver_features = 0;
        self.queue_sel = 0;
        self.interrupt_status = 0;
        self.status = 0;
        self.device.reset();
    }

    /// Whether the device may use its queues: DRIVER_OK set, neither
    /// DEVICE_NEEDS_RESET nor FAILED.
    fn live(&self) -> bool {
        self.status & status::DRIVER_OK != 0
            && self.status & (status::DEVICE_NEEDS_RESET | status::FAILED) == 0
    }

    fn notify(&mut self, index: u32, mem: &GuestMemoryMmap) -> Result<(), MmioError> {
        if !self.live() {
            debug!(
                index,
                status = self.status,
                "virtio-mmio: notify while not live ignored"
            );
            return Ok(());
        }
        let Some(q) = self.queues.get_mut(index as usize) else {
            debug!(index, "virtio-mmio: notify of a missing queue ignored");
            return Ok(());
        };
        if !q.queue.ready() {
            debug!(index, "virtio-mmio: notify of a queue not ready ignored");
            return Ok(());
        }
        // The index fits: it selected an entry of `queues`, whose length
        // came from a slice of u16 sizes the device gave.
        let index = index as u16;
        let run = self.device.process_queue(index, &mut q.queue, mem);
        self.complete(index, run, mem)
    }

    /// Queue `index` if the device may use it now: the device is live
    /// (DRIVER_OK set, neither DEVICE_NEEDS_RESET nor FAILED) and the queue
    /// exists and is ready. For a device that looks at a queue outside a
    /// notification without changing anything (has the driver posted a
    /// receive buffer?).
    pub fn live_queue(&self, index: u16) -> Option<&Queue> {
        if !self.live() {
            return None;
        }
        self.queues
            .get(usize::from(index))
            .map(|q| &q.queue)
            .filter(|q| q.ready())
    }

    /// Let the device act on queue `index` outside a notification, for
    /// input that comes from the host rather than from the driver (a
    /// received network frame, placed in a buffer the driver posted
    /// earlier).
    ///
    /// Unless [`MmioTransport::live_queue`] would return the queue, does
    /// nothing and returns `Ok(false)`. Otherwise calls `f` with the device
    /// and the queue, then does what a QueueNotify does once the device
    /// served the queue: sets InterruptStatus bit 0 if `f` used a buffer
    /// and the driver did not suppress interrupts, sets DEVICE_NEEDS_RESET
    /// if `f` found the ring broken, and returns a host failure as `Err`;
    /// `Ok(true)` otherwise. `f` hands anything else back through what it
    /// captures.
    pub fn with_device_queue(
        &mut self,
        index: u16,
        mem: &GuestMemoryMmap,
        f: impl FnOnce(&mut D, &mut Queue) -> QueueRun,
    ) -> Result<bool, MmioError> {
        if self.live_queue(index).is_none() {
            debug!(
                index,
                status = self.status,
                "virtio-mmio: queue not live; device not called"
            );
            return Ok(false);
        }
        let run = f(&mut self.device, &mut self.queues[usize::from(index)].queue);
        self.complete(index, run, mem).map(|()| true)
    }

    /// What follows the device's work on queue `index` (an existing queue):
    /// the used-buffer interrupt, DEVICE_NEEDS_RESET for a broken ring, the
    /// host failure.
    fn complete(
        &mut self,
        index: u16,
        run: QueueRun,
        mem: &GuestMemoryMmap,
    ) -> Result<(), MmioError> {
        let queue = &self.queues[usize::from(index)].queue;
        if run.used > 0 && !interrupt_suppressed(queue, mem) {
            self.interrupt_status |= INT_USED_BUFFER;
        }
        if let Some(why) = run.broken {
            warn!(
                device = self.device.device_id(),
                queue = index,
                "virtio-mmio: driver broke the ring ({why}); device needs reset"
            );
            self.status |= status::DEVICE_NEEDS_RESET;
            if self.status & status::DRIVER_OK != 0 {
                self.interrupt_status |= INT_CONFIG_CHANGE;
            }
        }
        match run.host_error {
            Some(source) => Err(MmioError::HostIo {
                device_id: self.device.device_id(),
                queue: index,
                source,
            }),
            None => Ok(()),
        }
    }

    /// Serialise the transport and the device state.
    pub fn encode(&self, e: &mut Encoder) {
        e.u32(self.device.device_id());
        e.u32(self.device_features_sel);
        e.u32(self.driver_features_sel);
        e.u64(self.driver_features);
        e.u32(self.queue_sel);
        e.u32(self.interrupt_status);
        e.u32(self.status);
        e.u32(self.config_generation);
        e.u32(self.queues.len() as u32);
        for q in &self.queues {
            let queue = &q.queue;
            e.u16(queue.max_size());
            e.u16(queue.size());
            e.bool(queue.ready());
            e.bool(q.bad_size);
            e.u64(queue.desc_table());
            e.u64(queue.avail_ring());
            e.u64(queue.used_ring());
            e.u16(queue.next_avail());
            e.u16(queue.next_used());
        }
        self.device.encode(e);
    }

    /// Restore from [`MmioTransport::encode`] output around `device`, built
    /// afresh by the caller with the same configuration (its backing file is
    /// not part of the snapshot).
    pub fn decode(d: &mut Decoder, device: D) -> Result<Self, SnapshotError> {
        let mut t = MmioTransport::new(device);
        let invalid = |what: String| SnapshotError::Invalid(format!("virtio-mmio: {what}"));
        let id = d.u32()?;
        if id != t.device.device_id() {
            return Err(invalid(format!(
                "snapshot holds device ID {id}, this device is {}",
                t.device.device_id()
            )));
        }
        t.device_features_sel = d.u32()?;
        t.driver_features_sel = d.u32()?;
        t.driver_features = d.u64()?;
        t.queue_sel = d.u32()?;
        t.interrupt_status = d.u32()?;
        t.status = d.u32()?;
        t.config_generation = d.u32()?;
        if t.status & status::FEATURES_OK != 0 && t.driver_features & !t.offered != 0 {
            return Err(invalid(format!(
                "negotiated features {:#x} beyond the offered {:#x}",
                t.driver_features, t.offered
            )));
        }
        let n = d.u32()?;
        if n as usize != t.queues.len() {
            return Err(invalid(format!(
                "snapshot holds {n} queues, this device has {}",
                t.queues.len()
            )));
        }
        for (i, q) in t.queues.iter_mut().enumerate() {
            let max = d.u16()?;
            if max != q.queue.max_size() {
                return Err(invalid(format!(
                    "queue {i}: maximum size {max} in the snapshot, {} here",
                    q.queue.max_size()
                )));
            }
            let size = d.u16()?;
            let ready = d.bool()?;
            q.bad_size = d.bool()?;
            let (desc, avail, used) = (d.u64()?, d.u64()?, d.u64()?);
            let queue = &mut q.queue;
            let bad =
                |what: &str, e: virtio_queue::Error| invalid(format!("queue {i}: {what}: {e}"));
            queue.try_set_size(size).map_err(|e| bad("size", e))?;
            queue
                .try_set_desc_table_address(GuestAddress(desc))
                .map_err(|e| bad("descriptor table", e))?;
            queue
                .try_set_avail_ring_address(GuestAddress(avail))
                .map_err(|e| bad("available ring", e))?;
            queue
                .try_set_used_ring_address(GuestAddress(used))
                .map_err(|e| bad("used ring", e))?;
            queue.set_ready(ready);
            queue.set_next_avail(d.u16()?);
            queue.set_next_used(d.u16()?);
        }
        t.device.decode(d)?;
        Ok(t)
    }
}

/// Whether the driver asked for no interrupt (`VRING_AVAIL_F_NO_INTERRUPT`
/// in the available ring's flags; without `VIRTIO_RING_F_EVENT_IDX` this is
/// its only suppression mechanism). An unreadable flags word counts as "not
/// suppressed".
fn interrupt_suppressed(queue: &Queue, mem: &GuestMemoryMmap) -> bool {
    mem.read_obj::<u16>(GuestAddress(queue.avail_ring()))
        .map(|flags| u16::from_le(flags) & VRING_AVAIL_F_NO_INTERRUPT as u16 != 0)
        .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use tempfile::NamedTempFile;
    use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};

    use super::*;
    use crate::devices::virtio::testing::*;
    use crate::devices::virtio::{Block, INT_CONFIG_CHANGE};

    const HDR: u64 = 0x10000;
    const ST: u64 = 0x10100;

    fn transport() -> (MmioTransport<Block>, GuestMemoryMmap, NamedTempFile) {
        let image = NamedTempFile::new().unwrap();
        image.as_file().set_len(64 * 512).unwrap();
        let block = Block::new(image.reopen().unwrap(), false, b"t").unwrap();
        (MmioTransport::new(block), memory(), image)
    }

    /// Submit a FLUSH request (header + status) and notify.
    fn flush(t: &mut MmioTransport<Block>, mem: &GuestMemoryMmap, drv: &mut Driver) {
        let mut h = [0u8; 16];
        h[0] = virtio_bindings::virtio_blk::VIRTIO_BLK_T_FLUSH as u8;
        mem.write_slice(&h, GuestAddress(HDR)).unwrap();
        drv.submit(mem, &[(HDR, 16, false), (ST, 1, true)]);
        wr(t, mem, QUEUE_NOTIFY, 0);
    }

    fn encoded(t: &MmioTransport<Block>) -> Vec<u8> {
        let mut e = Encoder::new();
        t.encode(&mut e);
        e.into_bytes()
    }

    #[test]
    fn identification_registers() {
        let (mut t, mem, _img) = transport();
        assert_eq!(rd(&mut t, MAGIC), 0x7472_6976);
        assert_eq!(rd(&mut t, VERSION), 2);
        assert_eq!(rd(&mut t, DEVICE_ID), 2);
        assert_eq!(rd(&mut t, VENDOR), u32::from_le_bytes(*b"vmft"));
        assert_eq!(rd(&mut t, CONFIG_GENERATION), 0);
        assert_eq!(rd(&mut t, STATUS), 0);
        assert_eq!(rd(&mut t, INTERRUPT_STATUS), 0);
        // Writes to read-only registers change nothing.
        wr(&mut t, &mem, MAGIC, 0);
        wr(&mut t, &mem, VERSION, 1);
        assert_eq!(rd(&mut t, MAGIC), 0x7472_6976);
        assert_eq!(rd(&mut t, VERSION), 2);
    }

    #[test]
    fn unknown_narrow_and_outside_accesses_read_zero() {
        let (mut t, mem, _img) = transport();
        // Legacy QueueAlign/QueuePFN, SHM registers, a hole, write-only ones.
        for off in [
            0x03c,
            0x040,
            0x0ac,
            0x0b0,
            0x0f8,
            QUEUE_NOTIFY,
            INTERRUPT_ACK,
        ] {
            assert_eq!(rd(&mut t, off), 0, "offset {off:#x}");
        }
        let mut two = [0xffu8; 2];
        t.read(MAGIC, &mut two);
        assert_eq!(two, [0, 0], "registers take 32-bit reads only");
        let mut four = [0xffu8; 4];
        t.read(MAGIC + 2, &mut four);
        assert_eq!(four, [0; 4], "misaligned");
        t.read(MMIO_WINDOW, &mut four);
        assert_eq!(four, [0; 4], "outside the window");
        // A 16-bit Status write is ignored, as is one outside the window.
        t.write(STATUS, &[1, 0], &mem).unwrap();
        t.write(MMIO_WINDOW + STATUS, &1u32.to_le_bytes(), &mem)
            .unwrap();
        assert_eq!(rd(&mut t, STATUS), 0);
    }

    #[test]
    fn device_features_by_selector() {
        let (mut t, mem, _img) = transport();
        let offered = device_features(&mut t, &mem);
        assert_eq!(offered, t.offered_features());
        assert_eq!(offered >> 32, 1, "VERSION_1 is bit 32, nothing above");
        assert_eq!(offered & (1 << VIRTIO_RING_F_EVENT_IDX), 0);
        assert_eq!(offered & (1 << VIRTIO_RING_F_INDIRECT_DESC), 0);
        wr(&mut t, &mem, DEVICE_FEATURES_SEL, 2);
        assert_eq!(rd(&mut t, DEVICE_FEATURES), 0);
    }

    #[test]
    fn features_ok_needs_version_1_and_only_offered_bits() {
        let (mut t, mem, _img) = transport();
        let offered = t.offered_features();
        for bad in [
            offered & !VIRTIO_F_VERSION_1,
            offered | (1 << VIRTIO_RING_F_EVENT_IDX),
        ] {
            wr(&mut t, &mem, STATUS, 0);
            add_status(&mut t, &mem, status::ACKNOWLEDGE);
            add_status(&mut t, &mem, status::DRIVER);
            write_driver_features(&mut t, &mem, bad);
            add_status(&mut t, &mem, status::FEATURES_OK);
            assert_eq!(
                rd(&mut t, STATUS),
                status::ACKNOWLEDGE | status::DRIVER,
                "features {bad:#x} accepted"
            );
            assert_eq!(t.acked_features(), 0);
            add_status(&mut t, &mem, status::DRIVER_OK);
            assert_eq!(rd(&mut t, STATUS) & status::DRIVER_OK, 0);
        }
        // VERSION_1 alone is enough.
        write_driver_features(&mut t, &mem, VIRTIO_F_VERSION_1);
        add_status(&mut t, &mem, status::FEATURES_OK);
        assert_ne!(rd(&mut t, STATUS) & status::FEATURES_OK, 0);
        assert_eq!(t.acked_features(), VIRTIO_F_VERSION_1);
    }

    #[test]
    fn driver_features_only_during_negotiation() {
        let (mut t, mem, _img) = transport();
        let offered = t.offered_features();
        // Before DRIVER: ignored.
        write_driver_features(&mut t, &mem, offered);
        add_status(&mut t, &mem, status::ACKNOWLEDGE);
        add_status(&mut t, &mem, status::DRIVER);
        add_status(&mut t, &mem, status::FEATURES_OK);
        assert_eq!(
            rd(&mut t, STATUS) & status::FEATURES_OK,
            0,
            "nothing was acked"
        );
        write_driver_features(&mut t, &mem, VIRTIO_F_VERSION_1);
        add_status(&mut t, &mem, status::FEATURES_OK);
        // After FEATURES_OK: frozen.
        write_driver_features(&mut t, &mem, offered);
        assert_eq!(t.acked_features(), VIRTIO_F_VERSION_1);
    }

    #[test]
    fn status_bits_follow_the_specified_order() {
        let (mut t, mem, _img) = transport();
        wr(&mut t, &mem, STATUS, status::DRIVER);
        assert_eq!(rd(&mut t, STATUS), 0, "DRIVER before ACKNOWLEDGE");
        add_status(&mut t, &mem, status::ACKNOWLEDGE);
        add_status(&mut t, &mem, status::DRIVER);
        add_status(&mut t, &mem, status::DRIVER_OK);
        assert_eq!(
            rd(&mut t, STATUS),
            status::ACKNOWLEDGE | status::DRIVER,
            "DRIVER_OK before FEATURES_OK"
        );
        // Clearing a bit other than by writing 0 is ignored.
        wr(&mut t, &mem, STATUS, status::ACKNOWLEDGE);
        assert_eq!(rd(&mut t, STATUS), status::ACKNOWLEDGE | status::DRIVER);
        // DEVICE_NEEDS_RESET is the device's to set.
        add_status(&mut t, &mem, status::DEVICE_NEEDS_RESET);
        assert_eq!(rd(&mut t, STATUS), status::ACKNOWLEDGE | status::DRIVER);
        add_status(&mut t, &mem, status::FAILED);
        assert_eq!(
            rd(&mut t, STATUS),
            status::ACKNOWLEDGE | status::DRIVER | status::FAILED
        );
    }

    #[test]
    fn queue_ready_refuses_bad_configurations() {
        let (mut t, mem, _img) = transport();
        let _ = Driver::init(&mut t, &mem, 16, 0);
        wr(&mut t, &mem, STATUS, 0);
        add_status(&mut t, &mem, status::ACKNOWLEDGE);
        add_status(&mut t, &mem, status::DRIVER);
        write_driver_features(&mut t, &mem, VIRTIO_F_VERSION_1);
        add_status(&mut t, &mem, status::FEATURES_OK);
        let try_ready = |t: &mut MmioTransport<Block>, num: u32, desc: u64, avail: u64| {
            wr(t, &mem, QUEUE_SEL, 0);
            wr(t, &mem, QUEUE_READY, 0);
            wr(t, &mem, QUEUE_NUM, num);
            wr(t, &mem, QUEUE_DESC_LOW, desc as u32);
            wr(t, &mem, QUEUE_DESC_HIGH, (desc >> 32) as u32);
            wr(t, &mem, QUEUE_DRIVER_LOW, avail as u32);
            wr(t, &mem, QUEUE_DRIVER_HIGH, (avail >> 32) as u32);
            wr(t, &mem, QUEUE_DEVICE_LOW, USED as u32);
            wr(t, &mem, QUEUE_DEVICE_HIGH, 0);
            wr(t, &mem, QUEUE_READY, 1);
            rd(t, QUEUE_READY)
        };
        assert_eq!(try_ready(&mut t, 3, DESC, AVAIL), 0, "not a power of two");
        assert_eq!(try_ready(&mut t, 512, DESC, AVAIL), 0, "above QueueNumMax");
        assert_eq!(try_ready(&mut t, 16, 1 << 40, AVAIL), 0, "outside memory");
        assert_eq!(
            try_ready(&mut t, 16, DESC, MEM_BYTES as u64 - 8),
            0,
            "ring runs off the end of memory"
        );
        assert_eq!(try_ready(&mut t, 16, DESC, 0), 0, "avail ring at 0");
        assert_eq!(try_ready(&mut t, 16, DESC, AVAIL), 1);
        // A queue that does not exist.
        wr(&mut t, &mem, QUEUE_SEL, 1);
        assert_eq!(rd(&mut t, QUEUE_NUM_MAX), 0);
        wr(&mut t, &mem, QUEUE_READY, 1);
        assert_eq!(rd(&mut t, QUEUE_READY), 0);
        wr(&mut t, &mem, QUEUE_NOTIFY, 1);
    }

    #[test]
    fn a_ready_queue_keeps_its_configuration() {
        let (mut t, mem, _img) = transport();
        let mut drv = Driver::init(&mut t, &mem, 16, 0);
        let before = encoded(&t);
        wr(&mut t, &mem, QUEUE_NUM, 8);
        wr(&mut t, &mem, QUEUE_DESC_LOW, 0x8000);
        wr(&mut t, &mem, QUEUE_DRIVER_LOW, 0x9000);
        wr(&mut t, &mem, QUEUE_DEVICE_LOW, 0xa000);
        assert_eq!(encoded(&t), before);
        flush(&mut t, &mem, &mut drv);
        assert_eq!(drv.pop_used(&mem), Some((0, 1)));
    }

    #[test]
    fn notify_before_driver_ok_is_ignored() {
        let (mut t, mem, _img) = transport();
        add_status(&mut t, &mem, status::ACKNOWLEDGE);
        add_status(&mut t, &mem, status::DRIVER);
        write_driver_features(&mut t, &mem, VIRTIO_F_VERSION_1);
        add_status(&mut t, &mem, status::FEATURES_OK);
        setup_queue(&mut t, &mem, 16);
        let mut drv = Driver::new(16);
        flush(&mut t, &mem, &mut drv);
        assert_eq!(drv.pop_used(&mem), None);
        assert!(!t.irq_level());
        add_status(&mut t, &mem, status::DRIVER_OK);
        wr(&mut t, &mem, QUEUE_NOTIFY, 0);
        assert_eq!(drv.pop_used(&mem), Some((0, 1)));
        assert!(t.irq_level());
    }

    #[test]
    fn interrupt_status_is_set_by_notify_and_cleared_by_ack() {
        let (mut t, mem, _img) = transport();
        let mut drv = Driver::init(&mut t, &mem, 16, 0);
        assert!(!t.irq_level());
        flush(&mut t, &mem, &mut drv);
        assert_eq!(rd(&mut t, INTERRUPT_STATUS), INT_USED_BUFFER);
        assert!(t.irq_level());
        // Acknowledging another bit leaves it.
        wr(&mut t, &mem, INTERRUPT_ACK, INT_CONFIG_CHANGE);
        assert!(t.irq_level());
        wr(&mut t, &mem, INTERRUPT_ACK, INT_USED_BUFFER);
        assert_eq!(rd(&mut t, INTERRUPT_STATUS), 0);
        assert!(!t.irq_level());
        // A notify with nothing available uses nothing and raises nothing.
        wr(&mut t, &mem, QUEUE_NOTIFY, 0);
        assert!(!t.irq_level());
    }

    #[test]
    fn no_interrupt_flag_suppresses_the_interrupt() {
        let (mut t, mem, _img) = transport();
        let mut drv = Driver::init(&mut t, &mem, 16, 0);
        mem.write_obj(1u16.to_le(), GuestAddress(AVAIL)).unwrap();
        flush(&mut t, &mem, &mut drv);
        assert_eq!(drv.pop_used(&mem), Some((0, 1)), "still completed");
        assert!(!t.irq_level());
        mem.write_obj(0u16, GuestAddress(AVAIL)).unwrap();
        flush(&mut t, &mem, &mut drv);
        assert!(t.irq_level());
    }

    #[test]
    fn with_device_queue_completes_like_a_notify() {
        let (mut t, mem, _img) = transport();
        // Not live yet: the device is not called.
        let mut called = false;
        let ran = t
            .with_device_queue(0, &mem, |_, _| {
                called = true;
                QueueRun::default()
            })
            .unwrap();
        assert!(!ran && !called);
        assert!(t.live_queue(0).is_none());
        let mut drv = Driver::init(&mut t, &mem, 16, 0);
        assert_eq!(t.live_queue(0).map(|q| q.size()), Some(16));
        assert!(t.live_queue(1).is_none(), "no such queue");
        assert!(!t.with_device_queue(1, &mem, |_, _| unreachable!()).unwrap());
        // A request served outside a notify: used, interrupt raised.
        let mut h = [0u8; 16];
        h[0] = virtio_bindings::virtio_blk::VIRTIO_BLK_T_FLUSH as u8;
        mem.write_slice(&h, GuestAddress(HDR)).unwrap();
        drv.submit(&mem, &[(HDR, 16, false), (ST, 1, true)]);
        let ran = t
            .with_device_queue(0, &mem, |blk, q| blk.process_queue(0, q, &mem))
            .unwrap();
        assert!(ran);
        assert_eq!(drv.pop_used(&mem), Some((0, 1)));
        assert_eq!(rd(&mut t, INTERRUPT_STATUS), INT_USED_BUFFER);
        // Nothing used: no interrupt.
        wr(&mut t, &mem, INTERRUPT_ACK, INT_USED_BUFFER);
        assert!(t
            .with_device_queue(0, &mem, |_, _| QueueRun::default())
            .unwrap());
        assert!(!t.irq_level());
        // The driver's NO_INTERRUPT hint holds here too.
        mem.write_obj(1u16.to_le(), GuestAddress(AVAIL)).unwrap();
        let used = || QueueRun {
            used: 1,
            ..QueueRun::default()
        };
        assert!(t.with_device_queue(0, &mem, |_, _| used()).unwrap());
        assert!(!t.irq_level());
        mem.write_obj(0u16, GuestAddress(AVAIL)).unwrap();
        // A broken ring: DEVICE_NEEDS_RESET, a configuration interrupt, and
        // the queue is no longer live.
        let broken = QueueRun {
            broken: Some("test".into()),
            ..QueueRun::default()
        };
        assert!(t.with_device_queue(0, &mem, |_, _| broken).unwrap());
        assert_ne!(rd(&mut t, STATUS) & status::DEVICE_NEEDS_RESET, 0);
        assert_eq!(rd(&mut t, INTERRUPT_STATUS), INT_CONFIG_CHANGE);
        assert!(t.live_queue(0).is_none());
        assert!(!t.with_device_queue(0, &mem, |_, _| unreachable!()).unwrap());
    }

    #[test]
    fn with_device_queue_reports_a_host_failure() {
        let (mut t, mem, _img) = transport();
        let _ = Driver::init(&mut t, &mem, 16, 0);
        let err = t
            .with_device_queue(0, &mem, |_, _| QueueRun {
                used: 1,
                broken: None,
                host_error: Some(HostError {
                    what: "testing".into(),
                    source: std::io::Error::other("boom"),
                }),
            })
            .unwrap_err();
        assert!(matches!(
            err,
            MmioError::HostIo {
                device_id: 2,
                queue: 0,
                ..
            }
        ));
        assert!(t.irq_level(), "the completion is still signalled");
    }

    #[test]
    fn reset_returns_to_power_on() {
        let (mut t, mem, img) = transport();
        let mut drv = Driver::init(&mut t, &mem, 16, 0);
        flush(&mut t, &mem, &mut drv);
        wr(&mut t, &mem, DEVICE_FEATURES_SEL, 1);
        wr(&mut t, &mem, QUEUE_SEL, 5);
        assert!(t.irq_level());
        wr(&mut t, &mem, STATUS, 0);
        assert_eq!(rd(&mut t, STATUS), 0);
        assert!(!t.irq_level());
        assert_eq!(t.acked_features(), 0);
        assert_eq!(rd(&mut t, DEVICE_FEATURES), t.offered_features() as u32);
        wr(&mut t, &mem, QUEUE_SEL, 0);
        assert_eq!(rd(&mut t, QUEUE_READY), 0);
        assert_eq!(rd(&mut t, QUEUE_NUM_MAX), 256);
        // Every bit of state equals a device that was never touched.
        let fresh = MmioTransport::new(Block::new(img.reopen().unwrap(), false, b"t").unwrap());
        assert_eq!(encoded(&t), encoded(&fresh));
        // And it can be brought up again.
        let mut drv = Driver::init(&mut t, &mem, 8, 0);
        flush(&mut t, &mem, &mut drv);
        assert_eq!(drv.pop_used(&mem), Some((0, 1)));
    }

    #[test]
    fn config_space_takes_any_width() {
        let (mut t, mem, _img) = transport();
        let mut b = [0u8; 1];
        t.read(CONFIG, &mut b);
        assert_eq!(b, [64]);
        let mut w = [0u8; 2];
        t.read(CONFIG, &mut w);
        assert_eq!(u16::from_le_bytes(w), 64);
        let mut q = [0u8; 8];
        t.read(CONFIG, &mut q);
        assert_eq!(u64::from_le_bytes(q), 64);
        let mut odd = [0xffu8; 3];
        t.read(CONFIG, &mut odd);
        assert_eq!(odd, [0; 3]);
        let mut far = [0xffu8; 4];
        t.read(0xffc, &mut far);
        assert_eq!(far, [0; 4], "past the device's fields");
        // The block configuration is read-only.
        t.write(CONFIG, &[1, 2, 3, 4], &mem).unwrap();
        t.read(CONFIG, &mut q);
        assert_eq!(u64::from_le_bytes(q), 64);
    }

    #[test]
    fn state_round_trips() {
        let (mut t, mem, img) = transport();
        let mut drv = Driver::init(&mut t, &mem, 32, 0);
        flush(&mut t, &mem, &mut drv);
        flush(&mut t, &mem, &mut drv);
        wr(&mut t, &mem, QUEUE_SEL, 0);
        let bytes = encoded(&t);
        let device = Block::new(img.reopen().unwrap(), false, b"t").unwrap();
        let back = MmioTransport::decode(&mut Decoder::new(&bytes), device).unwrap();
        assert_eq!(encoded(&back), bytes);
        assert_eq!(back.status(), t.status());
        assert_eq!(back.acked_features(), t.acked_features());
        assert_eq!(back.interrupt_status(), t.interrupt_status());
        // `state()` leaves out the event-index bookkeeping, unused here.
        assert_eq!(back.queues[0].queue.state(), t.queues[0].queue.state());
        assert_eq!(back.queues[0].queue.next_used(), 2);
    }
}
