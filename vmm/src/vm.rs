//! The VM: KVM objects, guest memory, devices, the door, and the run loop
//! that turns guest exits into device calls and interrupt injections.
//!
//! Run loop, one iteration per guest-caused exit:
//! 1. at the exit boundary, take what the outside world offers through the
//!    door (timer due? console input?) and raise device interrupt lines;
//! 2. if the PIC asserts INTR, inject with `KVM_INTERRUPT` when KVM is
//!    ready, else request an interrupt window;
//! 3. arm the deadline kicker for the next timer interrupt and `KVM_RUN`;
//! 4. dispatch the exit (port I/O to devices, HLT waits in the door,
//!    emulation failures to [`crate::emulate`], reset/halt/triple fault end
//!    the run).

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use ft_log::{Epoch, ExitKind, ExitRecord, LogHeader};
use kvm_bindings::{kvm_userspace_memory_region, KVM_MEM_LOG_DIRTY_PAGES};
use kvm_ioctls::{Kvm, VcpuExit, VmFd};
use sha2::{Digest, Sha256};
use thiserror::Error;
use tracing::{debug, info, warn};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

use crate::boot::{self, BootConfig, BootError};
use crate::deadline::{kick_after, KickInputs};
use crate::devices::serial::{ConsoleEvent, ConsoleOut};
use crate::devices::Devices;
use crate::emulate::{self, EmulationError};
use crate::nondet::{Door, DoorError, ExitCounter, LiveDoor, Mode, Position, PositionSource, Wake};
use crate::record::{RecordDoor, RecordStats};

use crate::epoch::EpochPages;
use crate::memory::{decode_memory, encode_memory, mem_bytes, memory_digest, PAGE};
use crate::replay::ReplayDoor;
use crate::snapshot::{self, pod_bytes, Decoder, Encoder, SnapshotError};
use crate::stats::Stats;
use crate::stop::StopHandle;
use crate::vcpu::{fingerprint, DeadlineKicker, Kicker, Vcpu, VcpuError, VcpuState};
use crate::watchdog::{ProgressWatchdog, WatchdogConfig};

/// KVM's TSS address for VMX hosts (three pages below 4 GiB).
const TSS_ADDR: usize = 0xfffb_d000;

