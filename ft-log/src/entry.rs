//! The log's entry types: everything the backup needs to re-execute what
//! the primary executed, and the fingerprints it checks along the way.
//!
//! Positions are exit numbers: the count of guest-caused exits (PIO, MMIO,
//! HLT, interrupt window, emulation completion) before the event. An event
//! "at `pos`" happened at the boundary after exit `pos` was handled and
//! before the guest ran again.

use std::ops::Range;

use serde::{Deserialize, Serialize};

use crate::format::LogError;

/// Bytes in a guest page.
pub const PAGE_SIZE: u64 = 4096;

/// What kind of guest-caused exit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ExitKind {
    /// `in` from a port.
    PioIn,
    /// `out` to a port.
    PioOut,
    /// MMIO read.
    MmioRead,
    /// MMIO write.
    MmioWrite,
    /// HLT.
    Hlt,
    /// Interrupt window opened (requested at a logged point).
    IrqWindow,
    /// An instruction the monitor completed for KVM's emulator.
    Emulated,
}

/// One guest-caused exit, as the primary saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExitRecord {
    /// Kind.
    pub kind: ExitKind,
    /// Port or guest-physical address (0 when not applicable).
    pub addr: u64,
    /// Value written (OUT, MMIO write), access size for reads, else 0.
    pub data: u64,
}

/// Where an input value came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ValueSource {
    /// Guest monotonic clock (PIT counter, port 0x61, PIT reload time).
    Clock,
    /// Wall clock (CMOS RTC).
    WallClock,
}

/// A compact fingerprint of the vCPU state at a point.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Fingerprint {
    /// Instruction pointer.
    pub rip: u64,
    /// Hash of the general registers, RFLAGS and the control registers.
    pub regs: u64,
}

/// A point in the console's input stream: byte `skip` of the typed chunk
/// numbered `seq` (the console numbers chunks from 1, contiguously).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct InputCursor {
    /// Chunk number.
    pub seq: u64,
    /// Bytes of that chunk already handed to the guest.
    pub skip: u64,
}

/// A guest page written since the previous epoch.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Page {
    /// Guest frame number.
    pub gfn: u64,
    /// When true, `data` is the XOR of the page with its content in the
    /// last epoch that carried this page (both sides keep that copy);
    /// otherwise the page itself.
    pub delta: bool,
    /// 4096 bytes.
    #[serde(with = "serde_bytes")]
    pub data: Vec<u8>,
}

impl Page {
    /// The guest-physical bytes this page covers, `gfn * 4096` up to
    /// `(gfn + 1) * 4096`, if they lie inside guest memory of `mem_len`
    /// bytes; `None` when they do not, including when the arithmetic would
    /// overflow (a gfn from a damaged or hostile log).
    pub fn byte_range(&self, mem_len: u64) -> Option<Range<u64>> {
        let start = self.gfn.checked_mul(PAGE_SIZE)?;
        let end = start.checked_add(PAGE_SIZE)?;
        (end <= mem_len).then_some(start..end)
    }
}

/// A cut in a long exit-free stretch: the primary's complete state at the
/// point where it was kicked, after exit `pos`. The backup applies it
/// instead of executing the stretch.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Epoch {
    /// Exit number the stretch started after.
    pub pos: u64,
    /// Epoch number (0, 1, ...).
    pub index: u64,
    /// The monitor's encoding of the full vCPU state (opaque here).
    #[serde(with = "serde_bytes")]
    pub vcpu: Vec<u8>,
    /// Pages written since the previous epoch.
    pub pages: Vec<Page>,
    /// Fingerprint of the state being installed.
    pub fingerprint: Fingerprint,
}

