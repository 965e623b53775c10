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
//!
//! The files, one job each:
//! - this one: the [`Vm`] and its assembly (fresh boot or snapshot), the
//!   run options, errors and accessors;
//! - `kvm`: the KVM objects and the memory slots;
//! - `run`: the run loop, its exit dispatch, stop points, going live,
//!   idling and the deadline kicker;
//! - `boundary`: what happens at a boundary: events, interrupt delivery,
//!   the recorder's kick boundary, console events;
//! - `epochs`: building an epoch (record) and applying it (replay);
//! - `persist`: snapshots and digests of the state.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use ft_log::LogHeader;
use kvm_ioctls::{Kvm, VmFd};
use thiserror::Error;
use tracing::info;

use crate::boot::{self, BootConfig, BootError, DiskSpec, NetSpec};
use crate::devices::mmio::MmioBus;
use crate::devices::serial::ConsoleOut;
use crate::devices::virtio::net::format_mac;
use crate::devices::virtio::{Block, BlockError, MmioTransport, Net};
use crate::devices::Devices;
use crate::emulate::EmulationError;
use crate::epoch::EpochPages;
use crate::ft::precopy::Written;
use crate::ft::transfer::DiskPart;
use crate::memory::{decode_memory, GuestMemoryMmap};
use crate::nondet::{Door, DoorError, ExitCounter, LiveDoor, Position, PositionSource};
use crate::record::{RecordDoor, RecordStats};
use crate::replay::ReplayDoor;
use crate::shared_disk::{FencedFlag, ReleaseNow, SharedDisks, ViewMode};
use crate::snapshot::{self, Decoder, SnapshotError};
use crate::stats::Stats;
use crate::stop::StopHandle;
use crate::vcpu::{DeadlineKicker, Kicker, Vcpu, VcpuError, VcpuState};
use crate::watchdog::{ProgressWatchdog, WatchdogConfig};

use kvm::{create_kvm, kvm_err};

mod boundary;
mod epochs;
mod handover;
mod kvm;
mod persist;
mod run;

pub use persist::snapshot_summary;

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
    /// A disk could not be attached.
    #[error("disk {path}: {detail}")]
    Disk {
        /// The image.
        path: String,
        /// What is wrong.
        detail: String,
    },
    /// The devices asked for do not fit this VM.
    #[error("{0}")]
    Devices(String),
    /// A device could not complete a guest request on the host (a disk
    /// read or write failed): this side stops, its disk may now differ.
    #[error("device failure: {0}")]
    Device(#[from] crate::devices::virtio::MmioError),
    /// A backup that went live could not start recording.
    #[error("cannot record after the takeover to {path}: {detail}")]
    TakeoverLog {
        /// The takeover log.
        path: String,
        /// What failed.
        detail: String,
    },
    /// Recording or replay failed (log error or divergence).
    #[error(transparent)]
    Door(#[from] DoorError),
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

/// How a stop on request is worded (in the end entry, too).
pub(crate) const STOPPED: &str = "guest stopped on request";

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
            VmExit::Stopped => f.write_str(STOPPED),
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
        /// What the VM is once live.
        then: AfterTakeover,
        /// Where console output goes once live, if the console sink given
        /// in [`RunOptions`] does not switch by itself.
        live_out: Option<Box<dyn Write + Send>>,
    },
}

impl VmError {
    /// The exit status vmft ends with for this error (see
    /// [`DoorError::exit_status`]; 1 for errors outside the door).
    pub fn exit_status(&self) -> u8 {
        match self {
            VmError::Door(d) => d.exit_status(),
            _ => 1,
        }
    }
}

/// What a backup that went live runs as.
#[derive(Debug, Clone, Default)]
pub enum AfterTakeover {
    /// Live, nothing logged.
    #[default]
    Live,
    /// A primary without a backup yet: it records from the takeover on
    /// (dirty logging on, epochs, no interrupt windows) to `log`, whose
    /// starting state is a snapshot taken at the takeover, at
    /// [`takeover_snapshot_path`] of `log` (the log's header names it).
    Record {
        /// The new log.
        log: PathBuf,
        /// Longest exit-free stretch before an epoch.
        epoch_bound: Duration,
    },
}

