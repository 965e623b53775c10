//! Intel 8259A programmable interrupt controller, master/slave pair on
//! ports 0x20-0x21 and 0xA0-0xA1, with the ELCR at 0x4D0-0x4D1.
//!
//! Behaviour follows the 8259A datasheet: ICW1-ICW4 initialisation
//! sequence, OCW1 masking, OCW2 EOI (non-specific, specific, rotating),
//! OCW3 register select, poll and special mask; edge-triggered inputs unless
//! the ELCR marks them level-triggered. The slave's output is wired to
//! master input 2.

use crate::snapshot::{Decoder, Encoder, SnapshotError};

/// Port of the master's command register.
pub const MASTER_CMD: u16 = 0x20;
/// Port of the master's data register.
pub const MASTER_DATA: u16 = 0x21;
/// Port of the slave's command register.
pub const SLAVE_CMD: u16 = 0xa0;
/// Port of the slave's data register.
pub const SLAVE_DATA: u16 = 0xa1;
/// Edge/level control registers (master, slave).
pub const ELCR_MASTER: u16 = 0x4d0;
/// Edge/level control register of the slave.
pub const ELCR_SLAVE: u16 = 0x4d1;

const CASCADE_IRQ: u8 = 2;

#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Chip {
    /// Interrupt request register.
    irr: u8,
    /// In-service register.
    isr: u8,
    /// Interrupt mask register (OCW1).
    imr: u8,
    /// Input line levels seen last, for edge detection.
    last_level: u8,
    /// Rotation: the IRQ with the highest priority is `priority_add`.
    priority_add: u8,
    /// Vector base from ICW2.
    irq_base: u8,
    /// OCW3: read ISR (true) or IRR (false) from the command port.
    read_isr: bool,
    /// OCW3: poll command pending.
    poll: bool,
    /// OCW3: special mask mode.
    special_mask: bool,
    /// 0 = ready, 1 = expect ICW2, 2 = expect ICW3, 3 = expect ICW4.
    init_state: u8,
    icw4_needed: bool,
    single_mode: bool,
    auto_eoi: bool,
    rotate_on_auto_eoi: bool,
    special_fully_nested: bool,
    /// Edge/level control: a set bit makes that input level-triggered.
    elcr: u8,
    elcr_mask: u8,
}

impl Chip {
    fn new(elcr_mask: u8) -> Self {
        Chip {
            elcr_mask,
            ..Default::default()
        }
    }

    /// Priority (0 = highest) of the highest-priority bit in `mask`, or 8.
    fn priority(&self, mask: u8) -> u8 {
        if mask == 0 {
            return 8;
        }
        (0..8)
            .find(|p| mask & (1 << ((p + self.priority_add) & 7)) != 0)
            .unwrap_or(8)
    }

    /// The IRQ this chip would signal now, if any.
    fn pending(&self, is_master: bool) -> Option<u8> {
        let mask = self.irr & !self.imr;
        let priority = self.priority(mask);
        if priority == 8 {
            return None;
        }
        let mut in_service = self.isr;
        if self.special_mask {
            in_service &= !self.imr;
        }
        if is_master && self.special_fully_nested {
            in_service &= !(1 << CASCADE_IRQ);
        }
        if priority < self.priority(in_service) {
            Some((priority + self.priority_add) & 7)
        } else {
            None
        }
    }

    fn set_level(&mut self, irq: u8, level: bool) {
        let bit = 1u8 << irq;
        if self.elcr & bit != 0 {
            if level {
                self.irr |= bit;
                self.last_level |= bit;
            } else {
                self.irr &= !bit;
                self.last_level &= !bit;
            }
        } else if level {
            if self.last_level & bit == 0 {
                self.irr |= bit;
            }
            self.last_level |= bit;
        } else {
            self.last_level &= !bit;
        }
    }