/// Errors that end a VM run.
#[derive(Debug, Error)]
pub enum VmError {
    /// KVM could not be opened or a VM-level call failed.
    #[error("KVM {what}: {source}")]
    Kvm {
        /// Which call.
        what: &'static str,
        /// errno.
        source: kvm_ioctls::Error,
    },
    /// Preparing the boot failed.
    #[error(transparent)]
    Boot(#[from] BootError),
    /// A vCPU call failed.
    #[error(transparent)]
    Vcpu(#[from] VcpuError),
    /// An instruction could not be emulated.
    #[error("guest stopped: {0}")]
    Emulation(#[from] EmulationError),
    /// The guest triple-faulted (KVM_EXIT_SHUTDOWN).
    #[error("guest triple fault (shutdown) at RIP {rip:#x}, CR0 {cr0:#x}, CR3 {cr3:#x}, after {exits} exits")]
    TripleFault {
        /// Guest RIP.
        rip: u64,
        /// CR0.
        cr0: u64,
        /// CR3.
        cr3: u64,
        /// Exits so far.
        exits: u64,
    },
    /// The guest kernel panicked.
    #[error("guest kernel panic: {message}{hint}")]
    GuestPanic {
        /// The panic line.
        message: String,
        /// What probably caused it.
        hint: &'static str,
    },
    /// The guest halted with interrupts enabled and nothing can wake it.
    #[error("guest is idle with no timer armed and no input possible: it would wait forever (RIP {rip:#x})")]
    IdleForever {
        /// Guest RIP.
        rip: u64,
    },
    /// KVM refused to enter the guest.
    #[error("KVM could not enter the guest: hardware entry failure reason {0:#x}")]
    FailEntry(u64),
    /// An exit the monitor does not handle.
    #[error("unexpected vCPU exit {0} at exit number {1}")]
    UnexpectedExit(String, u64),
    /// Snapshot save or restore failed.
    #[error(transparent)]
    Snapshot(#[from] SnapshotError),
    /// Recording or replay failed (log error or divergence).
    #[error(transparent)]
    Door(#[from] DoorError),
    /// The replay reached the recording's end in a different state.
    #[error("divergence at the end (exit {exit}): the primary ended with {primary}, the backup with {backup}")]
    FinalDivergence {
        /// Exit number of the end.
        exit: u64,
        /// The primary's reason and digest.
        primary: String,
        /// The backup's.
        backup: String,
    },
    /// An epoch from the log could not be applied.
    #[error("epoch {index} after exit {exit} cannot be applied: {detail}")]
    BadEpoch {
        /// Epoch number.
        index: u64,
        /// Exit number.
        exit: u64,
        /// What is wrong.
        detail: String,
    },
}

/// How a run ended without error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VmExit {
    /// The guest reset the machine (reboot, i8042 command 0xFE).
    Reset,
    /// The guest halted with interrupts disabled (power-off / halt).
    Halted,
    /// Stopped on request (the console escape or a signal) at a boundary;
    /// a recording ends there with a complete log.
    Stopped,
}

impl std::fmt::Display for VmExit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            VmExit::Reset => write!(f, "guest reset the machine (reboot)"),
            VmExit::Halted => write!(f, "guest halted (powered off)"),
            VmExit::Stopped => write!(f, "guest stopped on request"),
        }
    }
}

/// Fault-tolerance role of a run.
pub enum FtMode {
    /// No logging.
    Live,
    /// Record to a log; cut an epoch after `epoch_bound` without an
    /// exit while an interrupt waits.
    Record {
        /// Where the log goes.
        log: LogSink,
        /// The log's header (configuration and its hash).
        header: LogHeader,
        /// Longest exit-free stretch before an epoch.
        epoch_bound: Duration,
    },
    /// Replay from an opened log.
    Replay {
        /// The log.
        door: Box<ReplayDoor>,
        /// Go live when the log ends without an end entry.
        go_live: bool,
        /// Where console output goes once live, if the console sink given
        /// in [`RunOptions`] does not switch by itself.
        live_out: Option<Box<dyn Write + Send>>,
    },
}

/// Where a recording goes.
pub enum LogSink {
    /// A file, created (or truncated).
    File(PathBuf),
    /// Any byte stream (the logging channel), named in errors.
    Stream {
        /// The bytes' destination.
        sink: Box<dyn Write + Send>,
        /// Its name in errors.
        name: String,
    },
}

/// What a side of a fault-tolerant pair adds to the run loop: called at
/// every boundary (guest-caused exit or kick) once the events of that
/// boundary are delivered, with the door (to flush the log for an output
/// barrier, to log the released offset) and the position. An error ends
/// the run (a lost claim, a channel failure that leaves nothing to do).
pub trait PairHooks: Send {
    /// One boundary.
    fn boundary(&mut self, door: &mut dyn Door, pos: u64) -> Result<(), DoorError>;
}

/// Memory size (MiB) and command line of a snapshot file.
pub fn snapshot_summary(path: &Path) -> Result<(u64, String), SnapshotError> {
    let body = snapshot::read_file(path)?;
    let mut d = Decoder::new(&body);
    let mem_mib = d.u64()?;
    let cmdline = String::from_utf8_lossy(d.bytes()?).into_owned();
    Ok((mem_mib, cmdline))
}

/// Options of a run beyond the boot configuration.
pub struct RunOptions {
    /// Fault-tolerance role.
    pub ft: FtMode,
    /// Save a snapshot when the guest prints its ready marker.
    pub snapshot_on_ready: Option<PathBuf>,
    /// Console input (stdin), if any.
    pub console_in: Option<Box<dyn Read + Send>>,
    /// Console output.
    pub console_out: Box<dyn Write + Send>,
    /// Stop requests (console escape, signals) for this run.
    pub stop: StopHandle,
    /// The pair role's hooks (primary or backup), if in a pair.
    pub pair: Option<Box<dyn PairHooks>>,
}

/// A virtual machine with one vCPU.
///
/// Field order is drop order, and it matters: the vCPU and the VM fd go
/// first, guest memory after them, so memory KVM maps through the memory
/// slots stays mapped for as long as the VM fd exists (the `SAFETY` claim
/// of [`set_memslots`]).
pub struct Vm {
    vcpu: Vcpu,
    vmfd: VmFd,
    _kvm: Kvm,
    /// Kicks the vCPU from a helper thread; stopped (joined) on drop.
    deadline: DeadlineKicker,
    _kicker: Kicker,
    devices: Devices,
    door: Box<dyn Door>,
    /// The role the VM has been running in; `door.mode()` says the role
    /// now, and a difference means a backup just went live.
    mode: Mode,
    /// Longest exit-free stretch before the recorder cuts an epoch.
    epoch_bound: Duration,
    /// Digest of the state the run ended in, once taken.
    final_digest: Option<String>,
    epochs: u64,
    /// Console sink to switch to when a backup goes live.
    live_console: Option<Box<dyn Write + Send>>,
    epoch_pages: EpochPages,
    clock_start: Instant,
    clock_base_ns: u64,
    positions: Box<dyn PositionSource>,
    snapshot_on_ready: Option<PathBuf>,
    stop: StopHandle,
    pair: Option<Box<dyn PairHooks>>,
    /// Says so when a silent guest spins on one device.
    watchdog: ProgressWatchdog,
    mem_mib: u64,
    cmdline: String,
    /// Guest memory: dropped after the VM fd (see above).
    mem: GuestMemoryMmap,
    /// Statistics of this run.
    pub stats: Stats,
}

fn kvm_err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmError {
    move |source| VmError::Kvm { what, source }
}

/// Register every region of `mem` with KVM, or delete the slots.
fn set_memslots(vm: &VmFd, mem: &GuestMemoryMmap, flags: u32, delete: bool) -> Result<(), VmError> {
    for (slot, region) in mem.iter().enumerate() {
        let host = mem
            .get_host_address(region_start(region))
            .expect("region start is mapped");
        let r = kvm_userspace_memory_region {
            slot: slot as u32,
            flags,
            guest_phys_addr: region_start(region).0,
            memory_size: if delete { 0 } else { region_len(region) },
            userspace_addr: host as u64,
        };
        // SAFETY: the host range belongs to `mem`, which the Vm owns and
        // keeps mapped for as long as the VM fd exists (size 0 deletes).
        unsafe { vm.set_user_memory_region(r) }.map_err(kvm_err("SET_USER_MEMORY_REGION"))?;
    }
    Ok(())
}

fn create_kvm(mem: &GuestMemoryMmap, dirty_log: bool) -> Result<(Kvm, VmFd, Vcpu), VmError> {
    let kvm = Kvm::new().map_err(kvm_err("open /dev/kvm"))?;
    let vm = kvm.create_vm().map_err(kvm_err("CREATE_VM"))?;
    vm.set_tss_address(TSS_ADDR)
        .map_err(kvm_err("SET_TSS_ADDR"))?;
    let flags = if dirty_log {
        KVM_MEM_LOG_DIRTY_PAGES
    } else {
        0
    };
    set_memslots(&vm, mem, flags, false)?;
    let fd = vm.create_vcpu(0).map_err(kvm_err("CREATE_VCPU"))?;
    let vcpu = Vcpu::new(&kvm, fd)?;
    Ok((kvm, vm, vcpu))
}

fn region_start<R: vm_memory::GuestMemoryRegion>(r: &R) -> GuestAddress {
    r.start_addr()
}

fn region_len<R: vm_memory::GuestMemoryRegion>(r: &R) -> u64 {
    r.len()
}

/// What a new [`Vm`] is built from (fresh boot or snapshot).
struct Parts {
    kvm: Kvm,
    vmfd: VmFd,
    vcpu: Vcpu,
    mem: GuestMemoryMmap,
    mem_mib: u64,
    cmdline: String,
    devices: Devices,
    kicker: Kicker,
    clock_ns: u64,
    pos: Position,
}

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
    fn assemble(parts: Parts, opts: RunOptions) -> Result<Vm, VmError> {
        let Parts {
            kvm,
            vmfd,
            vcpu,
            mem,
            mem_mib,
            cmdline,
            devices,
            kicker,
            clock_ns,
            pos,
        } = parts;
        opts.stop.attach(kicker);
        let live = LiveDoor::new(clock_ns, opts.console_in, kicker);
        let mut live_console = None;
        let (door, mode, epoch_bound): (Box<dyn Door>, Mode, Duration) = match opts.ft {
            FtMode::Live => (Box::new(live), Mode::Live, Duration::MAX),
            FtMode::Record {
                log,
                header,
                epoch_bound,
            } => (
                Box::new(match log {
                    LogSink::File(path) => RecordDoor::create(&path, &header, live)?,
                    LogSink::Stream { sink, name } => {
                        RecordDoor::to_writer(sink, name, &header, live)?
                    }
                }),
                Mode::Record,
                epoch_bound,
            ),
            FtMode::Replay {
                mut door,
                go_live,
                live_out,
            } => {
                if go_live {
                    door.go_live_on_end(live);
                }
                live_console = live_out;
                (door, Mode::Replay, Duration::MAX)
            }
        };
        Ok(Vm {
            _kvm: kvm,
            vcpu,
            mem,
            mem_mib,
            cmdline,
            devices,
            door,
            mode,
            epoch_bound,
            final_digest: None,
            epochs: 0,
            live_console,
            epoch_pages: EpochPages::default(),
            vmfd,
            clock_start: Instant::now(),
            clock_base_ns: clock_ns,
            deadline: DeadlineKicker::start(kicker),
            _kicker: kicker,
            positions: Box::new(ExitCounter::starting_at(pos)),
            snapshot_on_ready: opts.snapshot_on_ready,
            stop: opts.stop,
            pair: opts.pair,
            watchdog: ProgressWatchdog::new(WatchdogConfig::default(), Instant::now())
                .expect("the default watchdog configuration is valid"),
            stats: Stats::default(),
        })
    }

