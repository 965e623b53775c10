//! virtio-blk over a raw image file.
//!
//! One request queue of at most [`QUEUE_SIZE`] entries. The configuration
//! space holds the capacity in 512-byte sectors (offset 0, le64), `size_max`
//! (offset 8, le32) and `seg_max` (offset 12, le32); the rest reads as 0.
//! Requests: IN (read), OUT (write), FLUSH (`fdatasync`), GET_ID (the
//! 20-byte ID given at construction); any other type completes with
//! UNSUPP.
//!
//! # Synchronous I/O on the vCPU thread, for replay
//!
//! Every available request is served at the QueueNotify exit that announced
//! it, on the calling (vCPU) thread, with plain `pread`/`pwrite`/`fdatasync`
//! on the image: by the time the vCPU runs again the data is in guest
//! memory, the status byte and the used-ring entry are written and the
//! interrupt status is set. This is deliberate. Under fault tolerance the
//! backup executes the same notify at the same exit against its own,
//! identical copy of the disk, so the completion and its DMA land at the
//! same guest-visible point on both sides, and nothing about the disk has
//! to be logged: no completion event, no data, no timing. An asynchronous
//! design would make the completion time a nondeterministic input to log
//! and inject. The price is that the guest waits for the host's I/O inside
//! the exit (it sees a slow disk, never a different one).
//!
//! Host failures (a read, write or sync of the image that fails) complete
//! the request with IOERR and are also reported to the caller
//! ([`super::MmioError::HostIo`]): the two sides' disks may then differ,
//! which the fault-tolerance layer must treat as a failure of this side.
//!
//! # Features offered
//!
//! - `VIRTIO_BLK_F_FLUSH`: the guest may cache writes and flushes them with
//!   FLUSH. If the driver does not negotiate it, every OUT is followed by
//!   `fdatasync` (write-through), as the specification asks of a device
//!   without a negotiated flush.
//! - `VIRTIO_BLK_F_SEG_MAX` ([`SEG_MAX`] = 128) and `VIRTIO_BLK_F_SIZE_MAX`
//!   ([`SIZE_MAX`] = 8 KiB): together they tell the driver that a request
//!   carries at most 128 × 8 KiB = [`MAX_REQUEST_BYTES`] (1 MiB) of data in
//!   at most [`MAX_CHAIN_DESCRIPTORS`] (130) descriptors (header and status
//!   included), which fits a 256-entry ring without indirect descriptors.
//!   Linux honours both (`max_segments`, `max_segment_size`). The device
//!   enforces the totals, not the per-segment size.
//! - `VIRTIO_BLK_F_RO` when built read-only: OUT completes with IOERR and
//!   writes nothing.
//!
//! # Limits and malformed requests
//!
//! The chain is read as the specification's byte streams, whatever the
//! descriptor boundaries: the device-readable part starts with the 16-byte
//! header (type le32, reserved le32, sector le64) followed, for OUT, by the
//! data; the device-writable part holds, for IN and GET_ID, the data, and
//! its last byte is the status. A guest can never make the device panic or
//! allocate more than [`MAX_REQUEST_BYTES`]:
//!
//! - No status byte (the chain's last descriptor is not device-writable,
//!   has length 0 or lies outside guest memory; or the chain has more than
//!   [`MAX_CHAIN_DESCRIPTORS`] descriptors): the chain is returned to the
//!   used ring with length 0 and nothing is written, since there is no
//!   place to report an error.
//! - Otherwise, a device-readable descriptor after a device-writable one, a
//!   descriptor outside guest memory, or a readable part shorter than the
//!   header: status IOERR.
//! - IN or OUT with a data length that is not a multiple of 512, larger than
//!   [`MAX_REQUEST_BYTES`], or reaching past the last sector (including an
//!   overflowing sector number): status IOERR, no data moved.
//! - GET_ID with less than 20 bytes of data room: IOERR.
//! - Surplus bytes (readable bytes after an IN's header, writable bytes
//!   before an OUT's status) are ignored.
//!
//! The used length is the number of bytes written into the chain: data plus
//! the status byte on success, 1 for an error status, 0 without one.
//!
//! If the driver breaks the ring itself (a head index out of range, an
//! available index that jumped by more than the queue size), the device
//! stops and reports it ([`super::QueueRun::broken`]); the transport then
//! asks for a reset.

use std::fs::{File, OpenOptions};
use std::io::{Seek, SeekFrom};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use thiserror::Error;
use tracing::{debug, warn};
use virtio_bindings::virtio_blk as blk;
use virtio_bindings::virtio_ids::VIRTIO_ID_BLOCK;
use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};

use super::written::{OwnImage, WrittenChunks};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

use crate::memory::GuestMemoryMmap;

use super::{HostError, QueueRun, VirtioDevice};
use crate::shared_disk::{SharedView, ViewError};
use crate::snapshot::{Decoder, Encoder, SnapshotError};

/// Bytes in a sector, the unit of the capacity and of request offsets.
pub const SECTOR_SIZE: u64 = 512;
/// Maximum size of the request queue.
pub const QUEUE_SIZE: u16 = 256;
/// Data segments per request announced in `seg_max`.
pub const SEG_MAX: u32 = 128;
/// Bytes per data segment announced in `size_max`.
pub const SIZE_MAX: u32 = 8192;
/// Largest data length of one request: `SEG_MAX * SIZE_MAX` (1 MiB).
pub const MAX_REQUEST_BYTES: u64 = SEG_MAX as u64 * SIZE_MAX as u64;
/// Most descriptors in one request chain: the data segments, the header
/// and the status.
pub const MAX_CHAIN_DESCRIPTORS: usize = SEG_MAX as usize + 2;
/// Length of the GET_ID answer.
pub const ID_BYTES: usize = blk::VIRTIO_BLK_ID_BYTES as usize;
/// Length of the request header.
const HEADER_BYTES: u64 = 16;

/// Status byte: success.
pub const S_OK: u8 = blk::VIRTIO_BLK_S_OK as u8;
/// Status byte: the request failed.
pub const S_IOERR: u8 = blk::VIRTIO_BLK_S_IOERR as u8;
/// Status byte: request type not supported.
pub const S_UNSUPP: u8 = blk::VIRTIO_BLK_S_UNSUPP as u8;

