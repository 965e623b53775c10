//! The MMIO bus: where memory-mapped devices (the virtio-mmio windows)
//! sit in guest-physical space, which ISA interrupt line each one drives,
//! and the dispatch of MMIO exits to them.
//!
//! Layout: device `i` (in the order the devices were given on the command
//! line) has the 4 KiB window at `MMIO_BASE + i * 4 KiB` and the ISA line
//! `IRQS[i]`. Linux finds each one through
//! `virtio_mmio.device=4K@BASE:IRQ` on its command line
//! ([`cmdline_arg`]). The windows are far above the guest RAM this monitor
//! gives a guest (at most [`MAX_RAM_BYTES`]), and the lines are ones no
//! other device of this machine uses (0 PIT, 2 cascade, 4 COM1, 8 RTC).
//!
//! A device's interrupt is a level (virtio's InterruptStatus is non-zero);
//! after every access the bus hands the levels to the 8259, which turns
//! rising edges into requests, as it does for the UART.
//!
//! Like every device here, the bus runs on the vCPU thread and is driven
//! only by guest accesses: what a device does at an exit, it does at the
//! same exit on the backup.

use std::fmt;

use crate::memory::GuestMemoryMmap;
use thiserror::Error;

use super::pic::Pic;
use super::virtio::written::{OwnImage, WrittenChunks};
use super::virtio::{Block, MmioError, MmioTransport, Net, VirtioDevice, MMIO_WINDOW};
use crate::shared_disk::SharedView;
use crate::snapshot::{Decoder, Encoder, SnapshotError};

/// Guest-physical address of the first device window.
pub const MMIO_BASE: u64 = 0xd000_0000;
/// Guest RAM must end below the first window.
pub const MAX_RAM_BYTES: u64 = MMIO_BASE;
/// The ISA interrupt lines of devices 0, 1, ...
pub const IRQS: [u8; 6] = [5, 6, 7, 9, 10, 11];

/// Where device `index` sits: its window's base and its interrupt line
/// (`None` past the last free line).
pub fn slot(index: usize) -> Option<(u64, u8)> {
    IRQS.get(index)
        .map(|&irq| (MMIO_BASE + index as u64 * MMIO_WINDOW, irq))
}

/// The kernel command-line argument announcing device `index`.
pub fn cmdline_arg(index: usize) -> Option<String> {
    slot(index).map(|(base, irq)| format!("virtio_mmio.device=4K@{base:#x}:{irq}"))
}

/// A device on the bus.
pub trait MmioDevice: Send {
    /// What it is, for messages ("virtio-blk").
    fn kind(&self) -> &'static str;
    /// A guest read of `data.len()` bytes at `offset` into the window.
    fn read(&mut self, offset: u64, data: &mut [u8]);
    /// A guest write at `offset` into the window.
    fn write(&mut self, offset: u64, data: &[u8], mem: &GuestMemoryMmap) -> Result<(), MmioError>;
    /// The level of its interrupt line.
    fn irq_level(&self) -> bool;
    /// Its state, for snapshots.
    fn encode(&self, e: &mut Encoder);
    /// This (freshly built) device with the state `encode` wrote.
    fn restore(self: Box<Self>, d: &mut Decoder) -> Result<Box<dyn MmioDevice>, SnapshotError>;
    /// The device itself, for what only its kind offers (the network
    /// card's receive path).
    fn as_any_mut(&mut self) -> &mut dyn std::any::Any;
}

impl<D: VirtioDevice + Send + 'static> MmioDevice for MmioTransport<D> {
    fn kind(&self) -> &'static str {
        match self.device().device_id() {
            1 => "virtio-net",
            2 => "virtio-blk",
            _ => "virtio",
        }
    }

    fn read(&mut self, offset: u64, data: &mut [u8]) {
        MmioTransport::read(self, offset, data)
    }

    fn write(&mut self, offset: u64, data: &[u8], mem: &GuestMemoryMmap) -> Result<(), MmioError> {
        MmioTransport::write(self, offset, data, mem)
    }

    fn irq_level(&self) -> bool {
        MmioTransport::irq_level(self)
    }

    fn encode(&self, e: &mut Encoder) {
        MmioTransport::encode(self, e)
    }

    fn restore(self: Box<Self>, d: &mut Decoder) -> Result<Box<dyn MmioDevice>, SnapshotError> {
        let device = self.into_device();
        Ok(Box::new(MmioTransport::decode(d, device)?))
    }

    fn as_any_mut(&mut self) -> &mut dyn std::any::Any {
        self
    }
}

/// Errors from the bus.
#[derive(Debug, Error)]
pub enum BusError {
    /// More devices than interrupt lines.
    #[error("at most {max} MMIO devices fit (one free ISA interrupt line each)")]
    Full {
        /// The limit.
        max: usize,
    },
}