    /// Create a VM and load the kernel for a fresh boot.
    pub fn boot(cfg: &BootConfig, opts: RunOptions) -> Result<Vm, VmError> {
        let mem = boot::create_memory(cfg.mem_mib)?;
        let info = boot::load(&mem, cfg)?;
        info!(entry = format!("{:#x}", info.entry), format = ?info.format, "kernel loaded");
        let dirty_log = matches!(opts.ft, FtMode::Record { .. });
        let (kvm, vmfd, mut vcpu) = create_kvm(&mem, dirty_log)?;
        let sregs = vcpu.fd.get_sregs().map_err(kvm_err("GET_SREGS"))?;
        vcpu.fd
            .set_sregs(&boot::boot_sregs(sregs))
            .map_err(kvm_err("SET_SREGS"))?;
        vcpu.fd
            .set_regs(&boot::boot_regs(&info))
            .map_err(kvm_err("SET_REGS"))?;
        vcpu.fd
            .set_fpu(&boot::boot_fpu())
            .map_err(kvm_err("SET_FPU"))?;
        let kicker = vcpu.arm_kick()?;
        let devices = Devices::new(ConsoleOut::new(opts.console_out));
        let opts = RunOptions {
            console_out: Box::new(std::io::sink()),
            ..opts
        };
        Self::assemble(
            Parts {
                kvm,
                vmfd,
                vcpu,
                mem,
                mem_mib: cfg.mem_mib,
                cmdline: cfg.cmdline.clone(),
                devices,
                kicker,
                clock_ns: 0,
                pos: Position::default(),
            },
            opts,
        )
    }

