//! The run loop: `KVM_RUN`, the dispatch of each exit to the devices and
//! the door, the stop points, going live, idling on HLT, arming the
//! deadline kicker, and the end of a run (the end entry and its digest).

use std::time::Instant;

use ft_log::{ExitKind, ExitRecord};
use kvm_ioctls::VcpuExit;
use tracing::{debug, info, warn};

use std::path::Path;
use std::time::Duration;

use kvm_bindings::KVM_MEM_LOG_DIRTY_PAGES;

use super::kvm::{kvm_err, set_memslots};
use super::{takeover_snapshot_path, AfterTakeover, JoinStep, Vm, VmError, VmExit};
use crate::deadline::{kick_after, KickInputs};
use crate::emulate;
use crate::nondet::LiveDoor;
use crate::nondet::{Mode, Wake};
use crate::record::{log_header, RecordDoor, VmSource};
use crate::shared_disk::ViewMode;
use crate::watchdog::ProgressWatchdog;

/// Tell the progress watchdog about a port exit (and console output: a
/// write to COM1's data register); print its warning, once per stall.
fn watch_port(wd: &mut ProgressWatchdog, port: u16, write: bool) {
    if write && port == crate::devices::serial::COM1_BASE {
        wd.on_console_output(Instant::now());
    }
    if wd.count_port_exit(port) {
        if let Some(w) = wd.check(Instant::now()) {
            eprintln!("{w}");
        }
    }
}

fn exit_value(data: &[u8]) -> u64 {
    let mut b = [0u8; 8];
    let n = data.len().min(8);
    b[..n].copy_from_slice(&data[..n]);
    u64::from_le_bytes(b)
}

impl Vm {
    fn exit(&mut self, rec: ExitRecord) -> Result<(), VmError> {
        let pos = self.positions.exit().exit;
        self.door.exit(pos, rec)?;
        Ok(())
    }

    /// The run ended: the door logs the end (record), checks it against
    /// the recording's (replay) or lets it be (live).
    fn finish(&mut self, exit: VmExit) -> Result<VmExit, VmError> {
        let pos = self.positions.now().exit;
        let (mem, vcpu) = (&self.mem, &self.vcpu);
        let mut taken = None;
        self.door.finish(pos, &exit.to_string(), &mut || {
            taken
                .get_or_insert_with(|| super::persist::state_digest_of(mem, vcpu))
                .clone()
        })?;
        if taken.is_some() {
            self.final_digest = taken;
        }
        Ok(exit)
    }

    /// Run the guest until it resets, halts or fails.
    pub fn run(&mut self) -> Result<VmExit, VmError> {
        let r = self.run_inner();
        let _ = self.door.flush();
        // The stop handle stays attached: a stop asked for while the caller
        // finishes up (releasing output, closing the channel) just kicks a
        // vCPU that no longer runs.
        r
    }