const F_FLUSH: u64 = 1 << blk::VIRTIO_BLK_F_FLUSH;
const F_SEG_MAX: u64 = 1 << blk::VIRTIO_BLK_F_SEG_MAX;
const F_SIZE_MAX: u64 = 1 << blk::VIRTIO_BLK_F_SIZE_MAX;
const F_RO: u64 = 1 << blk::VIRTIO_BLK_F_RO;

/// Errors building a block device.
#[derive(Debug, Error)]
pub enum BlockError {
    /// The image could not be opened.
    #[error("disk image {path}: {source}")]
    Open {
        /// Image path.
        path: PathBuf,
        /// Underlying error.
        source: std::io::Error,
    },
    /// The image's size could not be determined.
    #[error("disk image: cannot determine its size: {0}")]
    Size(#[source] std::io::Error),
    /// The ID does not fit GET_ID's 20 bytes.
    #[error("disk ID is {0} bytes, at most 20 fit")]
    IdTooLong(usize),
}

/// Request counters (not guest-visible, not in snapshots).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct BlockStats {
    /// IN requests completed OK.
    pub reads: u64,
    /// OUT requests completed OK.
    pub writes: u64,
    /// FLUSH requests completed OK.
    pub flushes: u64,
    /// GET_ID requests completed OK.
    pub get_ids: u64,
    /// Requests completed with IOERR (including malformed ones).
    pub io_errors: u64,
    /// Requests completed with UNSUPP.
    pub unsupported: u64,
    /// Malformed chains (with or without a status byte to report it).
    pub malformed: u64,
    /// Host-side I/O failures.
    pub host_errors: u64,
}

/// Where a disk's data is: an image of this side's own, or a shared one
/// seen through [`SharedView`].
#[derive(Debug)]
enum Backing {
    Own(File),
    Shared(Box<SharedView>),
}

/// The virtio-blk device model.
#[derive(Debug)]
pub struct Block {
    backing: Backing,
    /// Capacity in sectors (the image size rounded down).
    capacity: u64,
    read_only: bool,
    id: [u8; ID_BYTES],
    /// The driver negotiated FLUSH: writes may stay in the host's cache
    /// until a FLUSH request; otherwise each write is synced.
    flush_negotiated: bool,
    stats: BlockStats,
    queue_sizes: [u16; 1],
    /// The chunks of an own image written so far (a state transfer takes
    /// them).
    written: Arc<WrittenChunks>,
}

/// One descriptor's buffer.
#[derive(Debug, Clone, Copy)]
struct Seg {
    addr: GuestAddress,
    len: u32,
}

/// A request chain split into its two byte streams.
#[derive(Debug, Default)]
struct Streams {
    readable: Vec<Seg>,
    writable: Vec<Seg>,
    readable_len: u64,
    writable_len: u64,
}

/// How a request ended: the status byte and the data bytes written into
/// the chain before it.
struct Outcome {
    status: u8,
    data_written: u32,
    host_error: Option<HostError>,
}

impl Outcome {
    fn ok(data_written: u32) -> Self {
        Outcome {
            status: S_OK,
            data_written,
            host_error: None,
        }
    }
    fn status(status: u8) -> Self {
        Outcome {
            status,
            data_written: 0,
            host_error: None,
        }
    }
    fn host(what: String, source: std::io::Error) -> Self {
        Outcome {
            status: S_IOERR,
            data_written: 0,
            host_error: Some(HostError { what, source }),
        }
    }
}

impl Block {
    /// Open the raw image at `path` (read-only if `read_only`) as a device
    /// whose GET_ID answers `id`.
    pub fn open(path: &Path, read_only: bool, id: &[u8]) -> Result<Self, BlockError> {
        let file = OpenOptions::new()
            .read(true)
            .write(!read_only)
            .open(path)
            .map_err(|source| BlockError::Open {
                path: path.to_owned(),
                source,
            })?;
        Self::new(file, read_only, id)
    }

    /// A device over `file`, an open raw image (writable unless
    /// `read_only`), whose GET_ID answers `id` (at most 20 bytes, padded
    /// with zeros). The ID must be the same on primary and backup, so it
    /// must not be derived from the local path.
    pub fn new(file: File, read_only: bool, id: &[u8]) -> Result<Self, BlockError> {
        Self::with_backing(Backing::Own(file), read_only, id)
    }

    /// A device over a shared disk (see [`crate::shared_disk`]): reads and
    /// writes go through `view`.
    pub fn shared(view: SharedView, id: &[u8]) -> Result<Self, BlockError> {
        Self::with_backing(Backing::Shared(Box::new(view)), false, id)
    }

    /// The shared disk's view, if this disk is shared.
    pub fn shared_view(&mut self) -> Option<&mut SharedView> {
        match &mut self.backing {
            Backing::Shared(v) => Some(v),
            Backing::Own(_) => None,
        }
    }

    /// This disk as a state transfer copies it: a writable image of this
    /// side's own (`None` for a read-only or shared disk).
    pub fn own_image(&self) -> Option<std::io::Result<OwnImage>> {
        match (&self.backing, self.read_only) {
            (Backing::Own(file), false) => Some(file.try_clone().map(|file| OwnImage {
                file,
                written: self.written.clone(),
            })),
            _ => None,
        }
    }

    /// What this disk wrote, if it is a writable image of this side's own.
    pub fn own_writes(&self) -> Option<Arc<WrittenChunks>> {
        match (&self.backing, self.read_only) {
            (Backing::Own(_), false) => Some(self.written.clone()),
            _ => None,
        }
    }

    fn with_backing(mut backing: Backing, read_only: bool, id: &[u8]) -> Result<Self, BlockError> {
        if id.len() > ID_BYTES {
            return Err(BlockError::IdTooLong(id.len()));
        }
        let mut padded = [0u8; ID_BYTES];
        padded[..id.len()].copy_from_slice(id);
        // Seeking to the end measures regular files and block devices alike.
        let bytes = match &mut backing {
            Backing::Own(file) => file.seek(SeekFrom::End(0)),
            Backing::Shared(view) => view.size(),
        }
        .map_err(BlockError::Size)?;
        if !bytes.is_multiple_of(SECTOR_SIZE) {
            warn!(
                bytes,
                "virtio-blk: image size is not a multiple of 512; the last partial sector is invisible"
            );
        }
        Ok(Block {
            backing,
            written: Arc::new(WrittenChunks::new(bytes)),
            capacity: bytes / SECTOR_SIZE,
            read_only,
            id: padded,
            flush_negotiated: false,
            stats: BlockStats::default(),
            queue_sizes: [QUEUE_SIZE],
        })
    }

