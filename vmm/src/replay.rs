//! The backup's door: every value, event and injection comes from the log,
//! and every exit the replaying guest takes is checked against the exit the
//! primary took at the same number. The replayer never runs past what the
//! log covers: when it needs the next entry it reads (and, on a stream,
//! waits) until it is there.

use std::collections::VecDeque;
use std::fs::File;
use std::io::Read;
use std::path::Path;

use ft_log::{
    Decoder, Entry, Epoch, EpochAssembler, ExitKind, ExitRecord, Fingerprint, InputCursor,
    LogHeader, ValueSource,
};

use crate::nondet::{Door, DoorError, Due, LiveDoor, Mode, Replayer, Wake};

#[derive(Debug)]
enum Item {
    Exit(u64, ExitRecord),
    Entry(Entry),
}

fn entry_pos(e: &Entry) -> u64 {
    match e {
        Entry::Exits { first, .. } => *first,
        Entry::Value { pos, .. }
        | Entry::Timer { pos, .. }
        | Entry::ConsoleInput { pos, .. }
        | Entry::Interrupt { pos, .. }
        | Entry::Check { pos, .. }
        | Entry::NetRx { pos, .. }
        | Entry::DiskRead { pos, .. }
        | Entry::End { pos, .. } => *pos,
        Entry::Epoch(e) => e.pos,
        Entry::EpochPages { pos, .. } => *pos,
        Entry::Released { .. } | Entry::NetReleased { .. } | Entry::DiskReleased { .. } => 0,
    }
}

/// Describe an exit for a divergence report.
pub fn describe_exit(r: &ExitRecord) -> String {
    match r.kind {
        ExitKind::PioIn => format!("read port {:#x} ({} bytes)", r.addr, r.data),
        ExitKind::PioOut => format!("wrote {:#x} to port {:#x}", r.data, r.addr),
        ExitKind::MmioRead => format!("read MMIO {:#x} ({} bytes)", r.addr, r.data),
        ExitKind::MmioWrite => format!("wrote {:#x} to MMIO {:#x}", r.data, r.addr),
        ExitKind::Hlt => "executed HLT".into(),
        ExitKind::IrqWindow => "opened an interrupt window".into(),
        ExitKind::Emulated => format!("needed instruction completion ({})", r.data),
    }
}

fn source_name(s: ValueSource) -> &'static str {
    match s {
        ValueSource::Clock => "clock",
        ValueSource::WallClock => "wall-clock",
    }
}

fn describe_item(i: &Item) -> String {
    match i {
        Item::Exit(n, r) => format!("{} as exit {n}", describe_exit(r)),
        Item::Entry(Entry::Value { pos, source, .. }) => {
            format!("read the {} during exit {pos}", source_name(*source))
        }
        Item::Entry(e) => format!("logged a {} entry at exit {}", e.kind(), entry_pos(e)),
    }
}

/// The replaying door.
pub struct ReplayDoor {
    source: Box<dyn Read + Send>,
    decoder: Decoder,
    /// Puts epochs split over several frames back together.
    epochs: EpochAssembler,
    path: String,
    items: VecDeque<Item>,
    eof: bool,
    /// Read buffer, reused.
    buf: Vec<u8>,
    header: LogHeader,
    /// Where to continue when the log ends without an end entry.
    live: Option<LiveDoor>,
    /// Asked before going live (the claim at the arbiter); an error stops
    /// the backup instead.
    gate: Option<GoLiveGate>,
    /// Told each released-output offset the log carries.
    on_released: Option<Box<dyn FnMut(u64) + Send>>,
    /// Told each released transmit-stream offset the log carries.
    on_net_released: Option<Box<dyn FnMut(u64) + Send>>,
    on_disk_released: Option<Box<dyn FnMut(u64) + Send>>,
    gone_live_at: Option<u64>,
    last_clock_ns: u64,
    /// Where the console's input stream goes on after the input replayed
    /// so far (from the last numbered [`Entry::ConsoleInput`]).
    input_next: Option<InputCursor>,
}

