//! MC146818-compatible CMOS RTC and CMOS RAM on ports 0x70 (index, bit 7 =
//! NMI disable) and 0x71 (data).
//!
//! vm-superio only offers the ARM PL031 RTC, so the x86 CMOS model lives
//! here. The time of day is computed from the guest wall clock handed in by
//! the caller (read through the nondeterminism door) plus an offset that
//! guest writes to the time registers adjust.

use crate::snapshot::{Decoder, Encoder, SnapshotError};

/// Index port.
pub const INDEX: u16 = 0x70;
/// Data port.
pub const DATA: u16 = 0x71;

const REG_SECONDS: u8 = 0x00;
const REG_MINUTES: u8 = 0x02;
const REG_HOURS: u8 = 0x04;
const REG_WEEKDAY: u8 = 0x06;
const REG_DAY: u8 = 0x07;
const REG_MONTH: u8 = 0x08;
const REG_YEAR: u8 = 0x09;
const REG_A: u8 = 0x0a;
const REG_B: u8 = 0x0b;
const REG_C: u8 = 0x0c;
const REG_D: u8 = 0x0d;
const REG_CENTURY: u8 = 0x32;

const B_24H: u8 = 0x02;
const B_BINARY: u8 = 0x04;

/// Broken-down UTC time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DateTime {
    /// Full year, e.g. 2026.
    pub year: i64,
    /// 1-12.
    pub month: u8,
    /// 1-31.
    pub day: u8,
    /// 0-23.
    pub hour: u8,
    /// 0-59.
    pub minute: u8,
    /// 0-59.
    pub second: u8,
    /// 1 = Sunday .. 7 = Saturday, as the RTC counts.
    pub weekday: u8,
}

fn days_from_civil(y: i64, m: u8, d: u8) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let m = m as i64;
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + d as i64 - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146097 + doe - 719468
}

impl DateTime {
    /// From seconds since the Unix epoch.
    pub fn from_unix(secs: i64) -> Self {
        let days = secs.div_euclid(86400);
        let rem = secs.rem_euclid(86400);
        let z = days + 719468;
        let era = z.div_euclid(146097);
        let doe = z - era * 146097;
        let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146096) / 365;
        let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
        let mp = (5 * doy + 2) / 153;
        let day = (doy - (153 * mp + 2) / 5 + 1) as u8;
        let month = if mp < 10 { mp + 3 } else { mp - 9 } as u8;
        let year = yoe + era * 400 + if month <= 2 { 1 } else { 0 };
        DateTime {
            year,
            month,
            day,
            hour: (rem / 3600) as u8,
            minute: (rem % 3600 / 60) as u8,
            second: (rem % 60) as u8,
            // 1970-01-01 was a Thursday (RTC weekday 5).
            weekday: ((days + 4).rem_euclid(7) + 1) as u8,
        }
    }

    /// To seconds since the Unix epoch.
    pub fn to_unix(&self) -> i64 {
        days_from_civil(self.year, self.month, self.day) * 86400
            + self.hour as i64 * 3600
            + self.minute as i64 * 60
            + self.second as i64
    }
}

fn to_bcd(v: u8) -> u8 {
    ((v / 10) << 4) | (v % 10)
}

fn from_bcd(v: u8) -> u8 {
    (v >> 4) * 10 + (v & 0x0f)
}

/// The CMOS RTC with its 128 bytes of RAM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rtc {
    index: u8,
    ram: [u8; 128],
    /// Seconds added to the host-provided wall clock (guest clock setting).
    offset_secs: i64,
}

impl Default for Rtc {
    fn default() -> Self {
        Self::new()
    }
}

impl Rtc {
    /// Power-on state: 24-hour BCD mode, 32.768 kHz time base, valid RAM.
    pub fn new() -> Self {
        let mut ram = [0u8; 128];
        ram[REG_A as usize] = 0x26;
        ram[REG_B as usize] = B_24H;
        ram[REG_D as usize] = 0x80;
        Rtc {
            index: 0,
            ram,
            offset_secs: 0,
        }
    }

    /// Whether this port belongs to the RTC.
    pub fn handles(port: u16) -> bool {
        port == INDEX || port == DATA
    }

    fn encode_field(&self, v: u8) -> u8 {
        if self.ram[REG_B as usize] & B_BINARY != 0 {
            v
        } else {
            to_bcd(v)
        }
    }

    fn decode_field(&self, v: u8) -> u8 {
        if self.ram[REG_B as usize] & B_BINARY != 0 {
            v
        } else {
            from_bcd(v)
        }
    }

