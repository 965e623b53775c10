//! Progress watchdog: notices a guest that prints nothing while it hammers
//! one device, and says so once (issue 12).
//!
//! A guest that makes no visible progress is the worst failure a user can
//! meet. The typical cause is a guest polling a device for a state the
//! model never reaches (Linux's KASLR entropy read looping on the 8254's
//! NULL COUNT bit was one): the vCPU exits tens of thousands of times a
//! second on the same few ports and the console stays silent. The run loop
//! feeds this watchdog every port exit and every console output; when there
//! has been no output for [`WatchdogConfig::quiet`] and the last window of
//! [`WatchdogConfig::window`] saw more than [`WatchdogConfig::min_rate`]
//! exits per second, at least [`WatchdogConfig::min_share_percent`] of them
//! on one device, it returns a [`StallWarning`] for the caller to print on
//! stderr. It warns at most once per stall: only console output re-arms it.
//!
//! The watchdog sees nothing the guest can observe and changes nothing the
//! guest sees, so it plays no part in record/replay.
//!
//! # Cost on the hot path
//!
//! [`ProgressWatchdog::count_port_exit`] runs on every port exit: it bumps
//! one counter in a 16-slot table (the slot used last is tried first, so a
//! polling loop over one to four ports costs a compare or a short scan),
//! and decrements a countdown. It allocates nothing, makes no system call
//! and reads no clock. Every [`WatchdogConfig::sample_every`] exits it
//! returns `true`, and only then does the caller read the clock and call
//! [`ProgressWatchdog::check`], which closes a window at most once per
//! `window`.
//!
//! ```
//! use std::time::Instant;
//! use vmm::watchdog::{ProgressWatchdog, WatchdogConfig};
//!
//! let mut dog = ProgressWatchdog::new(WatchdogConfig::default(), Instant::now()).unwrap();
//! // On every port exit:
//! # let port = 0x43;
//! if dog.count_port_exit(port) {
//!     if let Some(warning) = dog.check(Instant::now()) {
//!         eprintln!("{warning}");
//!     }
//! }
//! // Whenever the guest writes to the console:
//! dog.on_console_output(Instant::now());
//! ```

use std::fmt;
use std::time::{Duration, Instant};

use thiserror::Error;

/// Slots of the per-window port table. A polling loop touches a handful of
/// ports; exits on ports beyond this many distinct ones in a window are
/// counted as "elsewhere", which only makes the window look less dominated.
const SLOTS: usize = 16;
/// Ports named in a warning.
const MAX_REPORTED_PORTS: usize = 4;
/// Marks an empty slot (ports are 16-bit).
const NO_PORT: u32 = u32::MAX;

/// When the watchdog speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WatchdogConfig {
    /// No console output for at least this long (default 10 s).
    pub quiet: Duration,
    /// Exits are judged over windows of this length (default 1 s).
    pub window: Duration,
    /// Port exits per second in a window above which the guest counts as
    /// busy (default 1000).
    pub min_rate: u64,
    /// Share of a window's port exits, in percent, that one device must
    /// take (default 90).
    pub min_share_percent: u8,
    /// Port exits between two clock samples (default 256).
    pub sample_every: u32,
}

impl Default for WatchdogConfig {
    fn default() -> Self {
        WatchdogConfig {
            quiet: Duration::from_secs(10),
            window: Duration::from_secs(1),
            min_rate: 1000,
            min_share_percent: 90,
            sample_every: 256,
        }
    }
}

/// A configuration the watchdog cannot work with.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum WatchdogError {
    /// The window is zero.
    #[error("the watchdog window must be longer than zero")]
    ZeroWindow,
    /// The sampling period is zero.
    #[error("the watchdog must sample the clock every 1 or more exits")]
    ZeroSamplePeriod,
    /// The share is not a percentage.
    #[error("a device's share of exits must be 1-100 %, not {0} %")]
    BadShare(u8),
}

/// One slot of the port table.
#[derive(Debug, Clone, Copy)]
struct Slot {
    port: u32,
    exits: u64,
}

const EMPTY: Slot = Slot {
    port: NO_PORT,
    exits: 0,
};

/// Exits on one port over the window that raised a warning.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PortExits {
    /// The port.
    pub port: u16,
    /// Its exits in the window.
    pub exits: u64,
}

/// A window in which one device took the exits at a high rate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Busy {
    exits_per_sec: u64,
    window_exits: u64,
    /// The device's ports, busiest first.
    ports: [PortExits; MAX_REPORTED_PORTS],
    len: usize,
}