/// Where a backup whose log ended stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LogEnd {
    /// The exit the replay reached.
    pub pos: u64,
    /// Where the console's input stream goes on: the primary handed the
    /// guest everything before it.
    pub input_next: Option<InputCursor>,
}

/// Decides whether a backup whose log ended may go live there.
pub type GoLiveGate = Box<dyn FnMut(LogEnd) -> Result<(), DoorError> + Send>;

impl ReplayDoor {
    /// When the log ends without an end entry (the primary stopped), go on
    /// with `live` instead of failing: the backup takes over.
    pub fn go_live_on_end(&mut self, live: LiveDoor) {
        self.live = Some(live);
    }

    /// Ask `gate` before going live; its error ends the replay instead.
    pub fn gate_go_live(&mut self, gate: GoLiveGate) {
        self.gate = Some(gate);
    }

    /// Tell `f` every released-output offset the log carries
    /// ([`Entry::Released`]), as soon as it is read.
    pub fn on_released(&mut self, f: Box<dyn FnMut(u64) + Send>) {
        self.on_released = Some(f);
    }

    /// Tell `f` every released transmit-stream offset the log carries
    /// ([`Entry::NetReleased`]), as soon as it is read.
    pub fn on_net_released(&mut self, f: Box<dyn FnMut(u64) + Send>) {
        self.on_net_released = Some(f);
    }

    /// Tell `f` every released shared-disk write-stream offset the log
    /// carries ([`Entry::DiskReleased`]), as soon as it is read.
    pub fn on_disk_released(&mut self, f: Box<dyn FnMut(u64) + Send>) {
        self.on_disk_released = Some(f);
    }

    /// The exit at which the backup went live, if it did.
    pub fn gone_live_at(&self) -> Option<u64> {
        self.gone_live_at
    }

    /// The log is exhausted at exit `pos`: go live if allowed.
    fn log_ended(&mut self, pos: u64) -> Result<&mut LiveDoor, DoorError> {
        if self.live.is_some() && self.gone_live_at.is_none() {
            if let Some(gate) = self.gate.as_mut() {
                gate(LogEnd {
                    pos,
                    input_next: self.input_next,
                })?;
            }
        }
        match self.live.as_mut() {
            Some(live) => {
                if self.gone_live_at.is_none() {
                    live.rebase(self.last_clock_ns);
                    self.gone_live_at = Some(pos);
                    tracing::info!(exit = pos, "log ended without an end entry: going live");
                }
                Ok(live)
            }
            None => Err(DoorError::LogEnded { exit: pos }),
        }
    }

    fn live_now(&mut self) -> Option<&mut LiveDoor> {
        if self.gone_live_at.is_some() {
            self.live.as_mut()
        } else {
            None
        }
    }

    /// Open a log file and read its header.
    pub fn open(path: &Path) -> Result<Self, DoorError> {
        let p = path.display().to_string();
        let f = File::open(path).map_err(|source| DoorError::Io {
            path: p.clone(),
            source,
        })?;
        Self::from_reader(Box::new(f), p)
    }

    /// Replay from any byte stream (a file, later a socket).
    pub fn from_reader(source: Box<dyn Read + Send>, name: String) -> Result<Self, DoorError> {
        let mut d = ReplayDoor {
            source,
            decoder: Decoder::new(),
            epochs: EpochAssembler::new(),
            path: name,
            items: VecDeque::new(),
            eof: false,
            buf: vec![0u8; 1 << 16],
            live: None,
            gate: None,
            on_released: None,
            on_net_released: None,
            on_disk_released: None,
            gone_live_at: None,
            last_clock_ns: 0,
            input_next: None,
            header: LogHeader {
                kernel: String::new(),
                initrd: None,
                mem_mib: 0,
                cmdline: String::new(),
                config_hash: String::new(),
                recorder: String::new(),
                snapshot: None,
            },
        };
        loop {
            let path = d.path.clone();
            let err = |source| DoorError::Log { path, source };
            if let Some(h) = d.decoder.header().map_err(err)? {
                d.header = h.clone();
                break;
            }
            if !d.read_more()? {
                d.decoder.finish().map_err(|e| d.log_err(e))?;
                unreachable!("finish fails without a header");
            }
        }
        Ok(d)
    }

