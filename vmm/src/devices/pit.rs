//! Intel 8254 programmable interval timer on ports 0x40-0x43, with port
//! 0x61 (channel 2 gate, speaker, channel 2 output, refresh toggle).
//!
//! Time comes only from the caller (`now_ns`, the guest clock read through
//! the nondeterminism door), never from the host directly, so the model
//! replays exactly. Channel 0 drives IRQ0; channel 2 exists for the
//! kernel's calibration reads through port 0x61.
//!
//! # Power-on state: as the firmware leaves it
//!
//! No firmware runs before the kernel here, yet a kernel may assume the
//! counters a PC BIOS programs at POST. Linux's KASLR entropy read
//! (`i8254()` in `arch/x86/lib/kaslr.c`, used when the CPU offers neither
//! RDRAND nor a TSC) repeats a read-back of counter 0 for as long as the
//! status byte reports NULL COUNT, so a counter 0 that was never loaded
//! hangs it forever (issue 12). What firmware leaves behind:
//!
//! - An IBM PC/XT-compatible POST (for instance Sergey Kiselev's
//!   `8088_bios`, `bios.asm`, "Initialize PIT") writes control word 0x36 to
//!   counter 0 (LSB then MSB, mode 3, binary) with count 0, i.e. 65536: the
//!   18.2 Hz system tick; and control word 0x54 to counter 1 (LSB only,
//!   mode 2, binary) with count 18, the DRAM refresh request every 15.1 µs.
//!   Counter 2 drives the speaker: the POST beep programs it with 0xB6
//!   (LSB then MSB, mode 3, binary) and turns the speaker off again through
//!   port 0x61, which leaves its gate low.
//! - SeaBIOS (`src/clock.c`, `pit_setup`) loads counter 0 with count 0,
//!   LSB/MSB access, binary, in mode 2 (also 18.2 Hz).
//! - QEMU's reset (`hw/timer/i8254_common.c`, `pit_reset_common`) puts every
//!   counter in mode 3 with count 0x10000, gates high for counters 0 and 1,
//!   low for counter 2. (Its status byte never reports NULL COUNT at all.)
//!
//! So at power-on counter 0 is in mode 3, LSB/MSB access, binary, count
//! 65536; counter 1 in mode 2, LSB-only access, binary, count 18; counter 2
//! in mode 3, LSB/MSB access, binary, count 65536 with its gate low and the
//! speaker off. Every count counts as loaded at guest time 0, so NULL COUNT
//! is clear for all three.
//!
//! # No IRQ0 before the guest loads counter 0
//!
//! On a PC, counter 0 raises IRQ0 at 18.2 Hz from POST on. This model lets
//! counter 0 count and its OUT toggle from power-on (reads, latches and
//! read-back see that), but schedules IRQ0 edges (`next_irq0_ns`) only once
//! the guest loads a count into counter 0. Delivering the firmware's tick
//! would help no guest and would change what this one sees:
//!
//! - there is no firmware here to have initialised the 8259 first: the PIC
//!   model powers on with its mask clear and vector base 0, so a power-on
//!   tick would become a pending request and, as soon as a guest sets IF
//!   before programming the PIC, vector 0 (#DE);
//! - a pending request changes the run loop: under record/replay it holds
//!   off the timer and arms epoch-bound kicks, so early boot would cut
//!   epochs and log timer events it does not cut today;
//! - Linux runs with interrupts disabled, reinitialises the PIC (ICW1
//!   clears its IRR in this model) and reprograms counter 0 before it
//!   unmasks IRQ0, so an early tick is nothing it can observe anyway.
//!
//! After the guest's first count write to counter 0 the device behaves
//! exactly as before this power-on state existed. The power-on state is the
//! same on primary and backup, and it is made of fields the snapshot
//! encoding already carries (a loaded count with no IRQ0 deadline), so the
//! encoding is unchanged.

use crate::snapshot::{Decoder, Encoder, SnapshotError};

/// Input clock of the 8254 in Hz.
pub const PIT_HZ: u64 = 1_193_182;
/// First counter port; channel `n` is at `CHANNEL0 + n`.
pub const CHANNEL0: u16 = 0x40;
/// Mode/command register.
pub const COMMAND: u16 = 0x43;
/// System control port B (channel 2 gate and output).
pub const PORT_61: u16 = 0x61;

