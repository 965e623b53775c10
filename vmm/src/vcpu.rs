//! The vCPU: KVM set-up (CPUID, registers, MSRs), interrupt injection with
//! `KVM_INTERRUPT` (not wrapped by kvm-ioctls), state capture for
//! snapshots, and the kick that takes the vCPU out of `KVM_RUN` from
//! another thread (`immediate_exit` set by a signal handler, so a kick that
//! lands just before `KVM_RUN` is not lost).

use std::cell::Cell;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use kvm_bindings::{
    kvm_debugregs, kvm_fpu, kvm_interrupt, kvm_msr_entry, kvm_regs, kvm_run, kvm_sregs,
    kvm_vcpu_events, kvm_xcrs, kvm_xsave, Msrs, KVM_MAX_CPUID_ENTRIES,
};
use kvm_ioctls::{Kvm, VcpuFd};
use thiserror::Error;
use vmm_sys_util::errno;
use vmm_sys_util::signal::{register_signal_handler, SIGRTMIN};

use crate::snapshot::{pod_bytes, pod_from_bytes, Decoder, Encoder, SnapshotError};

const KVMIO: u32 = 0xae;
vmm_sys_util::ioctl_iow_nr!(KVM_INTERRUPT, KVMIO, 0x86, kvm_interrupt);

/// Bumped whenever the encoding of [`VcpuState`] changes (it is the vCPU
/// blob of snapshots and of epochs in the log).
pub const VCPU_STATE_VERSION: u8 = 2;

/// Most MSRs a state may carry (the most one `KVM_GET_MSRS` call takes).
const MAX_MSRS: usize = kvm_bindings::KVM_MAX_MSR_ENTRIES;

/// vCPU errors: which KVM call failed.
#[derive(Debug, Error)]
pub enum VcpuError {
    /// A KVM ioctl failed.
    #[error("KVM {what} failed: {source}")]
    Kvm {
        /// Which call.
        what: &'static str,
        /// errno from KVM.
        source: kvm_ioctls::Error,
    },
    /// KVM read or wrote fewer MSRs than asked.
    #[error("KVM MSR {what}: {done} of {asked} MSRs")]
    MsrCount {
        /// Read, write or list.
        what: &'static str,
        /// How many KVM handled.
        done: usize,
        /// How many were asked for.
        asked: usize,
    },
    /// KVM refused to load an MSR of a saved state.
    #[error("KVM refused to load MSR {index:#x} of the saved vCPU state")]
    MsrRefused {
        /// The MSR.
        index: u32,
    },
    /// Installing the kick signal handler failed.
    #[error("cannot install the vCPU kick signal handler: {0}")]
    Signal(errno::Error),
}

fn kvm_err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VcpuError {
    move |source| VcpuError::Kvm { what, source }
}

thread_local! {
    /// The `kvm_run` of the vCPU that runs on this thread, which the kick
    /// handler writes `immediate_exit` in. Per thread, because a kick is a
    /// signal sent to one vCPU thread and runs its handler on that thread:
    /// several VMs (or vCPUs) in one process each get their own target.
    static KICK_TARGET: Cell<*mut kvm_run> = const { Cell::new(std::ptr::null_mut()) };
}

extern "C" fn handle_kick(_num: libc::c_int, _info: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // `try_with`: during thread teardown the slot may be gone; then there
    // is no vCPU to kick.
    let run = KICK_TARGET
        .try_with(Cell::get)
        .unwrap_or(std::ptr::null_mut());
    if !run.is_null() {
        // SAFETY: KICK_TARGET points into the live kvm_run mapping of the
        // vCPU of this thread (set by `Vcpu::arm_kick`, cleared when that
        // vCPU is dropped). The vCPU thread may hold a `&mut kvm_run` of its
        // own, so no reference is created here: a raw volatile byte store
        // through `addr_of_mut!`, which is what KVM expects for immediate_exit.
        unsafe { std::ptr::write_volatile(std::ptr::addr_of_mut!((*run).immediate_exit), 1) };
    }
}