    /// The log's header.
    pub fn header(&self) -> &LogHeader {
        &self.header
    }

    fn log_err(&self, source: ft_log::LogError) -> DoorError {
        DoorError::Log {
            path: self.path.clone(),
            source,
        }
    }

    fn read_more(&mut self) -> Result<bool, DoorError> {
        if self.eof {
            return Ok(false);
        }
        let n = loop {
            match self.source.read(&mut self.buf) {
                Ok(n) => break n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(source) => {
                    return Err(DoorError::Io {
                        path: self.path.clone(),
                        source,
                    })
                }
            }
        };
        if n == 0 {
            self.eof = true;
            return Ok(false);
        }
        self.decoder.push(&self.buf[..n]);
        Ok(true)
    }

    /// The next item, reading (and waiting for) more of the log as needed;
    /// `None` when the log ended cleanly.
    fn peek(&mut self) -> Result<Option<&Item>, DoorError> {
        while self.items.is_empty() {
            match self.decoder.next_frame().map_err(|e| self.log_err(e))? {
                Some(f) => match self.epochs.push(f.entry).map_err(|e| self.log_err(e))? {
                    // A part of an epoch: kept until the epoch is whole.
                    None => {}
                    Some(Entry::Released { offset }) => {
                        if let Some(f) = self.on_released.as_mut() {
                            f(offset);
                        }
                    }
                    Some(Entry::NetReleased { offset }) => {
                        if let Some(f) = self.on_net_released.as_mut() {
                            f(offset);
                        }
                    }
                    Some(Entry::DiskReleased { offset }) => {
                        if let Some(f) = self.on_disk_released.as_mut() {
                            f(offset);
                        }
                    }
                    Some(Entry::Exits { first, exits }) => {
                        for (i, r) in exits.into_iter().enumerate() {
                            self.items
                                .push_back(Item::Exit(first.saturating_add(i as u64), r));
                        }
                    }
                    Some(other) => self.items.push_back(Item::Entry(other)),
                },
                None => {
                    if !self.read_more()? {
                        if let Err(e) = self.decoder.finish() {
                            if self.live.is_none() {
                                return Err(self.log_err(e));
                            }
                            // Going live: the primary died in the middle of
                            // a frame. Nothing released depends on it (every
                            // output barrier is a frame boundary): drop it.
                            tracing::warn!(
                                "the log ends inside a frame ({e}): dropping the partial frame"
                            );
                        }
                        if self.live.is_some() && self.epochs.is_pending() {
                            tracing::warn!("the log ends inside a split epoch: dropping its parts");
                            self.epochs = EpochAssembler::new();
                        }
                        return Ok(None);
                    }
                }
            }
        }
        Ok(self.items.front())
    }

    fn take(&mut self) -> Option<Item> {
        self.items.pop_front()
    }

    fn diverge(exit: u64, primary: String, backup: String) -> DoorError {
        DoorError::Divergence {
            exit,
            primary,
            backup,
        }
    }

    /// Peek for an entry at `pos` matching `want`; consume and return it.
    fn take_if(
        &mut self,
        pos: u64,
        want: impl Fn(&Entry) -> bool,
    ) -> Result<Option<Entry>, DoorError> {
        match self.peek()? {
            Some(Item::Entry(e)) if entry_pos(e) == pos && want(e) => match self.take() {
                Some(Item::Entry(e)) => Ok(Some(e)),
                _ => unreachable!(),
            },
            _ => Ok(None),
        }
    }

