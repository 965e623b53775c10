//! The KVM objects of a VM: opening KVM, the VM fd with its TSS address,
//! the one vCPU, and the memory slots that map guest memory into the VM.

use kvm_bindings::{kvm_userspace_memory_region, KVM_MEM_LOG_DIRTY_PAGES};
use kvm_ioctls::{Kvm, VmFd};
use vm_memory::{GuestAddress, GuestMemoryBackend};

use crate::memory::GuestMemoryMmap;

use super::VmError;
use crate::vcpu::Vcpu;

/// KVM's TSS address for VMX hosts (three pages below 4 GiB).
const TSS_ADDR: usize = 0xfffb_d000;

pub(super) fn kvm_err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmError {
    move |source| VmError::Kvm { what, source }
}

/// Register every region of `mem` with KVM, or delete the slots.
pub(super) fn set_memslots(
    vm: &VmFd,
    mem: &GuestMemoryMmap,
    flags: u32,
    delete: bool,
) -> Result<(), VmError> {
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

pub(super) fn create_kvm(
    mem: &GuestMemoryMmap,
    dirty_log: bool,
) -> Result<(Kvm, VmFd, Vcpu), VmError> {
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