    /// Create a VM from `source`: boot it or restore a snapshot.
    pub fn start(source: &crate::record::VmSource, opts: RunOptions) -> Result<Vm, VmError> {
        match source {
            crate::record::VmSource::Boot(cfg) => Vm::boot(cfg, opts),
            crate::record::VmSource::Restore(path) => Vm::restore(path, opts),
        }
    }

    /// Create a VM from a snapshot file.
    pub fn restore(path: &Path, opts: RunOptions) -> Result<Vm, VmError> {
        let t0 = Instant::now();
        let body = snapshot::read_file(path)?;
        let mut d = Decoder::new(&body);
        let mem_mib = d.u64()?;
        let cmdline = String::from_utf8_lossy(d.bytes()?).into_owned();
        let clock_ns = d.u64()?;
        let exits = d.u64()?;
        let vstate = VcpuState::decode(&mut d)?;
        let console = opts.console_out;
        let opts = RunOptions {
            console_out: Box::new(std::io::sink()),
            ..opts
        };
        let devices = Devices::decode(&mut d, ConsoleOut::new(console))?;
        let mem = boot::create_memory(mem_mib)?;
        decode_memory(&mut d, &mem, (mem_mib << 20) as usize)?;
        if d.remaining() != 0 {
            return Err(SnapshotError::Invalid(format!("{} trailing bytes", d.remaining())).into());
        }
        let dirty_log = matches!(opts.ft, FtMode::Record { .. });
        let (kvm, vmfd, mut vcpu) = create_kvm(&mem, dirty_log)?;
        vcpu.restore(&vstate)?;
        let kicker = vcpu.arm_kick()?;
        info!(
            elapsed_ms = t0.elapsed().as_millis() as u64,
            "snapshot restored"
        );
        Self::assemble(
            Parts {
                kvm,
                vmfd,
                vcpu,
                mem,
                mem_mib,
                cmdline,
                devices,
                kicker,
                clock_ns,
                pos: Position { exit: exits },
            },
            opts,
        )
    }