struct Slot {
    base: u64,
    irq: u8,
    dev: Box<dyn MmioDevice>,
}

/// The MMIO devices of a machine.
#[derive(Default)]
pub struct MmioBus {
    slots: Vec<Slot>,
    /// The slot of the first network card (found once, at `add`: the exit
    /// path asks for it at every boundary).
    net: Option<usize>,
    /// The slots of shared disks (found at `add`).
    shared: Vec<usize>,
}

impl fmt::Debug for MmioBus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list()
            .entries(
                self.slots
                    .iter()
                    .map(|s| (s.dev.kind(), format!("{:#x}", s.base), s.irq)),
            )
            .finish()
    }
}

impl MmioBus {
    /// An empty bus.
    pub fn new() -> Self {
        Self::default()
    }

    /// Put `dev` in the next slot; returns its window base and line.
    pub fn add(&mut self, dev: Box<dyn MmioDevice>) -> Result<(u64, u8), BusError> {
        let (base, irq) = slot(self.slots.len()).ok_or(BusError::Full { max: IRQS.len() })?;
        let mut dev = dev;
        if self.net.is_none() && dev.as_any_mut().is::<MmioTransport<Net>>() {
            self.net = Some(self.slots.len());
        }
        if let Some(b) = dev.as_any_mut().downcast_mut::<MmioTransport<Block>>() {
            if b.device_mut().shared_view().is_some() {
                self.shared.push(self.slots.len());
            }
        }
        self.slots.push(Slot { base, irq, dev });
        Ok((base, irq))
    }

    /// Devices on the bus.
    pub fn len(&self) -> usize {
        self.slots.len()
    }

    /// No devices.
    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    fn find(&mut self, addr: u64) -> Option<(&mut Slot, u64)> {
        self.slots
            .iter_mut()
            .find(|s| addr >= s.base && addr - s.base < MMIO_WINDOW)
            .map(|s| {
                let off = addr - s.base;
                (s, off)
            })
    }

    /// A guest read at `addr`; `false` if no device is there.
    pub fn read(&mut self, addr: u64, data: &mut [u8]) -> bool {
        match self.find(addr) {
            Some((s, off)) => {
                s.dev.read(off, data);
                true
            }
            None => false,
        }
    }

    /// A guest write at `addr`; `Ok(false)` if no device is there.
    pub fn write(
        &mut self,
        addr: u64,
        data: &[u8],
        mem: &GuestMemoryMmap,
    ) -> Result<bool, MmioError> {
        match self.find(addr) {
            Some((s, off)) => s.dev.write(off, data, mem).map(|()| true),
            None => Ok(false),
        }
    }

    /// The first network card, if there is one.
    pub fn net_mut(&mut self) -> Option<&mut MmioTransport<Net>> {
        let i = self.net?;
        self.slots[i]
            .dev
            .as_any_mut()
            .downcast_mut::<MmioTransport<Net>>()
    }

    /// The views of the shared disks, in `--disk` order.
    pub fn shared_views(&mut self) -> impl Iterator<Item = &mut SharedView> {
        let shared = &self.shared;
        self.slots
            .iter_mut()
            .enumerate()
            .filter(|(i, _)| shared.contains(i))
            .filter_map(|(_, s)| {
                s.dev
                    .as_any_mut()
                    .downcast_mut::<MmioTransport<Block>>()
                    .and_then(|b| b.device_mut().shared_view())
            })
    }

    /// The block devices, in `--disk` order.
    fn blocks(&mut self) -> impl Iterator<Item = &mut Block> {
        self.slots.iter_mut().filter_map(|s| {
            s.dev
                .as_any_mut()
                .downcast_mut::<MmioTransport<Block>>()
                .map(|b| b.device_mut())
        })
    }

    /// The writable disks of this side's own, in `--disk` order, as a
    /// state transfer copies them.
    pub fn own_images(&mut self) -> std::io::Result<Vec<OwnImage>> {
        self.blocks().filter_map(|b| b.own_image()).collect()
    }

    /// What the own writable disks wrote, in `--disk` order (the trackers
    /// of [`MmioBus::own_images`], without opening the images again).
    pub fn own_writes(&mut self) -> Vec<std::sync::Arc<WrittenChunks>> {
        self.blocks().filter_map(|b| b.own_writes()).collect()
    }

    /// Whether a disk is shared.
    pub fn has_shared(&self) -> bool {
        !self.shared.is_empty()
    }

    /// Hand every device's interrupt level to the PIC.
    pub fn sync_irqs(&self, pic: &mut Pic) {
        for s in &self.slots {
            pic.set_irq(s.irq, s.dev.irq_level());
        }
    }

