//! Epochs: the recorder cuts one (the vCPU state and the pages dirtied
//! since the previous one) when the guest ran the epoch bound without an
//! exit while an event waits; the replayer installs it instead of running
//! the stretch and makes KVM drop its stale translations.

use ft_log::Epoch;
use vm_memory::{Bytes, GuestAddress};

use super::kvm::{kvm_err, set_memslots};
use super::{Vm, VmError};
use crate::memory::{mem_bytes, merge_bitmap, pages_of, PAGE};
use crate::snapshot::{Decoder, Encoder};
use crate::vcpu::{fingerprint, VcpuState};

impl Vm {
    pub(super) fn build_epoch(&mut self) -> Result<Epoch, VmError> {
        let mut e = Encoder::new();
        self.vcpu.save()?.encode(&mut e);
        let mem = mem_bytes(&self.mem);
        let bitmap = self
            .vmfd
            .get_dirty_log(0, mem.len())
            .map_err(kvm_err("GET_DIRTY_LOG"))?;
        if let Some(copy) = self.copy_dirty.as_mut() {
            merge_bitmap(copy, &bitmap);
        }
        let mut pages = Vec::new();
        for gfn in pages_of(&bitmap) {
            let at = gfn as usize * PAGE;
            if let Some(now) = mem.get(at..at + PAGE) {
                pages.push(self.epoch_pages.encode(gfn, now));
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

    pub(super) fn apply_epoch(&mut self, epoch: Epoch) -> Result<(), VmError> {
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
}
