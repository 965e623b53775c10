//! Re-protection, the run loop's part: page tracking for the pre-copy
//! rounds ([`crate::ft::precopy`] sends them from its thread), and the
//! pause that takes the rest (the pages written since the last round, the
//! vCPU, the devices) and goes on recording for the new backup.
//!
//! ```text
//! JoinStep::Begin      dirty log on, both trackers cleared ─▶ PairHooks::begin_copy(memory)
//! JoinStep::RoundSent  written pages (KVM ∪ epochs ∪ monitor) ─▶ PairHooks::copy_round ─▶ another round,
//!                      or: settle, into_live, written pages again, copy them, state up to
//!                      memory ─▶ PairHooks::hand_over ─▶ RecordDoor on the new log ─▶ resume
//! ```

use std::time::Instant;

use ft_log::LogHeader;
use kvm_bindings::KVM_MEM_LOG_DIRTY_PAGES;

use super::kvm::{kvm_err, set_memslots};
use super::{HandOver, Vm, VmError};
use crate::ft::precopy::{copy_chunks, copy_pages, Written};
use crate::memory::{mem_bytes, merge_bitmap, pages_of, take_host_writes};
use crate::nondet::{DoorError, LiveDoor, Mode};
use crate::record::{config_hash_of_transfer, recorder_id, RecordDoor};
use crate::shared_disk::ViewMode;

impl Vm {
    /// Pages written since the last call, by the guest (KVM's dirty log,
    /// and what epochs took from it meanwhile: a primary that lost its
    /// backup still records, its log dropped) or by the monitor (devices'
    /// writes into guest memory), in order; the records are cleared.
    fn take_written(&mut self) -> Result<Written, VmError> {
        let len = mem_bytes(&self.mem).len();
        let mut bitmap = self
            .vmfd
            .get_dirty_log(0, len)
            .map_err(kvm_err("GET_DIRTY_LOG"))?;
        merge_bitmap(&mut bitmap, &take_host_writes(&self.mem));
        // What epochs took from KVM's log since the last call.
        if let Some(taken) = self.copy_dirty.as_mut() {
            merge_bitmap(&mut bitmap, taken);
            taken.fill(0);
        }
        let chunks = self
            .devices
            .mmio
            .own_writes()
            .iter()
            .map(|w| w.take())
            .collect();
        Ok(Written {
            pages: pages_of(&bitmap),
            chunks,
        })
    }

    /// A backup waits: track written pages from here on, and start the
    /// copy. A failure refuses the backup; the VM goes on.
    pub(super) fn begin_copy(&mut self) -> Result<(), VmError> {
        let begun = self.start_copy();
        if let Err(e) = begun {
            self.join_failed(&e.to_string());
        }
        Ok(())
    }

    fn start_copy(&mut self) -> Result<(), VmError> {
        set_memslots(&self.vmfd, &self.mem, KVM_MEM_LOG_DIRTY_PAGES, false)?;
        self.copy_dirty = Some(Vec::new());
        self.take_written()?;
        let mem = self.mem.clone();
        let disks = self
            .devices
            .mmio
            .own_images()
            .map_err(|e| DoorError::Ft(format!("opening the disk images to copy them: {e}")))?;
        match self.pair.as_mut() {
            Some(pair) => Ok(pair.begin_copy(mem, disks)?),
            None => Ok(()),
        }
    }

    /// The joining backup is refused (`why`); the VM goes on.
    fn join_failed(&mut self, why: &str) {
        self.copy_dirty = None;
        if let Some(pair) = self.pair.as_mut() {
            pair.join_failed(why);
        }
    }

    /// A copy round is sent: another round, or the pause.
    pub(super) fn copy_round(&mut self) -> Result<(), VmError> {
        let written = match self.take_written() {
            Ok(w) => w,
            Err(e) => {
                self.join_failed(&e.to_string());
                return Ok(());
            }
        };
        let rest = match self.pair.as_mut() {
            Some(pair) => pair.copy_round(written),
            None => None,
        };
        match rest {
            Some(carried) => self.hand_over_state(carried),
            None => Ok(()),
        }
    }