/// Where the state at a takeover is saved, for a takeover log at `log`.
pub fn takeover_snapshot_path(log: &Path) -> PathBuf {
    let mut p = log.as_os_str().to_owned();
    p.push(".snap");
    PathBuf::from(p)
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

    /// What a joining backup's state transfer (re-protection) asks of the
    /// run loop at this boundary.
    fn join_step(&mut self) -> JoinStep {
        JoinStep::Idle
    }

    /// Start copying memory and the own writable `disks` to the waiting
    /// backup while the guest runs; the run loop tracks what is written
    /// from now on.
    fn begin_copy(
        &mut self,
        _mem: crate::memory::GuestMemoryMmap,
        _disks: Vec<crate::devices::virtio::written::OwnImage>,
    ) -> Result<(), DoorError> {
        Err(DoorError::Ft("this side hands no state over".into()))
    }

    /// The copy round is sent and the guest wrote `written` since: `None`
    /// when it goes in another round, or it back when the run loop is to
    /// pause and hand the rest over ([`PairHooks::hand_over`]).
    fn copy_round(&mut self, written: Written) -> Option<Written> {
        Some(written)
    }

    /// The rest of the state at exit `pos`, taken in the pause, goes to the
    /// joining backup; returns where the log continues from this state on.
    fn hand_over(&mut self, _pos: u64, _rest: HandOver) -> Result<LogContinues, DoorError> {
        Err(DoorError::Ft("this side hands no state over".into()))
    }

    /// The guest runs again after a hand-over that paused it for `pause`.
    fn resumed(&mut self, _pause: Duration) {}

    /// The state could not be taken for the waiting backup (`why`): it is
    /// refused, this side goes on as it was.
    fn join_failed(&mut self, _why: &str) {}
}

/// What a joining backup's state transfer asks of the run loop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JoinStep {
    /// Nothing.
    Idle,
    /// A backup waits: turn page tracking on, clean, and begin the copy
    /// ([`PairHooks::begin_copy`]).
    Begin,
    /// A copy round is sent: hand over the pages written since
    /// ([`PairHooks::copy_round`]).
    RoundSent,
}

/// The part of the state taken in the pause of a hand-over.
pub struct HandOver {
    /// Pages written since the last copy round, in order.
    pub pages: Vec<u64>,
    /// Their bytes (4096 per page, in the same order).
    pub data: Vec<u8>,
    /// The own writable disks' chunks written since the last round.
    pub disks: Vec<DiskPart>,
    /// The snapshot body up to its memory section: vCPU and devices.
    pub state: Vec<u8>,
}

/// Where a recording continues after a hand-over of the state to a new
/// backup (re-protection).
pub struct LogContinues {
    /// The log's bytes.
    pub sink: Box<dyn Write + Send>,
    /// Its name in errors.
    pub name: String,
    /// Longest exit-free stretch before an epoch.
    pub epoch_bound: Duration,
}

/// Options of a run beyond the boot configuration.
pub struct RunOptions {
    /// Fault-tolerance role.
    pub ft: FtMode,
    /// Save a snapshot when the guest prints its ready marker.
    pub snapshot_on_ready: Option<PathBuf>,
    /// Console input (stdin), if any.
    pub console_in: Option<Box<dyn crate::nondet::InputSource>>,
    /// Console output.
    pub console_out: Box<dyn Write + Send>,
    /// Stop requests (console escape, signals) for this run.
    pub stop: StopHandle,
    /// The pair role's hooks (primary or backup), if in a pair.
    pub pair: Option<Box<dyn PairHooks>>,
    /// The host side of the network card, if the VM has one.
    pub net: Option<NetIo>,
    /// The host side of the shared disks. `None`: built from the disk
    /// list, writing the images directly (or, replaying, only once live).
    pub shared_disk: Option<SharedDiskIo>,
}

/// The host side of the shared disks (see [`crate::shared_disk`]).
pub struct SharedDiskIo {
    /// The shared disks, opened.
    pub disks: SharedDisks,
    /// Where the write stream goes: the images when live, held for the
    /// output rule on a primary, kept for a takeover on a backup.
    pub out: Box<dyn Write + Send>,
    /// Switched to at a takeover, if `out` does not switch by itself.
    pub live_out: Option<Box<dyn Write + Send>>,
    /// Set when the sink was fenced off: the run stops (exit status 5).
    pub fenced: Option<FencedFlag>,
}

impl SharedDiskIo {
    /// Shared disks written directly by this process; replaying, written
    /// only from a takeover on.
    pub fn direct(disks: SharedDisks, replaying: bool) -> Self {
        let sink = || Box::new(ReleaseNow::new(disks.sink(Vec::new()))) as Box<dyn Write + Send>;
        let (out, live_out) = if replaying {
            (
                Box::new(std::io::sink()) as Box<dyn Write + Send>,
                Some(sink()),
            )
        } else {
            (sink(), None)
        };
        SharedDiskIo {
            disks,
            out,
            live_out,
            fenced: None,
        }
    }
}

/// The host side of a network card.
pub struct NetIo {
    /// The tap: read from while this side is live (at once when live or
    /// recording, from the takeover on for a backup), announced on at a
    /// takeover. `None`: frames are never received (a replay).
    pub tap: Option<std::sync::Arc<crate::devices::virtio::Tap>>,
    /// Where the guest's transmitted frames go, as the framed stream of
    /// [`crate::netio`]: the tap when live, held for the output rule on a
    /// primary, kept for a takeover on a backup.
    pub out: Box<dyn Write + Send>,
    /// Switched to at a takeover, if `out` does not switch by itself
    /// (`vmft replay --go-live`: frames are dropped until live).
    pub live_out: Option<Box<dyn Write + Send>>,
}

