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

use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::{Kvm, VcpuExit, VmFd};
use thiserror::Error;
use tracing::{debug, info, warn};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

use crate::boot::{self, BootConfig, BootError};
use crate::devices::serial::{ConsoleEvent, ConsoleOut};
use crate::devices::Devices;
use crate::emulate::{self, EmulationError};
use crate::nondet::{Door, LiveDoor, Position, Wake};
use crate::snapshot::{self, Decoder, Encoder, SnapshotError};
use crate::stats::Stats;
use crate::vcpu::{DeadlineKicker, Kicker, Vcpu, VcpuError, VcpuState};

const PAGE: usize = 4096;
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
}

/// How a run ended without error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VmExit {
    /// The guest reset the machine (reboot, i8042 command 0xFE).
    Reset,
    /// The guest halted with interrupts disabled (power-off / halt).
    Halted,
}

impl std::fmt::Display for VmExit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            VmExit::Reset => write!(f, "guest reset the machine (reboot)"),
            VmExit::Halted => write!(f, "guest halted (powered off)"),
        }
    }
}

/// Options of a run beyond the boot configuration.
pub struct RunOptions {
    /// Save a snapshot when the guest prints its ready marker.
    pub snapshot_on_ready: Option<PathBuf>,
    /// Console input (stdin), if any.
    pub console_in: Option<Box<dyn Read + Send>>,
    /// Console output.
    pub console_out: Box<dyn Write + Send>,
}

/// A virtual machine with one vCPU.
pub struct Vm {
    _kvm: Kvm,
    _vm: VmFd,
    vcpu: Vcpu,
    mem: GuestMemoryMmap,
    mem_mib: u64,
    cmdline: String,
    devices: Devices,
    door: Box<dyn Door>,
    deadline: DeadlineKicker,
    _kicker: Kicker,
    pos: Position,
    snapshot_on_ready: Option<PathBuf>,
    /// Statistics of this run.
    pub stats: Stats,
}

fn kvm_err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmError {
    move |source| VmError::Kvm { what, source }
}