    fn value(&mut self, pos: u64, source: ValueSource) -> Result<u64, DoorError> {
        let backup = format!("read the {} during exit {pos}", source_name(source));
        match self.peek()? {
            Some(Item::Entry(Entry::Value {
                pos: p,
                source: s,
                value,
            })) if *p == pos && *s == source => {
                let v = *value;
                self.take();
                if source == ValueSource::Clock {
                    self.last_clock_ns = self.last_clock_ns.max(v);
                }
                Ok(v)
            }
            Some(other) => Err(Self::diverge(pos, describe_item(other), backup)),
            None => {
                let live = self.log_ended(pos)?;
                match source {
                    ValueSource::Clock => live.clock_ns(pos),
                    ValueSource::WallClock => live.wall_clock_secs(pos).map(|v| v as u64),
                }
            }
        }
    }
}

impl Door for ReplayDoor {
    fn mode(&self) -> Mode {
        if self.gone_live_at.is_some() {
            Mode::Live
        } else {
            Mode::Replay
        }
    }

    fn exit(&mut self, pos: u64, rec: ExitRecord) -> Result<(), DoorError> {
        if let Some(live) = self.live_now() {
            return live.exit(pos, rec);
        }
        let backup = format!("{} as exit {pos}", describe_exit(&rec));
        match self.peek()? {
            Some(Item::Exit(n, r)) if *n == pos && *r == rec => {
                self.take();
                Ok(())
            }
            Some(other) => Err(Self::diverge(pos, describe_item(other), backup)),
            None => self.log_ended(pos)?.exit(pos, rec),
        }
    }

    fn clock_ns(&mut self, pos: u64) -> Result<u64, DoorError> {
        if let Some(live) = self.live_now() {
            return live.clock_ns(pos);
        }
        self.value(pos, ValueSource::Clock)
    }

    fn wall_clock_secs(&mut self, pos: u64) -> Result<i64, DoorError> {
        if let Some(live) = self.live_now() {
            return live.wall_clock_secs(pos);
        }
        self.value(pos, ValueSource::WallClock).map(|v| v as i64)
    }

    fn due(&mut self, pos: u64, deadline: Option<u64>, rx_room: usize) -> Result<Due, DoorError> {
        if let Some(live) = self.live_now() {
            return live.due(pos, deadline, rx_room);
        }
        let mut due = Due::default();
        if let Some(Entry::Timer { now_ns, .. }) =
            self.take_if(pos, |e| matches!(e, Entry::Timer { .. }))?
        {
            self.last_clock_ns = self.last_clock_ns.max(now_ns);
            due.timer_now = Some(now_ns);
        }
        if let Some(Entry::ConsoleInput { bytes, next, .. }) =
            self.take_if(pos, |e| matches!(e, Entry::ConsoleInput { .. }))?
        {
            if next.is_some() {
                self.input_next = next;
            }
            if bytes.len() > rx_room {
                return Err(Self::diverge(
                    pos,
                    format!("handed {} console bytes to the UART", bytes.len()),
                    format!("has room for {rx_room}"),
                ));
            }
            due.input = bytes;
        }
        Ok(due)
    }

    fn net_rx(&mut self, pos: u64, ready: bool) -> Result<Option<Vec<u8>>, DoorError> {
        if let Some(live) = self.live_now() {
            return live.net_rx(pos, ready);
        }
        match self.take_if(pos, |e| matches!(e, Entry::NetRx { .. }))? {
            Some(Entry::NetRx { frame, .. }) if ready => Ok(Some(frame)),
            Some(Entry::NetRx { frame, .. }) => Err(Self::diverge(
                pos,
                format!("placed a {}-byte frame in the receive queue", frame.len()),
                "has no receive buffer".into(),
            )),
            _ => Ok(None),
        }
    }

    fn pending(&mut self, timer_deadline: Option<u64>) -> bool {
        match self.live_now() {
            Some(live) => live.pending(timer_deadline),
            None => false,
        }
    }