/// One log entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Entry {
    /// The exits starting at number `first` (1-based), in order.
    Exits {
        /// Number of the first exit in `exits`.
        first: u64,
        /// The exits.
        exits: Vec<ExitRecord>,
    },
    /// A value from outside the VM handed to the guest at exit `pos`.
    Value {
        /// Exit number.
        pos: u64,
        /// Where it came from.
        source: ValueSource,
        /// The value.
        value: u64,
    },
    /// The timer was found due at the boundary after exit `pos`, at guest time `now_ns`.
    Timer {
        /// Exit number.
        pos: u64,
        /// Guest clock when it was noticed.
        now_ns: u64,
    },
    /// Console input handed to the UART at the boundary after exit `pos`.
    ConsoleInput {
        /// Exit number.
        pos: u64,
        /// Bytes received.
        #[serde(with = "serde_bytes")]
        bytes: Vec<u8>,
        /// Where the console's input stream goes on after these bytes,
        /// when the console numbers its input (`None` for a plain stdin).
        /// A backup that goes live asks the console to resume there, so no
        /// typed byte is lost or doubled across a failover.
        next: Option<InputCursor>,
    },
    /// Interrupt `vector` injected at the boundary after exit `pos`.
    Interrupt {
        /// Exit number.
        pos: u64,
        /// Vector.
        vector: u8,
        /// vCPU state just before the injection.
        fingerprint: Fingerprint,
    },
    /// State delta cutting an exit-free stretch.
    Epoch(Box<Epoch>),
    /// Periodic check of the vCPU state (and sometimes memory) at exit `pos`.
    Check {
        /// Exit number.
        pos: u64,
        /// vCPU fingerprint.
        fingerprint: Fingerprint,
        /// CRC32C-based digest of all guest memory, when taken.
        memory: Option<u64>,
    },
    /// The recording ended after exit `pos` with this final state digest.
    End {
        /// Exit number.
        pos: u64,
        /// How the run ended, as the monitor words it.
        reason: String,
        /// Final state digest (memory and registers).
        digest: String,
    },
    /// Part of the pages of a large epoch, split off so that no frame
    /// exceeds the writer's limit ([`crate::LogWriter::write_epoch`]):
    /// pages of the epoch with this `index` after exit `pos`, to be applied
    /// together with it. The parts come in page order right before their
    /// [`Entry::Epoch`], which carries the remaining pages;
    /// [`EpochAssembler`] puts them back together.
    EpochPages {
        /// Exit number the epoch's stretch started after.
        pos: u64,
        /// The epoch's number.
        index: u64,
        /// Some of its pages, in order.
        pages: Vec<Page>,
    },
    /// The primary has released the guest's console output up to (not
    /// including) byte `offset` of the output stream (the output rule). Not
    /// tied to an exit: a backup that goes live re-sends its output from
    /// the last such offset, so the console sees no gap.
    Released {
        /// End of the released output.
        offset: u64,
    },
    /// A network frame received for the guest, placed in its receive
    /// queue at the boundary after exit `pos`.
    NetRx {
        /// Exit number.
        pos: u64,
        /// The Ethernet frame.
        #[serde(with = "serde_bytes")]
        frame: Vec<u8>,
    },
    /// The primary has written the guest's transmitted frames up to (not
    /// including) byte `offset` of the framed transmit stream to its tap
    /// (the output rule); a backup going live re-sends from there.
    NetReleased {
        /// End of the released transmit stream.
        offset: u64,
    },
    /// Data the guest read from a shared disk during exit `pos` (the
    /// notify that served the request), in the order the device read it:
    /// the backup cannot read a disk the primary may already have changed,
    /// so it takes the bytes from here.
    DiskRead {
        /// Exit number.
        pos: u64,
        /// Index of the disk (its `--disk` order).
        disk: u8,
        /// The bytes read.
        #[serde(with = "serde_bytes")]
        data: Vec<u8>,
    },
    /// The primary has written the guest's shared-disk writes up to (not
    /// including) byte `offset` of the write stream to the disk (the output
    /// rule); a backup going live writes again from there.
    DiskReleased {
        /// End of the released write stream.
        offset: u64,
    },
}