    /// Every device's state, in slot order.
    pub fn encode(&self, e: &mut Encoder) {
        e.u32(self.slots.len() as u32);
        for s in &self.slots {
            e.bytes(s.dev.kind().as_bytes());
            s.dev.encode(e);
        }
    }

    /// Restore the state [`MmioBus::encode`] wrote into this bus, whose
    /// devices were built from the same configuration (same kinds, same
    /// order).
    pub fn restore(&mut self, d: &mut Decoder) -> Result<(), SnapshotError> {
        let n = d.u32()? as usize;
        if n != self.slots.len() {
            return Err(SnapshotError::Invalid(format!(
                "the snapshot has {n} MMIO devices, this VM {} (give the same --disk and --net options as when it was taken)",
                self.slots.len()
            )));
        }
        for (i, s) in self.slots.iter_mut().enumerate() {
            let kind = String::from_utf8_lossy(d.bytes()?).into_owned();
            if kind != s.dev.kind() {
                return Err(SnapshotError::Invalid(format!(
                    "MMIO device {i} is a {kind} in the snapshot, a {} here",
                    s.dev.kind()
                )));
            }
            let placeholder: Box<dyn MmioDevice> = Box::new(Empty);
            let dev = std::mem::replace(&mut s.dev, placeholder);
            s.dev = dev.restore(d)?;
        }
        Ok(())
    }
}

/// Stands in for a device while it is being restored.
struct Empty;

impl MmioDevice for Empty {
    fn kind(&self) -> &'static str {
        "none"
    }
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }
    fn write(&mut self, _o: u64, _d: &[u8], _m: &GuestMemoryMmap) -> Result<(), MmioError> {
        Ok(())
    }
    fn irq_level(&self) -> bool {
        false
    }
    fn encode(&self, _e: &mut Encoder) {}
    fn restore(self: Box<Self>, _d: &mut Decoder) -> Result<Box<dyn MmioDevice>, SnapshotError> {
        Ok(self)
    }
    fn as_any_mut(&mut self) -> &mut dyn std::any::Any {
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::Block;

    fn disk(bytes: usize) -> (tempfile::NamedTempFile, Block) {
        let f = tempfile::NamedTempFile::new().unwrap();
        f.as_file().set_len(bytes as u64).unwrap();
        let b = Block::open(f.path(), false, b"t").unwrap();
        (f, b)
    }

    #[test]
    fn slots_follow_the_layout_and_the_cmdline_names_them() {
        assert_eq!(slot(0), Some((0xd000_0000, 5)));
        assert_eq!(slot(1), Some((0xd000_1000, 6)));
        assert_eq!(slot(IRQS.len()), None);
        assert_eq!(
            cmdline_arg(1).unwrap(),
            "virtio_mmio.device=4K@0xd0001000:6"
        );
    }

    #[test]
    fn accesses_reach_the_device_of_their_window_only() {
        let mut bus = MmioBus::new();
        let (_f, b) = disk(1 << 20);
        assert_eq!(
            bus.add(Box::new(MmioTransport::new(b))).unwrap(),
            (MMIO_BASE, 5)
        );
        let mut magic = [0u8; 4];
        assert!(bus.read(MMIO_BASE, &mut magic));
        assert_eq!(&magic, b"virt");
        let mut id = [0u8; 4];
        assert!(bus.read(MMIO_BASE + 8, &mut id));
        assert_eq!(u32::from_le_bytes(id), 2, "a block device");
        assert!(
            !bus.read(MMIO_BASE + MMIO_WINDOW, &mut id),
            "no device there"
        );
        assert!(!bus.read(MMIO_BASE - 4, &mut id));
    }

    #[test]
    fn a_full_bus_says_so() {
        let mut bus = MmioBus::new();
        let mut files = Vec::new();
        for _ in 0..IRQS.len() {
            let (f, b) = disk(4096);
            files.push(f);
            bus.add(Box::new(MmioTransport::new(b))).unwrap();
        }
        let (_f, b) = disk(4096);
        assert!(matches!(
            bus.add(Box::new(MmioTransport::new(b))),
            Err(BusError::Full { max: 6 })
        ));
    }

    #[test]
    fn state_restores_into_a_bus_of_the_same_devices_only() {
        let mut bus = MmioBus::new();
        let (_f, b) = disk(1 << 20);
        bus.add(Box::new(MmioTransport::new(b))).unwrap();
        let mut e = Encoder::new();
        bus.encode(&mut e);
        let bytes = e.into_bytes();

        let mut same = MmioBus::new();
        let (_g, b) = disk(1 << 20);
        same.add(Box::new(MmioTransport::new(b))).unwrap();
        same.restore(&mut Decoder::new(&bytes)).unwrap();

        let mut none = MmioBus::new();
        let err = none.restore(&mut Decoder::new(&bytes)).unwrap_err();
        assert!(err.to_string().contains("1 MMIO devices"), "{err}");
    }
}
