//! Boundaries: after a guest-caused exit (or, recording, a kick), hand the
//! devices what the door offers, deliver an interrupt, check and apply
//! epochs; and the console events (init, ready marker, panic) the serial
//! scanner reports.

use std::io::Write;
use std::time::Instant;

use super::{Vm, VmError};
use crate::devices::mmio::MmioBus;
use crate::devices::serial::ConsoleEvent;
use crate::memory::memory_digest;
use crate::nondet::{Door, DoorError, Mode};
use crate::shared_disk::ViewMode;
use crate::vcpu::fingerprint;

impl Vm {
    pub(super) fn handle_console_events(&mut self) -> Result<(), VmError> {
        for ev in self.devices.serial.console().take_events() {
            match ev {
                ConsoleEvent::InitStarted => {
                    self.stats
                        .init_at
                        .get_or_insert(self.stats.started.elapsed());
                }
                ConsoleEvent::Ready => {
                    self.stats
                        .ready_at
                        .get_or_insert(self.stats.started.elapsed());
                    if let Some(path) = self.snapshot_on_ready.take() {
                        self.settle()?;
                        self.save_snapshot(&path)?;
                        eprintln!("vmft: snapshot saved to {}", path.display());
                    }
                }
                ConsoleEvent::Panic(message) => {
                    let hint = if message.contains("Attempted to kill init") {
                        " (init died: if this kernel lacks guest-images/kernel/syscall-fault.patch, \
                         its first system call fails on this KVM)"
                    } else {
                        ""
                    };
                    return Err(VmError::GuestPanic { message, hint });
                }
            }
        }
        Ok(())
    }

    /// At an exit boundary: hand the devices what the outside world offers
    /// (through the door) and inject an interrupt if the door says so.
    pub(super) fn deliver(&mut self) -> Result<(), VmError> {
        let pos = self.positions.now().exit;
        // Hold the next timer tick while the PIC still has a request to
        // deliver. Where injection points are scarce (record/replay on hosts
        // without interrupt windows), a tick due at every point would win
        // each time on priority and starve the UART; a late tick is what
        // the guest would see from a slow PIT. Depends only on PIC state,
        // so primary and backup decide alike.
        let timer_deadline = if self.door.mode() != Mode::Live && self.devices.pic.has_request() {
            None
        } else {
            self.devices.pit.next_irq0_ns()
        };
        let due = self
            .door
            .due(pos, timer_deadline, self.devices.serial.rx_room())?;
        if let Some(now) = due.timer_now {
            if self.devices.poll_timer(now) {
                self.stats.timer_irqs += 1;
            }
        }
        if !due.input.is_empty() {
            self.stats.input_bytes += due.input.len() as u64;
            self.devices.serial.receive(&due.input);
            self.devices.sync_irqs();
        }
        self.receive_frame(pos)?;
        let offer = if self.devices.pic.has_interrupt() {
            let run = self.vcpu.fd.get_kvm_run();
            let ready = run.ready_for_interrupt_injection != 0 && run.if_flag != 0;
            // The replayer injects where the log says; it offers what its PIC has.
            if ready || self.door.mode() == Mode::Replay {
                self.devices.pic.clone().acknowledge()
            } else {
                None
            }
        } else {
            None
        };
        if tracing::enabled!(tracing::Level::TRACE) && self.devices.pic.has_interrupt() {
            let run = self.vcpu.fd.get_kvm_run();
            tracing::trace!(
                pos,
                ready = run.ready_for_interrupt_injection,
                if_flag = run.if_flag,
                offer = ?offer,
                "interrupt pending at boundary"
            );
        }
        let vcpu = &self.vcpu;
        let inject = self.door.interrupt(pos, offer, &mut || fingerprint(vcpu))?;
        if let Some(vector) = inject {
            let acked = self.devices.pic.acknowledge();
            debug_assert_eq!(acked, Some(vector));
            self.vcpu.interrupt(vector)?;
            *self.stats.injected.entry(vector).or_default() += 1;
        }
        // An interrupt window would be the lowest-latency way to deliver a
        // waiting interrupt, but on nested KVM hosts whose guest kernel code
        // is emulated, the window exit lands at timing-dependent
        // instructions (measured: same exit number, different RIP on primary
        // and backup). Under record/replay a waiting interrupt goes in at the
        // next guest-caused exit where the guest can take it, or by an
        // epoch. (Single-stepping guest-kernel code until it can take the
        // interrupt was measured too: exact, but it doubled the epochs of a
        // Linux boot and slowed it down, so it is not used.)
        if self.door.mode() == Mode::Live {
            let more = self.devices.pic.has_interrupt();
            self.vcpu.fd.get_kvm_run().request_interrupt_window = more as u8;
        }
        Ok(())
    }