const RW_LATCH: u8 = 0;
const RW_LSB: u8 = 1;
const RW_MSB: u8 = 2;
const RW_WORD0: u8 = 3;
const RW_WORD1: u8 = 4;

/// Convert nanoseconds to PIT input ticks.
pub fn ns_to_ticks(ns: u64) -> u64 {
    ((ns as u128 * PIT_HZ as u128) / 1_000_000_000) as u64
}

/// Convert PIT input ticks to nanoseconds (rounded up, so a deadline is never early).
pub fn ticks_to_ns(ticks: u64) -> u64 {
    ((ticks as u128 * 1_000_000_000).div_ceil(PIT_HZ as u128)) as u64
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Channel {
    /// Reload value; 0x10000 stands for a written 0.
    count: u32,
    /// Guest time at which `count` was loaded (or the gate last rose).
    load_ns: u64,
    /// Whether a count has been written since the mode was set.
    armed: bool,
    latched_count: u16,
    /// RW state of the latched count (0 = no latch).
    count_latched: u8,
    status_latched: bool,
    status: u8,
    read_state: u8,
    write_state: u8,
    write_latch: u8,
    rw_mode: u8,
    mode: u8,
    bcd: bool,
    gate: bool,
}

impl Channel {
    /// A counter as firmware leaves it: control word written (mode,
    /// access, binary), then `count` (0x10000 for a written 0) loaded at
    /// guest time 0.
    fn programmed(mode: u8, rw_mode: u8, count: u32, gate: bool) -> Self {
        Channel {
            count,
            load_ns: 0,
            armed: true,
            latched_count: 0,
            count_latched: 0,
            status_latched: false,
            status: 0,
            read_state: rw_mode,
            write_state: rw_mode,
            write_latch: 0,
            rw_mode,
            mode,
            bcd: false,
            gate,
        }
    }

    /// Whether a low gate suspends this counter right now. Only modes 2
    /// and 3 are modelled (counter 2 is the only one with a gate input; the
    /// others are wired high): counting stops and OUT is forced high.
    fn gated_off(&self) -> bool {
        !self.gate && matches!(self.mode, 2 | 3)
    }

    fn elapsed_ticks(&self, now_ns: u64) -> u64 {
        ns_to_ticks(now_ns.saturating_sub(self.load_ns))
    }

    /// Current counter value.
    fn counter(&self, now_ns: u64) -> u16 {
        if !self.armed {
            return self.count as u16;
        }
        if self.gated_off() {
            // Counting is suspended. Exact while the gate has stayed low
            // since the count was loaded (counter 2 at power-on: the
            // initial count); after a falling edge mid-count the chip holds
            // the value it had, which this model does not keep. A rising
            // edge reloads either way (`set_gate`).
            return self.count as u16;
        }
        let d = self.elapsed_ticks(now_ns);
        let count = self.count as u64;
        let value = match self.mode {
            0 | 1 | 4 | 5 => count.wrapping_sub(d) & 0xffff,
            3 => count - ((2 * d) % count),
            _ => count - (d % count),
        };
        value as u16
    }

    /// Current level of the OUT pin.
    fn output(&self, now_ns: u64) -> bool {
        if !self.armed {
            // After a mode write OUT is low in mode 0 and high otherwise.
            return self.mode != 0;
        }
        if self.gated_off() {
            return true;
        }
        let d = self.elapsed_ticks(now_ns);
        let count = self.count as u64;
        match self.mode {
            0 | 1 => d >= count,
            2 => d % count != count - 1,
            3 => d % count < count.div_ceil(2),
            _ => d != count, // 4, 5: one-tick low pulse at terminal count
        }
    }

    fn load(&mut self, value: u32, now_ns: u64) {
        self.count = if value == 0 { 0x10000 } else { value };
        self.load_ns = now_ns;
        self.armed = true;
    }

    fn latch_count(&mut self, now_ns: u64) {
        if self.count_latched == 0 {
            self.latched_count = self.counter(now_ns);
            self.count_latched = self.rw_mode;
        }
    }

    fn latch_status(&mut self, now_ns: u64) {
        if !self.status_latched {
            self.status = ((self.output(now_ns) as u8) << 7)
                | ((!self.armed as u8) << 6)
                | (self.rw_mode << 4)
                | (self.mode << 1)
                | self.bcd as u8;
            self.status_latched = true;
        }
    }

    fn read(&mut self, now_ns: u64) -> u8 {
        if self.status_latched {
            self.status_latched = false;
            return self.status;
        }
        if self.count_latched != 0 {
            return match self.count_latched {
                RW_LSB => {
                    self.count_latched = 0;
                    self.latched_count as u8
                }
                RW_MSB => {
                    self.count_latched = 0;
                    (self.latched_count >> 8) as u8
                }
                RW_WORD0 => {
                    self.count_latched = RW_MSB;
                    self.latched_count as u8
                }
                _ => {
                    self.count_latched = 0;
                    (self.latched_count >> 8) as u8
                }
            };
        }
        let counter = self.counter(now_ns);
        match self.read_state {
            RW_LSB => counter as u8,
            RW_MSB => (counter >> 8) as u8,
            RW_WORD0 => {
                self.read_state = RW_WORD1;
                counter as u8
            }
            _ => {
                self.read_state = RW_WORD0;
                (counter >> 8) as u8
            }
        }
    }

    fn write(&mut self, value: u8, now_ns: u64) {
        match self.write_state {
            RW_LSB => self.load(value as u32, now_ns),
            RW_MSB => self.load((value as u32) << 8, now_ns),
            RW_WORD0 => {
                self.write_latch = value;
                self.write_state = RW_WORD1;
            }
            _ => {
                self.load(self.write_latch as u32 | ((value as u32) << 8), now_ns);
                self.write_state = RW_WORD0;
            }
        }
    }

    fn set_gate(&mut self, gate: bool, now_ns: u64) {
        if gate && !self.gate && matches!(self.mode, 1 | 2 | 3 | 5) && self.armed {
            // Rising edge restarts the count in these modes.
            self.load_ns = now_ns;
        }
        self.gate = gate;
    }

    /// Guest time of the first rising edge of OUT strictly after `after_ns`
    /// (the IRQ0 edge), or `None` when no edge is coming.
    fn next_edge_ns(&self, after_ns: u64) -> Option<u64> {
        if !self.armed || !self.gate {
            return None;
        }
        let count = self.count as u64;
        let d = self.elapsed_ticks(after_ns);
        let edge_tick = match self.mode {
            // Periodic: OUT rises at every multiple of the count.
            2 | 3 => (d / count + 1) * count,
            // One-shot modes rise once: mode 0 at the count, mode 4 one
            // tick after its low pulse.
            0 | 1 => {
                if d >= count {
                    return None;
                }
                count
            }
            _ => {
                if d > count {
                    return None;
                }
                count + 1
            }
        };
        Some(self.load_ns + ticks_to_ns(edge_tick))
    }

    fn encode(&self, e: &mut Encoder) {
        e.u32(self.count);
        e.u64(self.load_ns);
        e.bool(self.armed);
        e.u16(self.latched_count);
        for b in [
            self.count_latched,
            self.status,
            self.read_state,
            self.write_state,
            self.write_latch,
            self.rw_mode,
            self.mode,
        ] {
            e.u8(b);
        }
        e.bool(self.status_latched);
        e.bool(self.bcd);
        e.bool(self.gate);
    }

    fn decode(d: &mut Decoder) -> Result<Self, SnapshotError> {
        Ok(Channel {
            count: d.u32()?,
            load_ns: d.u64()?,
            armed: d.bool()?,
            latched_count: d.u16()?,
            count_latched: d.u8()?,
            status: d.u8()?,
            read_state: d.u8()?,
            write_state: d.u8()?,
            write_latch: d.u8()?,
            rw_mode: d.u8()?,
            mode: d.u8()?,
            status_latched: d.bool()?,
            bcd: d.bool()?,
            gate: d.bool()?,
        })
    }
}

/// The three-channel 8254 and port 0x61.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pit {
    channels: [Channel; 3],
    speaker_data: bool,
    /// Guest time at which IRQ0 is next due, if channel 0 will fire.
    next_irq0_ns: Option<u64>,
}