    /// Capacity in 512-byte sectors.
    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    /// Whether the device refuses writes.
    pub fn read_only(&self) -> bool {
        self.read_only
    }

    /// Request counters.
    pub fn stats(&self) -> BlockStats {
        self.stats
    }

    fn config_bytes(&self) -> [u8; 16] {
        let mut c = [0u8; 16];
        c[0..8].copy_from_slice(&self.capacity.to_le_bytes());
        c[8..12].copy_from_slice(&SIZE_MAX.to_le_bytes());
        c[12..16].copy_from_slice(&SEG_MAX.to_le_bytes());
        c
    }

    /// Serve one chain; returns the used length and any host failure.
    fn serve(
        &mut self,
        chain: DescriptorChain<&GuestMemoryMmap>,
        mem: &GuestMemoryMmap,
    ) -> (u32, Option<HostError>) {
        let head = chain.head_index();
        let mut streams = Streams::default();
        let mut count = 0usize;
        let mut last = None;
        let mut problem: Option<&'static str> = None;
        for desc in chain {
            count += 1;
            let seg = Seg {
                addr: desc.addr(),
                len: desc.len(),
            };
            last = Some((seg, desc.is_write_only()));
            if count > MAX_CHAIN_DESCRIPTORS {
                // Keep walking (the chain is bounded by the ring) only to
                // find its last descriptor.
                continue;
            }
            if !mem.check_range(seg.addr, seg.len as usize) {
                problem.get_or_insert("descriptor outside guest memory");
            }
            if desc.is_write_only() {
                streams.writable_len += u64::from(seg.len);
                streams.writable.push(seg);
            } else {
                if !streams.writable.is_empty() {
                    problem.get_or_insert("device-readable descriptor after a writable one");
                }
                streams.readable_len += u64::from(seg.len);
                streams.readable.push(seg);
            }
        }
        let status_addr = match last {
            Some((seg, true))
                if count <= MAX_CHAIN_DESCRIPTORS
                    && seg.len > 0
                    && mem.check_range(seg.addr, seg.len as usize) =>
            {
                GuestAddress(seg.addr.0 + u64::from(seg.len) - 1)
            }
            _ => {
                self.stats.malformed += 1;
                debug!(
                    head,
                    descriptors = count,
                    "virtio-blk: chain without a usable status byte; returned unused"
                );
                return (0, None);
            }
        };
        if streams.readable_len < HEADER_BYTES {
            problem.get_or_insert("request header shorter than 16 bytes");
        }
        let outcome = match problem {
            Some(why) => {
                self.stats.malformed += 1;
                debug!(head, "virtio-blk: malformed request: {why}");
                Outcome::status(S_IOERR)
            }
            None => self.execute(&streams, mem),
        };
        match outcome.status {
            S_OK => {}
            S_UNSUPP => self.stats.unsupported += 1,
            _ => self.stats.io_errors += 1,
        }
        if mem.write_obj(outcome.status, status_addr).is_err() {
            // Checked above; only a concurrent change of the memory map
            // could get here.
            debug!(head, "virtio-blk: status byte not writable");
            return (outcome.data_written, outcome.host_error);
        }
        (outcome.data_written + 1, outcome.host_error)
    }

    /// Execute a well-formed request.
    fn execute(&mut self, s: &Streams, mem: &GuestMemoryMmap) -> Outcome {
        let mut header = [0u8; HEADER_BYTES as usize];
        if !gather(mem, &s.readable, 0, &mut header) {
            return Outcome::status(S_IOERR);
        }
        let kind = u32::from_le_bytes(header[0..4].try_into().unwrap());
        let sector = u64::from_le_bytes(header[8..16].try_into().unwrap());
        // The status byte is the last writable byte; the data before it.
        let writable_data = s.writable_len - 1;
        match kind {
            blk::VIRTIO_BLK_T_IN => self.read(sector, writable_data, s, mem),
            blk::VIRTIO_BLK_T_OUT => self.write(sector, s.readable_len - HEADER_BYTES, s, mem),
            blk::VIRTIO_BLK_T_FLUSH => self.flush(),
            blk::VIRTIO_BLK_T_GET_ID => {
                if writable_data < ID_BYTES as u64 || !scatter(mem, &s.writable, 0, &self.id) {
                    return Outcome::status(S_IOERR);
                }
                self.stats.get_ids += 1;
                Outcome::ok(ID_BYTES as u32)
            }
            other => {
                debug!(kind = other, "virtio-blk: unsupported request type");
                Outcome::status(S_UNSUPP)
            }
        }
    }

    /// Byte offset of `len` bytes at `sector` if the request is acceptable.
    fn byte_range(&self, sector: u64, len: u64) -> Option<u64> {
        if !len.is_multiple_of(SECTOR_SIZE) || len > MAX_REQUEST_BYTES {
            debug!(
                len,
                "virtio-blk: data length not whole sectors or too large"
            );
            return None;
        }
        let end = sector.checked_add(len / SECTOR_SIZE)?;
        if end > self.capacity {
            debug!(
                sector,
                len,
                capacity = self.capacity,
                "virtio-blk: request past the end of the disk"
            );
            return None;
        }
        // sector < capacity <= u64::MAX / 512: no overflow.
        Some(sector * SECTOR_SIZE)
    }

    fn read(&mut self, sector: u64, len: u64, s: &Streams, mem: &GuestMemoryMmap) -> Outcome {
        let Some(offset) = self.byte_range(sector, len) else {
            return Outcome::status(S_IOERR);
        };
        // len <= MAX_REQUEST_BYTES: fits usize and u32.
        let mut buf = vec![0u8; len as usize];
        match &mut self.backing {
            Backing::Own(file) => {
                if let Err(e) = file.read_exact_at(&mut buf, offset) {
                    return Outcome::host(format!("reading {len} bytes at sector {sector}"), e);
                }
            }
            Backing::Shared(view) => match view.read(offset, &mut buf) {
                Ok(()) => {}
                Err(ViewError::Io { source, .. }) => {
                    return Outcome::host(format!("reading {len} bytes at sector {sector}"), source)
                }
                // Replaying without the primary's bytes: the view keeps the
                // divergence for the run loop to report.
                Err(e) => {
                    view.diverged(e.to_string());
                    return Outcome::status(S_IOERR);
                }
            },
        }
        if !scatter(mem, &s.writable, 0, &buf) {
            return Outcome::status(S_IOERR);
        }
        self.stats.reads += 1;
        Outcome::ok(len as u32)
    }