/// A virtual machine with one vCPU.
///
/// Field order is drop order, and it matters: the vCPU and the VM fd go
/// first, guest memory after them, so memory KVM maps through the memory
/// slots stays mapped for as long as the VM fd exists (the `SAFETY` claim
/// of [`kvm::set_memslots`]).
pub struct Vm {
    vcpu: Vcpu,
    vmfd: VmFd,
    _kvm: Kvm,
    /// Kicks the vCPU from a helper thread; stopped (joined) on drop.
    deadline: DeadlineKicker,
    _kicker: Kicker,
    devices: Devices,
    /// The door of the VM's role: live, recording or replaying. A
    /// replaying door hands over a live door when the backup may go live
    /// ([`crate::nondet::Replayer::take_live`]); the VM then swaps in the
    /// door of its role after the takeover.
    door: Box<dyn Door>,
    /// What a replaying VM becomes once live.
    after_takeover: AfterTakeover,
    /// Longest exit-free stretch before the recorder cuts an epoch.
    epoch_bound: Duration,
    /// Digest of the state the run ended in, once taken.
    final_digest: Option<String>,
    epochs: u64,
    /// Console sink to switch to when a backup goes live.
    live_console: Option<Box<dyn Write + Send>>,
    /// The network card's host side.
    net: Option<NetIo>,
    /// The MAC of the network card (announced at a takeover).
    net_mac: Option<[u8; 6]>,
    /// The shared disks' host side.
    shared_disk: Option<SharedDiskIo>,
    epoch_pages: EpochPages,
    /// While memory is copied to a joining backup: the pages of KVM's
    /// dirty log that epochs took (and cleared) meanwhile, as a bitmap
    /// (a primary that lost its backup still records, log dropped).
    copy_dirty: Option<Vec<u64>>,
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
    /// The disks attached (their paths, for a snapshot's configuration).
    disks: Vec<DiskSpec>,
    /// The network cards attached.
    nets: Vec<NetSpec>,
    /// Guest memory: dropped after the VM fd (see above).
    mem: GuestMemoryMmap,
    /// Statistics of this run.
    pub stats: Stats,
}