    /// Unknown port accesses so far.
    pub fn unknown_ports(&self) -> &std::collections::BTreeMap<u16, (u64, u64)> {
        &self.devices.unknown_ports
    }

    /// Recording statistics, when recording.
    pub fn record_stats(&self) -> Option<RecordStats> {
        self.door.record_stats()
    }

    /// Guest-caused exits so far.
    pub fn position(&self) -> Position {
        self.positions.now()
    }

    /// Epochs cut (record) or applied (replay).
    pub fn epochs(&self) -> u64 {
        self.epochs
    }

    /// Save the whole VM state to `path`. The vCPU must be outside KVM_RUN
    /// with no half-done I/O (see [`Vm::settle`]).
    pub fn save_snapshot(&mut self, path: &Path) -> Result<(), VmError> {
        let t0 = Instant::now();
        let mut e = Encoder::new();
        e.u64(self.mem_mib);
        e.bytes(self.cmdline.as_bytes());
        e.u64(self.door.clock_ns(self.positions.now().exit)?);
        e.u64(self.positions.now().exit);
        self.vcpu.save()?.encode(&mut e);
        self.devices.encode(&mut e);
        encode_memory(&mut e, mem_bytes(&self.mem));
        let body = e.into_bytes();
        snapshot::write_file(path, &body)?;
        info!(
            path = %path.display(),
            bytes = body.len(),
            elapsed_ms = t0.elapsed().as_millis() as u64,
            "snapshot saved"
        );
        Ok(())
    }

    /// Let KVM finish a pending I/O instruction without running guest code
    /// (KVM_RUN with immediate_exit set), so the state is consistent.
    fn settle(&mut self) -> Result<(), VmError> {
        self.vcpu.fd.set_kvm_immediate_exit(1);
        let r = self.vcpu.fd.run().map(|_| ());
        self.vcpu.fd.set_kvm_immediate_exit(0);
        match r {
            Err(e) if e.errno() == libc::EINTR => Ok(()),
            Err(e) => Err(VmError::Kvm {
                what: "RUN (settle)",
                source: e,
            }),
            Ok(()) => Ok(()),
        }
    }