    fn write(&mut self, sector: u64, len: u64, s: &Streams, mem: &GuestMemoryMmap) -> Outcome {
        if self.read_only {
            debug!(sector, "virtio-blk: write to a read-only disk refused");
            return Outcome::status(S_IOERR);
        }
        let Some(offset) = self.byte_range(sector, len) else {
            return Outcome::status(S_IOERR);
        };
        let mut buf = vec![0u8; len as usize];
        if !gather(mem, &s.readable, HEADER_BYTES, &mut buf) {
            return Outcome::status(S_IOERR);
        }
        let file = match &mut self.backing {
            Backing::Own(file) => file,
            // An output: on its way to the image through the write stream
            // (synced there before it counts as written).
            Backing::Shared(view) => {
                view.write(offset, &buf);
                self.stats.writes += 1;
                return Outcome::ok(0);
            }
        };
        // Marked before the write: a copy that reads the chunk meanwhile
        // sends it again in its next round.
        self.written.mark(offset, len);
        if let Err(e) = file.write_all_at(&buf, offset) {
            return Outcome::host(format!("writing {len} bytes at sector {sector}"), e);
        }
        if !self.flush_negotiated {
            if let Err(e) = file.sync_data() {
                return Outcome::host(format!("syncing the write at sector {sector}"), e);
            }
        }
        self.stats.writes += 1;
        Outcome::ok(0)
    }

    fn flush(&mut self) -> Outcome {
        // A shared disk's writes are synced by the write stream's sink.
        if let (false, Backing::Own(file)) = (self.read_only, &self.backing) {
            if let Err(e) = file.sync_data() {
                return Outcome::host("flushing".into(), e);
            }
        }
        self.stats.flushes += 1;
        Outcome::ok(0)
    }
}

/// Copy `buf.len()` bytes of the stream `segs`, from byte `skip` on, out of
/// guest memory. False if the stream is too short or memory refuses.
fn gather(mem: &GuestMemoryMmap, segs: &[Seg], skip: u64, buf: &mut [u8]) -> bool {
    walk(segs, skip, buf.len(), |addr, range| {
        mem.read_slice(&mut buf[range], addr).is_ok()
    })
}

/// Copy `data` into the stream `segs` from byte `skip` on. False if the
/// stream is too short or memory refuses.
fn scatter(mem: &GuestMemoryMmap, segs: &[Seg], skip: u64, data: &[u8]) -> bool {
    walk(segs, skip, data.len(), |addr, range| {
        mem.write_slice(&data[range], addr).is_ok()
    })
}

/// Call `f(guest address, range of the caller's buffer)` for each piece of
/// `len` bytes of the stream `segs` starting at byte `skip`.
fn walk(
    segs: &[Seg],
    mut skip: u64,
    len: usize,
    mut f: impl FnMut(GuestAddress, std::ops::Range<usize>) -> bool,
) -> bool {
    let mut done = 0usize;
    for seg in segs {
        if done == len {
            break;
        }
        let seg_len = u64::from(seg.len);
        if skip >= seg_len {
            skip -= seg_len;
            continue;
        }
        // At most u32::MAX, and at most what is left of the buffer.
        let n = (seg_len - skip).min((len - done) as u64) as usize;
        let Some(addr) = seg.addr.0.checked_add(skip) else {
            return false;
        };
        if !f(GuestAddress(addr), done..done + n) {
            return false;
        }
        done += n;
        skip = 0;
    }
    done == len
}

impl VirtioDevice for Block {
    fn device_id(&self) -> u32 {
        VIRTIO_ID_BLOCK
    }

    fn features(&self) -> u64 {
        let ro = if self.read_only { F_RO } else { 0 };
        F_FLUSH | F_SEG_MAX | F_SIZE_MAX | ro
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let config = self.config_bytes();
        for (i, b) in data.iter_mut().enumerate() {
            *b = usize::try_from(offset)
                .ok()
                .and_then(|o| o.checked_add(i))
                .and_then(|o| config.get(o))
                .copied()
                .unwrap_or(0);
        }
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        debug!(
            offset,
            len = data.len(),
            "virtio-blk: configuration space is read-only; write ignored"
        );
    }

    fn activate(&mut self, acked_features: u64) {
        self.flush_negotiated = acked_features & F_FLUSH != 0;
    }

    fn process_queue(&mut self, index: u16, queue: &mut Queue, mem: &GuestMemoryMmap) -> QueueRun {
        let mut run = QueueRun::default();
        if index != 0 {
            return run;
        }
        // With the vCPU stopped in this exit the available index cannot
        // move, and the queue refuses an index more than `size` ahead, so at
        // most `size` chains wait; the bound only makes that explicit.
        for _ in 0..queue.size() {
            let chain = match queue.iter(mem) {
                Ok(mut avail) => avail.next(),
                Err(e) => {
                    run.broken = Some(format!("available ring: {e}"));
                    break;
                }
            };
            let Some(chain) = chain else {
                break;
            };
            let head = chain.head_index();
            if head >= queue.size() {
                run.broken = Some(format!(
                    "head index {head} out of a {}-entry queue",
                    queue.size()
                ));
                break;
            }
            let (len, host_error) = self.serve(chain, mem);
            if let Some(e) = host_error {
                self.stats.host_errors += 1;
                run.host_error.get_or_insert(e);
            }
            if let Err(e) = queue.add_used(mem, head, len) {
                run.broken = Some(format!("used ring: {e}"));
                break;
            }
            run.used += 1;
        }
        run
    }

    fn reset(&mut self) {
        self.flush_negotiated = false;
    }

    fn encode(&self, e: &mut Encoder) {
        e.u64(self.capacity);
        e.bool(self.read_only);
        e.raw(&self.id);
        e.bool(self.flush_negotiated);
    }