/// What a new [`Vm`] is built from (fresh boot or snapshot).
struct Parts {
    kvm: Kvm,
    vmfd: VmFd,
    vcpu: Vcpu,
    mem: GuestMemoryMmap,
    mem_mib: u64,
    cmdline: String,
    disks: Vec<DiskSpec>,
    nets: Vec<NetSpec>,
    devices: Devices,
    kicker: Kicker,
    clock_ns: u64,
    pos: Position,
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
            disks,
            nets,
            devices,
            kicker,
            clock_ns,
            pos,
        } = parts;
        opts.stop.attach(kicker);
        let net_mac = nets.first().map(|n| n.mac);
        let mut live = LiveDoor::new(clock_ns, opts.console_in, kicker);
        let receives_now = !matches!(opts.ft, FtMode::Replay { .. });
        if let (true, Some(tap)) = (receives_now, opts.net.as_ref().and_then(|n| n.tap.clone())) {
            crate::netio::spawn_reader(tap, live.attach_net(), kicker)
                .map_err(|e| VmError::Devices(format!("cannot start the tap reader: {e}")))?;
        }
        let mut live_console = None;
        let mut after_takeover = AfterTakeover::Live;
        let (door, epoch_bound): (Box<dyn Door>, Duration) = match opts.ft {
            FtMode::Live => (Box::new(live), Duration::MAX),
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
                epoch_bound,
            ),
            FtMode::Replay {
                mut door,
                go_live,
                then,
                live_out,
            } => {
                if go_live {
                    door.go_live_on_end(live);
                }
                live_console = live_out;
                after_takeover = then;
                (door, Duration::MAX)
            }
        };
        Ok(Vm {
            _kvm: kvm,
            vcpu,
            mem,
            mem_mib,
            cmdline,
            disks,
            nets,
            devices,
            door,
            after_takeover,
            epoch_bound,
            final_digest: None,
            epochs: 0,
            live_console,
            net_mac,
            net: opts.net,
            shared_disk: opts.shared_disk,
            epoch_pages: EpochPages::default(),
            copy_dirty: None,
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

    /// The shared disks' host side: as given, or opened from `disks`.
    fn open_shared_disks(disks: &[DiskSpec], opts: &mut RunOptions) -> Result<(), VmError> {
        if opts.shared_disk.is_none() && disks.iter().any(|d| d.shared) {
            let opened = SharedDisks::open(disks).map_err(|e| VmError::Devices(e.to_string()))?;
            let replaying = matches!(opts.ft, FtMode::Replay { .. });
            opts.shared_disk = Some(SharedDiskIo::direct(opened, replaying));
        }
        Ok(())
    }

    /// The MMIO devices for `disks`, in order.
    fn mmio_bus(
        disks: &[DiskSpec],
        nets: &[NetSpec],
        mem_mib: u64,
        shared: Option<&SharedDiskIo>,
        mode: ViewMode,
    ) -> Result<MmioBus, VmError> {
        let mut bus = MmioBus::new();
        if (!disks.is_empty() || !nets.is_empty())
            && (mem_mib << 20) > crate::devices::mmio::MAX_RAM_BYTES
        {
            return Err(VmError::Devices(format!(
                "with devices, guest memory must end below {:#x} ({mem_mib} MiB asked)",
                crate::devices::mmio::MAX_RAM_BYTES
            )));
        }
        for (i, d) in disks.iter().enumerate() {
            let err = |detail: String| VmError::Disk {
                path: d.path.display().to_string(),
                detail,
            };
            let id = format!("vmft-disk{i}");
            let view = match shared {
                Some(s) if d.shared => s.disks.view(i).map_err(|e| err(e.to_string()))?,
                _ => None,
            };
            let block = match view {
                Some(mut view) => {
                    view.set_mode(mode);
                    Block::shared(view, id.as_bytes())
                }
                None => Block::open(&d.path, d.read_only, id.as_bytes()),
            }
            .map_err(|e| match e {
                // The path is named once, by this error.
                BlockError::Open { source, .. } => err(source.to_string()),
                e => err(e.to_string()),
            })?;
            let (base, irq) = bus
                .add(Box::new(MmioTransport::new(block)))
                .map_err(|e| err(e.to_string()))?;
            info!(path = %d.path.display(), base = format!("{base:#x}"), irq, read_only = d.read_only, "disk attached");
        }
        for n in nets {
            let net = Net::new(n.mac).map_err(|e| VmError::Devices(e.to_string()))?;
            let (base, irq) = bus
                .add(Box::new(MmioTransport::new(net)))
                .map_err(|e| VmError::Devices(e.to_string()))?;
            info!(tap = %n.tap, mac = %format_mac(&n.mac), base = format!("{base:#x}"), irq, "network card attached");
        }
        Ok(bus)
    }

    /// Create a VM and load the kernel for a fresh boot.
    pub fn boot(cfg: &BootConfig, mut opts: RunOptions) -> Result<Vm, VmError> {
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
        Self::open_shared_disks(&cfg.disks, &mut opts)?;
        let bus = Self::mmio_bus(
            &cfg.disks,
            &cfg.nets,
            cfg.mem_mib,
            opts.shared_disk.as_ref(),
            ViewMode::of(&opts.ft),
        )?;
        let devices = Devices::with_mmio(ConsoleOut::new(opts.console_out), bus);
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
                disks: cfg.disks.clone(),
                nets: cfg.nets.clone(),
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
            crate::record::VmSource::Restore {
                snapshot,
                disks,
                nets,
            } => Vm::restore(snapshot, disks, nets, opts),
        }
    }

    /// Create a VM from a snapshot file, with the disks and network cards
    /// it was taken with.
    pub fn restore(
        path: &Path,
        disks: &[DiskSpec],
        nets: &[NetSpec],
        opts: RunOptions,
    ) -> Result<Vm, VmError> {
        let t0 = Instant::now();
        let body = snapshot::read_file(path)?;
        let mut d = Decoder::new(&body);
        let mem_mib = d.u64()?;
        let cmdline = String::from_utf8_lossy(d.bytes()?).into_owned();
        let clock_ns = d.u64()?;
        let exits = d.u64()?;
        let vstate = VcpuState::decode(&mut d)?;
        let console = opts.console_out;
        let mut opts = RunOptions {
            console_out: Box::new(std::io::sink()),
            ..opts
        };
        Self::open_shared_disks(disks, &mut opts)?;
        let bus = Self::mmio_bus(
            disks,
            nets,
            mem_mib,
            opts.shared_disk.as_ref(),
            ViewMode::of(&opts.ft),
        )?;
        let devices = Devices::decode(&mut d, ConsoleOut::new(console), bus)?;
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
                disks: disks.to_vec(),
                nets: nets.to_vec(),
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
    pub fn record_stats(&mut self) -> Option<RecordStats> {
        self.door.recorder().map(|r| r.stats())
    }

    /// Guest-caused exits so far.
    pub fn position(&self) -> Position {
        self.positions.now()
    }

    /// Epochs cut (record) or applied (replay).
    pub fn epochs(&self) -> u64 {
        self.epochs
    }
}