/// The guest printed nothing for a long time while exiting at a high rate
/// on one device. Its `Display` is the line to print on stderr.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StallWarning {
    /// Time since the last console output (or since the start).
    pub silent_for: Duration,
    /// Port exits per second over the last window.
    pub exits_per_sec: u64,
    /// Port exits in that window, on every port.
    pub window_exits: u64,
    /// The busy device's ports with their exits, busiest first (at most 4).
    pub ports: Vec<PortExits>,
}

impl fmt::Display for StallWarning {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "vmft: warning: no console output for {} s while the guest exits {} times/s on ",
            self.silent_for.as_secs(),
            thousands(self.exits_per_sec)
        )?;
        let n = self.ports.len();
        for (i, p) in self.ports.iter().enumerate() {
            if i > 0 {
                f.write_str(if i + 1 == n { " and " } else { ", " })?;
            }
            write!(f, "port {:#04x}", p.port)?;
            let share = (n > 1).then(|| percent(p.exits, self.window_exits));
            match (port_name(p.port), share) {
                (Some(name), Some(s)) => write!(f, " ({name}, {s}%)")?,
                (Some(name), None) => write!(f, " ({name})")?,
                (None, Some(s)) => write!(f, " ({s}%)")?,
                (None, None) => {}
            }
        }
        f.write_str(": it may be spinning on a device")
    }
}

/// `part` as a whole percentage of `whole` (rounded down).
fn percent(part: u64, whole: u64) -> u64 {
    (part as u128 * 100 / whole.max(1) as u128) as u64
}

/// `48000` as `48,000`.
fn thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// What the monitor has at `port`, for messages.
pub fn port_name(port: u16) -> Option<&'static str> {
    Some(match port {
        0x20 => "PIC master command",
        0x21 => "PIC master data",
        0xa0 => "PIC slave command",
        0xa1 => "PIC slave data",
        0x4d0 => "PIC master ELCR",
        0x4d1 => "PIC slave ELCR",
        0x40 => "PIT counter 0",
        0x41 => "PIT counter 1",
        0x42 => "PIT counter 2",
        0x43 => "PIT command",
        0x61 => "port B: PIT counter 2 gate and output",
        0x60 => "i8042 data",
        0x64 => "i8042 status/command",
        0x70 => "CMOS index",
        0x71 => "CMOS data",
        0x80 => "POST code, I/O delay",
        0x3f8 => "COM1 data",
        0x3f9 => "COM1 interrupt enable",
        0x3fa => "COM1 interrupt identification",
        0x3fb => "COM1 line control",
        0x3fc => "COM1 modem control",
        0x3fd => "COM1 line status",
        0x3fe => "COM1 modem status",
        0x3ff => "COM1 scratch",
        _ => return None,
    })
}

/// The device behind `port`, as the first port of its group: a guest
/// polling a device alternates between its ports (Linux's KASLR read of the
/// 8254 writes 0x43 once and reads 0x40 three times), so dominance is
/// judged per device. Ports of no known device are their own group.
fn device_of(port: u16) -> u16 {
    match port {
        0x40..=0x43 | 0x61 => 0x40,
        0x20 | 0x21 | 0xa0 | 0xa1 | 0x4d0 | 0x4d1 => 0x20,
        0x60 | 0x64 => 0x60,
        0x70 | 0x71 => 0x70,
        0x3f8..=0x3ff => 0x3f8,
        other => other,
    }
}

/// Watches for a silent guest that exits at a high rate on one device.
/// See the module documentation for how the run loop drives it.
#[derive(Debug, Clone)]
pub struct ProgressWatchdog {
    config: WatchdogConfig,
    /// Port exits by port in the current window.
    slots: [Slot; SLOTS],
    /// Slots in use.
    used: usize,
    /// The slot hit last: tried first.
    last: usize,
    /// Exits on ports that found no free slot.
    elsewhere: u64,
    /// Exits until the next clock sample.
    countdown: u32,
    window_start: Instant,
    /// The last closed window, if one device kept the guest busy in it.
    busy: Option<Busy>,
    last_output: Instant,
    /// Warned since the last console output.
    warned: bool,
}

impl ProgressWatchdog {
    /// A watchdog whose quiet time and first window start at `now`.
    pub fn new(config: WatchdogConfig, now: Instant) -> Result<Self, WatchdogError> {
        if config.window.is_zero() {
            return Err(WatchdogError::ZeroWindow);
        }
        if config.sample_every == 0 {
            return Err(WatchdogError::ZeroSamplePeriod);
        }
        if !(1..=100).contains(&config.min_share_percent) {
            return Err(WatchdogError::BadShare(config.min_share_percent));
        }
        Ok(ProgressWatchdog {
            config,
            slots: [EMPTY; SLOTS],
            used: 0,
            last: 0,
            elsewhere: 0,
            countdown: config.sample_every,
            window_start: now,
            busy: None,
            last_output: now,
            warned: false,
        })
    }

