//! Run statistics printed by `vmft run --stats`: exits by kind,
//! interrupts, emulation completions, unknown ports, boot milestones.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::{Duration, Instant};

/// Counters of one run.
#[derive(Debug)]
pub struct Stats {
    /// When the run started.
    pub started: Instant,
    /// Exits by kind.
    pub exits: BTreeMap<&'static str, u64>,
    /// Interrupts injected, by vector.
    pub injected: BTreeMap<u8, u64>,
    /// Instructions completed by the monitor, by name.
    pub emulated: BTreeMap<&'static str, u64>,
    /// Timer interrupts raised.
    pub timer_irqs: u64,
    /// Console input bytes handed to the guest.
    pub input_bytes: u64,
    /// Network frames placed in the guest's receive queue.
    pub frames_received: u64,
    /// Network frames the guest transmitted.
    pub frames_sent: u64,
    /// Bytes of the shared disks' write stream.
    pub shared_disk_bytes: u64,
    /// Time inside KVM_RUN.
    pub in_guest: Duration,
    /// Time the guest was idle (HLT) waiting for an event.
    pub idle: Duration,
    /// When the kernel started /init.
    pub init_at: Option<Duration>,
    /// When the guest printed the ready marker.
    pub ready_at: Option<Duration>,
}

impl Default for Stats {
    fn default() -> Self {
        Stats {
            started: Instant::now(),
            exits: BTreeMap::new(),
            injected: BTreeMap::new(),
            emulated: BTreeMap::new(),
            timer_irqs: 0,
            input_bytes: 0,
            frames_received: 0,
            frames_sent: 0,
            shared_disk_bytes: 0,
            in_guest: Duration::ZERO,
            idle: Duration::ZERO,
            init_at: None,
            ready_at: None,
        }
    }
}

impl Stats {
    /// Count one exit of `kind`.
    pub fn exit(&mut self, kind: &'static str) {
        *self.exits.entry(kind).or_default() += 1;
    }

    /// Render the report; `unknown_ports` is (port, reads, writes).
    pub fn report(&self, unknown_ports: &BTreeMap<u16, (u64, u64)>) -> String {
        let mut s = String::new();
        let total = self.started.elapsed();
        let secs = |d: Option<Duration>| {
            d.map(|d| format!("{:.2} s", d.as_secs_f64()))
                .unwrap_or_else(|| "not reached".into())
        };
        let _ = writeln!(s, "vmft run statistics");
        let _ = writeln!(s, "  boot to init (Run /init):   {}", secs(self.init_at));
        let _ = writeln!(s, "  boot to ready marker:       {}", secs(self.ready_at));
        let _ = writeln!(
            s,
            "  total wall time:            {:.2} s",
            total.as_secs_f64()
        );
        let _ = writeln!(
            s,
            "  time in KVM_RUN:            {:.2} s",
            self.in_guest.as_secs_f64()
        );
        let _ = writeln!(
            s,
            "  time idle (HLT):            {:.2} s",
            self.idle.as_secs_f64()
        );
        let all: u64 = self.exits.values().sum();
        let _ = writeln!(s, "  exits: {all}");
        for (k, v) in &self.exits {
            let _ = writeln!(s, "    {k:<22} {v}");
        }
        let inj: u64 = self.injected.values().sum();
        let _ = writeln!(
            s,
            "  interrupts injected: {inj} (timer IRQs raised: {})",
            self.timer_irqs
        );
        for (k, v) in &self.injected {
            let _ = writeln!(s, "    vector {k:#04x}            {v}");
        }
        let em: u64 = self.emulated.values().sum();
        let _ = writeln!(s, "  instructions completed by the monitor: {em}");
        for (k, v) in &self.emulated {
            let _ = writeln!(s, "    {k:<22} {v}");
        }
        let unk: u64 = unknown_ports.values().map(|(r, w)| r + w).sum();
        let _ = writeln!(s, "  unknown port accesses: {unk}");
        for (p, (r, w)) in unknown_ports {
            let _ = writeln!(s, "    port {p:#06x}  reads {r}  writes {w}");
        }
        let _ = writeln!(s, "  console input bytes: {}", self.input_bytes);
        if self.frames_received + self.frames_sent > 0 {
            let _ = writeln!(
                s,
                "  network frames: {} received, {} sent",
                self.frames_received, self.frames_sent
            );
        }
        if self.shared_disk_bytes > 0 {
            let _ = writeln!(
                s,
                "  shared-disk write stream: {} bytes",
                self.shared_disk_bytes
            );
        }
        s
    }
}