impl Default for Pit {
    fn default() -> Self {
        Self::new()
    }
}

impl Pit {
    /// Power-on state, as firmware leaves the 8254 (see the module
    /// documentation): counter 0 in mode 3 with count 65536, counter 1 in
    /// mode 2 with count 18, counter 2 in mode 3 with count 65536 and its
    /// gate low, speaker off; all counting from guest time 0, NULL COUNT
    /// clear. No IRQ0 is scheduled until the guest loads counter 0.
    pub fn new() -> Self {
        Pit {
            channels: [
                Channel::programmed(3, RW_WORD0, 0x10000, true),
                Channel::programmed(2, RW_LSB, 18, true),
                Channel::programmed(3, RW_WORD0, 0x10000, false),
            ],
            speaker_data: false,
            next_irq0_ns: None,
        }
    }

    /// Whether this port belongs to the PIT.
    pub fn handles(port: u16) -> bool {
        (CHANNEL0..=COMMAND).contains(&port) || port == PORT_61
    }

    /// Port read at guest time `now_ns`.
    pub fn read(&mut self, port: u16, now_ns: u64) -> u8 {
        match port {
            PORT_61 => {
                let ch2 = &self.channels[2];
                // Bit 4 toggles every 15 µs (DRAM refresh), derived from guest time.
                let refresh = ((now_ns / 15_000) & 1) as u8;
                (ch2.gate as u8)
                    | ((self.speaker_data as u8) << 1)
                    | (refresh << 4)
                    | ((ch2.output(now_ns) as u8) << 5)
            }
            COMMAND => 0xff, // the control word register is write-only
            _ => self.channels[(port - CHANNEL0) as usize].read(now_ns),
        }
    }