    fn run_inner(&mut self) -> Result<VmExit, VmError> {
        let mut counted = true;
        let mut last_exit_at = Instant::now();
        loop {
            if let Some(live) = self.door.replayer().and_then(|r| r.take_live()) {
                self.take_over(live)?;
            }
            if counted || self.door.mode() == Mode::Live {
                self.boundary()?;
            } else if self.door.recorder().is_some() {
                self.kick_boundary(&mut last_exit_at)?;
            }
            if let Some(pair) = self.pair.as_mut() {
                pair.boundary(self.door.as_mut(), self.positions.now().exit)?;
                match pair.join_step() {
                    JoinStep::Idle => {}
                    JoinStep::Begin => self.begin_copy()?,
                    JoinStep::RoundSent => self.copy_round()?,
                }
            }
            if let Some(end) = self.stop_point(counted)? {
                return Ok(end);
            }
            if self.door.mode() != Mode::Replay {
                self.arm_deadline(last_exit_at);
            }
            let t0 = Instant::now();
            let exit = self.vcpu.fd.run();
            self.stats.in_guest += t0.elapsed();
            counted = true;
            match exit {
                Ok(VcpuExit::IoIn(port, data)) => {
                    let rec = ExitRecord {
                        kind: ExitKind::PioIn,
                        addr: port as u64,
                        data: data.len() as u64,
                    };
                    let pos = self.positions.exit().exit;
                    self.stats.exit("pio_in");
                    watch_port(&mut self.watchdog, port, false);
                    self.door.exit(pos, rec)?;
                    self.devices.pio_in(pos, port, data, self.door.as_mut())?;
                }
                Ok(VcpuExit::IoOut(port, data)) => {
                    let rec = ExitRecord {
                        kind: ExitKind::PioOut,
                        addr: port as u64,
                        data: exit_value(data),
                    };
                    let pos = self.positions.exit().exit;
                    self.stats.exit("pio_out");
                    watch_port(&mut self.watchdog, port, true);
                    self.door.exit(pos, rec)?;
                    self.devices.pio_out(pos, port, data, self.door.as_mut())?;
                    if self.devices.i8042.reset_requested() {
                        return self.finish(VmExit::Reset);
                    }
                    self.handle_console_events()?;
                }
                Ok(VcpuExit::MmioRead(addr, data)) => {
                    let rec = ExitRecord {
                        kind: ExitKind::MmioRead,
                        addr,
                        data: data.len() as u64,
                    };
                    let pos = self.positions.exit().exit;
                    self.stats.exit("mmio_read");
                    self.door.exit(pos, rec)?;
                    if !self.devices.mmio_read(addr, data) {
                        debug!(addr = format!("{addr:#x}"), "MMIO read with no device");
                    }
                }
                Ok(VcpuExit::MmioWrite(addr, data)) => {
                    let rec = ExitRecord {
                        kind: ExitKind::MmioWrite,
                        addr,
                        data: exit_value(data),
                    };
                    let pos = self.positions.exit().exit;
                    self.stats.exit("mmio_write");
                    self.door.exit(pos, rec)?;
                    Self::supply_disk_reads(&mut self.devices.mmio, self.door.as_mut(), pos)?;
                    if !self.devices.mmio_write(addr, data, &self.mem)? {
                        debug!(addr = format!("{addr:#x}"), "MMIO write with no device");
                    }
                    self.transmit_frames()?;
                    self.shared_disk_io(pos)?;
                }
                Ok(VcpuExit::Hlt) => {
                    self.stats.exit("hlt");
                    self.exit(ExitRecord {
                        kind: ExitKind::Hlt,
                        addr: 0,
                        data: 0,
                    })?;
                    if self.vcpu.fd.get_kvm_run().if_flag == 0 {
                        return self.finish(VmExit::Halted);
                    }
                    if !self.devices.pic.has_interrupt() {
                        self.idle()?;
                    }
                }
                Ok(VcpuExit::IrqWindowOpen) => {
                    self.stats.exit("irq_window");
                    self.exit(ExitRecord {
                        kind: ExitKind::IrqWindow,
                        addr: 0,
                        data: 0,
                    })?;
                }
                Ok(VcpuExit::InternalError) => {
                    self.stats.exit("emulation_failure");
                    self.exit(ExitRecord {
                        kind: ExitKind::Emulated,
                        addr: 0,
                        data: 0,
                    })?;
                    let done = emulate::complete(&mut self.vcpu, &self.mem)?;
                    *self.stats.emulated.entry(done.name()).or_default() += 1;
                }
                Ok(VcpuExit::Shutdown) => {
                    let regs = self.vcpu.fd.get_regs().map_err(kvm_err("GET_REGS"))?;
                    let sregs = self.vcpu.fd.get_sregs().map_err(kvm_err("GET_SREGS"))?;
                    return Err(VmError::TripleFault {
                        rip: regs.rip,
                        cr0: sregs.cr0,
                        cr3: sregs.cr3,
                        exits: self.positions.now().exit,
                    });
                }
                Ok(VcpuExit::FailEntry(reason, _)) => return Err(VmError::FailEntry(reason)),
                Ok(VcpuExit::Intr) => {
                    counted = false;
                    self.stats.exit("kick");
                    self.vcpu.fd.set_kvm_immediate_exit(0);
                }
                Ok(other) => {
                    return Err(VmError::UnexpectedExit(
                        format!("{other:?}"),
                        self.positions.now().exit,
                    ))
                }
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                    // A kick (signal or immediate_exit): not a guest-caused exit.
                    if tracing::enabled!(tracing::Level::TRACE) {
                        let rip = self.vcpu.fd.get_regs().map(|r| r.rip).unwrap_or(0);
                        tracing::trace!(rip = format!("{rip:#x}"), "kick");
                    }
                    counted = false;
                    self.stats.exit("kick");
                    self.vcpu.fd.set_kvm_immediate_exit(0);
                }
                Err(e) => {
                    return Err(VmError::Kvm {
                        what: "RUN",
                        source: e,
                    })
                }
            }
            if counted {
                last_exit_at = Instant::now();
            }
        }
    }

    /// At a boundary: end the run here if a stop was requested (live or
    /// recording) or, replaying, if the recording was stopped here.
    fn stop_point(&mut self, counted: bool) -> Result<Option<VmExit>, VmError> {
        let pos = self.positions.now().exit;
        if let Some(replayer) = self.door.replayer() {
            if counted && replayer.stopped_at(pos, super::STOPPED)? {
                return self.finish(VmExit::Stopped).map(Some);
            }
            if let Some(reason) = self.stop.requested() {
                eprintln!("vmft: replay stopped by {reason} at exit {pos}");
                return Ok(Some(VmExit::Stopped));
            }
            return Ok(None);
        }
        let Some(reason) = self.stop.requested() else {
            return Ok(None);
        };
        info!(%reason, pos, "stopping");
        if !counted && self.door.recorder().is_some() {
            // Stopped between exits: an epoch takes the backup to exactly
            // this state, so the end entry's digest is the backup's too.
            self.cut_epoch()?;
        }
        self.finish(VmExit::Stopped).map(Some)
    }

    /// The replaying door handed over `live`: the log ended without an end
    /// entry and the gate let this side go live. From here on this VM is
    /// the primary: live, or recording for a future backup.
    fn take_over(&mut self, live: LiveDoor) -> Result<(), VmError> {
        let exit = self.positions.now().exit;
        eprintln!("vmft: the log ends at exit {exit} without an end entry: the backup goes live");
        if let Some(out) = self.live_console.take() {
            self.devices.serial.console().set_sink(out);
        }
        // Clocks continue from the last logged time; re-arm host-side hints.
        self.clock_start = Instant::now();
        self.clock_base_ns = live.now_ns();
        tracing::debug!(
            clock_ns = self.clock_base_ns,
            next_tick_ns = ?self.devices.pit.next_irq0_ns(),
            "live"
        );
        let mut live = live;
        // Shared disks: read the images from now on (the gate wrote the
        // writes the primary may not have written before letting go).
        for v in self.devices.mmio.shared_views() {
            v.set_mode(ViewMode::Direct);
        }
        if let Some(sd) = self.shared_disk.as_mut() {
            if let Some(out) = sd.live_out.take() {
                sd.out = out;
            }
        }
        if let Some(out) = self.net.as_mut().and_then(|n| n.live_out.take()) {
            if let Some(n) = self.net.as_mut() {
                n.out = out;
            }
        }
        if let (Some(tap), Some(mac)) =
            (self.net.as_ref().and_then(|n| n.tap.clone()), self.net_mac)
        {
            // This side's tap now receives for the guest; the bridge learns
            // that the guest's MAC lives here.
            let stale = crate::netio::discard_queued(&tap);
            tracing::debug!(
                stale,
                "frames queued on the tap before the takeover discarded"
            );
            crate::netio::spawn_reader(tap.clone(), live.attach_net(), self._kicker)
                .map_err(|e| VmError::Devices(format!("cannot start the tap reader: {e}")))?;
            crate::netio::announce(&tap, mac);
        }
        match std::mem::take(&mut self.after_takeover) {
            AfterTakeover::Live => self.door = Box::new(live),
            AfterTakeover::Record { log, epoch_bound } => {
                self.start_recording(live, &log, epoch_bound)?;
            }
        }
        Ok(())
    }

    /// Turn this live VM into a recorder: save the state now as the new
    /// log's starting point, turn on dirty logging, and log from here to
    /// `log`.
    fn start_recording(
        &mut self,
        live: LiveDoor,
        log: &Path,
        epoch_bound: Duration,
    ) -> Result<(), VmError> {
        let err = |detail: String| VmError::TakeoverLog {
            path: log.display().to_string(),
            detail,
        };
        let snap = takeover_snapshot_path(log);
        self.settle()?;
        self.save_snapshot_at(&snap, live.now_ns())?;
        let header = log_header(&VmSource::Restore {
            snapshot: snap.clone(),
            disks: self.disks.clone(),
            nets: self.nets.clone(),
        })
        .map_err(|e| err(e.to_string()))?;
        // Pages the guest wrote before this point are in the snapshot; the
        // dirty log starts clean when it is turned on.
        set_memslots(&self.vmfd, &self.mem, KVM_MEM_LOG_DIRTY_PAGES, false)?;
        self.epoch_pages = Default::default();
        self.epoch_bound = epoch_bound;
        self.door = Box::new(RecordDoor::create(log, &header, live)?);
        eprintln!(
            "vmft: recording from exit {} to {} (the state there is in {})",
            self.positions.now().exit,
            log.display(),
            snap.display()
        );
        Ok(())
    }

    /// Arm the deadline kicker after a stop, by the policy in
    /// [`crate::deadline`]: live, at the next timer tick; recording, once an
    /// event waits and the exit-free stretch has reached the epoch bound.
    /// Called after every stop, counted or not, so a guest that runs
    /// without exits is always kicked when a kick can deliver something.
    fn arm_deadline(&mut self, last_exit_at: Instant) {
        let recording = self.door.recorder().is_some();
        let waiting = self.devices.pic.has_interrupt() || (recording && self.door.pending(None));
        let after = kick_after(KickInputs {
            recording,
            now_ns: self.door_clock_hint(),
            next_tick_ns: self.devices.pit.next_irq0_ns(),
            waiting,
            since_exit: last_exit_at.elapsed(),
            epoch_bound: self.epoch_bound,
        });
        tracing::trace!(?after, waiting, "deadline armed");
        self.deadline.set(after);
    }

    /// Host-side estimate of the guest clock for arming the deadline kicker
    /// (never handed to the guest, so it needs no logging).
    fn door_clock_hint(&self) -> u64 {
        self.clock_base_ns + self.clock_start.elapsed().as_nanos() as u64
    }

    /// The guest executed HLT with interrupts enabled: wait for the next
    /// timer deadline or console input.
    fn idle(&mut self) -> Result<(), VmError> {
        let t0 = Instant::now();
        // The vCPU is not in the guest; the deadline thread need not kick.
        self.deadline.set(None);
        let wake = self.door.wait(self.devices.pit.next_irq0_ns());
        self.stats.idle += t0.elapsed();
        if wake == Wake::Never {
            let rip = self.vcpu.fd.get_regs().map(|r| r.rip).unwrap_or(0);
            warn!("guest idle with nothing to wake it");
            return Err(VmError::IdleForever { rip });
        }
        // A kick that raced with the wait leaves immediate_exit set; clear it.
        self.vcpu.fd.set_kvm_immediate_exit(0);
        Ok(())
    }
}
