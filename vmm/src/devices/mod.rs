//! Emulated legacy devices and the port I/O bus that dispatches to them.
//!
//! Every device lives on the vCPU thread and is driven only by guest port
//! accesses and by values handed in through the nondeterminism door
//! ([`crate::nondet::Door`]), so the whole device model replays exactly.

pub mod i8042;
pub mod mmio;
pub mod pic;
pub mod pit;
pub mod rtc;
pub mod serial;
pub mod virtio;

use std::collections::BTreeMap;

use crate::nondet::{Door, DoorError};
use crate::snapshot::{Decoder, Encoder, SnapshotError};

use self::i8042::I8042;
use self::mmio::MmioBus;
use self::pic::Pic;
use self::pit::Pit;
use self::rtc::Rtc;
use self::serial::{ConsoleOut, SerialPort, COM1_IRQ};

/// ISA IRQ of the PIT's channel 0.
pub const PIT_IRQ: u8 = 0;
/// The POST diagnostic port; Linux writes it as an I/O delay.
pub const POST_PORT: u16 = 0x80;

/// All port-mapped devices of the machine.
#[derive(Debug)]
pub struct Devices {
    /// Interrupt controller pair.
    pub pic: Pic,
    /// Interval timer.
    pub pit: Pit,
    /// CMOS clock and RAM.
    pub rtc: Rtc,
    /// COM1.
    pub serial: SerialPort,
    /// Reset controller.
    pub i8042: I8042,
    /// Memory-mapped devices (virtio disks and network cards).
    pub mmio: MmioBus,
    /// Accesses to ports no device claims, by port (reads, writes).
    pub unknown_ports: BTreeMap<u16, (u64, u64)>,
}

impl Devices {
    /// Devices in their power-on state, console output to `console`, no
    /// MMIO devices.
    pub fn new(console: ConsoleOut) -> Self {
        Self::with_mmio(console, MmioBus::new())
    }

    /// Devices in their power-on state, with the MMIO devices of `mmio`.
    pub fn with_mmio(console: ConsoleOut, mmio: MmioBus) -> Self {
        Devices {
            pic: Pic::new(),
            pit: Pit::new(),
            rtc: Rtc::new(),
            serial: SerialPort::new(console),
            i8042: I8042::default(),
            mmio,
            unknown_ports: BTreeMap::new(),
        }
    }

    /// Handle an `in` from `port` at exit `pos`; fills `data` (1, 2 or 4 bytes).
    pub fn pio_in(
        &mut self,
        pos: u64,
        port: u16,
        data: &mut [u8],
        door: &mut dyn Door,
    ) -> Result<(), DoorError> {
        data.fill(0xff);
        let value = if SerialPort::handles(port) {
            let v = self.serial.read(port);
            self.sync_irqs();
            v
        } else if Pit::handles(port) {
            let now = door.clock_ns(pos)?;
            self.pit.read(port, now)
        } else if Pic::handles(port) {
            self.pic.read(port)
        } else if Rtc::handles(port) {
            // Only the clock registers read the (logged) wall clock.
            let wall = if self.rtc.reads_clock(port) {
                door.wall_clock_secs(pos)?
            } else {
                0
            };
            self.rtc.read(port, wall)
        } else if I8042::handles(port) {
            self.i8042.read(port)
        } else {
            self.unknown_ports.entry(port).or_default().0 += 1;
            return Ok(());
        };
        data[0] = value;
        Ok(())
    }

    /// Handle an `out` to `port` at exit `pos`.
    pub fn pio_out(
        &mut self,
        pos: u64,
        port: u16,
        data: &[u8],
        door: &mut dyn Door,
    ) -> Result<(), DoorError> {
        let value = data.first().copied().unwrap_or(0);
        if SerialPort::handles(port) {
            self.serial.write(port, value);
            self.sync_irqs();
        } else if Pit::handles(port) {
            let now = door.clock_ns(pos)?;
            self.pit.write(port, value, now);
        } else if Pic::handles(port) {
            self.pic.write(port, value);
        } else if Rtc::handles(port) {
            // The index port needs no time; the data port may set the clock.
            let wall = if port == rtc::DATA {
                door.wall_clock_secs(pos)?
            } else {
                0
            };
            self.rtc.write(port, value, wall);
        } else if I8042::handles(port) {
            self.i8042.write(port, value);
        } else if port != POST_PORT {
            self.unknown_ports.entry(port).or_default().1 += 1;
        }
        Ok(())
    }