    /// Interrupt acknowledge for `irq` (INTA pulse).
    fn acknowledge(&mut self, irq: u8) {
        let bit = 1u8 << irq;
        if self.auto_eoi {
            if self.rotate_on_auto_eoi {
                self.priority_add = (irq + 1) & 7;
            }
        } else {
            self.isr |= bit;
        }
        if self.elcr & bit == 0 {
            self.irr &= !bit;
        }
    }

    fn write_cmd(&mut self, value: u8) {
        if value & 0x10 != 0 {
            // ICW1: start initialisation.
            self.irr = 0;
            self.isr = 0;
            self.imr = 0;
            self.last_level = 0;
            self.priority_add = 0;
            self.read_isr = false;
            self.poll = false;
            self.special_mask = false;
            self.auto_eoi = false;
            self.rotate_on_auto_eoi = false;
            self.special_fully_nested = false;
            self.icw4_needed = value & 0x01 != 0;
            self.single_mode = value & 0x02 != 0;
            self.init_state = 1;
        } else if value & 0x08 != 0 {
            // OCW3.
            if value & 0x04 != 0 {
                self.poll = true;
            }
            if value & 0x02 != 0 {
                self.read_isr = value & 0x01 != 0;
            }
            if value & 0x40 != 0 {
                self.special_mask = value & 0x20 != 0;
            }
        } else {
            // OCW2.
            match value >> 5 {
                0 => self.rotate_on_auto_eoi = false,
                4 => self.rotate_on_auto_eoi = true,
                1 | 5 => {
                    let priority = self.priority(self.isr);
                    if priority != 8 {
                        let irq = (priority + self.priority_add) & 7;
                        self.isr &= !(1 << irq);
                        if value >> 5 == 5 {
                            self.priority_add = (irq + 1) & 7;
                        }
                    }
                }
                3 => self.isr &= !(1 << (value & 7)),
                7 => {
                    let irq = value & 7;
                    self.isr &= !(1 << irq);
                    self.priority_add = (irq + 1) & 7;
                }
                6 => self.priority_add = (value + 1) & 7,
                _ => {} // 2: no operation
            }
        }
    }

    fn write_data(&mut self, value: u8) {
        match self.init_state {
            1 => {
                self.irq_base = value & 0xf8;
                self.init_state = if self.single_mode {
                    if self.icw4_needed {
                        3
                    } else {
                        0
                    }
                } else {
                    2
                };
            }
            2 => self.init_state = if self.icw4_needed { 3 } else { 0 },
            3 => {
                self.special_fully_nested = value & 0x10 != 0;
                self.auto_eoi = value & 0x02 != 0;
                self.init_state = 0;
            }
            _ => self.imr = value,
        }
    }

    fn encode(&self, e: &mut Encoder) {
        for b in [
            self.irr,
            self.isr,
            self.imr,
            self.last_level,
            self.priority_add,
            self.irq_base,
            self.init_state,
            self.elcr,
            self.elcr_mask,
        ] {
            e.u8(b);
        }
        for b in [
            self.read_isr,
            self.poll,
            self.special_mask,
            self.icw4_needed,
            self.single_mode,
            self.auto_eoi,
            self.rotate_on_auto_eoi,
            self.special_fully_nested,
        ] {
            e.bool(b);
        }
    }

    fn decode(d: &mut Decoder) -> Result<Self, SnapshotError> {
        Ok(Chip {
            irr: d.u8()?,
            isr: d.u8()?,
            imr: d.u8()?,
            last_level: d.u8()?,
            priority_add: d.u8()?,
            irq_base: d.u8()?,
            init_state: d.u8()?,
            elcr: d.u8()?,
            elcr_mask: d.u8()?,
            read_isr: d.bool()?,
            poll: d.bool()?,
            special_mask: d.bool()?,
            icw4_needed: d.bool()?,
            single_mode: d.bool()?,
            auto_eoi: d.bool()?,
            rotate_on_auto_eoi: d.bool()?,
            special_fully_nested: d.bool()?,
        })
    }
}

/// The cascaded master/slave pair of a PC.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pic {
    master: Chip,
    slave: Chip,
}

impl Default for Pic {
    fn default() -> Self {
        Self::new()
    }
}