impl Entry {
    /// Short name of the entry kind, for statistics and errors.
    pub fn kind(&self) -> &'static str {
        match self {
            Entry::Exits { .. } => "exits",
            Entry::Value { .. } => "value",
            Entry::Timer { .. } => "timer",
            Entry::ConsoleInput { .. } => "console-input",
            Entry::Interrupt { .. } => "interrupt",
            Entry::Epoch(_) => "epoch",
            Entry::Check { .. } => "check",
            Entry::End { .. } => "end",
            Entry::EpochPages { .. } => "epoch-pages",
            Entry::Released { .. } => "released",
            Entry::NetRx { .. } => "net-rx",
            Entry::NetReleased { .. } => "net-released",
            Entry::DiskRead { .. } => "disk-read",
            Entry::DiskReleased { .. } => "disk-released",
        }
    }
}

/// Puts split epochs back together on the reading side: feed it every
/// entry in log order; it keeps [`Entry::EpochPages`] parts and hands back
/// the final [`Entry::Epoch`] with all the parts' pages before its own, so
/// the replayer sees whole epochs. Other entries pass through unchanged.
#[derive(Debug, Default)]
pub struct EpochAssembler {
    pending: Option<PendingEpoch>,
}

#[derive(Debug)]
struct PendingEpoch {
    pos: u64,
    index: u64,
    parts: u64,
    pages: Vec<Page>,
}

impl EpochAssembler {
    /// An assembler with nothing pending.
    pub fn new() -> Self {
        Self::default()
    }

    /// Take the next entry of the log: `Ok(None)` for a part (kept until
    /// its epoch arrives), `Ok(Some(entry))` for anything else, an epoch
    /// then carrying its parts' pages first. Errors: a part or epoch for
    /// another epoch than the parts pending ([`LogError::EpochMismatch`]),
    /// another entry while parts are pending ([`LogError::EpochIncomplete`]).
    /// After an error nothing is pending.
    pub fn push(&mut self, entry: Entry) -> Result<Option<Entry>, LogError> {
        match entry {
            Entry::EpochPages { pos, index, pages } => {
                let p = self.pending.get_or_insert_with(|| PendingEpoch {
                    pos,
                    index,
                    parts: 0,
                    pages: Vec::new(),
                });
                if (p.pos, p.index) != (pos, index) {
                    return Err(self.mismatch(pos, index));
                }
                p.parts += 1;
                if p.pages.is_empty() {
                    p.pages = pages;
                } else {
                    p.pages.extend(pages);
                }
                Ok(None)
            }
            Entry::Epoch(mut e) => match self.pending.take() {
                None => Ok(Some(Entry::Epoch(e))),
                Some(p) if (p.pos, p.index) == (e.pos, e.index) => {
                    let mut pages = p.pages;
                    pages.append(&mut e.pages);
                    e.pages = pages;
                    Ok(Some(Entry::Epoch(e)))
                }
                Some(p) => {
                    self.pending = Some(p);
                    Err(self.mismatch(e.pos, e.index))
                }
            },
            other => match &self.pending {
                None => Ok(Some(other)),
                Some(_) => Err(self.incomplete(format!("a {} entry", other.kind()))),
            },
        }
    }

    /// Whether parts are waiting for their epoch.
    pub fn is_pending(&self) -> bool {
        self.pending.is_some()
    }

    /// At the end of the log: an error if parts wait for an epoch that
    /// never came ([`LogError::EpochIncomplete`]). A backup taking over
    /// from a primary that stopped mid-epoch may instead ignore them: the
    /// epoch was never complete in the log. Nothing is pending afterwards.
    pub fn finish(&mut self) -> Result<(), LogError> {
        match self.pending {
            None => Ok(()),
            Some(_) => Err(self.incomplete("the end of the log".into())),
        }
    }

    fn mismatch(&mut self, found_pos: u64, found_index: u64) -> LogError {
        let p = self.pending.take().expect("parts are pending");
        LogError::EpochMismatch {
            pos: p.pos,
            index: p.index,
            found_pos,
            found_index,
        }
    }

    fn incomplete(&mut self, found: String) -> LogError {
        let p = self.pending.take().expect("parts are pending");
        LogError::EpochIncomplete {
            pos: p.pos,
            index: p.index,
            parts: p.parts,
            found,
        }
    }
}