    /// Port write at guest time `now_ns`.
    pub fn write(&mut self, port: u16, value: u8, now_ns: u64) {
        match port {
            PORT_61 => {
                self.channels[2].set_gate(value & 1 != 0, now_ns);
                self.speaker_data = value & 2 != 0;
            }
            COMMAND => self.write_command(value, now_ns),
            _ => {
                let idx = (port - CHANNEL0) as usize;
                self.channels[idx].write(value, now_ns);
                if idx == 0 {
                    self.next_irq0_ns = self.channels[0].next_edge_ns(now_ns);
                }
            }
        }
    }

    fn write_command(&mut self, value: u8, now_ns: u64) {
        let channel = (value >> 6) as usize;
        if channel == 3 {
            // Read-back command: bits 1-3 select channels; bit 5 clear
            // latches counts, bit 4 clear latches status.
            for (i, ch) in self.channels.iter_mut().enumerate() {
                if value & (2 << i) != 0 {
                    if value & 0x20 == 0 {
                        ch.latch_count(now_ns);
                    }
                    if value & 0x10 == 0 {
                        ch.latch_status(now_ns);
                    }
                }
            }
            return;
        }
        let ch = &mut self.channels[channel];
        let access = (value >> 4) & 3;
        if access == RW_LATCH {
            ch.latch_count(now_ns);
            return;
        }
        let mut mode = (value >> 1) & 7;
        if mode > 5 {
            mode -= 4; // 6 and 7 are aliases of 2 and 3
        }
        ch.rw_mode = access;
        ch.read_state = access;
        ch.write_state = access;
        ch.mode = mode;
        ch.bcd = value & 1 != 0;
        ch.armed = false;
        if channel == 0 {
            self.next_irq0_ns = None;
        }
    }

    /// When IRQ0 is next due (guest time), for the run loop's deadline.
    pub fn next_irq0_ns(&self) -> Option<u64> {
        self.next_irq0_ns
    }

    /// Called at exit boundaries: returns true when IRQ0 is due at
    /// `now_ns`, and moves the deadline on. Missed periods are coalesced
    /// into one interrupt (the guest counts time with its own clocksource).
    pub fn poll_irq0(&mut self, now_ns: u64) -> bool {
        match self.next_irq0_ns {
            Some(due) if now_ns >= due => {
                self.next_irq0_ns = self.channels[0].next_edge_ns(now_ns);
                true
            }
            _ => false,
        }
    }

    /// Serialise the device state.
    pub fn encode(&self, e: &mut Encoder) {
        for ch in &self.channels {
            ch.encode(e);
        }
        e.bool(self.speaker_data);
        e.opt_u64(self.next_irq0_ns);
    }