    fn interrupt(
        &mut self,
        pos: u64,
        offer: Option<u8>,
        fp: &mut dyn FnMut() -> Fingerprint,
    ) -> Result<Option<u8>, DoorError> {
        if let Some(live) = self.live_now() {
            return live.interrupt(pos, offer, fp);
        }
        let Some(Entry::Interrupt {
            vector,
            fingerprint,
            ..
        }) = self.take_if(pos, |e| matches!(e, Entry::Interrupt { .. }))?
        else {
            return Ok(None);
        };
        if offer != Some(vector) {
            return Err(Self::diverge(
                pos,
                format!("injected vector {vector:#x}"),
                match offer {
                    Some(v) => format!("has vector {v:#x} pending"),
                    None => "has no interrupt pending".into(),
                },
            ));
        }
        let mine = fp();
        if mine != fingerprint {
            return Err(Self::diverge(
                pos,
                format!("had state {fingerprint:x?} before injecting {vector:#x}"),
                format!("has {mine:x?}"),
            ));
        }
        Ok(Some(vector))
    }

    fn check(
        &mut self,
        pos: u64,
        compute: &mut dyn FnMut(bool) -> (Fingerprint, Option<u64>),
    ) -> Result<(), DoorError> {
        if let Some(Entry::Check {
            fingerprint,
            memory,
            ..
        }) = self.take_if(pos, |e| matches!(e, Entry::Check { .. }))?
        {
            let (fp, mem) = compute(memory.is_some());
            if fp != fingerprint {
                return Err(Self::diverge(
                    pos,
                    format!("had state {fingerprint:x?}"),
                    format!("has {fp:x?}"),
                ));
            }
            if mem != memory {
                return Err(Self::diverge(
                    pos,
                    format!("had memory digest {:x?}", memory),
                    format!("has {:x?}", mem),
                ));
            }
        }
        Ok(())
    }

    fn finish(
        &mut self,
        pos: u64,
        reason: &str,
        digest: &mut dyn FnMut() -> String,
    ) -> Result<(), DoorError> {
        if self.live_now().is_some() {
            return Ok(());
        }
        let logged = self.take_if(pos, |e| matches!(e, Entry::End { .. }))?;
        let mine = digest();
        match logged {
            Some(Entry::End {
                reason: r,
                digest: d,
                ..
            }) if r == reason && d == mine => Ok(()),
            Some(Entry::End {
                reason: r,
                digest: d,
                ..
            }) => Err(DoorError::FinalDivergence {
                exit: pos,
                primary: format!("{r}, digest {d}"),
                backup: format!("{reason}, digest {mine}"),
            }),
            _ => Err(DoorError::FinalDivergence {
                exit: pos,
                primary: "no end here (the recording went on)".into(),
                backup: format!("{reason}, digest {mine}"),
            }),
        }
    }

    fn wait(&mut self, deadline_ns: Option<u64>) -> Wake {
        match self.live_now() {
            Some(live) => live.wait(deadline_ns),
            None => Wake::Deadline,
        }
    }

    fn replayer(&mut self) -> Option<&mut dyn Replayer> {
        Some(self)
    }
}

impl Replayer for ReplayDoor {
    fn next_epoch(&mut self, pos: u64) -> Result<Option<Epoch>, DoorError> {
        if self.live_now().is_some() {
            return Ok(None);
        }
        Ok(match self.take_if(pos, |e| matches!(e, Entry::Epoch(_)))? {
            Some(Entry::Epoch(e)) => Some(*e),
            _ => None,
        })
    }

    fn stopped_at(&mut self, pos: u64, reason: &str) -> Result<bool, DoorError> {
        if self.live_now().is_some() {
            return Ok(false);
        }
        Ok(matches!(
            self.peek()?,
            Some(Item::Entry(Entry::End { pos: p, reason: r, .. })) if *p == pos && r == reason
        ))
    }