    /// With the guest paused at this boundary, take the rest of the state
    /// (`carried`: pages written during the last round), give it to the
    /// pair hooks (which send it, then the log), and record from this
    /// state on.
    fn hand_over_state(&mut self, carried: Written) -> Result<(), VmError> {
        let t0 = Instant::now();
        let pos = self.positions.now().exit;
        if self.door.mode() == Mode::Replay {
            return Err(DoorError::Ft("a replaying side has no state to hand over".into()).into());
        }
        self.settle()?;
        let stand_in = Box::new(LiveDoor::new(0, None, self._kicker));
        let live = std::mem::replace(&mut self.door, stand_in)
            .into_live()
            .ok_or_else(|| DoorError::Ft("the door has no live door to go on with".into()))?;
        // A recording continues counting the console input the guest had.
        let input_logged = live.input_handed();
        // What can fail here leaves the VM running (live, as it was, only
        // without the old log nobody reads): the joining backup is refused.
        let prepared = self.take_rest(carried, live.now_ns());
        let (rest, header) = match prepared {
            Ok(p) => p,
            Err(e) => {
                self.door = Box::new(live);
                self.live_views();
                self.join_failed(&e.to_string());
                return Ok(());
            }
        };
        // A live side asked KVM for interrupt windows; recording does not
        // use them (their exits are not deterministic here).
        self.vcpu.fd.get_kvm_run().request_interrupt_window = 0;
        // The dirty log is on and was cleared with the last pages: epochs
        // carry what is written from here on, whole at first.
        self.epoch_pages = Default::default();
        let Some(pair) = self.pair.as_mut() else {
            self.door = Box::new(live);
            return Ok(());
        };
        let next = match pair.hand_over(pos, rest) {
            Ok(n) => n,
            Err(e) => {
                pair.join_failed(&e.to_string());
                self.door = Box::new(live);
                self.live_views();
                return Ok(());
            }
        };
        // Shared disks: reads go into the log from here on.
        for v in self.devices.mmio.shared_views() {
            v.set_mode(ViewMode::Record);
        }
        self.epoch_bound = next.epoch_bound;
        self.door = Box::new(
            RecordDoor::to_writer(next.sink, next.name, &header, live)?
                .with_input_logged(input_logged),
        );
        pair.resumed(t0.elapsed());
        Ok(())
    }

    /// Shared disks: a side that goes on live without a log reads the
    /// images and keeps no reads for a log.
    fn live_views(&mut self) {
        for v in self.devices.mmio.shared_views() {
            v.set_mode(ViewMode::Direct);
        }
    }

    /// The rest of the state now: the pages and disk chunks written since
    /// the last round (`carried` and those since) with their bytes, the
    /// state up to memory, and the header of a log that starts from it.
    fn take_rest(
        &mut self,
        carried: Written,
        clock_ns: u64,
    ) -> Result<(HandOver, LogHeader), VmError> {
        let mut written = carried;
        written.merge(self.take_written()?);
        self.copy_dirty = None;
        let Written { pages, chunks } = written;
        let data = copy_pages(&self.mem, &pages)
            .map_err(|e| DoorError::Ft(format!("copying the last pages: {e}")))?;
        let images = self
            .devices
            .mmio
            .own_images()
            .map_err(|e| DoorError::Ft(format!("the disk images: {e}")))?;
        let mut disks = Vec::new();
        for (i, (image, chunks)) in images.iter().zip(chunks).enumerate() {
            disks.push(
                copy_chunks(i as u32, image, chunks)
                    .map_err(|e| DoorError::Ft(format!("copying disk {i}'s last chunks: {e}")))?,
            );
        }
        let state = self.state_body(clock_ns)?;
        // Disk contents came in the transfer, checked: the hash names the
        // disks' sizes and access, not their bytes (hashing them would
        // read every image in the pause).
        let hash = config_hash_of_transfer(&state, &self.disks, &self.nets)
            .map_err(|e| DoorError::Ft(format!("the state's configuration: {e}")))?;
        let header = LogHeader {
            kernel: String::new(),
            initrd: None,
            mem_mib: self.mem_mib,
            cmdline: self.cmdline.clone(),
            config_hash: hash,
            recorder: recorder_id(),
            snapshot: Some("(state transfer)".into()),
        };
        Ok((
            HandOver {
                pages,
                data,
                disks,
                state,
            },
            header,
        ))
    }
}