    /// Restore from [`Pit::encode`] output.
    pub fn decode(d: &mut Decoder) -> Result<Self, SnapshotError> {
        Ok(Pit {
            channels: [
                Channel::decode(d)?,
                Channel::decode(d)?,
                Channel::decode(d)?,
            ],
            speaker_data: d.bool()?,
            next_irq0_ns: d.opt_u64()?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: u64 = 1_000_000;

    fn program(pit: &mut Pit, channel: u8, mode: u8, count: u16, now: u64) {
        pit.write(COMMAND, (channel << 6) | (3 << 4) | (mode << 1), now);
        let port = CHANNEL0 + channel as u16;
        pit.write(port, count as u8, now);
        pit.write(port, (count >> 8) as u8, now);
    }

    fn read_word(pit: &mut Pit, channel: u8, now: u64) -> u16 {
        let port = CHANNEL0 + channel as u16;
        let lo = pit.read(port, now) as u16;
        let hi = pit.read(port, now) as u16;
        lo | (hi << 8)
    }

    #[test]
    fn mode2_counts_down_and_reloads() {
        let mut pit = Pit::new();
        program(&mut pit, 0, 2, 1000, 0);
        assert_eq!(read_word(&mut pit, 0, 0), 1000);
        // 500 ticks later.
        let t = ticks_to_ns(500);
        assert_eq!(read_word(&mut pit, 0, t), 500);
        // After a full period it reloads.
        let t = ticks_to_ns(1000 + 100);
        assert_eq!(read_word(&mut pit, 0, t), 900);
    }

    #[test]
    fn mode2_irq0_is_periodic_at_the_programmed_rate() {
        let mut pit = Pit::new();
        let latch = ((PIT_HZ + 50) / 100) as u16; // HZ=100, as Linux programs it
        program(&mut pit, 0, 2, latch, 0);
        let first = pit.next_irq0_ns().unwrap();
        assert!((first as i64 - 10 * MS as i64).abs() < 10_000, "{first}");
        assert!(!pit.poll_irq0(first - 1));
        assert!(pit.poll_irq0(first));
        let second = pit.next_irq0_ns().unwrap();
        assert!((second as i64 - 20 * MS as i64).abs() < 20_000, "{second}");
        // Missed periods coalesce into one interrupt.
        assert!(pit.poll_irq0(95 * MS));
        assert!(!pit.poll_irq0(95 * MS));
        let next = pit.next_irq0_ns().unwrap();
        assert!(next > 95 * MS && next <= 100 * MS + 10_000, "{next}");
    }

    #[test]
    fn mode3_square_wave_counts_by_two_and_output_toggles() {
        let mut pit = Pit::new();
        program(&mut pit, 2, 3, 100, 0);
        pit.write(PORT_61, 0x01, 0); // gate channel 2 on
        assert_eq!(read_word(&mut pit, 2, 0), 100);
        let t = ticks_to_ns(10);
        assert_eq!(read_word(&mut pit, 2, t), 80);
        assert_eq!(pit.read(PORT_61, t) & 0x20, 0x20, "first half high");
        let t = ticks_to_ns(60);
        assert_eq!(pit.read(PORT_61, t) & 0x20, 0, "second half low");
        let t = ticks_to_ns(100);
        assert_eq!(pit.read(PORT_61, t) & 0x20, 0x20, "high again next period");
    }

    #[test]
    fn latch_command_freezes_the_read_value() {
        let mut pit = Pit::new();
        program(&mut pit, 0, 2, 5000, 0);
        let t1 = ticks_to_ns(1000);
        pit.write(COMMAND, 0x00, t1); // counter latch, channel 0
                                      // Reading later still returns the latched value, LSB then MSB.
        let t2 = ticks_to_ns(3000);
        assert_eq!(read_word(&mut pit, 0, t2), 4000);
        // The next read is live again.
        assert_eq!(read_word(&mut pit, 0, t2), 2000);
    }

    #[test]
    fn read_back_latches_status() {
        let mut pit = Pit::new();
        program(&mut pit, 2, 0, 100, 0);
        pit.write(COMMAND, 0b1110_1000, 0); // read-back: status only, channel 2
        let status = pit.read(CHANNEL0 + 2, 0);
        assert_eq!(status & 0x3f, 3 << 4, "LSB+MSB access, mode 0, binary");
        assert_eq!(status & 0x80, 0, "mode 0 output low before terminal count");
    }

    #[test]
    fn mode0_output_rises_at_terminal_count_on_port_61() {
        // The calibration sequence Linux uses (pit_calibrate_tsc style).
        let mut pit = Pit::new();
        pit.write(PORT_61, 0x01, 0);
        program(&mut pit, 2, 0, 0xffff, 0);
        assert_eq!(pit.read(PORT_61, ticks_to_ns(100)) & 0x20, 0);
        assert_eq!(pit.read(PORT_61, ticks_to_ns(0xffff)) & 0x20, 0x20);
    }

    #[test]
    fn mode4_oneshot_fires_once() {
        let mut pit = Pit::new();
        program(&mut pit, 0, 4, 100, 0);
        let due = pit.next_irq0_ns().unwrap();
        assert_eq!(due, ticks_to_ns(101));
        assert!(pit.poll_irq0(due));
        assert_eq!(pit.next_irq0_ns(), None);
    }

    #[test]
    fn lsb_only_access() {
        let mut pit = Pit::new();
        pit.write(COMMAND, (1 << 4) | (2 << 1), 0); // ch0, LSB only, mode 2
        pit.write(CHANNEL0, 200, 0);
        assert_eq!(pit.read(CHANNEL0, 0), 200);
        assert_eq!(pit.read(CHANNEL0, ticks_to_ns(50)), 150);
    }

    /// Read-back command (datasheet: D7 D6 = 11, D5 = !COUNT, D4 =
    /// !STATUS, D3-D1 select counters 2-0) latching both count and status of
    /// `channel`, then the status byte and the latched count as the guest
    /// reads them.
    fn read_back(pit: &mut Pit, channel: u8, now: u64) -> (u8, u16) {
        pit.write(COMMAND, 0xc0 | (2 << channel), now);
        let port = CHANNEL0 + channel as u16;
        let status = pit.read(port, now);
        let lo = pit.read(port, now) as u16;
        // LSB-only access latches one byte; the next read is live again.
        let hi = if status & 0x30 == 0x30 {
            pit.read(port, now) as u16
        } else {
            0
        };
        (status, lo | (hi << 8))
    }

    // Status byte (8254 datasheet, read-back command): D7 OUT, D6 NULL
    // COUNT, D5-D4 RW (01 LSB, 10 MSB, 11 LSB then MSB), D3-D1 mode, D0 BCD.
    const OUT: u8 = 0x80;
    const NULL_COUNT: u8 = 0x40;

    #[test]
    fn power_on_counter0_is_mode3_lsb_msb_binary_65536_with_null_count_clear() {
        let mut pit = Pit::new();
        let (status, count) = read_back(&mut pit, 0, 0);
        assert_eq!(status & NULL_COUNT, 0, "count loaded by firmware");
        assert_eq!(status & 0x30, 0x30, "LSB then MSB");
        assert_eq!(status & 0x0e, 3 << 1, "mode 3");
        assert_eq!(status & 0x01, 0, "binary");
        assert_eq!(status & OUT, OUT, "mode 3 OUT starts high");
        assert_eq!(status, 0xb6);
        assert_eq!(count, 0, "65536 reads as 0");
        // Mode 3 counts down by two; OUT is high for the first half of the
        // 65536-tick period and low for the second (18.2 Hz).
        let t = ticks_to_ns(1000);
        assert_eq!(
            read_back(&mut pit, 0, t),
            (0xb6, 0x10000u32.wrapping_sub(2000) as u16)
        );
        let t = ticks_to_ns(40_000);
        let (status, count) = read_back(&mut pit, 0, t);
        assert_eq!(status, 0x36, "second half: OUT low, NULL COUNT still clear");
        assert_eq!(count, (0x10000u32 - (2 * 40_000) % 0x10000) as u16);
        assert_eq!(read_back(&mut pit, 0, ticks_to_ns(0x10000 + 5)).0, 0xb6);
    }

    #[test]
    fn power_on_counter1_is_mode2_lsb_only_binary_18() {
        let mut pit = Pit::new();
        let (status, count) = read_back(&mut pit, 1, 0);
        assert_eq!(status & NULL_COUNT, 0);
        assert_eq!(status & 0x30, 0x10, "LSB only");
        assert_eq!(status & 0x0e, 2 << 1, "mode 2");
        assert_eq!(status & 0x01, 0, "binary");
        assert_eq!(status, 0x94, "OUT high between refresh pulses");
        assert_eq!(count, 18);
        // Rate generator: counts 18..1, OUT low for the one tick at 1.
        assert_eq!(read_back(&mut pit, 1, ticks_to_ns(5)), (0x94, 13));
        assert_eq!(read_back(&mut pit, 1, ticks_to_ns(17)), (0x14, 1));
        assert_eq!(read_back(&mut pit, 1, ticks_to_ns(18)), (0x94, 18));
        // Plain reads use the LSB-only access the firmware set.
        assert_eq!(pit.read(CHANNEL0 + 1, ticks_to_ns(18 + 3)), 15);
    }

    #[test]
    fn power_on_counter2_is_mode3_gated_off_speaker_off() {
        let mut pit = Pit::new();
        let (status, count) = read_back(&mut pit, 2, 0);
        assert_eq!(status & NULL_COUNT, 0);
        assert_eq!(status, 0xb6, "mode 3, LSB then MSB, binary, OUT high");
        assert_eq!(count, 0);
        // Gate low: counting suspended, OUT held high (datasheet, mode 3).
        let t = ticks_to_ns(40_000);
        assert_eq!(read_back(&mut pit, 2, t), (0xb6, 0));
        assert_eq!(
            pit.read(PORT_61, t) & 0x23,
            0x20,
            "gate low, speaker off, OUT high"
        );
        // A rising gate edge starts the count from there.
        pit.write(PORT_61, 0x01, t);
        let t2 = t + ticks_to_ns(100);
        assert_eq!(read_back(&mut pit, 2, t2).1, (0x10000u32 - 200) as u16);
    }

    #[test]
    fn power_on_schedules_no_irq0_until_the_guest_loads_counter0() {
        let mut pit = Pit::new();
        assert_eq!(pit.next_irq0_ns(), None);
        assert!(!pit.poll_irq0(10_000 * MS));
        // A control word alone re-arms nothing: NULL COUNT is set until
        // the count is written (datasheet), and still no IRQ0.
        pit.write(COMMAND, 0x34, 20 * MS);
        assert_eq!(read_back(&mut pit, 0, 20 * MS).0 & 0x7f, 0x74);
        assert_eq!(pit.next_irq0_ns(), None);
        pit.write(CHANNEL0, 0x9c, 20 * MS);
        pit.write(CHANNEL0, 0x2e, 20 * MS);
        assert_eq!(read_back(&mut pit, 0, 20 * MS).0 & NULL_COUNT, 0);
        assert_eq!(pit.next_irq0_ns(), Some(20 * MS + ticks_to_ns(11932)));
    }

    #[test]
    fn linux_kaslr_i8254_read_terminates_at_power_on() {
        // arch/x86/lib/kaslr.c, i8254(): read-back of counter 0 (0xc2),
        // status, then LSB and MSB of the count, repeated while the status
        // reports NULL COUNT. Issue 12: it used to spin here forever.
        let mut pit = Pit::new();
        let now = 123 * MS;
        let mut rounds = 0;
        let timer = loop {
            rounds += 1;
            assert!(rounds < 10, "NULL COUNT never clears");
            pit.write(COMMAND, 0xc2, now);
            let status = pit.read(CHANNEL0, now);
            let lo = pit.read(CHANNEL0, now) as u16;
            let hi = pit.read(CHANNEL0, now) as u16;
            if status & NULL_COUNT == 0 {
                break lo | (hi << 8);
            }
        };
        assert_eq!(rounds, 1);
        let d = ns_to_ticks(now);
        assert_eq!(timer, (0x10000 - (2 * d) % 0x10000) as u16);
    }

    #[test]
    fn power_on_state_round_trips() {
        let pit = Pit::new();
        let mut e = Encoder::new();
        pit.encode(&mut e);
        let bytes = e.into_bytes();
        let back = Pit::decode(&mut Decoder::new(&bytes)).unwrap();
        assert_eq!(back, pit);
        assert_eq!(back.next_irq0_ns(), None);
    }

    #[test]
    fn state_round_trips() {
        let mut pit = Pit::new();
        program(&mut pit, 0, 2, 11932, 0);
        let mut e = Encoder::new();
        pit.encode(&mut e);
        let bytes = e.into_bytes();
        assert_eq!(Pit::decode(&mut Decoder::new(&bytes)).unwrap(), pit);
    }
}