    /// Forward the UART's interrupt line to the PIC (a level; the PIC turns
    /// rising edges into requests). Only serial accesses and received input
    /// change it, so only those call this.
    pub fn sync_irqs(&mut self) {
        let level = self.serial.irq_level();
        self.pic.set_irq(COM1_IRQ, level);
        self.mmio.sync_irqs(&mut self.pic);
    }

    /// A guest MMIO read; `false` if no device is at `addr` (the data is
    /// then all ones, as from an empty bus).
    pub fn mmio_read(&mut self, addr: u64, data: &mut [u8]) -> bool {
        // A read changes no interrupt line (virtio's status is cleared by
        // a write of InterruptACK): nothing to sync.
        let found = self.mmio.read(addr, data);
        if !found {
            data.fill(0xff);
        }
        found
    }

    /// A guest MMIO write; `Ok(false)` if no device is at `addr`.
    pub fn mmio_write(
        &mut self,
        addr: u64,
        data: &[u8],
        mem: &crate::memory::GuestMemoryMmap,
    ) -> Result<bool, virtio::MmioError> {
        let r = self.mmio.write(addr, data, mem);
        self.sync_irqs();
        r
    }

    /// Raise the timer interrupt if it is due at `now_ns`.
    pub fn poll_timer(&mut self, now_ns: u64) -> bool {
        if self.pit.poll_irq0(now_ns) {
            self.pic.pulse_irq(PIT_IRQ);
            true
        } else {
            false
        }
    }

    /// Serialise every device's state.
    pub fn encode(&self, e: &mut Encoder) {
        self.pic.encode(e);
        self.pit.encode(e);
        self.rtc.encode(e);
        self.serial.encode(e);
        self.mmio.encode(e);
    }

    /// Restore devices from [`Devices::encode`] output; `mmio` holds the
    /// MMIO devices built from the same configuration, which get their
    /// state from the snapshot.
    pub fn decode(
        d: &mut Decoder,
        console: ConsoleOut,
        mut mmio: MmioBus,
    ) -> Result<Self, SnapshotError> {
        let pic = Pic::decode(d)?;
        let pit = Pit::decode(d)?;
        let rtc = Rtc::decode(d)?;
        let serial = SerialPort::decode(d, console)?;
        mmio.restore(d)?;
        Ok(Devices {
            pic,
            pit,
            rtc,
            serial,
            i8042: I8042::default(),
            mmio,
            unknown_ports: BTreeMap::new(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nondet::FixedDoor;

    #[test]
    fn unknown_ports_read_all_ones_and_are_counted() {
        let mut dev = Devices::new(ConsoleOut::new(Box::new(std::io::sink())));
        let mut door = FixedDoor::default();
        let mut data = [0u8; 2];
        dev.pio_in(1, 0x1234, &mut data, &mut door).unwrap();
        assert_eq!(data, [0xff, 0xff]);
        dev.pio_out(2, 0x1234, &[1], &mut door).unwrap();
        dev.pio_out(3, POST_PORT, &[1], &mut door).unwrap();
        assert_eq!(dev.unknown_ports.get(&0x1234), Some(&(1, 1)));
        assert!(!dev.unknown_ports.contains_key(&POST_PORT));
    }

    #[test]
    fn serial_interrupt_reaches_pic() {
        let mut dev = Devices::new(ConsoleOut::new(Box::new(std::io::sink())));
        let mut door = FixedDoor::default();
        for (port, v) in [
            (0x20, 0x11),
            (0x21, 0x30),
            (0x21, 0x04),
            (0x21, 0x01),
            (0x21, 0x00),
        ] {
            dev.pio_out(0, port, &[v], &mut door).unwrap();
        }
        dev.pio_out(1, 0x3f9, &[0x02], &mut door).unwrap(); // IER: THR empty
        assert!(dev.pic.has_interrupt());
        assert_eq!(dev.pic.acknowledge(), Some(0x34));
    }
}