    /// The configuration in force.
    pub fn config(&self) -> &WatchdogConfig {
        &self.config
    }

    /// Count one port exit. The hot path: no clock, no allocation. Returns
    /// `true` every `sample_every` exits; the caller then reads the clock
    /// and calls [`ProgressWatchdog::check`].
    #[inline]
    pub fn count_port_exit(&mut self, port: u16) -> bool {
        let slot = &mut self.slots[self.last];
        if slot.port == port as u32 {
            slot.exits += 1;
        } else {
            self.count_other(port);
        }
        self.countdown -= 1;
        if self.countdown == 0 {
            self.countdown = self.config.sample_every;
            true
        } else {
            false
        }
    }

    /// [`ProgressWatchdog::count_port_exit`] and, when a sample is due,
    /// [`ProgressWatchdog::check`] at `now`, for a caller that has the time
    /// of every exit anyway. Otherwise prefer the pair: reading the clock on
    /// every exit costs more than the watchdog.
    #[inline]
    pub fn on_port_exit(&mut self, port: u16, now: Instant) -> Option<StallWarning> {
        if self.count_port_exit(port) {
            self.check(now)
        } else {
            None
        }
    }

    /// A port other than the last one: find or take its slot.
    #[inline(never)]
    fn count_other(&mut self, port: u16) {
        let key = port as u32;
        if let Some(i) = self.slots[..self.used].iter().position(|s| s.port == key) {
            self.slots[i].exits += 1;
            self.last = i;
        } else if self.used < SLOTS {
            self.slots[self.used] = Slot {
                port: key,
                exits: 1,
            };
            self.last = self.used;
            self.used += 1;
        } else {
            self.elsewhere += 1;
        }
    }

    /// The guest wrote to the console at `now`: the quiet time restarts and
    /// a later stall may warn again.
    pub fn on_console_output(&mut self, now: Instant) {
        self.last_output = now;
        self.warned = false;
    }

    /// Close the window if it has lasted `window`, and return a warning if
    /// the guest has been silent for `quiet` while the last window was busy
    /// on one device and no warning was given since the last output. Cheap
    /// unless a window closes; may be called at any time.
    pub fn check(&mut self, now: Instant) -> Option<StallWarning> {
        let elapsed = now.saturating_duration_since(self.window_start);
        if elapsed >= self.config.window {
            self.busy = self.close_window(elapsed);
            self.slots = [EMPTY; SLOTS];
            self.used = 0;
            self.last = 0;
            self.elsewhere = 0;
            self.window_start = now;
        }
        if self.warned {
            return None;
        }
        let silent_for = now.saturating_duration_since(self.last_output);
        if silent_for < self.config.quiet {
            return None;
        }
        let busy = self.busy?;
        self.warned = true;
        let warning = StallWarning {
            silent_for,
            exits_per_sec: busy.exits_per_sec,
            window_exits: busy.window_exits,
            ports: busy.ports[..busy.len].to_vec(),
        };
        tracing::debug!(
            silent_ms = silent_for.as_millis() as u64,
            exits_per_sec = busy.exits_per_sec,
            port = busy.ports[0].port,
            "progress watchdog: stall"
        );
        Some(warning)
    }