impl Pic {
    /// A pair in its power-on state (all inputs edge-triggered).
    pub fn new() -> Self {
        // IRQ 0, 1, 2 (master) and 8, 13 (slave) cannot be level-triggered.
        Pic {
            master: Chip::new(0xf8),
            slave: Chip::new(0xde),
        }
    }

    /// Drive ISA interrupt line `irq` (0-15) to `level`.
    pub fn set_irq(&mut self, irq: u8, level: bool) {
        if irq >= 8 {
            self.slave.set_level(irq - 8, level);
        } else {
            self.master.set_level(irq, level);
        }
        self.update_cascade();
    }

    /// Raise and lower an edge-triggered line: one interrupt request.
    pub fn pulse_irq(&mut self, irq: u8) {
        self.set_irq(irq, true);
        self.set_irq(irq, false);
    }

    fn update_cascade(&mut self) {
        let slave_out = self.slave.pending(false).is_some();
        self.master.set_level(CASCADE_IRQ, slave_out);
    }

    /// Whether any unmasked request is waiting in either IRR (delivered or
    /// not yet, whatever the in-service state).
    pub fn has_request(&self) -> bool {
        self.master.irr & !self.master.imr != 0 || self.slave.irr & !self.slave.imr != 0
    }

    /// Whether the master is asserting INTR to the CPU.
    pub fn has_interrupt(&self) -> bool {
        self.master.pending(true).is_some()
    }

    /// The interrupt acknowledge cycle: returns the vector to deliver and
    /// updates IRR/ISR, or `None` when nothing is pending.
    pub fn acknowledge(&mut self) -> Option<u8> {
        let irq = self.master.pending(true)?;
        self.master.acknowledge(irq);
        let vector = if irq == CASCADE_IRQ {
            let slave_irq = match self.slave.pending(false) {
                Some(i) => {
                    self.slave.acknowledge(i);
                    i
                }
                None => 7, // spurious IRQ 15
            };
            self.slave.irq_base.wrapping_add(slave_irq)
        } else {
            self.master.irq_base.wrapping_add(irq)
        };
        self.update_cascade();
        Some(vector)
    }

    /// Whether this port belongs to the PIC pair.
    pub fn handles(port: u16) -> bool {
        matches!(
            port,
            MASTER_CMD | MASTER_DATA | SLAVE_CMD | SLAVE_DATA | ELCR_MASTER | ELCR_SLAVE
        )
    }

    /// Port read.
    pub fn read(&mut self, port: u16) -> u8 {
        match port {
            ELCR_MASTER => self.master.elcr,
            ELCR_SLAVE => self.slave.elcr,
            MASTER_CMD | SLAVE_CMD => {
                let is_master = port == MASTER_CMD;
                let chip = if is_master {
                    &mut self.master
                } else {
                    &mut self.slave
                };
                if chip.poll {
                    chip.poll = false;
                    let value = match chip.pending(is_master) {
                        Some(irq) => {
                            chip.acknowledge(irq);
                            0x80 | irq
                        }
                        None => 0,
                    };
                    self.update_cascade();
                    value
                } else if chip.read_isr {
                    chip.isr
                } else {
                    chip.irr
                }
            }
            MASTER_DATA => self.master.imr,
            SLAVE_DATA => self.slave.imr,
            _ => 0xff,
        }
    }

    /// Port write.
    pub fn write(&mut self, port: u16, value: u8) {
        match port {
            MASTER_CMD => self.master.write_cmd(value),
            MASTER_DATA => self.master.write_data(value),
            SLAVE_CMD => self.slave.write_cmd(value),
            SLAVE_DATA => self.slave.write_data(value),
            ELCR_MASTER => self.master.elcr = value & self.master.elcr_mask,
            ELCR_SLAVE => self.slave.elcr = value & self.slave.elcr_mask,
            _ => {}
        }
        self.update_cascade();
    }

    /// Serialise the device state.
    pub fn encode(&self, e: &mut Encoder) {
        self.master.encode(e);
        self.slave.encode(e);
    }