fn create_kvm(mem: &GuestMemoryMmap) -> Result<(Kvm, VmFd, Vcpu), VmError> {
    let kvm = Kvm::new().map_err(kvm_err("open /dev/kvm"))?;
    let vm = kvm.create_vm().map_err(kvm_err("CREATE_VM"))?;
    vm.set_tss_address(TSS_ADDR)
        .map_err(kvm_err("SET_TSS_ADDR"))?;
    for (slot, region) in mem.iter().enumerate() {
        let host = mem
            .get_host_address(region_start(region))
            .expect("region start is mapped");
        let r = kvm_userspace_memory_region {
            slot: slot as u32,
            flags: 0,
            guest_phys_addr: region_start(region).0,
            memory_size: region_len(region),
            userspace_addr: host as u64,
        };
        // SAFETY: the host range belongs to `mem`, which the Vm owns and
        // keeps mapped for as long as the VM fd exists.
        unsafe { vm.set_user_memory_region(r) }.map_err(kvm_err("SET_USER_MEMORY_REGION"))?;
    }
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

/// All guest memory as one byte slice (the VM has a single region at 0).
fn mem_bytes(mem: &GuestMemoryMmap, len: usize) -> &[u8] {
    let host = mem
        .get_host_address(GuestAddress(0))
        .expect("guest memory starts at 0");
    // SAFETY: the single region starting at guest address 0 is `len` bytes
    // of mapped memory owned by `mem`, which outlives the slice. It is read
    // only while the vCPU is outside KVM_RUN (on the vCPU thread), so the
    // guest does not write it meanwhile.
    unsafe { std::slice::from_raw_parts(host, len) }
}

impl Vm {
    /// Create a VM and load the kernel for a fresh boot.
    pub fn boot(cfg: &BootConfig, opts: RunOptions) -> Result<Vm, VmError> {
        let mem = boot::create_memory(cfg.mem_mib)?;
        let info = boot::load(&mem, cfg)?;
        info!(entry = format!("{:#x}", info.entry), format = ?info.format, "kernel loaded");
        let (kvm, vmfd, mut vcpu) = create_kvm(&mem)?;
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
        let door = Box::new(LiveDoor::new(0, opts.console_in, kicker));
        Ok(Vm {
            _kvm: kvm,
            _vm: vmfd,
            vcpu,
            mem,
            mem_mib: cfg.mem_mib,
            cmdline: cfg.cmdline.clone(),
            devices,
            door,
            deadline: DeadlineKicker::start(kicker),
            _kicker: kicker,
            pos: Position::default(),
            snapshot_on_ready: opts.snapshot_on_ready,
            stats: Stats::default(),
        })
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
        let devices = Devices::decode(&mut d, ConsoleOut::new(opts.console_out))?;
        let mem = boot::create_memory(mem_mib)?;
        decode_memory(&mut d, &mem, (mem_mib << 20) as usize)?;
        if d.remaining() != 0 {
            return Err(SnapshotError::Invalid(format!("{} trailing bytes", d.remaining())).into());
        }
        let (kvm, vmfd, mut vcpu) = create_kvm(&mem)?;
        vcpu.restore(&vstate)?;
        let kicker = vcpu.arm_kick()?;
        let door = Box::new(LiveDoor::new(clock_ns, opts.console_in, kicker));
        info!(
            elapsed_ms = t0.elapsed().as_millis() as u64,
            "snapshot restored"
        );
        Ok(Vm {
            _kvm: kvm,
            _vm: vmfd,
            vcpu,
            mem,
            mem_mib,
            cmdline,
            devices,
            door,
            deadline: DeadlineKicker::start(kicker),
            _kicker: kicker,
            pos: Position { exit: exits },
            snapshot_on_ready: opts.snapshot_on_ready,
            stats: Stats::default(),
        })
    }

    /// Unknown port accesses so far.
    pub fn unknown_ports(&self) -> &std::collections::BTreeMap<u16, (u64, u64)> {
        &self.devices.unknown_ports
    }

    /// Save the whole VM state to `path`. The vCPU must be outside KVM_RUN
    /// with no half-done I/O (see [`Vm::settle`]).
    pub fn save_snapshot(&mut self, path: &Path) -> Result<(), VmError> {
        let t0 = Instant::now();
        let mut e = Encoder::new();
        e.u64(self.mem_mib);
        e.bytes(self.cmdline.as_bytes());
        e.u64(self.door.clock_ns());
        e.u64(self.pos.exit);
        self.vcpu.save()?.encode(&mut e);
        self.devices.encode(&mut e);
        encode_memory(&mut e, mem_bytes(&self.mem, (self.mem_mib << 20) as usize));
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

    /// Give pending outside events to the devices and inject an interrupt
    /// if the PIC asserts one and the vCPU can take it.
    fn deliver(&mut self) -> Result<(), VmError> {
        let now = self.door.clock_ns();
        if self.devices.poll_timer(now) {
            self.stats.timer_irqs += 1;
        }
        let room = self.devices.serial.rx_room();
        if room > 0 {
            let input = self.door.console_input(room);
            if !input.is_empty() {
                self.stats.input_bytes += input.len() as u64;
                self.devices.serial.receive(&input);
                self.devices.sync_irqs();
            }
        }
        if self.devices.pic.has_interrupt() {
            let run = self.vcpu.fd.get_kvm_run();
            if run.ready_for_interrupt_injection != 0 && run.if_flag != 0 {
                if let Some(vector) = self.devices.pic.acknowledge() {
                    self.door.interrupt(vector);
                    self.vcpu.interrupt(vector)?;
                    *self.stats.injected.entry(vector).or_default() += 1;
                }
            }
            let more = self.devices.pic.has_interrupt();
            self.vcpu.fd.get_kvm_run().request_interrupt_window = more as u8;
        } else {
            self.vcpu.fd.get_kvm_run().request_interrupt_window = 0;
        }
        let next = self.devices.pit.next_irq0_ns();
        self.deadline
            .set(next.map(|t| Duration::from_nanos(t.saturating_sub(now))));
        Ok(())
    }

    /// Run the guest until it resets, halts or fails.
    pub fn run(&mut self) -> Result<VmExit, VmError> {
        loop {
            self.deliver()?;
            let t0 = Instant::now();
            let exit = self.vcpu.fd.run();
            self.stats.in_guest += t0.elapsed();
            match exit {
                Ok(VcpuExit::IoIn(port, data)) => {
                    self.pos.exit += 1;
                    self.stats.exit("pio_in");
                    self.door.at(self.pos);
                    self.devices.pio_in(port, data, self.door.as_mut());
                }
                Ok(VcpuExit::IoOut(port, data)) => {
                    self.pos.exit += 1;
                    self.stats.exit("pio_out");
                    self.door.at(self.pos);
                    self.devices.pio_out(port, data, self.door.as_mut());
                    if self.devices.i8042.reset_requested() {
                        return Ok(VmExit::Reset);
                    }
                    self.handle_console_events()?;
                }
                Ok(VcpuExit::MmioRead(addr, data)) => {
                    self.pos.exit += 1;
                    self.stats.exit("mmio_read");
                    debug!(addr = format!("{addr:#x}"), "MMIO read with no device");
                    data.fill(0xff);
                }
                Ok(VcpuExit::MmioWrite(addr, _)) => {
                    self.pos.exit += 1;
                    self.stats.exit("mmio_write");
                    debug!(addr = format!("{addr:#x}"), "MMIO write with no device");
                }
                Ok(VcpuExit::Hlt) => {
                    self.pos.exit += 1;
                    self.stats.exit("hlt");
                    self.door.at(self.pos);
                    if self.vcpu.fd.get_kvm_run().if_flag == 0 {
                        return Ok(VmExit::Halted);
                    }
                    if !self.devices.pic.has_interrupt() {
                        self.idle()?;
                    }
                }
                Ok(VcpuExit::IrqWindowOpen) => {
                    self.pos.exit += 1;
                    self.stats.exit("irq_window");
                    self.door.at(self.pos);
                }
                Ok(VcpuExit::InternalError) => {
                    self.pos.exit += 1;
                    self.stats.exit("emulation_failure");
                    self.door.at(self.pos);
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
                        exits: self.pos.exit,
                    });
                }
                Ok(VcpuExit::FailEntry(reason, _)) => return Err(VmError::FailEntry(reason)),
                Ok(VcpuExit::Intr) => {
                    self.stats.exit("kick");
                    self.vcpu.fd.set_kvm_immediate_exit(0);
                }
                Ok(other) => {
                    return Err(VmError::UnexpectedExit(format!("{other:?}"), self.pos.exit))
                }
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                    // A kick (signal or immediate_exit): not a guest-caused exit.
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
        }
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

/// Memory as a bitmap of non-zero pages followed by those pages.
fn encode_memory(e: &mut Encoder, mem: &[u8]) {
    let pages = mem.len() / PAGE;
    let mut bitmap = vec![0u8; pages.div_ceil(8)];
    let mut nonzero = Vec::new();
    for (i, page) in mem.chunks(PAGE).enumerate() {
        if page.iter().any(|&b| b != 0) {
            bitmap[i / 8] |= 1 << (i % 8);
            nonzero.push(i);
        }
    }
    e.u64(pages as u64);
    e.bytes(&bitmap);
    for i in nonzero {
        e.raw(&mem[i * PAGE..(i + 1) * PAGE]);
    }
}

fn decode_memory(d: &mut Decoder, mem: &GuestMemoryMmap, len: usize) -> Result<(), SnapshotError> {
    let pages = d.u64()? as usize;
    if pages * PAGE != len {
        return Err(SnapshotError::Invalid(format!(
            "memory section has {pages} pages, the VM has {}",
            len / PAGE
        )));
    }
    let bitmap = d.bytes()?;
    if bitmap.len() != pages.div_ceil(8) {
        return Err(SnapshotError::Invalid("memory bitmap size".into()));
    }
    for i in 0..pages {
        if bitmap[i / 8] & (1 << (i % 8)) != 0 {
            mem.write_slice(d.bytes_exact(PAGE)?, GuestAddress((i * PAGE) as u64))
                .map_err(|e| SnapshotError::Invalid(format!("memory page {i}: {e}")))?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sparse_memory_round_trip() {
        let mut mem = vec![0u8; 16 * PAGE];
        mem[3 * PAGE + 7] = 1;
        mem[15 * PAGE] = 0xaa;
        let mut e = Encoder::new();
        encode_memory(&mut e, &mem);
        let bytes = e.into_bytes();
        assert!(bytes.len() < 3 * PAGE + 64, "zero pages are not stored");
        let guest = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 16 * PAGE)]).unwrap();
        decode_memory(&mut Decoder::new(&bytes), &guest, 16 * PAGE).unwrap();
        assert_eq!(mem_bytes(&guest, 16 * PAGE), &mem[..]);
    }
}
