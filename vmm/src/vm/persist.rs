//! Persistence: saving a snapshot (after settling half-done I/O), reading
//! a snapshot's summary, and the digests of the VM state that end entries
//! carry. Restoring is [`Vm::restore`].

use std::path::Path;
use std::time::Instant;

use sha2::{Digest, Sha256};
use tracing::info;

use super::{Vm, VmError};
use crate::memory::{encode_memory, mem_bytes};
use crate::snapshot::{self, pod_bytes, Decoder, Encoder, SnapshotError};

/// Memory size (MiB) and command line of a snapshot file.
pub fn snapshot_summary(path: &Path) -> Result<(u64, String), SnapshotError> {
    let body = snapshot::read_file(path)?;
    let mut d = Decoder::new(&body);
    let mem_mib = d.u64()?;
    let cmdline = String::from_utf8_lossy(d.bytes()?).into_owned();
    Ok((mem_mib, cmdline))
}

impl Vm {
    /// Save the whole VM state to `path`. The vCPU must be outside KVM_RUN
    /// with no half-done I/O (see [`Vm::settle`]).
    pub fn save_snapshot(&mut self, path: &Path) -> Result<(), VmError> {
        let clock_ns = self.door.clock_ns(self.positions.now().exit)?;
        self.save_snapshot_at(path, clock_ns)
    }

    /// Save a snapshot whose guest clock is `clock_ns`.
    pub(super) fn save_snapshot_at(&mut self, path: &Path, clock_ns: u64) -> Result<(), VmError> {
        let t0 = Instant::now();
        let body = self.snapshot_body(clock_ns)?;
        snapshot::write_file(path, &body)?;
        info!(
            path = %path.display(),
            bytes = body.len(),
            elapsed_ms = t0.elapsed().as_millis() as u64,
            "snapshot saved"
        );
        Ok(())
    }

    /// The snapshot body of the state now, with guest clock `clock_ns`
    /// (settled first, see [`Vm::settle`]).
    pub(super) fn snapshot_body(&mut self, clock_ns: u64) -> Result<Vec<u8>, VmError> {
        let mut e = Encoder::new();
        self.encode_state(&mut e, clock_ns)?;
        encode_memory(&mut e, mem_bytes(&self.mem));
        Ok(e.into_bytes())
    }

    /// The snapshot body up to its memory section (memory is its last
    /// section): what a state transfer sends in its pause.
    pub(super) fn state_body(&mut self, clock_ns: u64) -> Result<Vec<u8>, VmError> {
        let mut e = Encoder::new();
        self.encode_state(&mut e, clock_ns)?;
        Ok(e.into_bytes())
    }

    fn encode_state(&mut self, e: &mut Encoder, clock_ns: u64) -> Result<(), VmError> {
        e.u64(self.mem_mib);
        e.bytes(self.cmdline.as_bytes());
        e.u64(clock_ns);
        e.u64(self.positions.now().exit);
        self.vcpu.save()?.encode(e);
        self.devices.encode(e);
        Ok(())
    }

    /// Let KVM finish a pending I/O instruction without running guest code
    /// (KVM_RUN with immediate_exit set), so the state is consistent.
    pub(super) fn settle(&mut self) -> Result<(), VmError> {
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
        state_digest_of(&self.mem, &self.vcpu)
    }
}

/// A digest of guest memory and the vCPU's registers.
pub(super) fn state_digest_of(
    mem: &crate::memory::GuestMemoryMmap,
    vcpu: &crate::vcpu::Vcpu,
) -> String {
    let mut h = Sha256::new();
    h.update(mem_bytes(mem));
    let regs = vcpu.fd.get_regs().unwrap_or_default();
    h.update(pod_bytes(&regs));
    let d = h.finalize();
    d.iter().map(|b| format!("{b:02x}")).collect()
}