    fn handle_console_events(&mut self) -> Result<(), VmError> {
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
    fn deliver(&mut self) -> Result<(), VmError> {
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

    /// The boundary after a guest-caused exit (or any stop, live).
    fn boundary(&mut self) -> Result<(), VmError> {
        self.deliver()?;
        let pos = self.positions.now().exit;
        let (vcpu, mem) = (&self.vcpu, &self.mem);
        self.door.check(pos, &mut |with_mem| {
            (fingerprint(vcpu), with_mem.then(|| memory_digest(mem)))
        })?;
        if self.door.mode() == Mode::Replay {
            // The primary cut epochs after this exit: install each one
            // instead of executing the stretch, then its events.
            while let Some(epoch) = self.door.epoch(pos, None)? {
                self.apply_epoch(epoch)?;
                self.deliver()?;
            }
        }
        Ok(())
    }

    /// Record: a kick stopped the guest between exits. Cut an epoch if an
    /// event waits and the guest has run `epoch_bound` without an exit.
    fn kick_boundary(&mut self, last_exit_at: &mut Instant) -> Result<(), VmError> {
        let deadline = self.devices.pit.next_irq0_ns();
        if !self.door.pending(deadline) && !self.devices.pic.has_interrupt() {
            return Ok(());
        }
        if last_exit_at.elapsed() < self.epoch_bound {
            return Ok(()); // the deadline is re-armed for the bound
        }
        let epoch = self.build_epoch()?;
        self.door.epoch(self.positions.now().exit, Some(epoch))?;
        self.epochs += 1;
        self.deliver()?;
        *last_exit_at = Instant::now();
        Ok(())
    }

    fn build_epoch(&mut self) -> Result<Epoch, VmError> {
        let mut e = Encoder::new();
        self.vcpu.save()?.encode(&mut e);
        let mem = mem_bytes(&self.mem);
        let bitmap = self
            .vmfd
            .get_dirty_log(0, mem.len())
            .map_err(kvm_err("GET_DIRTY_LOG"))?;
        let mut pages = Vec::new();
        for (w, word) in bitmap.iter().enumerate() {
            let mut bits = *word;
            while bits != 0 {
                let b = bits.trailing_zeros() as usize;
                bits &= bits - 1;
                let gfn = w * 64 + b;
                if let Some(now) = mem.get(gfn * PAGE..(gfn + 1) * PAGE) {
                    pages.push(self.epoch_pages.encode(gfn as u64, now));
                }
            }
        }
        Ok(Epoch {
            pos: self.positions.now().exit,
            index: self.epochs,
            vcpu: e.into_bytes(),
            pages,
            fingerprint: fingerprint(&self.vcpu),
        })
    }

    fn apply_epoch(&mut self, epoch: Epoch) -> Result<(), VmError> {
        let bad = |detail: String| VmError::BadEpoch {
            index: epoch.index,
            exit: epoch.pos,
            detail,
        };
        // Finish the I/O of the last exit first, or KVM would complete it
        // over the installed registers.
        self.settle()?;
        let state =
            VcpuState::decode(&mut Decoder::new(&epoch.vcpu)).map_err(|e| bad(e.to_string()))?;
        self.vcpu.restore(&state)?;
        let len = self.mem_mib << 20;
        for p in &epoch.pages {
            let range = match p.byte_range(len) {
                Some(r) if p.data.len() == PAGE => r,
                _ => return Err(bad(format!("page {:#x} out of range or not 4 KiB", p.gfn))),
            };
            let page = self.epoch_pages.decode(p).map_err(bad)?;
            self.mem
                .write_slice(&page, GuestAddress(range.start))
                .map_err(|e| bad(e.to_string()))?;
        }
        self.refresh_memslots()?;
        let fp = fingerprint(&self.vcpu);
        if fp != epoch.fingerprint {
            return Err(bad(format!(
                "installed state {fp:x?} differs from the logged {:x?}",
                epoch.fingerprint
            )));
        }
        self.epochs += 1;
        Ok(())
    }

    /// Make KVM forget every translation it built from guest memory.
    ///
    /// The epoch wrote guest memory (page tables included) from the host
    /// side, and skipped the guest's own `invlpg`/CR3 writes of the stretch
    /// it replaces. Where KVM shadows guest page tables (nested hosts), such
    /// writes bypass its write tracking, so shadow pages would stay stale;
    /// on EPT hosts the guest TLB could. Deleting and re-adding the memory
    /// slot zaps all of them; the guest then faults its mappings back in.
    fn refresh_memslots(&mut self) -> Result<(), VmError> {
        set_memslots(&self.vmfd, &self.mem, 0, true)?;
        set_memslots(&self.vmfd, &self.mem, 0, false)
    }

    fn exit(&mut self, rec: ExitRecord) -> Result<(), VmError> {
        let pos = self.positions.exit().exit;
        self.door.exit(pos, rec)?;
        Ok(())
    }

    /// The digest of the state the run ended in (computed once; record and
    /// replay already needed it to write or check the end entry).
    pub fn final_digest(&mut self) -> String {
        if self.final_digest.is_none() {
            self.final_digest = Some(self.state_digest());
        }
        self.final_digest.clone().unwrap_or_default()
    }

    /// A digest of the whole state now: memory and registers.
    pub fn state_digest(&self) -> String {
        let mut h = Sha256::new();
        h.update(mem_bytes(&self.mem));
        let regs = self.vcpu.fd.get_regs().unwrap_or_default();
        h.update(pod_bytes(&regs));
        let d = h.finalize();
        d.iter().map(|b| format!("{b:02x}")).collect()
    }

    fn finish(&mut self, exit: VmExit) -> Result<VmExit, VmError> {
        let mode = self.door.mode();
        if mode == Mode::Live {
            return Ok(exit);
        }
        let reason = exit.to_string();
        let digest = self.final_digest();
        let pos = self.positions.now().exit;
        match mode {
            Mode::Live => {}
            Mode::Record => {
                self.door.end(pos, Some((reason, digest)))?;
            }
            Mode::Replay => match self.door.end(pos, None)? {
                Some((r, d)) if r == reason && d == digest => {}
                Some((r, d)) => {
                    return Err(VmError::FinalDivergence {
                        exit: pos,
                        primary: format!("{r}, digest {d}"),
                        backup: format!("{reason}, digest {digest}"),
                    })
                }
                None => {
                    return Err(VmError::FinalDivergence {
                        exit: pos,
                        primary: "no end here (the recording went on)".into(),
                        backup: format!("{reason}, digest {digest}"),
                    })
                }
            },
        }
        Ok(exit)
    }

    /// Run the guest until it resets, halts or fails.
    pub fn run(&mut self) -> Result<VmExit, VmError> {
        let r = self.run_inner();
        let _ = self.door.flush();
        self.stop.detach();
        r
    }

    fn run_inner(&mut self) -> Result<VmExit, VmError> {
        let mut counted = true;
        let mut last_exit_at = Instant::now();
        loop {
            let mode = self.door.mode();
            if mode != self.mode {
                self.went_live()?;
            }
            if counted || mode == Mode::Live {
                self.boundary()?;
            } else if mode == Mode::Record {
                self.kick_boundary(&mut last_exit_at)?;
            }
            if let Some(pair) = self.pair.as_mut() {
                pair.boundary(self.door.as_mut(), self.positions.now().exit)?;
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
                    data.fill(0xff);
                    self.stats.exit("mmio_read");
                    debug!(addr = format!("{addr:#x}"), "MMIO read with no device");
                    self.exit(rec)?;
                }
                Ok(VcpuExit::MmioWrite(addr, data)) => {
                    let rec = ExitRecord {
                        kind: ExitKind::MmioWrite,
                        addr,
                        data: exit_value(data),
                    };
                    self.stats.exit("mmio_write");
                    debug!(addr = format!("{addr:#x}"), "MMIO write with no device");
                    self.exit(rec)?;
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
        let mode = self.door.mode();
        let pos = self.positions.now().exit;
        if mode == Mode::Replay {
            if counted && self.door.stopped_at(pos, &VmExit::Stopped.to_string())? {
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
        if mode == Mode::Record && !counted {
            // Stopped between exits: an epoch takes the backup to exactly
            // this state, so the end entry's digest is the backup's too.
            let epoch = self.build_epoch()?;
            self.door.epoch(pos, Some(epoch))?;
            self.epochs += 1;
        }
        self.finish(VmExit::Stopped).map(Some)
    }

    /// The replay door went live (its log ended without an end entry):
    /// from here on this VM is the primary.
    fn went_live(&mut self) -> Result<(), VmError> {
        let exit = self.positions.now().exit;
        eprintln!("vmft: the log ends at exit {exit} without an end entry: the backup goes live");
        if let Some(out) = self.live_console.take() {
            self.devices.serial.console().set_sink(out);
        }
        // Clocks continue from the last logged time; re-arm host-side hints.
        self.clock_start = Instant::now();
        self.clock_base_ns = self.door.clock_ns(exit)?;
        self.mode = Mode::Live;
        tracing::debug!(
            clock_ns = self.clock_base_ns,
            next_tick_ns = ?self.devices.pit.next_irq0_ns(),
            "live"
        );
        Ok(())
    }

    /// Arm the deadline kicker after a stop, by the policy in
    /// [`crate::deadline`]: live, at the next timer tick; recording, once an
    /// event waits and the exit-free stretch has reached the epoch bound.
    /// Called after every stop, counted or not, so a guest that runs
    /// without exits is always kicked when a kick can deliver something.
    fn arm_deadline(&mut self, last_exit_at: Instant) {
        let recording = self.door.mode() == Mode::Record;
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