/// The signal used to kick the vCPU thread.
pub fn kick_signal() -> libc::c_int {
    SIGRTMIN()
}

/// Something that can take the vCPU out of the guest.
#[derive(Debug, Clone, Copy)]
pub struct Kicker {
    thread: libc::pthread_t,
}

impl Kicker {
    /// A kicker for the calling thread (the vCPU thread).
    pub fn for_current_thread() -> Self {
        Kicker {
            // SAFETY: pthread_self has no preconditions.
            thread: unsafe { libc::pthread_self() },
        }
    }

    /// Send the kick signal; the vCPU leaves KVM_RUN (or does not enter it).
    pub fn kick(&self) {
        // SAFETY: the thread id was taken from a live thread that outlives
        // every kicker (the vCPU thread runs the VM to its end); the
        // signal has a handler installed by `Vcpu::arm_kick`.
        unsafe {
            libc::pthread_kill(self.thread, kick_signal());
        }
    }
}

/// A helper thread that kicks the vCPU when a deadline passes (the next
/// timer interrupt), so a guest that runs without exits still gets it.
pub struct DeadlineKicker {
    shared: Arc<(Mutex<DeadlineState>, Condvar)>,
    thread: Option<std::thread::JoinHandle<()>>,
}

#[derive(Default)]
struct DeadlineState {
    deadline: Option<Instant>,
    stop: bool,
}

impl DeadlineKicker {
    /// Start the helper thread.
    pub fn start(kicker: Kicker) -> Self {
        let shared = Arc::new((Mutex::new(DeadlineState::default()), Condvar::new()));
        let s = shared.clone();
        let thread = std::thread::Builder::new()
            .name("vmft-deadline".into())
            .spawn(move || {
                let (lock, cv) = &*s;
                let mut st = lock.lock().unwrap_or_else(|e| e.into_inner());
                while !st.stop {
                    match st.deadline {
                        None => st = cv.wait(st).unwrap_or_else(|e| e.into_inner()),
                        Some(d) => {
                            let now = Instant::now();
                            if now >= d {
                                st.deadline = None;
                                kicker.kick();
                            } else {
                                st = cv
                                    .wait_timeout(st, d - now)
                                    .unwrap_or_else(|e| e.into_inner())
                                    .0;
                            }
                        }
                    }
                }
            })
            .expect("spawn deadline thread");
        DeadlineKicker {
            shared,
            thread: Some(thread),
        }
    }

    /// Kick the vCPU `after` from now (or never, with `None`).
    pub fn set(&self, after: Option<Duration>) {
        let (lock, cv) = &*self.shared;
        let mut st = lock.lock().unwrap_or_else(|e| e.into_inner());
        let new = after.map(|a| Instant::now() + a);
        // Only wake the helper when the deadline moves earlier or is cleared.
        let changed = match (st.deadline, new) {
            (Some(old), Some(n)) => n < old || n > old + Duration::from_micros(200),
            (None, None) => false,
            _ => true,
        };
        if changed {
            st.deadline = new;
            cv.notify_one();
        }
    }
}