    fn encode_hour(&self, hour: u8) -> u8 {
        if self.ram[REG_B as usize] & B_24H != 0 {
            self.encode_field(hour)
        } else {
            let pm = hour >= 12;
            let h12 = match hour % 12 {
                0 => 12,
                h => h,
            };
            self.encode_field(h12) | if pm { 0x80 } else { 0 }
        }
    }

    fn decode_hour(&self, v: u8) -> u8 {
        if self.ram[REG_B as usize] & B_24H != 0 {
            self.decode_field(v)
        } else {
            let h12 = self.decode_field(v & 0x7f) % 12;
            if v & 0x80 != 0 {
                h12 + 12
            } else {
                h12
            }
        }
    }

    /// Whether a read of `port` now returns clock time (and so needs the
    /// wall clock from the door).
    pub fn reads_clock(&self, port: u16) -> bool {
        port == DATA
            && matches!(
                self.index,
                REG_SECONDS
                    | REG_MINUTES
                    | REG_HOURS
                    | REG_WEEKDAY
                    | REG_DAY
                    | REG_MONTH
                    | REG_YEAR
                    | REG_CENTURY
            )
    }

    /// Port read; `wall_secs` is the host wall clock (Unix seconds) from the door.
    pub fn read(&mut self, port: u16, wall_secs: i64) -> u8 {
        if port == INDEX {
            return 0xff;
        }
        let now = DateTime::from_unix(wall_secs + self.offset_secs);
        match self.index {
            REG_SECONDS => self.encode_field(now.second),
            REG_MINUTES => self.encode_field(now.minute),
            REG_HOURS => self.encode_hour(now.hour),
            REG_WEEKDAY => self.encode_field(now.weekday),
            REG_DAY => self.encode_field(now.day),
            REG_MONTH => self.encode_field(now.month),
            REG_YEAR => self.encode_field((now.year % 100) as u8),
            REG_CENTURY => self.encode_field((now.year / 100) as u8),
            // Update-in-progress (bit 7) is never reported: reads are atomic here.
            REG_A => self.ram[REG_A as usize] & 0x7f,
            REG_C => {
                let v = self.ram[REG_C as usize];
                self.ram[REG_C as usize] = 0;
                v
            }
            i => self.ram[i as usize],
        }
    }

    /// Port write; `wall_secs` as for [`Rtc::read`].
    pub fn write(&mut self, port: u16, value: u8, wall_secs: i64) {
        if port == INDEX {
            self.index = value & 0x7f;
            return;
        }
        let idx = self.index;
        match idx {
            REG_SECONDS | REG_MINUTES | REG_HOURS | REG_DAY | REG_MONTH | REG_YEAR
            | REG_CENTURY => {
                let mut t = DateTime::from_unix(wall_secs + self.offset_secs);
                match idx {
                    REG_SECONDS => t.second = self.decode_field(value).min(59),
                    REG_MINUTES => t.minute = self.decode_field(value).min(59),
                    REG_HOURS => t.hour = self.decode_hour(value).min(23),
                    REG_DAY => t.day = self.decode_field(value).clamp(1, 31),
                    REG_MONTH => t.month = self.decode_field(value).clamp(1, 12),
                    REG_YEAR => t.year = t.year / 100 * 100 + self.decode_field(value) as i64,
                    _ => t.year = self.decode_field(value) as i64 * 100 + t.year % 100,
                }
                self.offset_secs = t.to_unix() - wall_secs;
            }
            REG_WEEKDAY => {}   // derived from the date
            REG_C | REG_D => {} // read-only
            REG_A => self.ram[REG_A as usize] = value & 0x7f,
            REG_B => self.ram[REG_B as usize] = value,
            i => self.ram[i as usize] = value,
        }
    }

    /// Serialise the device state.
    pub fn encode(&self, e: &mut Encoder) {
        e.u8(self.index);
        e.bytes(&self.ram);
        e.i64(self.offset_secs);
    }