    fn disk_reads(&mut self, pos: u64) -> Result<crate::nondet::DiskReadsAt, DoorError> {
        let mut at = crate::nondet::DiskReadsAt::default();
        if self.live_now().is_some() {
            at.live = true;
            return Ok(at);
        }
        while let Some(e) = self.take_if(pos, |e| matches!(e, Entry::DiskRead { .. }))? {
            if let Entry::DiskRead { disk, data, .. } = e {
                at.reads.push((disk, data));
            }
        }
        // The log ends here, maybe after only some of this exit's reads
        // (the primary died within the exit): go live now, so the rest
        // are read from the images.
        if self.peek()?.is_none() {
            self.log_ended(pos)?;
            at.live = true;
        }
        Ok(at)
    }

    fn take_live(&mut self) -> Option<LiveDoor> {
        if self.gone_live_at.is_some() {
            self.live.take()
        } else {
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nondet::LiveDoor;
    use crate::nondet::{Recorder, Replayer};
    use crate::record::RecordDoor;
    use crate::vcpu::Kicker;

    fn header() -> LogHeader {
        LogHeader {
            kernel: "k".into(),
            initrd: None,
            mem_mib: 64,
            cmdline: String::new(),
            config_hash: "00".into(),
            recorder: "test".into(),
            snapshot: None,
        }
    }

    fn out(port: u64, data: u64) -> ExitRecord {
        ExitRecord {
            kind: ExitKind::PioOut,
            addr: port,
            data,
        }
    }

    fn fp(rip: u64) -> Fingerprint {
        Fingerprint { rip, regs: 1 }
    }

    /// Record a short session through the record door, return the log path.
    fn record(dir: &std::path::Path) -> (std::path::PathBuf, u64) {
        let path = dir.join("t.log");
        let live = LiveDoor::new(0, None, Kicker::for_current_thread());
        let mut r = RecordDoor::create(&path, &header(), live).unwrap();
        r.exit(1, out(0x43, 0x34)).unwrap();
        let clock = r.clock_ns(1).unwrap();
        r.exit(2, out(0x3f8, b'a' as u64)).unwrap();
        let due = r.due(2, Some(0), 16).unwrap();
        assert!(due.timer_now.is_some(), "deadline 0 is due");
        r.interrupt(2, Some(0x30), &mut || fp(0x1000)).unwrap();
        r.exit(3, out(0x64, 0xfe)).unwrap();
        r.finish(3, "reset", &mut || "d1g".into()).unwrap();
        drop(r);
        (path, clock)
    }

    #[test]
    fn replay_returns_what_was_recorded_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let (path, clock) = record(dir.path());
        let mut p = ReplayDoor::open(&path).unwrap();
        assert_eq!(p.header().mem_mib, 64);
        p.exit(1, out(0x43, 0x34)).unwrap();
        assert_eq!(p.clock_ns(1).unwrap(), clock);
        p.exit(2, out(0x3f8, b'a' as u64)).unwrap();
        assert!(p.due(2, None, 16).unwrap().timer_now.is_some());
        assert_eq!(
            p.interrupt(2, Some(0x30), &mut || fp(0x1000)).unwrap(),
            Some(0x30)
        );
        assert_eq!(
            p.interrupt(2, Some(0x30), &mut || fp(0x1000)).unwrap(),
            None,
            "consumed"
        );
        p.exit(3, out(0x64, 0xfe)).unwrap();
        p.finish(3, "reset", &mut || "d1g".into()).unwrap();
    }

    #[test]
    fn an_end_in_another_state_or_place_is_a_final_divergence() {
        let dir = tempfile::tempdir().unwrap();
        let (path, _) = record(dir.path());
        let replay_to_end = || {
            let mut p = ReplayDoor::open(&path).unwrap();
            p.exit(1, out(0x43, 0x34)).unwrap();
            p.clock_ns(1).unwrap();
            p.exit(2, out(0x3f8, b'a' as u64)).unwrap();
            p.due(2, None, 16).unwrap();
            p.interrupt(2, Some(0x30), &mut || fp(0x1000)).unwrap();
            p
        };
        let mut p = replay_to_end();
        p.exit(3, out(0x64, 0xfe)).unwrap();
        match p.finish(3, "reset", &mut || "other".into()) {
            Err(DoorError::FinalDivergence {
                exit: 3,
                primary,
                backup,
            }) => {
                assert!(primary.contains("d1g"), "{primary}");
                assert!(backup.contains("other"), "{backup}");
            }
            other => panic!("expected a final divergence, got {other:?}"),
        }
        // Ending early (at exit 2) where the recording went on.
        let mut p = replay_to_end();
        let e = p.finish(2, "reset", &mut || "d1g".into()).unwrap_err();
        assert!(
            matches!(&e, DoorError::FinalDivergence { primary, .. } if primary.contains("went on")),
            "{e}"
        );
    }

    #[test]
    fn a_different_exit_is_a_divergence_naming_both_sides() {
        let dir = tempfile::tempdir().unwrap();
        let (path, _) = record(dir.path());
        let mut p = ReplayDoor::open(&path).unwrap();
        p.exit(1, out(0x43, 0x34)).unwrap();
        // The backup skips the clock read and writes elsewhere.
        match p.exit(2, out(0x3f8, b'b' as u64)) {
            Err(DoorError::Divergence {
                exit,
                primary,
                backup,
            }) => {
                assert_eq!(exit, 2);
                assert!(primary.contains("clock"), "{primary}");
                assert!(backup.contains("0x62"), "{backup}");
            }
            other => panic!("expected a divergence, got {other:?}"),
        }
    }

    #[test]
    fn wrong_interrupt_state_is_a_divergence() {
        let dir = tempfile::tempdir().unwrap();
        let (path, _) = record(dir.path());
        let mut p = ReplayDoor::open(&path).unwrap();
        p.exit(1, out(0x43, 0x34)).unwrap();
        p.clock_ns(1).unwrap();
        p.exit(2, out(0x3f8, b'a' as u64)).unwrap();
        p.due(2, None, 16).unwrap();
        let e = p.interrupt(2, Some(0x30), &mut || fp(0x2000)).unwrap_err();
        assert!(matches!(e, DoorError::Divergence { exit: 2, .. }), "{e}");
    }

    #[test]
    fn going_live_hands_every_later_call_to_the_live_door() {
        let dir = tempfile::tempdir().unwrap();
        let (path, clock) = record(dir.path());
        let bytes = std::fs::read(&path).unwrap();
        let (_, frames) = ft_log::decode_all(&bytes).unwrap();
        // Keep everything up to (not including) the end entry.
        let cut = dir.path().join("no-end.log");
        std::fs::write(&cut, &bytes[..frames.last().unwrap().offset as usize]).unwrap();
        let mut p = ReplayDoor::open(&cut).unwrap();
        p.go_live_on_end(LiveDoor::new(0, None, Kicker::for_current_thread()));
        p.exit(1, out(0x43, 0x34)).unwrap();
        p.clock_ns(1).unwrap();
        p.exit(2, out(0x3f8, b'a' as u64)).unwrap();
        p.due(2, None, 16).unwrap();
        p.interrupt(2, Some(0x30), &mut || fp(0x1000)).unwrap();
        p.exit(3, out(0x64, 0xfe)).unwrap();
        assert_eq!(p.mode(), Mode::Replay, "still replaying: exit 3 is logged");
        // Exit 4 is past the log: the backup goes live.
        p.exit(4, out(0x3f8, b'z' as u64)).unwrap();
        assert_eq!(p.mode(), Mode::Live);
        assert_eq!(p.gone_live_at(), Some(4));
        assert!(
            p.clock_ns(4).unwrap() >= clock,
            "the clock does not go back"
        );
        let due = p.due(4, Some(0), 16).unwrap();
        assert!(due.timer_now.is_some(), "timers are due again when live");
        assert_eq!(
            p.interrupt(4, Some(0x30), &mut || fp(0)).unwrap(),
            Some(0x30)
        );
        // The VM then takes the live door over, once.
        assert!(p.take_live().is_some(), "the live door is handed over");
        assert!(p.take_live().is_none(), "only once");
    }

    #[test]
    fn a_log_cut_within_an_exits_disk_reads_goes_live_there_with_what_it_has() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("d.log");
        let live = LiveDoor::new(0, None, Kicker::for_current_thread());
        let mut r = RecordDoor::create(&path, &header(), live).unwrap();
        r.exit(1, out(0x43, 0x34)).unwrap();
        r.disk_read(1, 0, vec![1u8; 512]).unwrap();
        r.exit(2, out(0x43, 0x35)).unwrap();
        r.disk_read(2, 0, vec![2u8; 512]).unwrap();
        r.disk_read(2, 1, vec![3u8; 1024]).unwrap();
        r.finish(2, "reset", &mut || "d".into()).unwrap();
        drop(r);
        let bytes = std::fs::read(&path).unwrap();
        let (_, frames) = ft_log::decode_all(&bytes).unwrap();
        let kinds: Vec<_> = frames.iter().map(|f| f.entry.kind()).collect();
        // Cut after the first read of exit 2: its second read is not logged.
        let second = kinds.iter().rposition(|k| *k == "disk-read").unwrap();
        let cut = dir.path().join("cut.log");
        std::fs::write(&cut, &bytes[..frames[second].offset as usize]).unwrap();

        // Whole: every read at its exit, and not live.
        let mut p = ReplayDoor::open(&path).unwrap();
        p.exit(1, out(0x43, 0x34)).unwrap();
        let at = p.disk_reads(1).unwrap();
        assert_eq!((at.reads.len(), at.live), (1, false));
        p.exit(2, out(0x43, 0x35)).unwrap();
        let at = p.disk_reads(2).unwrap();
        assert_eq!(at.reads, vec![(0, vec![2u8; 512]), (1, vec![3u8; 1024])]);
        assert!(!at.live);

        // Cut: the read it has, and live from there (a backup).
        let mut p = ReplayDoor::open(&cut).unwrap();
        p.go_live_on_end(LiveDoor::new(0, None, Kicker::for_current_thread()));
        p.exit(1, out(0x43, 0x34)).unwrap();
        assert!(!p.disk_reads(1).unwrap().live);
        p.exit(2, out(0x43, 0x35)).unwrap();
        let at = p.disk_reads(2).unwrap();
        assert_eq!(at.reads, vec![(0, vec![2u8; 512])]);
        assert!(at.live, "the log ended within exit 2");
        assert_eq!(p.gone_live_at(), Some(2));
        // A replay with no live door reports where the log stopped.
        let mut p = ReplayDoor::open(&cut).unwrap();
        p.exit(1, out(0x43, 0x34)).unwrap();
        p.disk_reads(1).unwrap();
        p.exit(2, out(0x43, 0x35)).unwrap();
        assert!(matches!(
            p.disk_reads(2),
            Err(DoorError::LogEnded { exit: 2 })
        ));
    }

    #[test]
    fn a_log_cut_at_a_frame_boundary_ends_the_replay_cleanly() {
        let dir = tempfile::tempdir().unwrap();
        let (path, _) = record(dir.path());
        let bytes = std::fs::read(&path).unwrap();
        let (_, frames) = ft_log::decode_all(&bytes).unwrap();
        let cut = dir.path().join("cut.log");
        std::fs::write(&cut, &bytes[..frames[1].offset as usize]).unwrap();
        let mut p = ReplayDoor::open(&cut).unwrap();
        p.exit(1, out(0x43, 0x34)).unwrap();
        assert!(matches!(
            p.clock_ns(1),
            Err(DoorError::LogEnded { exit: 1 })
        ));
    }
}
