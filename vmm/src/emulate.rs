//! Completion of instructions the KVM emulator on these hosts rejects.
//!
//! Guest kernel code is emulated instruction by instruction here, and the
//! emulator fails on a few instructions a Linux kernel uses: `int3` at
//! CPL0 (the kernel's INT3 self-test), and the x87 control instructions
//! `fwait`, `fnclex` and `fninit` (first user process's FPU set-up). The
//! monitor completes those itself; anything else stops the VM with an error
//! naming RIP and the instruction bytes.

use kvm_bindings::{kvm_sregs, KVM_INTERNAL_ERROR_EMULATION};
use thiserror::Error;
use vm_memory::{Bytes, GuestAddress};

use crate::memory::GuestMemoryMmap;

use crate::vcpu::Vcpu;

/// Instructions the monitor completes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Completed {
    /// `int3` at CPL0: RIP advanced, #BP (vector 3) injected.
    Int3,
    /// `fwait`: a no-op without pending x87 exceptions.
    Fwait,
    /// `fnclex`: x87 exception flags cleared.
    Fnclex,
    /// `fninit`: x87 state reset.
    Fninit,
}

impl Completed {
    /// Name for statistics.
    pub fn name(&self) -> &'static str {
        match self {
            Completed::Int3 => "int3",
            Completed::Fwait => "fwait",
            Completed::Fnclex => "fnclex",
            Completed::Fninit => "fninit",
        }
    }
}

/// Why an emulation failure could not be completed.
#[derive(Debug, Error)]
pub enum EmulationError {
    /// An instruction the monitor does not know.
    #[error("KVM cannot emulate the instruction at RIP {rip:#x} (CPL{cpl}): bytes {bytes}")]
    Unsupported {
        /// Guest RIP.
        rip: u64,
        /// Privilege level.
        cpl: u8,
        /// Instruction bytes, hex.
        bytes: String,
    },
    /// KVM reported an internal error other than an emulation failure.
    #[error("KVM internal error, suberror {suberror}, at RIP {rip:#x}")]
    Internal {
        /// KVM suberror code.
        suberror: u32,
        /// Guest RIP.
        rip: u64,
    },
    /// Reading or writing vCPU state failed while completing.
    #[error("completing an instruction at RIP {rip:#x}: {detail}")]
    State {
        /// Guest RIP.
        rip: u64,
        /// What failed.
        detail: String,
    },
}

/// Read up to 15 instruction bytes at CS:RIP through the guest page tables.
pub fn fetch_bytes(vcpu: &Vcpu, mem: &GuestMemoryMmap, sregs: &kvm_sregs, rip: u64) -> Vec<u8> {
    let linear = sregs.cs.base.wrapping_add(rip);
    let mut out = Vec::with_capacity(15);
    for i in 0..15u64 {
        let gva = linear.wrapping_add(i);
        let Ok(t) = vcpu.fd.translate_gva(gva) else {
            break;
        };
        if t.valid == 0 {
            break;
        }
        let mut b = [0u8; 1];
        if mem
            .read_slice(&mut b, GuestAddress(t.physical_address))
            .is_err()
        {
            break;
        }
        out.push(b[0]);
    }
    out
}

fn hex(bytes: &[u8]) -> String {
    if bytes.is_empty() {
        return "(unreadable)".into();
    }
    bytes
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// Handle `KVM_EXIT_INTERNAL_ERROR`: complete the instruction or explain.
pub fn complete(vcpu: &mut Vcpu, mem: &GuestMemoryMmap) -> Result<Completed, EmulationError> {
    // SAFETY: the exit reason is KVM_EXIT_INTERNAL_ERROR (the caller got
    // VcpuExit::InternalError), so `internal` is the active union member.
    let suberror = unsafe { vcpu.fd.get_kvm_run().__bindgen_anon_1.internal.suberror };
    let st = |rip: u64| {
        move |e: kvm_ioctls::Error| EmulationError::State {
            rip,
            detail: e.to_string(),
        }
    };
    let mut regs = vcpu.fd.get_regs().map_err(st(0))?;
    let rip = regs.rip;
    if suberror != KVM_INTERNAL_ERROR_EMULATION {
        return Err(EmulationError::Internal { suberror, rip });
    }
    let sregs = vcpu.fd.get_sregs().map_err(st(rip))?;
    let cpl = sregs.cs.dpl;
    let bytes = fetch_bytes(vcpu, mem, &sregs, rip);
    let unsupported = || EmulationError::Unsupported {
        rip,
        cpl,
        bytes: hex(&bytes),
    };
    let (what, len) = match bytes.as_slice() {
        [0xcc, ..] if cpl == 0 => (Completed::Int3, 1),
        [0x9b, ..] => (Completed::Fwait, 1),
        [0xdb, 0xe2, ..] => (Completed::Fnclex, 2),
        [0xdb, 0xe3, ..] => (Completed::Fninit, 2),
        _ => return Err(unsupported()),
    };
    match what {
        Completed::Fnclex | Completed::Fninit => {
            let mut fpu = vcpu.fd.get_fpu().map_err(st(rip))?;
            if what == Completed::Fnclex {
                // Clear PE, UE, OE, ZE, DE, IE, SF, ES and B.
                fpu.fsw &= !0x80ff;
            } else {
                fpu.fcw = 0x37f;
                fpu.fsw = 0;
                fpu.ftwx = 0; // abridged tag word: all registers empty
                fpu.last_opcode = 0;
                fpu.last_ip = 0;
                fpu.last_dp = 0;
            }
            vcpu.fd.set_fpu(&fpu).map_err(st(rip))?;
        }
        Completed::Fwait => {
            let fpu = vcpu.fd.get_fpu().map_err(st(rip))?;
            // An unmasked pending x87 exception (ES set) would raise #MF.
            if fpu.fsw & 0x80 != 0 && (fpu.fcw & 0x3f) != 0x3f {
                return Err(unsupported());
            }
        }
        Completed::Int3 => {}
    }
    regs.rip = rip + len;
    vcpu.fd.set_regs(&regs).map_err(st(rip))?;
    if what == Completed::Int3 {
        let mut events = vcpu.fd.get_vcpu_events().map_err(st(rip))?;
        events.exception.injected = 1;
        events.exception.nr = 3;
        events.exception.has_error_code = 0;
        events.exception.error_code = 0;
        vcpu.fd.set_vcpu_events(&events).map_err(st(rip))?;
    }
    Ok(what)
}