    /// A frame for the guest, if the door has one and the card a buffer
    /// (the same decision on both sides: the door logs or replays it).
    fn receive_frame(&mut self, pos: u64) -> Result<(), VmError> {
        let Some(card) = self.devices.mmio.net_mut() else {
            return Ok(());
        };
        let ready = card.rx_ready(&self.mem);
        let Some(frame) = self.door.net_rx(pos, ready)? else {
            return Ok(());
        };
        match card.deliver_rx(&frame, &self.mem) {
            Ok(outcome) => {
                tracing::trace!(pos, len = frame.len(), ?outcome, "frame received");
                self.stats.frames_received += 1;
            }
            // A frame outside Ethernet's sizes from the tap: dropped, on
            // both sides alike.
            Err(e) => tracing::debug!(pos, "frame dropped: {e}"),
        }
        self.devices.sync_irqs();
        Ok(())
    }

    /// The guest's transmitted frames after an exit: into the transmit
    /// stream (to the tap, held, or kept, by role).
    pub(super) fn transmit_frames(&mut self) -> Result<(), VmError> {
        let Some(card) = self.devices.mmio.net_mut() else {
            return Ok(());
        };
        let frames = card.device_mut().take_tx();
        if frames.is_empty() {
            return Ok(());
        }
        self.stats.frames_sent += frames.len() as u64;
        if let Some(net) = self.net.as_mut() {
            for f in &frames {
                net.out
                    .write_all(&crate::netio::frame_record(f))
                    .map_err(|e| VmError::Devices(format!("transmit stream: {e}")))?;
            }
        }
        Ok(())
    }

    /// Replaying, before an MMIO write (a notify may read a shared disk):
    /// hand the shared disks' views the bytes the primary read at `pos`.
    /// If the door goes live here instead, the views read the images.
    pub(super) fn supply_disk_reads(
        bus: &mut MmioBus,
        door: &mut dyn Door,
        pos: u64,
    ) -> Result<(), VmError> {
        if !bus.has_shared() {
            return Ok(());
        }
        let Some(replayer) = door.replayer() else {
            return Ok(());
        };
        let at = replayer.disk_reads(pos)?;
        if !at.reads.is_empty() {
            let mut views: Vec<_> = bus.shared_views().collect();
            for (disk, data) in at.reads {
                let Some(v) = views.iter_mut().find(|v| v.disk() == disk) else {
                    return Err(DoorError::Divergence {
                        exit: pos,
                        primary: format!("read {} bytes of shared disk {disk}", data.len()),
                        backup: "has no such shared disk".into(),
                    }
                    .into());
                };
                v.supply(data);
            }
        }
        // The log ended within this exit and the door went live: the
        // reads it did not log come from the images.
        if at.live {
            for v in bus.shared_views() {
                v.set_mode(ViewMode::Direct);
            }
        }
        Ok(())
    }