    /// Restore from [`Pic::encode`] output.
    pub fn decode(d: &mut Decoder) -> Result<Self, SnapshotError> {
        Ok(Pic {
            master: Chip::decode(d)?,
            slave: Chip::decode(d)?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The initialisation Linux performs (init_8259A): vectors 0x30/0x38,
    /// cascade on IRQ2, 8086 mode, normal EOI.
    fn linux_init(pic: &mut Pic, auto_eoi: bool) {
        pic.write(MASTER_DATA, 0xff);
        pic.write(SLAVE_DATA, 0xff);
        pic.write(MASTER_CMD, 0x11); // ICW1: edge, cascade, ICW4
        pic.write(MASTER_DATA, 0x30); // ICW2: vector base
        pic.write(MASTER_DATA, 0x04); // ICW3: slave on IR2
        pic.write(MASTER_DATA, if auto_eoi { 0x03 } else { 0x01 }); // ICW4
        pic.write(SLAVE_CMD, 0x11);
        pic.write(SLAVE_DATA, 0x38);
        pic.write(SLAVE_DATA, 0x02);
        pic.write(SLAVE_DATA, 0x01);
        pic.write(MASTER_DATA, 0x00);
        pic.write(SLAVE_DATA, 0x00);
    }

    #[test]
    fn initialisation_words_set_vector_base() {
        let mut pic = Pic::new();
        linux_init(&mut pic, false);
        pic.pulse_irq(0);
        assert_eq!(pic.acknowledge(), Some(0x30));
        pic.pulse_irq(9);
        // IRQ0 is in service and has higher priority than the cascade.
        assert_eq!(pic.acknowledge(), None);
        pic.write(MASTER_CMD, 0x20); // non-specific EOI for IRQ0
        assert_eq!(pic.acknowledge(), Some(0x39));
    }

    #[test]
    fn icw_sequence_returns_data_port_to_imr() {
        let mut pic = Pic::new();
        linux_init(&mut pic, false);
        pic.write(MASTER_DATA, 0xa5);
        assert_eq!(pic.read(MASTER_DATA), 0xa5);
        pic.write(SLAVE_DATA, 0x5a);
        assert_eq!(pic.read(SLAVE_DATA), 0x5a);
    }

    #[test]
    fn masked_irq_is_not_delivered_until_unmasked() {
        let mut pic = Pic::new();
        linux_init(&mut pic, false);
        pic.write(MASTER_DATA, 0x01);
        pic.pulse_irq(0);
        assert!(!pic.has_interrupt());
        assert_eq!(pic.read(MASTER_CMD) & 1, 1, "IRR keeps the request");
        pic.write(MASTER_DATA, 0x00);
        assert!(pic.has_interrupt());
        assert_eq!(pic.acknowledge(), Some(0x30));
    }

    #[test]
    fn priority_lower_irq_wins_and_isr_blocks_lower_priorities() {
        let mut pic = Pic::new();
        linux_init(&mut pic, false);
        pic.pulse_irq(4);
        pic.pulse_irq(1);
        assert_eq!(pic.acknowledge(), Some(0x31));
        // IRQ4 waits while IRQ1 is in service.
        assert_eq!(pic.acknowledge(), None);
        // A higher priority IRQ0 may nest.
        pic.pulse_irq(0);
        assert_eq!(pic.acknowledge(), Some(0x30));
        pic.write(MASTER_CMD, 0x20); // EOI clears IRQ0 (highest in service)
        assert_eq!(pic.acknowledge(), None);
        pic.write(MASTER_CMD, 0x20); // EOI clears IRQ1
        assert_eq!(pic.acknowledge(), Some(0x34));
    }

    #[test]
    fn specific_eoi_clears_named_irq() {
        let mut pic = Pic::new();
        linux_init(&mut pic, false);
        pic.pulse_irq(3);
        assert_eq!(pic.acknowledge(), Some(0x33));
        pic.write(MASTER_CMD, 0x0b); // OCW3: read ISR
        assert_eq!(pic.read(MASTER_CMD), 0x08);
        pic.write(MASTER_CMD, 0x60 | 3); // specific EOI IRQ3
        assert_eq!(pic.read(MASTER_CMD), 0x00);
    }

    #[test]
    fn ocw3_selects_irr_or_isr() {
        let mut pic = Pic::new();
        linux_init(&mut pic, false);
        pic.write(MASTER_DATA, 0xff);
        pic.pulse_irq(5);
        pic.write(MASTER_CMD, 0x0a); // read IRR
        assert_eq!(pic.read(MASTER_CMD), 0x20);
        pic.write(MASTER_CMD, 0x0b); // read ISR
        assert_eq!(pic.read(MASTER_CMD), 0x00);
    }

    #[test]
    fn auto_eoi_leaves_isr_clear() {
        let mut pic = Pic::new();
        linux_init(&mut pic, true);
        pic.pulse_irq(0);
        assert_eq!(pic.acknowledge(), Some(0x30));
        pic.pulse_irq(0);
        assert_eq!(pic.acknowledge(), Some(0x30));
    }

    #[test]
    fn edge_trigger_needs_a_new_rising_edge() {
        let mut pic = Pic::new();
        linux_init(&mut pic, false);
        pic.set_irq(4, true);
        assert_eq!(pic.acknowledge(), Some(0x34));
        pic.write(MASTER_CMD, 0x20);
        // Line still high: no new request without a new edge.
        assert_eq!(pic.acknowledge(), None);
        pic.set_irq(4, false);
        pic.set_irq(4, true);
        assert_eq!(pic.acknowledge(), Some(0x34));
    }

    #[test]
    fn rotation_on_nonspecific_eoi_makes_serviced_irq_lowest() {
        let mut pic = Pic::new();
        linux_init(&mut pic, false);
        pic.pulse_irq(0);
        assert_eq!(pic.acknowledge(), Some(0x30));
        pic.write(MASTER_CMD, 0xa0); // rotate on non-specific EOI
        pic.pulse_irq(0);
        pic.pulse_irq(5);
        // IRQ0 is now lowest priority: IRQ5 wins.
        assert_eq!(pic.acknowledge(), Some(0x35));
    }

    #[test]
    fn poll_command_acknowledges() {
        let mut pic = Pic::new();
        linux_init(&mut pic, false);
        pic.pulse_irq(6);
        pic.write(MASTER_CMD, 0x0c); // OCW3 poll
        assert_eq!(pic.read(MASTER_CMD), 0x86);
        assert!(!pic.has_interrupt());
    }

    #[test]
    fn spurious_slave_interrupt_is_irq15() {
        let mut pic = Pic::new();
        linux_init(&mut pic, false);
        pic.write(SLAVE_DATA, 0x00);
        // Drive the cascade input directly without any slave request.
        pic.master.irr |= 1 << CASCADE_IRQ;
        assert_eq!(pic.acknowledge(), Some(0x3f));
    }

    #[test]
    fn has_request_sees_unmasked_irr_on_both_chips() {
        let mut pic = Pic::new();
        linux_init(&mut pic, false);
        assert!(!pic.has_request());
        pic.write(MASTER_DATA, 0x10); // mask IRQ4
        pic.pulse_irq(4);
        assert!(!pic.has_request(), "masked");
        pic.pulse_irq(12);
        assert!(pic.has_request(), "slave request");
        pic.acknowledge();
        pic.acknowledge();
        pic.write(MASTER_DATA, 0x00);
        assert!(pic.has_request(), "IRQ4 unmasked");
    }

    #[test]
    fn state_round_trips() {
        let mut pic = Pic::new();
        linux_init(&mut pic, false);
        pic.pulse_irq(3);
        pic.pulse_irq(10);
        let mut e = Encoder::new();
        pic.encode(&mut e);
        let bytes = e.into_bytes();
        let back = Pic::decode(&mut Decoder::new(&bytes)).unwrap();
        assert_eq!(back, pic);
    }
}