    /// Restore from [`Rtc::encode`] output.
    pub fn decode(d: &mut Decoder) -> Result<Self, SnapshotError> {
        let index = d.u8()?;
        let ram: [u8; 128] = d
            .bytes()?
            .try_into()
            .map_err(|_| SnapshotError::Invalid("CMOS RAM is not 128 bytes".into()))?;
        Ok(Rtc {
            index,
            ram,
            offset_secs: d.i64()?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // 2026-11-28 06:43:27 UTC, a Saturday.
    const T: i64 = 1_795_848_207;

    fn rd(rtc: &mut Rtc, reg: u8, t: i64) -> u8 {
        rtc.write(INDEX, reg, t);
        rtc.read(DATA, t)
    }

    fn wr(rtc: &mut Rtc, reg: u8, v: u8, t: i64) {
        rtc.write(INDEX, reg, t);
        rtc.write(DATA, v, t);
    }

    #[test]
    fn civil_conversion_round_trips() {
        let dt = DateTime::from_unix(T);
        assert_eq!(
            (dt.year, dt.month, dt.day, dt.hour, dt.minute, dt.second),
            (2026, 11, 28, 6, 43, 27)
        );
        assert_eq!(dt.weekday, 7, "Saturday");
        assert_eq!(dt.to_unix(), T);
        assert_eq!(DateTime::from_unix(0).weekday, 5, "1970-01-01 Thursday");
        let leap = DateTime::from_unix(951_782_400); // 2000-02-29
        assert_eq!((leap.year, leap.month, leap.day), (2000, 2, 29));
    }

    #[test]
    fn time_registers_default_to_bcd_24h() {
        let mut rtc = Rtc::new();
        assert_eq!(rd(&mut rtc, REG_SECONDS, T), 0x27);
        assert_eq!(rd(&mut rtc, REG_MINUTES, T), 0x43);
        assert_eq!(rd(&mut rtc, REG_HOURS, T), 0x06);
        assert_eq!(rd(&mut rtc, REG_DAY, T), 0x28);
        assert_eq!(rd(&mut rtc, REG_MONTH, T), 0x11);
        assert_eq!(rd(&mut rtc, REG_YEAR, T), 0x26);
        assert_eq!(rd(&mut rtc, REG_CENTURY, T), 0x20);
        assert_eq!(rd(&mut rtc, REG_WEEKDAY, T), 0x07);
    }

    #[test]
    fn binary_and_12_hour_modes() {
        let mut rtc = Rtc::new();
        wr(&mut rtc, REG_B, B_BINARY, T); // binary, 12-hour
        assert_eq!(rd(&mut rtc, REG_SECONDS, T), 27);
        assert_eq!(rd(&mut rtc, REG_HOURS, T), 6, "6 AM");
        let pm = T + 12 * 3600;
        assert_eq!(rd(&mut rtc, REG_HOURS, pm), 0x80 | 6, "6 PM");
        let midnight = T - 6 * 3600 - 43 * 60 - 27;
        assert_eq!(rd(&mut rtc, REG_HOURS, midnight), 12, "12 AM");
    }

    #[test]
    fn only_clock_registers_need_the_wall_clock() {
        let mut rtc = Rtc::new();
        rtc.write(INDEX, REG_SECONDS, T);
        assert!(rtc.reads_clock(DATA));
        assert!(!rtc.reads_clock(INDEX));
        rtc.write(INDEX, REG_B, T);
        assert!(!rtc.reads_clock(DATA));
        rtc.write(INDEX, 0x40, T);
        assert!(!rtc.reads_clock(DATA), "CMOS RAM");
    }

    #[test]
    fn status_registers() {
        let mut rtc = Rtc::new();
        assert_eq!(rd(&mut rtc, REG_A, T) & 0x80, 0, "UIP clear");
        assert_eq!(rd(&mut rtc, REG_D, T), 0x80, "valid RAM and time");
        assert_eq!(rd(&mut rtc, REG_B, T), B_24H);
    }

    #[test]
    fn guest_write_sets_clock_offset() {
        let mut rtc = Rtc::new();
        wr(&mut rtc, REG_YEAR, 0x30, T);
        assert_eq!(rd(&mut rtc, REG_YEAR, T), 0x30);
        // The clock keeps running from the new setting.
        assert_eq!(rd(&mut rtc, REG_SECONDS, T + 5), 0x32);
        assert_eq!(rd(&mut rtc, REG_YEAR, T + 5), 0x30);
    }

    #[test]
    fn cmos_ram_and_nmi_bit() {
        let mut rtc = Rtc::new();
        wr(&mut rtc, 0x80 | 0x40, 0x5a, T); // NMI-disable bit ignored in index
        assert_eq!(rd(&mut rtc, 0x40, T), 0x5a);
    }

    #[test]
    fn state_round_trips() {
        let mut rtc = Rtc::new();
        wr(&mut rtc, 0x20, 7, T);
        wr(&mut rtc, REG_YEAR, 0x31, T);
        let mut e = Encoder::new();
        rtc.encode(&mut e);
        let bytes = e.into_bytes();
        assert_eq!(Rtc::decode(&mut Decoder::new(&bytes)).unwrap(), rtc);
    }
}