    /// After an MMIO write: the shared disks' reads go to the log
    /// (recording), their writes to the write stream; replaying, a read
    /// the log did not hold is a divergence.
    pub(super) fn shared_disk_io(&mut self, pos: u64) -> Result<(), VmError> {
        if !self.devices.mmio.has_shared() {
            return Ok(());
        }
        let mut reads = Vec::new();
        let mut writes = Vec::new();
        let mut divergence = None;
        for v in self.devices.mmio.shared_views() {
            for data in v.take_reads() {
                reads.push((v.disk(), data));
            }
            writes.extend(v.take_writes());
            if divergence.is_none() {
                divergence = v.take_divergence();
            }
        }
        if let Some(backup) = divergence {
            return Err(DoorError::Divergence {
                exit: pos,
                primary: "logged the shared-disk reads of this exit".into(),
                backup,
            }
            .into());
        }
        if !reads.is_empty() {
            let Some(rec) = self.door.recorder() else {
                return Err(VmError::Devices(
                    "a shared disk kept reads for a log, but this VM does not record".into(),
                ));
            };
            for (disk, data) in reads {
                rec.disk_read(pos, disk, data)?;
            }
        }
        if !writes.is_empty() {
            self.stats.shared_disk_bytes += writes.len() as u64;
            if let Some(sd) = self.shared_disk.as_mut() {
                if let Err(e) = sd.out.write_all(&writes) {
                    // A live side writes through: say fenced if it was.
                    self.check_fence()?;
                    return Err(VmError::Devices(format!("shared-disk write stream: {e}")));
                }
            }
        }
        self.check_fence()
    }

    /// Stop if this side was fenced off a shared disk (exit status 5), or
    /// a write to one failed (the backup, which kept it, takes over).
    pub(super) fn check_fence(&self) -> Result<(), VmError> {
        match self
            .shared_disk
            .as_ref()
            .and_then(|s| s.fenced.as_ref())
            .and_then(|f| f.get())
        {
            Some(f) if f.fenced => Err(DoorError::Fenced(f.message).into()),
            Some(f) => Err(VmError::Devices(format!(
                "writing a shared disk failed: {}",
                f.message
            ))),
            None => Ok(()),
        }
    }

    /// The boundary after a guest-caused exit (or any stop, live).
    pub(super) fn boundary(&mut self) -> Result<(), VmError> {
        self.check_fence()?;
        self.deliver()?;
        let pos = self.positions.now().exit;
        let (vcpu, mem) = (&self.vcpu, &self.mem);
        self.door.check(pos, &mut |with_mem| {
            (fingerprint(vcpu), with_mem.then(|| memory_digest(mem)))
        })?;
        // Replaying: the primary cut epochs after this exit; install each
        // one instead of executing the stretch, then its events.
        while let Some(epoch) = match self.door.replayer() {
            Some(r) => r.next_epoch(pos)?,
            None => None,
        } {
            self.apply_epoch(epoch)?;
            self.deliver()?;
        }
        Ok(())
    }

    /// Record: a kick stopped the guest between exits. Cut an epoch if an
    /// event waits and the guest has run `epoch_bound` without an exit.
    pub(super) fn kick_boundary(&mut self, last_exit_at: &mut Instant) -> Result<(), VmError> {
        let deadline = self.devices.pit.next_irq0_ns();
        if !self.door.pending(deadline) && !self.devices.pic.has_interrupt() {
            return Ok(());
        }
        if last_exit_at.elapsed() < self.epoch_bound {
            return Ok(()); // the deadline is re-armed for the bound
        }
        self.cut_epoch()?;
        self.deliver()?;
        *last_exit_at = Instant::now();
        Ok(())
    }

    /// Record: cut an epoch here and log it.
    pub(super) fn cut_epoch(&mut self) -> Result<(), VmError> {
        let epoch = self.build_epoch()?;
        let pos = self.positions.now().exit;
        if let Some(r) = self.door.recorder() {
            r.log_epoch(pos, epoch)?;
            self.epochs += 1;
        }
        Ok(())
    }
}