    /// Judge the window that lasted `elapsed`: busy on one device or not.
    fn close_window(&self, elapsed: Duration) -> Option<Busy> {
        let slots = &self.slots[..self.used];
        let total = slots.iter().map(|s| s.exits).sum::<u64>() + self.elsewhere;
        let nanos = elapsed.as_nanos().max(1);
        let exits_per_sec = (total as u128 * 1_000_000_000 / nanos) as u64;
        if total == 0 || exits_per_sec <= self.config.min_rate {
            return None;
        }
        // Exits per device; the table is tiny, so quadratic is fine.
        let (device, device_exits) = slots
            .iter()
            .map(|s| {
                let d = device_of(s.port as u16);
                let sum = slots
                    .iter()
                    .filter(|o| device_of(o.port as u16) == d)
                    .map(|o| o.exits)
                    .sum::<u64>();
                (d, sum)
            })
            .max_by_key(|&(_, sum)| sum)?;
        if (device_exits as u128) * 100 < total as u128 * self.config.min_share_percent as u128 {
            return None;
        }
        let mut sorted = [EMPTY; SLOTS];
        let mut n = 0;
        for s in slots.iter().filter(|s| device_of(s.port as u16) == device) {
            sorted[n] = *s;
            n += 1;
        }
        sorted[..n].sort_unstable_by(|a, b| b.exits.cmp(&a.exits).then(a.port.cmp(&b.port)));
        let mut ports = [PortExits { port: 0, exits: 0 }; MAX_REPORTED_PORTS];
        let len = n.min(MAX_REPORTED_PORTS);
        for (p, s) in ports.iter_mut().zip(&sorted[..len]) {
            *p = PortExits {
                port: s.port as u16,
                exits: s.exits,
            };
        }
        Some(Busy {
            exits_per_sec,
            window_exits: total,
            ports,
            len,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    fn dog(t0: Instant) -> ProgressWatchdog {
        ProgressWatchdog::new(WatchdogConfig::default(), t0).unwrap()
    }

    /// Feed `exits` port exits cycling through `ports`, evenly spread over
    /// `span` from `*t`, calling `check` whenever the watchdog asks, as the
    /// run loop does. Returns the warnings raised; `*t` ends after `span`.
    fn run(
        d: &mut ProgressWatchdog,
        t: &mut Instant,
        span: Duration,
        exits: u64,
        ports: &[u16],
    ) -> Vec<StallWarning> {
        let start = *t;
        let mut warnings = Vec::new();
        for i in 0..exits {
            let port = ports[(i % ports.len() as u64) as usize];
            if d.count_port_exit(port) {
                let now = start + span.mul_f64(i as f64 / exits as f64);
                warnings.extend(d.check(now));
            }
        }
        *t = start + span;
        warnings.extend(d.check(*t));
        warnings
    }

    /// Linux's KASLR read of the 8254: out 0x43, then three reads of 0x40.
    const KASLR_LOOP: [u16; 4] = [0x43, 0x40, 0x40, 0x40];

    #[test]
    fn warns_once_for_a_stall_spinning_on_one_device() {
        let t0 = Instant::now();
        let mut d = dog(t0);
        let mut t = t0;
        // 9 s of 48,000 exits/s: busy, but not yet silent for 10 s.
        assert!(run(&mut d, &mut t, 9000 * MS, 9 * 48_000, &KASLR_LOOP).is_empty());
        let w = run(&mut d, &mut t, 2000 * MS, 2 * 48_000, &KASLR_LOOP);
        assert_eq!(w.len(), 1, "{w:?}");
        let w = &w[0];
        assert!(w.silent_for >= Duration::from_secs(10));
        assert!(w.silent_for < Duration::from_secs(11));
        assert!((47_000..=49_000).contains(&w.exits_per_sec), "{w:?}");
        assert_eq!(
            w.ports.iter().map(|p| p.port).collect::<Vec<_>>(),
            [0x40, 0x43]
        );
        let text = w.to_string();
        assert!(
            text.starts_with("vmft: warning: no console output for 10 s while the guest exits 4"),
            "{text}"
        );
        assert!(
            text.contains(
                "times/s on port 0x40 (PIT counter 0, 75%) and port 0x43 (PIT command, 25%): \
                 it may be spinning on a device"
            ),
            "{text}"
        );
        // The stall goes on: no second warning.
        assert!(run(&mut d, &mut t, 30_000 * MS, 30 * 48_000, &KASLR_LOOP).is_empty());
    }

    #[test]
    fn single_port_message_matches_the_issue() {
        let w = StallWarning {
            silent_for: Duration::from_millis(12_400),
            exits_per_sec: 48_000,
            window_exits: 48_000,
            ports: vec![PortExits {
                port: 0x43,
                exits: 48_000,
            }],
        };
        assert_eq!(
            w.to_string(),
            "vmft: warning: no console output for 12 s while the guest exits 48,000 times/s \
             on port 0x43 (PIT command): it may be spinning on a device"
        );
    }

    #[test]
    fn no_warning_while_output_flows() {
        let t0 = Instant::now();
        let mut d = dog(t0);
        let mut t = t0;
        for _ in 0..30 {
            assert!(run(&mut d, &mut t, 1000 * MS, 48_000, &KASLR_LOOP).is_empty());
            d.on_console_output(t);
        }
    }

    #[test]
    fn no_warning_when_exits_are_spread_over_devices() {
        let t0 = Instant::now();
        let mut d = dog(t0);
        let mut t = t0;
        // PIT, PIC, CMOS and COM1 in turn: no device above 90 %.
        let ports = [0x40, 0x20, 0x70, 0x3fd, 0x43, 0x21, 0x71, 0x3f8];
        assert!(run(&mut d, &mut t, 20_000 * MS, 20 * 50_000, &ports).is_empty());
    }

    #[test]
    fn no_warning_when_exits_are_slow() {
        let t0 = Instant::now();
        let mut d = dog(t0);
        let mut t = t0;
        // 500 exits/s on one port: a guest waiting, not spinning.
        assert!(run(&mut d, &mut t, 30_000 * MS, 30 * 500, &[0x43]).is_empty());
    }

    #[test]
    fn no_warning_when_a_busy_stretch_ended() {
        let t0 = Instant::now();
        let mut d = dog(t0);
        let mut t = t0;
        assert!(run(&mut d, &mut t, 5000 * MS, 5 * 48_000, &[0x43]).is_empty());
        // Then quiet and slow: the last window is what counts.
        assert!(run(&mut d, &mut t, 20_000 * MS, 20 * 100, &[0x43]).is_empty());
    }

    #[test]
    fn warns_again_after_output_resumes_and_the_guest_stalls_again() {
        let t0 = Instant::now();
        let mut d = dog(t0);
        let mut t = t0;
        let w = run(&mut d, &mut t, 12_000 * MS, 12 * 48_000, &KASLR_LOOP);
        assert_eq!(w.len(), 1);
        // Output resumes for a while...
        for _ in 0..5 {
            assert!(run(&mut d, &mut t, 1000 * MS, 48_000, &[0x3f8, 0x3fd]).is_empty());
            d.on_console_output(t);
        }
        // ...then the guest spins elsewhere, silently.
        let w = run(&mut d, &mut t, 12_000 * MS, 12 * 20_000, &[0x71]);
        assert_eq!(w.len(), 1, "{w:?}");
        assert_eq!(
            w[0].ports,
            [PortExits {
                port: 0x71,
                exits: w[0].window_exits
            }]
        );
        assert!(w[0].to_string().contains("on port 0x71 (CMOS data):"));
    }

    #[test]
    fn unknown_ports_are_their_own_device_and_many_ports_overflow_to_elsewhere() {
        let t0 = Instant::now();
        let mut d = dog(t0);
        let mut t = t0;
        let w = run(&mut d, &mut t, 11_000 * MS, 11 * 5000, &[0x1234]);
        assert_eq!(w.len(), 1);
        assert!(
            w[0].to_string().contains("on port 0x1234: it may"),
            "{}",
            w[0]
        );
        // 64 distinct ports: the table keeps 16, the rest count elsewhere.
        let mut d = dog(t);
        let ports: Vec<u16> = (0x500..0x540).collect();
        assert!(run(&mut d, &mut t, 20_000 * MS, 20 * 64_000, &ports).is_empty());
    }

    #[test]
    fn rejects_configurations_it_cannot_use() {
        let now = Instant::now();
        let bad = |c: WatchdogConfig| ProgressWatchdog::new(c, now).unwrap_err();
        let base = WatchdogConfig::default();
        assert_eq!(
            bad(WatchdogConfig {
                window: Duration::ZERO,
                ..base
            }),
            WatchdogError::ZeroWindow
        );
        assert_eq!(
            bad(WatchdogConfig {
                sample_every: 0,
                ..base
            }),
            WatchdogError::ZeroSamplePeriod
        );
        assert_eq!(
            bad(WatchdogConfig {
                min_share_percent: 101,
                ..base
            }),
            WatchdogError::BadShare(101)
        );
    }

    #[test]
    fn thousands_separators() {
        assert_eq!(thousands(0), "0");
        assert_eq!(thousands(999), "999");
        assert_eq!(thousands(1000), "1,000");
        assert_eq!(thousands(48_000), "48,000");
        assert_eq!(thousands(1_234_567), "1,234,567");
    }

    #[test]
    fn per_exit_cost_is_a_few_nanoseconds() {
        // Not a benchmark: a guard against an accidental clock read or
        // allocation per exit (those cost 20+ ns each). The best of a few
        // rounds, and a generous bound, so a busy machine passes.
        let mut d = dog(Instant::now());
        let n = 1_000_000u64;
        let mut best = u64::MAX;
        for _ in 0..5 {
            let t = Instant::now();
            let mut samples = 0u64;
            for i in 0..n {
                let port = KASLR_LOOP[(i & 3) as usize];
                samples += std::hint::black_box(&mut d).count_port_exit(port) as u64;
            }
            best = best.min(t.elapsed().as_nanos() as u64 * 1000 / n);
            assert!(samples >= n / 256 && samples <= n / 256 + 1);
        }
        eprintln!(
            "watchdog: {}.{:03} ns per port exit",
            best / 1000,
            best % 1000
        );
        if !cfg!(debug_assertions) {
            assert!(best < 30_000, "{best} ps per exit");
        }
    }
}