impl Drop for DeadlineKicker {
    fn drop(&mut self) {
        {
            let (lock, cv) = &*self.shared;
            lock.lock().unwrap_or_else(|e| e.into_inner()).stop = true;
            cv.notify_one();
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Everything KVM holds about the vCPU, for snapshots.
pub struct VcpuState {
    /// General registers.
    pub regs: kvm_regs,
    /// Segment and control registers.
    pub sregs: kvm_sregs,
    /// x87/SSE state.
    pub fpu: kvm_fpu,
    /// Extended state (XSAVE area).
    pub xsave: kvm_xsave,
    /// Extended control registers.
    pub xcrs: kvm_xcrs,
    /// Debug registers.
    pub debugregs: kvm_debugregs,
    /// Pending exceptions, interrupt shadow, NMI state.
    pub events: kvm_vcpu_events,
    /// Selected MSRs (index, value).
    pub msrs: Vec<(u32, u64)>,
}

impl VcpuState {
    /// Serialise.
    pub fn encode(&self, e: &mut Encoder) {
        e.u8(VCPU_STATE_VERSION);
        e.bytes(pod_bytes(&self.regs));
        e.bytes(pod_bytes(&self.sregs));
        e.bytes(pod_bytes(&self.fpu));
        e.bytes(pod_bytes(&self.xsave));
        e.bytes(pod_bytes(&self.xcrs));
        e.bytes(pod_bytes(&self.debugregs));
        e.bytes(pod_bytes(&self.events));
        e.u32(self.msrs.len() as u32);
        for (i, v) in &self.msrs {
            e.u32(*i);
            e.u64(*v);
        }
    }

    /// Deserialise.
    pub fn decode(d: &mut Decoder) -> Result<Self, SnapshotError> {
        let version = d.u8()?;
        if version != VCPU_STATE_VERSION {
            return Err(SnapshotError::Invalid(format!(
                "vCPU state version {version}, this vmft reads version {VCPU_STATE_VERSION}"
            )));
        }
        let regs = pod_from_bytes(d.bytes()?)?;
        let sregs = pod_from_bytes(d.bytes()?)?;
        let fpu = pod_from_bytes(d.bytes()?)?;
        let xsave = pod_from_bytes(d.bytes()?)?;
        let xcrs = pod_from_bytes(d.bytes()?)?;
        let debugregs = pod_from_bytes(d.bytes()?)?;
        let events = pod_from_bytes(d.bytes()?)?;
        let n = d.u32()?;
        if n as usize > MAX_MSRS {
            return Err(SnapshotError::Invalid(format!("{n} MSRs")));
        }
        let mut msrs = Vec::with_capacity(n as usize);
        for _ in 0..n {
            msrs.push((d.u32()?, d.u64()?));
        }
        Ok(VcpuState {
            regs,
            sregs,
            fpu,
            xsave,
            xcrs,
            debugregs,
            events,
            msrs,
        })
    }
}

/// A digest of the CPUID table the guest sees on this host: KVM's
/// supported table (what vmft passes to `KVM_SET_CPUID2`) and, because this
/// KVM shows the guest the host's own feature bits of leaves 1 and 7
/// whatever the table says, the host's raw leaves 0, 1, 7 and 0x80000001.
/// Two hosts whose guests would see different CPUs get different digests.
pub fn cpuid_digest() -> Result<String, String> {
    let kvm = Kvm::new().map_err(|e| format!("open /dev/kvm: {e}"))?;
    let table = kvm
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(|e| format!("GET_SUPPORTED_CPUID: {e}"))?;
    let mut bytes = Vec::new();
    for e in table.as_slice() {
        let (mut eax, mut ebx, ecx, mut edx) = (e.eax, e.ebx, e.ecx, e.edx);
        // Identifiers of the host CPU this process happens to run on, not
        // properties of the CPU model: APIC IDs and topology numbering.
        match e.function {
            1 => ebx &= 0x00ff_ffff,
            0xb | 0x1f => edx = 0,
            0x8000_001e => {
                eax = 0;
                ebx &= !0xff;
            }
            _ => {}
        }
        for v in [e.function, e.index, e.flags, eax, ebx, ecx, edx] {
            bytes.extend_from_slice(&v.to_le_bytes());
        }
        if std::env::var_os("VMFT_DEBUG_CPUID").is_some() {
            eprintln!(
                "{:#x}/{:#x}: {:08x} {:08x} {:08x} {:08x}",
                e.function, e.index, eax, ebx, ecx, edx
            );
        }
    }
    for (leaf, sub) in [(0u32, 0u32), (1, 0), (7, 0), (0x8000_0001, 0)] {
        let r = std::arch::x86_64::__cpuid_count(leaf, sub);
        // Leaf 1 EBX bits 31..24 are the APIC ID of the CPU this runs on.
        let ebx = if leaf == 1 {
            r.ebx & 0x00ff_ffff
        } else {
            r.ebx
        };
        for v in [leaf, sub, r.eax, ebx, r.ecx, r.edx] {
            bytes.extend_from_slice(&v.to_le_bytes());
        }
    }
    let d = crc32c::crc32c(&bytes);
    Ok(format!("{d:08x}-{}", bytes.len()))
}

/// The one vCPU of the VM.
pub struct Vcpu {
    /// The KVM vCPU.
    pub fd: VcpuFd,
    /// The MSRs saved and restored with the state: every MSR KVM lists
    /// (`KVM_GET_MSR_INDEX_LIST`) that this vCPU can read and write back.
    /// An epoch replaces a stretch of execution, so an MSR the guest wrote
    /// in it and the state left out would be lost on the backup.
    msrs: Vec<u32>,
}

impl Vcpu {
    /// Configure CPUID: KVM's supported table passed unchanged, so KVM's
    /// view and the guest's view agree.
    pub fn new(kvm: &Kvm, fd: VcpuFd) -> Result<Self, VcpuError> {
        let cpuid = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(kvm_err("GET_SUPPORTED_CPUID"))?;
        fd.set_cpuid2(&cpuid).map_err(kvm_err("SET_CPUID2"))?;
        let listed = kvm
            .get_msr_index_list()
            .map_err(kvm_err("GET_MSR_INDEX_LIST"))?;
        let msrs = transferable_msrs(&fd, listed.as_slice());
        tracing::debug!(
            listed = listed.as_slice().len(),
            saved = msrs.len(),
            "MSRs carried in vCPU state"
        );
        Ok(Vcpu { fd, msrs })
    }

    /// The MSRs carried in this vCPU's state.
    pub fn msr_list(&self) -> &[u32] {
        &self.msrs
    }

    /// Install the kick handler and point it at this vCPU. Call on the vCPU thread.
    pub fn arm_kick(&mut self) -> Result<Kicker, VcpuError> {
        register_signal_handler(kick_signal(), handle_kick).map_err(VcpuError::Signal)?;
        let run: *mut kvm_run = self.fd.get_kvm_run();
        KICK_TARGET.with(|t| t.set(run));
        Ok(Kicker::for_current_thread())
    }

    /// Inject external interrupt `vector` (userspace irqchip only).
    pub fn interrupt(&self, vector: u8) -> Result<(), VcpuError> {
        let irq = kvm_interrupt { irq: vector as u32 };
        // SAFETY: KVM_INTERRUPT reads one kvm_interrupt from the pointer,
        // which is valid for the duration of the call; the fd is a vCPU fd.
        let ret = unsafe { vmm_sys_util::ioctl::ioctl_with_ref(&self.fd, KVM_INTERRUPT(), &irq) };
        if ret < 0 {
            return Err(VcpuError::Kvm {
                what: "INTERRUPT",
                source: errno::Error::last(),
            });
        }
        Ok(())
    }

    /// Capture the full vCPU state.
    pub fn save(&self) -> Result<VcpuState, VcpuError> {
        let mut msrs = msr_entries(self.msrs.iter().map(|&index| (index, 0)))?;
        let n = self.fd.get_msrs(&mut msrs).map_err(kvm_err("GET_MSRS"))?;
        if n != self.msrs.len() {
            return Err(VcpuError::MsrCount {
                what: "read",
                done: n,
                asked: self.msrs.len(),
            });
        }
        Ok(VcpuState {
            regs: self.fd.get_regs().map_err(kvm_err("GET_REGS"))?,
            sregs: self.fd.get_sregs().map_err(kvm_err("GET_SREGS"))?,
            fpu: self.fd.get_fpu().map_err(kvm_err("GET_FPU"))?,
            xsave: self.fd.get_xsave().map_err(kvm_err("GET_XSAVE"))?,
            xcrs: self.fd.get_xcrs().map_err(kvm_err("GET_XCRS"))?,
            debugregs: self.fd.get_debug_regs().map_err(kvm_err("GET_DEBUGREGS"))?,
            events: self
                .fd
                .get_vcpu_events()
                .map_err(kvm_err("GET_VCPU_EVENTS"))?,
            msrs: msrs.as_slice()[..n]
                .iter()
                .map(|e| (e.index, e.data))
                .collect(),
        })
    }

    /// Load a full vCPU state.
    pub fn restore(&self, s: &VcpuState) -> Result<(), VcpuError> {
        self.fd.set_sregs(&s.sregs).map_err(kvm_err("SET_SREGS"))?;
        self.fd.set_regs(&s.regs).map_err(kvm_err("SET_REGS"))?;
        self.fd.set_xcrs(&s.xcrs).map_err(kvm_err("SET_XCRS"))?;
        // SAFETY: the kvm_xsave buffer is the fixed-size one KVM_GET_XSAVE
        // filled in, so KVM reads only within it.
        unsafe { self.fd.set_xsave(&s.xsave) }.map_err(kvm_err("SET_XSAVE"))?;
        self.fd.set_fpu(&s.fpu).map_err(kvm_err("SET_FPU"))?;
        let msrs = msr_entries(s.msrs.iter().copied())?;
        let n = self.fd.set_msrs(&msrs).map_err(kvm_err("SET_MSRS"))?;
        if n != s.msrs.len() {
            let failed = s.msrs.get(n).map(|m| m.0).unwrap_or_default();
            return Err(VcpuError::MsrRefused { index: failed });
        }
        self.fd
            .set_debug_regs(&s.debugregs)
            .map_err(kvm_err("SET_DEBUGREGS"))?;
        self.fd
            .set_vcpu_events(&s.events)
            .map_err(kvm_err("SET_VCPU_EVENTS"))?;
        Ok(())
    }
}

impl Drop for Vcpu {
    fn drop(&mut self) {
        let run: *mut kvm_run = self.fd.get_kvm_run();
        let _ = KICK_TARGET.try_with(|t| {
            if t.get() == run {
                t.set(std::ptr::null_mut());
            }
        });
    }
}

/// A `Msrs` list of (index, value) pairs.
fn msr_entries(it: impl Iterator<Item = (u32, u64)>) -> Result<Msrs, VcpuError> {
    let entries: Vec<kvm_msr_entry> = it
        .map(|(index, data)| kvm_msr_entry {
            index,
            data,
            ..Default::default()
        })
        .collect();
    Msrs::from_entries(&entries).map_err(|_| VcpuError::MsrCount {
        what: "list",
        done: entries.len(),
        asked: kvm_bindings::KVM_MAX_MSR_ENTRIES,
    })
}

/// The MSRs of `listed` that `fd` can read and write back unchanged (some
/// listed ones are read-only or belong to features this vCPU lacks).
fn transferable_msrs(fd: &VcpuFd, listed: &[u32]) -> Vec<u32> {
    listed
        .iter()
        .copied()
        .filter(|&index| {
            let Ok(mut one) = msr_entries(std::iter::once((index, 0))) else {
                return false;
            };
            matches!(fd.get_msrs(&mut one), Ok(1)) && matches!(fd.set_msrs(&one), Ok(1))
        })
        .take(MAX_MSRS)
        .collect()
}

/// Fingerprint of the vCPU: RIP and a hash of the general registers,
/// RFLAGS and the control registers.
pub fn fingerprint(vcpu: &Vcpu) -> ft_log::Fingerprint {
    let regs = vcpu.fd.get_regs().unwrap_or_default();
    let sregs = vcpu.fd.get_sregs().unwrap_or_default();
    let lo = crc32c::crc32c(crate::snapshot::pod_bytes(&regs)) as u64;
    let mut c = Vec::with_capacity(48);
    for v in [
        sregs.cr0,
        sregs.cr3,
        sregs.cr4,
        sregs.efer,
        sregs.cs.selector as u64,
        sregs.ss.selector as u64,
    ] {
        c.extend_from_slice(&v.to_le_bytes());
    }
    let hi = crc32c::crc32c(&c) as u64;
    ft_log::Fingerprint {
        rip: regs.rip,
        regs: (hi << 32) | lo,
    }
}