    fn decode(&mut self, d: &mut Decoder) -> Result<(), SnapshotError> {
        let capacity = d.u64()?;
        let read_only = d.bool()?;
        let id = d.bytes_exact(ID_BYTES)?;
        if capacity != self.capacity || read_only != self.read_only || id != self.id {
            return Err(SnapshotError::Invalid(format!(
                "virtio-blk: snapshot taken with a disk of {capacity} sectors, read-only {read_only}, \
                 ID {:?}; this disk has {} sectors, read-only {}, ID {:?}",
                String::from_utf8_lossy(id),
                self.capacity,
                self.read_only,
                String::from_utf8_lossy(&self.id),
            )));
        }
        self.flush_negotiated = d.bool()?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::io::Read;

    use tempfile::NamedTempFile;
    use vm_memory::Bytes;

    use super::*;
    use crate::devices::virtio::testing::*;
    use crate::devices::virtio::{status, MmioError, MmioTransport, INT_USED_BUFFER};

    const ID: &[u8] = b"vmft-disk0";
    /// Request header.
    const HDR: u64 = 0x10000;
    /// Status byte.
    const ST: u64 = 0x10100;
    /// Data buffers.
    const BUF: u64 = 0x20000;

    struct Rig {
        t: MmioTransport<Block>,
        mem: GuestMemoryMmap,
        drv: Driver,
        image: NamedTempFile,
    }

    fn pattern(seed: u8, len: usize) -> Vec<u8> {
        (0..len)
            .map(|i| (i as u8).wrapping_mul(7).wrapping_add(seed))
            .collect()
    }

    fn image(sectors: u64) -> NamedTempFile {
        let f = NamedTempFile::new().unwrap();
        f.as_file().set_len(sectors * SECTOR_SIZE).unwrap();
        f
    }

    fn rig_with(sectors: u64, read_only: bool, refuse: u64) -> Rig {
        let image = image(sectors);
        let file = if read_only {
            File::open(image.path()).unwrap()
        } else {
            image.reopen().unwrap()
        };
        let mut t = MmioTransport::new(Block::new(file, read_only, ID).unwrap());
        let mem = memory();
        let drv = Driver::init(&mut t, &mem, 16, refuse);
        Rig { t, mem, drv, image }
    }

    fn rig(sectors: u64) -> Rig {
        rig_with(sectors, false, 0)
    }

    impl Rig {
        fn header(&self, kind: u32, sector: u64) {
            let mut h = [0u8; 16];
            h[0..4].copy_from_slice(&kind.to_le_bytes());
            h[8..16].copy_from_slice(&sector.to_le_bytes());
            self.mem.write_slice(&h, GuestAddress(HDR)).unwrap();
            self.mem.write_obj(0xeeu8, GuestAddress(ST)).unwrap();
        }

        fn notify(&mut self) -> Result<(), MmioError> {
            self.t.write(QUEUE_NOTIFY, &0u32.to_le_bytes(), &self.mem)
        }

        fn status_byte(&self) -> u8 {
            self.mem.read_obj(GuestAddress(ST)).unwrap()
        }

        /// Submit `bufs`, notify, and return (status byte, used length).
        fn run(&mut self, bufs: &[(u64, u32, bool)]) -> (u8, u32) {
            let head = self.drv.submit(&self.mem, bufs);
            self.notify().unwrap();
            let (id, len) = self.drv.pop_used(&self.mem).expect("request not completed");
            assert_eq!(id, u32::from(head));
            assert_eq!(self.drv.pop_used(&self.mem), None);
            (self.status_byte(), len)
        }

        fn write(&mut self, sector: u64, data: &[u8]) -> (u8, u32) {
            self.header(blk::VIRTIO_BLK_T_OUT, sector);
            self.mem.write_slice(data, GuestAddress(BUF)).unwrap();
            self.run(&[
                (HDR, 16, false),
                (BUF, data.len() as u32, false),
                (ST, 1, true),
            ])
        }

        fn read(&mut self, sector: u64, len: usize) -> (u8, u32, Vec<u8>) {
            self.header(blk::VIRTIO_BLK_T_IN, sector);
            self.mem
                .write_slice(&vec![0xaa; len], GuestAddress(BUF))
                .unwrap();
            let (status, used) =
                self.run(&[(HDR, 16, false), (BUF, len as u32, true), (ST, 1, true)]);
            let mut data = vec![0u8; len];
            self.mem.read_slice(&mut data, GuestAddress(BUF)).unwrap();
            (status, used, data)
        }

        /// A request with no data: header and status.
        fn bare(&mut self, kind: u32, sector: u64) -> (u8, u32) {
            self.header(kind, sector);
            self.run(&[(HDR, 16, false), (ST, 1, true)])
        }

        fn file_bytes(&self) -> Vec<u8> {
            let mut v = Vec::new();
            File::open(self.image.path())
                .unwrap()
                .read_to_end(&mut v)
                .unwrap();
            v
        }
    }

    #[test]
    fn offers_flush_seg_max_size_max_and_config_capacity() {
        let mut r = rig(2048);
        let offered = r.t.offered_features();
        assert_eq!(
            offered,
            (1 << 32)
                | (1 << blk::VIRTIO_BLK_F_FLUSH)
                | (1 << blk::VIRTIO_BLK_F_SEG_MAX)
                | (1 << blk::VIRTIO_BLK_F_SIZE_MAX)
        );
        assert_eq!(rd(&mut r.t, DEVICE_ID), 2);
        assert_eq!(rd(&mut r.t, QUEUE_NUM_MAX), 256);
        let mut cap = [0u8; 8];
        r.t.read(CONFIG, &mut cap);
        assert_eq!(u64::from_le_bytes(cap), 2048);
        // Linux reads a le64 field as two 32-bit reads.
        assert_eq!(rd(&mut r.t, CONFIG), 2048);
        assert_eq!(rd(&mut r.t, CONFIG + 4), 0);
        assert_eq!(rd(&mut r.t, CONFIG + 8), SIZE_MAX);
        assert_eq!(rd(&mut r.t, CONFIG + 12), SEG_MAX);
        assert_eq!(rd(&mut r.t, CONFIG + 20), 0, "blk_size not offered");
        assert_eq!(
            MAX_REQUEST_BYTES,
            1 << 20,
            "seg_max × size_max is the request bound"
        );
    }

    #[test]
    fn written_sectors_read_back() {
        let mut r = rig(64);
        let data = pattern(1, 4096);
        assert_eq!(r.write(8, &data), (S_OK, 1));
        let (status, used, back) = r.read(8, 4096);
        assert_eq!((status, used), (S_OK, 4097));
        assert_eq!(back, data);
        // A neighbour stays zero.
        let (status, _, before) = r.read(7, 512);
        assert_eq!(status, S_OK);
        assert_eq!(before, vec![0u8; 512]);
        assert_eq!(r.t.device().stats().writes, 1);
        assert_eq!(r.t.device().stats().reads, 2);
    }

    #[test]
    fn write_lands_at_its_byte_offset_in_the_image() {
        let mut r = rig(64);
        let data = pattern(9, 1024);
        assert_eq!(r.write(3, &data).0, S_OK);
        let file = r.file_bytes();
        assert_eq!(file.len(), 64 * 512);
        assert_eq!(&file[3 * 512..5 * 512], &data[..]);
        assert!(file[..3 * 512].iter().all(|&b| b == 0));
        assert!(file[5 * 512..].iter().all(|&b| b == 0));
    }

    #[test]
    fn data_is_a_byte_stream_across_descriptors() {
        let mut r = rig(64);
        // OUT with header and data in one descriptor, then the status.
        let data = pattern(3, 1536);
        r.header(blk::VIRTIO_BLK_T_OUT, 10);
        r.mem.write_slice(&data, GuestAddress(HDR + 16)).unwrap();
        assert_eq!(r.run(&[(HDR, 16 + 1536, false), (ST, 1, true)]), (S_OK, 1));
        // IN scattered over three buffers, the last one also holding the
        // status byte.
        r.header(blk::VIRTIO_BLK_T_IN, 10);
        let (a, b, c) = (BUF, BUF + 0x1000, BUF + 0x2000);
        let (status, used) = r.run(&[
            (HDR, 16, false),
            (a, 512, true),
            (b, 1000, true),
            (c, 25, true),
        ]);
        let mut back = vec![0u8; 1536];
        r.mem.read_slice(&mut back[..512], GuestAddress(a)).unwrap();
        r.mem
            .read_slice(&mut back[512..1512], GuestAddress(b))
            .unwrap();
        r.mem
            .read_slice(&mut back[1512..], GuestAddress(c))
            .unwrap();
        let st: u8 = r.mem.read_obj(GuestAddress(c + 24)).unwrap();
        assert_eq!((st, used), (S_OK, 1537));
        assert_eq!(status, 0xee, "the status went to the last byte, not ST");
        assert_eq!(back, data);
    }

    #[test]
    fn requests_past_the_end_are_ioerr() {
        let mut r = rig(16);
        assert_eq!(r.write(16, &[1; 512]), (S_IOERR, 1));
        assert_eq!(r.write(15, &[1; 1024]), (S_IOERR, 1), "straddles the end");
        assert_eq!(r.write(u64::MAX, &[1; 512]), (S_IOERR, 1), "overflows");
        assert_eq!(r.read(16, 512).0, S_IOERR);
        let (status, used, data) = r.read(u64::MAX / 512, 512);
        assert_eq!((status, used), (S_IOERR, 1));
        assert_eq!(data, vec![0xaa; 512], "no data written on error");
        assert!(r.file_bytes().iter().all(|&b| b == 0));
        assert_eq!(r.write(15, &[1; 512]).0, S_OK, "the last sector is fine");
        assert_eq!(r.t.device().stats().io_errors, 5);
    }

    #[test]
    fn odd_or_oversized_lengths_are_ioerr() {
        let mut r = rig(4096);
        assert_eq!(r.write(0, &[1; 100]).0, S_IOERR);
        assert_eq!(r.read(0, 513).0, S_IOERR);
        let big = MAX_REQUEST_BYTES as usize;
        assert_eq!(r.write(0, &vec![2; big]).0, S_OK, "exactly the bound");
        assert_eq!(r.write(0, &vec![3; big + 512]).0, S_IOERR);
        assert_eq!(r.read(0, big + 512).0, S_IOERR);
        let (status, _, data) = r.read(0, big);
        assert_eq!(status, S_OK);
        assert!(data.iter().all(|&b| b == 2));
    }

    #[test]
    fn unknown_type_is_unsupp() {
        let mut r = rig(16);
        assert_eq!(r.bare(99, 0), (S_UNSUPP, 1));
        assert_eq!(
            r.bare(blk::VIRTIO_BLK_T_DISCARD, 0),
            (S_UNSUPP, 1),
            "DISCARD is not offered"
        );
        assert_eq!(r.t.device().stats().unsupported, 2);
    }

    #[test]
    fn get_id_answers_the_padded_id() {
        let mut r = rig(16);
        r.header(blk::VIRTIO_BLK_T_GET_ID, 0);
        r.mem.write_slice(&[0xaa; 20], GuestAddress(BUF)).unwrap();
        let (status, used) = r.run(&[(HDR, 16, false), (BUF, 20, true), (ST, 1, true)]);
        assert_eq!((status, used), (S_OK, 21));
        let mut id = [0u8; 20];
        r.mem.read_slice(&mut id, GuestAddress(BUF)).unwrap();
        assert_eq!(&id[..10], ID);
        assert_eq!(&id[10..], &[0u8; 10]);
        // Too little room for the 20 bytes.
        r.header(blk::VIRTIO_BLK_T_GET_ID, 0);
        assert_eq!(
            r.run(&[(HDR, 16, false), (BUF, 8, true), (ST, 1, true)]),
            (S_IOERR, 1)
        );
        assert!(matches!(
            Block::new(image(1).reopen().unwrap(), false, &[b'x'; 21]),
            Err(BlockError::IdTooLong(21))
        ));
    }

    #[test]
    fn flush_completes_ok() {
        let mut r = rig(16);
        assert_eq!(r.write(0, &[5; 512]).0, S_OK);
        assert_eq!(r.bare(blk::VIRTIO_BLK_T_FLUSH, 0), (S_OK, 1));
        assert_eq!(r.t.device().stats().flushes, 1);
        // Without FLUSH negotiated the device writes through; writes still
        // complete.
        let mut r = rig_with(16, false, 1 << blk::VIRTIO_BLK_F_FLUSH);
        assert_eq!(r.write(1, &[6; 512]).0, S_OK);
        assert_eq!(&r.file_bytes()[512..1024], &[6; 512]);
    }

    #[test]
    fn read_only_disk_refuses_writes() {
        let mut r = rig_with(16, true, 0);
        assert_ne!(r.t.acked_features() & (1 << blk::VIRTIO_BLK_F_RO), 0);
        assert_eq!(r.write(0, &[7; 512]), (S_IOERR, 1));
        assert!(r.file_bytes().iter().all(|&b| b == 0));
        assert_eq!(r.read(0, 512).0, S_OK);
        assert_eq!(r.bare(blk::VIRTIO_BLK_T_FLUSH, 0).0, S_OK);
    }

    #[test]
    fn host_failure_is_ioerr_and_reported() {
        // A device that believes it may write over a file opened read-only.
        let img = image(16);
        let mut t =
            MmioTransport::new(Block::new(File::open(img.path()).unwrap(), false, ID).unwrap());
        let mem = memory();
        let mut drv = Driver::init(&mut t, &mem, 16, 0);
        let mut h = [0u8; 16];
        h[0..4].copy_from_slice(&blk::VIRTIO_BLK_T_OUT.to_le_bytes());
        mem.write_slice(&h, GuestAddress(HDR)).unwrap();
        drv.submit(&mem, &[(HDR, 16, false), (BUF, 512, false), (ST, 1, true)]);
        let err = t
            .write(QUEUE_NOTIFY, &0u32.to_le_bytes(), &mem)
            .unwrap_err();
        assert!(matches!(
            err,
            MmioError::HostIo {
                device_id: 2,
                queue: 0,
                ..
            }
        ));
        assert!(err.to_string().contains("writing 512 bytes at sector 0"));
        assert_eq!(drv.pop_used(&mem), Some((0, 1)));
        assert_eq!(mem.read_obj::<u8>(GuestAddress(ST)).unwrap(), S_IOERR);
        assert!(t.irq_level(), "the completion is still signalled");
        assert_eq!(t.device().stats().host_errors, 1);
    }

    #[test]
    fn several_requests_complete_in_one_notify() {
        let mut r = rig(64);
        let mut heads = Vec::new();
        for i in 0..3u64 {
            // Each request gets its own header, data and status.
            let hdr = HDR + 0x200 * i;
            let mut h = [0u8; 16];
            h[0..4].copy_from_slice(&blk::VIRTIO_BLK_T_OUT.to_le_bytes());
            h[8..16].copy_from_slice(&(i * 2).to_le_bytes());
            r.mem.write_slice(&h, GuestAddress(hdr)).unwrap();
            let buf = BUF + 0x1000 * i;
            r.mem
                .write_slice(&pattern(i as u8, 512), GuestAddress(buf))
                .unwrap();
            heads.push(r.drv.submit(
                &r.mem,
                &[(hdr, 16, false), (buf, 512, false), (hdr + 0x100, 1, true)],
            ));
        }
        r.notify().unwrap();
        for (i, head) in heads.into_iter().enumerate() {
            assert_eq!(r.drv.pop_used(&r.mem), Some((u32::from(head), 1)));
            let st: u8 = r
                .mem
                .read_obj(GuestAddress(HDR + 0x200 * i as u64 + 0x100))
                .unwrap();
            assert_eq!(st, S_OK);
            let off = i * 2 * 512;
            assert_eq!(&r.file_bytes()[off..off + 512], &pattern(i as u8, 512)[..]);
        }
        assert_eq!(r.drv.pop_used(&r.mem), None);
    }

    #[test]
    fn malformed_chains_complete_without_panic() {
        let mut r = rig(16);
        // Header shorter than 16 bytes: IOERR.
        r.header(blk::VIRTIO_BLK_T_IN, 0);
        assert_eq!(r.run(&[(HDR, 8, false), (ST, 1, true)]), (S_IOERR, 1));
        // A readable descriptor after a writable one: IOERR.
        r.header(blk::VIRTIO_BLK_T_OUT, 0);
        assert_eq!(
            r.run(&[
                (HDR, 16, false),
                (BUF, 512, true),
                (BUF, 512, false),
                (ST, 1, true)
            ]),
            (S_IOERR, 1)
        );
        // A data buffer outside guest memory: IOERR, nothing read.
        r.header(blk::VIRTIO_BLK_T_OUT, 0);
        assert_eq!(
            r.run(&[(HDR, 16, false), (1 << 40, 512, false), (ST, 1, true)]),
            (S_IOERR, 1)
        );
        // No writable status byte at all: returned with length 0, ST untouched.
        r.header(blk::VIRTIO_BLK_T_OUT, 0);
        assert_eq!(r.run(&[(HDR, 16, false), (BUF, 512, false)]), (0xee, 0));
        // Status descriptor of length 0.
        r.header(blk::VIRTIO_BLK_T_FLUSH, 0);
        assert_eq!(r.run(&[(HDR, 16, false), (ST, 0, true)]), (0xee, 0));
        // Status byte outside guest memory.
        r.header(blk::VIRTIO_BLK_T_FLUSH, 0);
        assert_eq!(r.run(&[(HDR, 16, false), (1 << 40, 1, true)]), (0xee, 0));
        assert!(r.file_bytes().iter().all(|&b| b == 0));
        let stats = r.t.device().stats();
        assert_eq!(stats.malformed, 6);
        assert_eq!(stats.io_errors, 3);
        // The device still works.
        assert_eq!(r.write(0, &[1; 512]).0, S_OK);
    }

    #[test]
    fn looping_and_overlong_chains_are_bounded() {
        let mut r = rig(16);
        // A descriptor whose `next` is itself: the ring size bounds the walk.
        r.header(blk::VIRTIO_BLK_T_IN, 0);
        let head = r.drv.size - 1;
        r.drv.write_desc(&r.mem, head, HDR, 16, F_NEXT, head);
        r.drv.publish(&r.mem, head);
        r.notify().unwrap();
        assert_eq!(r.drv.pop_used(&r.mem), Some((u32::from(head), 0)));

        // 131 descriptors (a 256-entry queue): more than MAX_CHAIN_DESCRIPTORS.
        let image = image(256);
        let mut t = MmioTransport::new(Block::new(image.reopen().unwrap(), false, ID).unwrap());
        let mem = memory();
        let mut drv = Driver::init(&mut t, &mem, 256, 0);
        let mut h = [0u8; 16];
        h[0..4].copy_from_slice(&blk::VIRTIO_BLK_T_OUT.to_le_bytes());
        mem.write_slice(&h, GuestAddress(HDR)).unwrap();
        let mut bufs = vec![(HDR, 16, false)];
        bufs.extend((0..MAX_CHAIN_DESCRIPTORS as u64 - 1).map(|i| (BUF + 512 * i, 512, false)));
        bufs.push((ST, 1, true));
        assert_eq!(bufs.len(), MAX_CHAIN_DESCRIPTORS + 1);
        mem.write_obj(0xeeu8, GuestAddress(ST)).unwrap();
        let head = drv.submit(&mem, &bufs);
        t.write(QUEUE_NOTIFY, &0u32.to_le_bytes(), &mem).unwrap();
        assert_eq!(drv.pop_used(&mem), Some((u32::from(head), 0)));
        assert_eq!(mem.read_obj::<u8>(GuestAddress(ST)).unwrap(), 0xee);
        // One fewer fits: header, 128 × 512-byte segments, status.
        bufs.remove(1);
        let head = drv.submit(&mem, &bufs);
        t.write(QUEUE_NOTIFY, &0u32.to_le_bytes(), &mem).unwrap();
        assert_eq!(drv.pop_used(&mem), Some((u32::from(head), 1)));
        assert_eq!(mem.read_obj::<u8>(GuestAddress(ST)).unwrap(), S_OK);
    }

    #[test]
    fn head_out_of_range_asks_for_reset() {
        let mut r = rig(16);
        wr(&mut r.t, &r.mem, INTERRUPT_ACK, 0xffff_ffff);
        r.drv.publish(&r.mem, r.drv.size); // head index == queue size
        r.notify().unwrap();
        assert_eq!(r.drv.pop_used(&r.mem), None);
        let st = rd(&mut r.t, STATUS);
        assert_ne!(st & status::DEVICE_NEEDS_RESET, 0);
        assert_eq!(
            rd(&mut r.t, INTERRUPT_STATUS),
            2,
            "config change, no used buffer"
        );
        // Further notifies are ignored until the driver resets.
        r.header(blk::VIRTIO_BLK_T_FLUSH, 0);
        r.drv.submit(&r.mem, &[(HDR, 16, false), (ST, 1, true)]);
        r.notify().unwrap();
        assert_eq!(r.drv.pop_used(&r.mem), None);
        // Reset and probe again: works.
        r.drv = Driver::init(&mut r.t, &r.mem, 16, 0);
        assert_eq!(rd(&mut r.t, STATUS) & status::DEVICE_NEEDS_RESET, 0);
        assert_eq!(r.write(0, &[4; 512]).0, S_OK);
    }

    #[test]
    fn available_index_jump_asks_for_reset() {
        let mut r = rig(16);
        r.mem
            .write_obj(100u16.to_le(), GuestAddress(AVAIL + 2))
            .unwrap();
        r.notify().unwrap();
        assert_ne!(rd(&mut r.t, STATUS) & status::DEVICE_NEEDS_RESET, 0);
        assert_eq!(r.drv.pop_used(&r.mem), None);
    }

    #[test]
    fn snapshot_mid_way_continues_on_a_copy_of_the_disk() {
        let mut r = rig(64);
        let first = pattern(11, 2048);
        assert_eq!(r.write(4, &first).0, S_OK);
        assert_eq!(r.read(4, 2048).2, first);
        // Leave an interrupt pending, as a snapshot between exits may.
        assert!(r.t.irq_level());

        let mut e = Encoder::new();
        r.t.encode(&mut e);
        let bytes = e.into_bytes();

        // The backup's own copy of the disk.
        let copy = NamedTempFile::new().unwrap();
        std::fs::copy(r.image.path(), copy.path()).unwrap();
        let device = Block::new(copy.reopen().unwrap(), false, ID).unwrap();
        let restored = MmioTransport::decode(&mut Decoder::new(&bytes), device).unwrap();
        let mut again = Encoder::new();
        restored.encode(&mut again);
        assert_eq!(again.into_bytes(), bytes, "encode(decode(x)) == x");
        assert!(restored.irq_level());
        assert_eq!(restored.status(), r.t.status());

        // Continue on the restored device with the same guest memory and
        // driver: the rings pick up where they were.
        r.t = restored;
        r.image = copy;
        assert_eq!(r.read(4, 2048).2, first);
        let second = pattern(12, 512);
        assert_eq!(r.write(20, &second).0, S_OK);
        assert_eq!(&r.file_bytes()[20 * 512..21 * 512], &second[..]);
        assert_eq!(&r.file_bytes()[4 * 512..8 * 512], &first[..]);
        assert_eq!(r.drv.avail_idx, 4);
    }

    #[test]
    fn snapshot_refuses_another_disk() {
        let r = rig(64);
        let mut e = Encoder::new();
        r.t.encode(&mut e);
        let bytes = e.into_bytes();
        let other = Block::new(image(32).reopen().unwrap(), false, ID).unwrap();
        let err = MmioTransport::decode(&mut Decoder::new(&bytes), other).unwrap_err();
        assert!(matches!(err, SnapshotError::Invalid(_)), "{err}");
        let ro = Block::new(File::open(r.image.path()).unwrap(), true, ID).unwrap();
        assert!(MmioTransport::decode(&mut Decoder::new(&bytes), ro).is_err());
        let truncated = &bytes[..bytes.len() - 1];
        let same = Block::new(r.image.reopen().unwrap(), false, ID).unwrap();
        assert!(MmioTransport::decode(&mut Decoder::new(truncated), same).is_err());
    }

    #[test]
    fn capacity_rounds_down_to_whole_sectors() {
        let f = NamedTempFile::new().unwrap();
        f.as_file().set_len(3 * 512 + 100).unwrap();
        let b = Block::new(f.reopen().unwrap(), false, ID).unwrap();
        assert_eq!(b.capacity(), 3);
    }

    #[test]
    fn used_buffer_interrupt_follows_each_completion() {
        let mut r = rig(16);
        assert!(!r.t.irq_level());
        r.bare(blk::VIRTIO_BLK_T_FLUSH, 0);
        assert_eq!(rd(&mut r.t, INTERRUPT_STATUS), INT_USED_BUFFER);
        wr(&mut r.t, &r.mem, INTERRUPT_ACK, INT_USED_BUFFER);
        assert!(!r.t.irq_level());
    }
}
