//! Shared disks (`--disk PATH,shared`): one image that both sides of a pair
//! can reach, written only by the live side.
//!
//! With separate disks each side has its own copy and executes the same
//! requests on it, so a disk is internal state. A shared disk is outside
//! the VM, like the console: what the guest writes to it is **output**, and
//! what it reads is **input** (the backup cannot read an image that the
//! primary has already changed). Three parts:
//!
//! - **The device's view** ([`SharedView`], inside the virtio-blk model):
//!   a read is served from the image with the writes not yet on it laid
//!   over (a cache of sectors, dropped once the write reached the image);
//!   recording, the bytes read are kept for the log (`DiskRead`);
//!   replaying, they come from the log instead of the image. A write is
//!   cached and handed on as a record of the **write stream**.
//! - **The write stream**: records `len u32 | disk u8 | seq u64 | offset
//!   u64 | data` (little-endian; `len` counts what follows it), one per
//!   guest write, in guest order. On a primary it is held like console
//!   output ([`crate::ft::output::HeldOutput`]) and released to
//!   [`DiskSink`] once the backup acknowledged the log behind it; a backup
//!   keeps the part the primary may not have written
//!   ([`crate::ft::output::OutputTail`], from the last `DiskReleased`
//!   offset) and writes it again when it goes live. Writes are idempotent
//!   and the tail is written in order, so writing a record twice is
//!   harmless.
//! - **The fence** ([`Fence`]): a side that was stopped (SIGSTOP, a long
//!   pause) may wake holding writes it believes acknowledged, after the
//!   other side went live and wrote newer data. The file `PATH.vmft-fence`
//!   holds `generation owner`: the newest generation that formed a pair or
//!   claimed the VM, and the claimant that won it (`-` before any claim).
//!   Every release of writes takes an exclusive `flock` on it, checks that
//!   no other side owns this side's generation and that no newer
//!   generation has spoken, writes, and unlocks, so a fenced side's late
//!   write never reaches the image; it stops itself instead (exit status
//!   5). A live side that takes a new backup (re-protection) moves its
//!   own generation on to the new pair's without writing the file
//!   ([`Fence::advance`]): the file still names it as the owner of the
//!   old generation, and the first claim of the new one is written as
//!   usual.

use std::collections::BTreeMap;
use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::io::{self, Seek, SeekFrom, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use thiserror::Error;

use crate::ft::output::Release;

/// Bytes in a sector: the unit of the view's cache.
const SECTOR: u64 = 512;
/// Bytes of a write record's head after its length: disk, seq, offset.
const RECORD_HEAD: usize = 1 + 8 + 8;
/// Largest record accepted by the decoder (a request is at most 1 MiB).
const MAX_RECORD: usize = RECORD_HEAD + (1 << 20);

/// Errors of shared disks.
#[derive(Debug, Error)]
pub enum SharedDiskError {
    /// The image or its fence file cannot be opened.
    #[error("shared disk {path}: {source}")]
    Open {
        /// The file.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// The fence file is unreadable or holds something else.
    #[error("shared disk fence {path}: {detail}")]
    BadFence {
        /// The fence file.
        path: PathBuf,
        /// What is wrong.
        detail: String,
    },
    /// A newer side owns the disk: this side must not write.
    #[error("shared disk {path}: fenced: {holder} (this side: generation {generation}, {me})")]
    Fenced {
        /// The fence file.
        path: PathBuf,
        /// Who holds it.
        holder: String,
        /// This side's generation.
        generation: u64,
        /// This side.
        me: String,
    },
    /// This side never claimed its generation: it cannot take its fence
    /// to a newer one.
    #[error(
        "shared disk fence {path}: this side never claimed generation {generation}, so a \
         new pair cannot take the disk over from it"
    )]
    NotOwner {
        /// The fence file.
        path: PathBuf,
        /// This side's generation.
        generation: u64,
    },
    /// Reading, writing or syncing the fence or the image failed.
    #[error("shared disk {path}: {what}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The step.
        what: &'static str,
        /// Why.
        source: io::Error,
    },
}

/// One record of the write stream.
pub fn write_record(disk: u8, seq: u64, offset: u64, data: &[u8]) -> Vec<u8> {
    let len = (RECORD_HEAD + data.len()) as u32;
    let mut r = Vec::with_capacity(4 + len as usize);
    r.extend_from_slice(&len.to_le_bytes());
    r.push(disk);
    r.extend_from_slice(&seq.to_le_bytes());
    r.extend_from_slice(&offset.to_le_bytes());
    r.extend_from_slice(data);
    r
}

/// A decoded write record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WriteRecord {
    /// The disk's index (`--disk` order).
    pub disk: u8,
    /// The view's number for this write (from 1).
    pub seq: u64,
    /// Byte offset in the image.
    pub offset: u64,
    /// The bytes written.
    pub data: Vec<u8>,
}

/// Splits the write stream, given in pieces of any size, into records.
#[derive(Debug, Default)]
pub struct RecordDecoder {
    buf: Vec<u8>,
}

impl RecordDecoder {
    /// Add bytes of the stream.
    pub fn push(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// The next whole record; an error if the stream cannot be a write
    /// stream (a length no record has).
    pub fn next_record(&mut self) -> io::Result<Option<WriteRecord>> {
        if self.buf.len() < 4 {
            return Ok(None);
        }
        let len = u32::from_le_bytes(self.buf[..4].try_into().unwrap()) as usize;
        if !(RECORD_HEAD..=MAX_RECORD).contains(&len) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("shared-disk write stream: a record of {len} bytes"),
            ));
        }
        if self.buf.len() < 4 + len {
            return Ok(None);
        }
        let b = &self.buf[4..4 + len];
        let rec = WriteRecord {
            disk: b[0],
            seq: u64::from_le_bytes(b[1..9].try_into().unwrap()),
            offset: u64::from_le_bytes(b[9..17].try_into().unwrap()),
            data: b[RECORD_HEAD..].to_vec(),
        };
        self.buf.drain(..4 + len);
        Ok(Some(rec))
    }

    /// Bytes of an unfinished record.
    pub fn pending(&self) -> usize {
        self.buf.len()
    }
}

/// The fence of a shared disk: who may write it (see the module docs).
///
/// One open file per fence; its mutex makes the threads of one process
/// (the hooks that claim, the sink that writes) take turns, since `flock`
/// only excludes other open files.
#[derive(Debug)]
pub struct Fence {
    file: Mutex<File>,
    path: PathBuf,
    /// This side's generation: moves on when a new backup joins
    /// ([`Fence::advance`]).
    generation: AtomicU64,
    /// The generation this side last claimed (0: none).
    claimed: AtomicU64,
    me: String,
}

/// What a fence file holds.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Holder {
    generation: u64,
    /// The claimant that won `generation`, if any did.
    owner: Option<String>,
}

/// How often a side waiting for the fence says so.
const FENCE_WAIT_NOTE: std::time::Duration = std::time::Duration::from_secs(5);

/// An exclusive `flock`, released when dropped.
struct Locked<'a>(&'a File);

impl<'a> Locked<'a> {
    /// Wait for the lock. A holder that never lets go (a process stopped
    /// inside a write) keeps this side waiting: no write ever gets past
    /// the fence, and the wait is said every few seconds.
    fn take(file: &'a File, path: &Path) -> io::Result<Self> {
        let started = std::time::Instant::now();
        let mut said = started;
        loop {
            // SAFETY: flock on a file descriptor this File owns; no memory
            // is passed.
            let r = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
            if r == 0 {
                return Ok(Locked(file));
            }
            let e = io::Error::last_os_error();
            match e.raw_os_error() {
                Some(libc::EWOULDBLOCK) | Some(libc::EINTR) => {}
                _ => return Err(e),
            }
            if said.elapsed() >= FENCE_WAIT_NOTE {
                said = std::time::Instant::now();
                tracing::warn!(
                    "waiting {:.0} s for the fence {}: another process holds it (a side \
                     stopped inside a write?); nothing is written until it lets go or dies",
                    started.elapsed().as_secs_f64(),
                    path.display()
                );
            }
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
    }
}

impl Drop for Locked<'_> {
    fn drop(&mut self) {
        // SAFETY: as in `take`; unlocking a lock this descriptor holds.
        unsafe { libc::flock(self.0.as_raw_fd(), libc::LOCK_UN) };
    }
}

impl Fence {
    /// The fence file of `image`.
    pub fn path_of(image: &Path) -> PathBuf {
        let mut p = image.as_os_str().to_owned();
        p.push(".vmft-fence");
        PathBuf::from(p)
    }

    /// Open (creating) the fence of `image` for a side of `generation`
    /// whose claimant identity is `me`.
    pub fn open(image: &Path, generation: u64, me: &str) -> Result<Fence, SharedDiskError> {
        let path = Self::path_of(image);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(|source| SharedDiskError::Open {
                path: path.clone(),
                source,
            })?;
        Ok(Fence {
            file: Mutex::new(file),
            path,
            generation: AtomicU64::new(generation),
            claimed: AtomicU64::new(0),
            me: me.to_string(),
        })
    }

    fn io(&self, what: &'static str) -> impl FnOnce(io::Error) -> SharedDiskError + '_ {
        move |source| SharedDiskError::Io {
            path: self.path.clone(),
            what,
            source,
        }
    }

    /// What the fence holds: its first line. An empty file (never joined)
    /// holds nothing; anything unreadable fences everyone (fail closed).
    fn read(&self, file: &File) -> Result<Option<Holder>, SharedDiskError> {
        let mut buf = vec![0u8; 512];
        let n = file
            .read_at(&mut buf, 0)
            .map_err(self.io("reading the fence"))?;
        let text = String::from_utf8_lossy(&buf[..n]);
        if text.trim().is_empty() {
            return Ok(None);
        }
        let line = text.lines().next().unwrap_or("").trim();
        let bad = || SharedDiskError::BadFence {
            path: self.path.clone(),
            detail: format!("holds {line:?}, not \"GENERATION OWNER\""),
        };
        let (g, owner) = line.split_once(' ').ok_or_else(bad)?;
        if owner.is_empty() || owner.contains(' ') {
            return Err(bad());
        }
        Ok(Some(Holder {
            generation: g.parse().map_err(|_| bad())?,
            owner: (owner != "-").then(|| owner.to_string()),
        }))
    }

    /// Write the fence's line, then cut what an older, longer line left:
    /// a crash in between leaves the new line first (never an empty file).
    fn store(&self, file: &File, owner: Option<&str>) -> Result<(), SharedDiskError> {
        let line = format!("{} {}\n", self.generation(), owner.unwrap_or("-"));
        file.write_all_at(line.as_bytes(), 0)
            .and_then(|_| file.set_len(line.len() as u64))
            .and_then(|_| file.sync_data())
            .map_err(self.io("writing the fence"))
    }

    /// Whether this side may write, given what the fence holds.
    fn check(&self, holder: &Option<Holder>) -> Result<(), SharedDiskError> {
        let mine = self.generation();
        let fenced = |holder: String| SharedDiskError::Fenced {
            path: self.path.clone(),
            holder,
            generation: mine,
            me: self.me.clone(),
        };
        match holder {
            None => Ok(()),
            Some(h) if h.generation > mine => Err(fenced(format!(
                "generation {} has spoken since",
                h.generation
            ))),
            Some(Holder {
                generation,
                owner: Some(o),
            }) if *generation == mine && *o != self.me => {
                Err(fenced(format!("{o} won generation {generation}")))
            }
            Some(_) => Ok(()),
        }
    }

    /// Run `f` on the fence's file, holding it (this process's threads
    /// in turn, other processes by `flock`).
    fn locked<T>(
        &self,
        f: impl FnOnce(&File) -> Result<T, SharedDiskError>,
    ) -> Result<T, SharedDiskError> {
        let file = self.file.lock().unwrap_or_else(|e| e.into_inner());
        let _l = Locked::take(&file, &self.path).map_err(self.io("locking the fence"))?;
        f(&file)
    }

    /// A pair of this generation forms: record it, so that sides of older
    /// generations are fenced off; refused if a newer one has spoken.
    pub fn join(&self) -> Result<(), SharedDiskError> {
        self.locked(|file| {
            let holder = self.read(file)?;
            self.check(&holder)?;
            match holder {
                Some(h) if h.generation == self.generation() => Ok(()),
                _ => self.store(file, None),
            }
        })
    }

    /// This side won the claim for its generation: from now on only it
    /// may write.
    pub fn claim(&self) -> Result<(), SharedDiskError> {
        self.locked(|file| {
            self.check(&self.read(file)?)?;
            self.store(file, Some(&self.me))?;
            self.claimed.store(self.generation(), Ordering::Release);
            Ok(())
        })
    }

    /// This side's generation.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// This side (live, owning its generation) formed a pair of the newer
    /// `generation` with a backup that joined: its writes are checked
    /// against that one from now on. The fence file is left as it is: it
    /// names this side as the owner of the older generation, which fences
    /// off the other sides of that generation and lets either side of the
    /// new pair claim the new one. That holds only if this side claimed
    /// its generation: refused otherwise ([`SharedDiskError::NotOwner`]).
    /// Never moves back.
    pub fn advance(&self, generation: u64) -> Result<(), SharedDiskError> {
        self.owns()?;
        self.generation.fetch_max(generation, Ordering::AcqRel);
        Ok(())
    }

    /// Whether this side claimed its current generation.
    fn owns(&self) -> Result<(), SharedDiskError> {
        let generation = self.generation();
        if self.claimed.load(Ordering::Acquire) == generation {
            return Ok(());
        }
        Err(SharedDiskError::NotOwner {
            path: self.path.clone(),
            generation,
        })
    }

    /// Run `write` while holding the fence, if this side may still write.
    pub fn write<T>(
        &self,
        write: impl FnOnce() -> Result<T, SharedDiskError>,
    ) -> Result<T, SharedDiskError> {
        self.locked(|file| {
            self.check(&self.read(file)?)?;
            write()
        })
    }
}

/// One shared disk, as opened by a monitor.
#[derive(Debug)]
struct Disk {
    path: PathBuf,
    file: File,
    /// The seq of the last write that reached the image.
    applied: Arc<AtomicU64>,
}

/// The shared disks of a VM: what the devices' views and the write
/// stream's sink share.
#[derive(Debug, Clone, Default)]
pub struct SharedDisks {
    /// By `--disk` index; `None` for a disk that is not shared.
    disks: Vec<Option<Arc<Disk>>>,
}

impl SharedDisks {
    /// Open the shared disks among `specs` (read and write).
    pub fn open(specs: &[crate::boot::DiskSpec]) -> Result<SharedDisks, SharedDiskError> {
        let mut disks = Vec::new();
        for s in specs {
            if !s.shared {
                disks.push(None);
                continue;
            }
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .open(&s.path)
                .map_err(|source| SharedDiskError::Open {
                    path: s.path.clone(),
                    source,
                })?;
            // The fence is a file next to the image, on the filesystem
            // both sides reach: a device node has no such place.
            let is_file = file.metadata().map(|m| m.is_file()).unwrap_or(false);
            if !is_file {
                return Err(SharedDiskError::Open {
                    path: s.path.clone(),
                    source: io::Error::new(
                        io::ErrorKind::InvalidInput,
                        "a shared disk must be a regular file on a filesystem both sides \
                         reach (its fence file lives next to it)",
                    ),
                });
            }
            disks.push(Some(Arc::new(Disk {
                path: s.path.clone(),
                file,
                applied: Arc::new(AtomicU64::new(0)),
            })));
        }
        Ok(SharedDisks { disks })
    }

    /// Whether any disk is shared.
    pub fn any(&self) -> bool {
        self.disks.iter().any(Option::is_some)
    }

    /// The images of the shared disks.
    pub fn paths(&self) -> Vec<PathBuf> {
        self.disks
            .iter()
            .flatten()
            .map(|d| d.path.clone())
            .collect()
    }

    /// The device's view of disk `index`, if it is shared.
    pub fn view(&self, index: usize) -> Result<Option<SharedView>, SharedDiskError> {
        let Some(Some(d)) = self.disks.get(index) else {
            return Ok(None);
        };
        let file = d.file.try_clone().map_err(|source| SharedDiskError::Io {
            path: d.path.clone(),
            what: "opening the image for reading",
            source,
        })?;
        Ok(Some(SharedView::new(index as u8, file, d.applied.clone())))
    }

    /// The fences of the shared disks for a side of `generation` whose
    /// claimant identity is `me`.
    pub fn fences(&self, generation: u64, me: &str) -> Result<Fences, SharedDiskError> {
        let fences = self
            .paths()
            .iter()
            .map(|p| Fence::open(p, generation, me))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Fences(Arc::new(fences)))
    }

    /// A sink that writes the stream's records to the images, holding
    /// `fences` (see [`SharedDisks::fences`]) if this side is one of a
    /// pair.
    pub fn sink(&self, fences: Vec<Fence>) -> DiskSink {
        self.sink_fenced(Fences(Arc::new(fences)))
    }

    /// As [`SharedDisks::sink`], with fences shared with the side's hooks.
    pub fn sink_fenced(&self, fences: Fences) -> DiskSink {
        DiskSink {
            disks: self.clone(),
            fences,
            decoder: RecordDecoder::default(),
            fenced: Arc::new(Mutex::new(None)),
        }
    }
}

/// The fences of a side's shared disks: claimed by the side's hooks when
/// it wins the VM, held by its [`DiskSink`] at every write.
#[derive(Clone, Debug, Default)]
pub struct Fences(Arc<Vec<Fence>>);

impl Fences {
    /// This side won the claim: only it may write from now on.
    pub fn claim(&self) -> Result<(), SharedDiskError> {
        self.0.iter().try_for_each(Fence::claim)
    }

    /// A pair of this generation forms: older generations are fenced off.
    pub fn join(&self) -> Result<(), SharedDiskError> {
        self.0.iter().try_for_each(Fence::join)
    }

    /// A new backup joined: this side's pair is of `generation` now (see
    /// [`Fence::advance`]); all or none of the fences move.
    pub fn advance(&self, generation: u64) -> Result<(), SharedDiskError> {
        self.0.iter().try_for_each(Fence::owns)?;
        self.0.iter().try_for_each(|f| f.advance(generation))
    }

    /// This side's generation (the newest of its fences').
    pub fn generation(&self) -> u64 {
        self.0.iter().map(Fence::generation).max().unwrap_or(0)
    }
}

/// Writes the write stream to the images (see the module docs).
pub struct DiskSink {
    disks: SharedDisks,
    fences: Fences,
    decoder: RecordDecoder,
    fenced: Arc<Mutex<Option<SinkFailure>>>,
}

/// Why a [`DiskSink`] stopped writing, once it did: fenced off (exit
/// status 5), or a write that failed (the VM stops, so that the backup,
/// which kept the write, takes over and writes it).
#[derive(Clone, Debug, Default)]
pub struct FencedFlag(Arc<Mutex<Option<SinkFailure>>>);

/// A [`DiskSink`]'s failure.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SinkFailure {
    /// Fenced off by a newer side (rather than an I/O error).
    pub fenced: bool,
    /// What happened.
    pub message: String,
}

impl FencedFlag {
    /// The failure, once the sink failed.
    pub fn get(&self) -> Option<SinkFailure> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

impl DiskSink {
    /// Where the sink says it was fenced off.
    pub fn fenced_flag(&self) -> FencedFlag {
        FencedFlag(self.fenced.clone())
    }

    fn apply(&mut self, records: &[WriteRecord]) -> Result<(), SharedDiskError> {
        for r in records {
            let Some(Some(d)) = self.disks.disks.get(r.disk as usize) else {
                return Err(SharedDiskError::Io {
                    path: PathBuf::from(format!("disk {}", r.disk)),
                    what: "a write record for a disk that is not shared",
                    source: io::Error::from(io::ErrorKind::InvalidData),
                });
            };
            d.file
                .write_all_at(&r.data, r.offset)
                .map_err(|source| SharedDiskError::Io {
                    path: d.path.clone(),
                    what: "writing",
                    source,
                })?;
        }
        // Durable before the writes count as done (a flush the guest saw
        // complete relies on the log until here).
        let mut written: Vec<u8> = records.iter().map(|r| r.disk).collect();
        written.sort_unstable();
        written.dedup();
        for d in written
            .iter()
            .filter_map(|&i| self.disks.disks.get(i as usize).and_then(Option::as_ref))
        {
            d.file.sync_data().map_err(|source| SharedDiskError::Io {
                path: d.path.clone(),
                what: "syncing",
                source,
            })?;
        }
        for r in records {
            if let Some(Some(d)) = self.disks.disks.get(r.disk as usize) {
                d.applied.fetch_max(r.seq, Ordering::AcqRel);
            }
        }
        Ok(())
    }

    fn release_records(&mut self, bytes: &[u8]) -> Result<(), SharedDiskError> {
        self.decoder.push(bytes);
        let mut records = Vec::new();
        while let Some(r) = self
            .decoder
            .next_record()
            .map_err(|source| SharedDiskError::Io {
                path: PathBuf::from("the write stream"),
                what: "decoding",
                source,
            })?
        {
            records.push(r);
        }
        if records.is_empty() {
            return Ok(());
        }
        // Every fence is held while writing (a side fenced off one disk
        // writes none).
        fn under(
            fences: &[Fence],
            f: &mut dyn FnMut() -> Result<(), SharedDiskError>,
        ) -> Result<(), SharedDiskError> {
            match fences.split_first() {
                None => f(),
                Some((first, rest)) => first.write(|| under(rest, f)),
            }
        }
        let fences = self.fences.0.clone();
        under(&fences, &mut || self.apply(&records))
    }
}

impl Release for DiskSink {
    /// Write whole records. After a failure nothing more is written (the
    /// stream is ordered: a later write must not land without an earlier
    /// one).
    fn release(&mut self, _offset: u64, bytes: &[u8]) -> io::Result<()> {
        let failed = self
            .fenced
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        if let Some(f) = failed {
            return Err(io::Error::other(f.message));
        }
        self.release_records(bytes).map_err(|e| {
            let failure = SinkFailure {
                fenced: matches!(e, SharedDiskError::Fenced { .. }),
                message: e.to_string(),
            };
            tracing::error!("{}: this side writes nothing more", failure.message);
            let msg = failure.message.clone();
            *self.fenced.lock().unwrap_or_else(|e| e.into_inner()) = Some(failure);
            io::Error::other(msg)
        })
    }
}

/// A [`Release`] used as a plain writer: each write is released at once
/// (a VM without a backup writes its shared disks directly).
pub struct ReleaseNow<R: Release> {
    sink: R,
    offset: u64,
}

impl<R: Release> ReleaseNow<R> {
    /// Release through `sink`.
    pub fn new(sink: R) -> Self {
        ReleaseNow { sink, offset: 0 }
    }
}

impl<R: Release> Write for ReleaseNow<R> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.sink.release(self.offset, buf)?;
        self.offset += buf.len() as u64;
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Where a view's reads come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ViewMode {
    /// The image, with writes not yet on it laid over.
    Direct,
    /// As `Direct`, and the bytes read are kept for the log.
    Record,
    /// The log: the primary's bytes, handed in before the exit.
    Replay,
}

impl ViewMode {
    /// The mode a VM in `ft` starts in.
    pub fn of(ft: &crate::vm::FtMode) -> ViewMode {
        match ft {
            crate::vm::FtMode::Live => ViewMode::Direct,
            crate::vm::FtMode::Record { .. } => ViewMode::Record,
            crate::vm::FtMode::Replay { .. } => ViewMode::Replay,
        }
    }
}

/// A read the view could not serve.
#[derive(Debug, Error)]
pub enum ViewError {
    /// Replaying, the log holds no (or other) data for this read.
    #[error("the log has no data for a read of {len} bytes at byte {offset} of shared disk {disk}{}", .found.map(|f| format!(" (it holds {f} bytes)")).unwrap_or_default())]
    NotLogged {
        /// The disk.
        disk: u8,
        /// Byte offset.
        offset: u64,
        /// Bytes asked for.
        len: usize,
        /// Bytes the next logged read holds, if there is one.
        found: Option<usize>,
    },
    /// Reading the image failed.
    #[error("reading {len} bytes at byte {offset}: {source}")]
    Io {
        /// Byte offset.
        offset: u64,
        /// Bytes asked for.
        len: usize,
        /// Why.
        source: io::Error,
    },
}

/// The virtio-blk device's view of a shared disk (see the module docs).
#[derive(Debug)]
pub struct SharedView {
    disk: u8,
    file: File,
    mode: ViewMode,
    /// Sectors written and perhaps not yet on the image: the data and the
    /// seq of the write that left it.
    cache: BTreeMap<u64, (u64, Box<[u8]>)>,
    /// Seq of the last write (writes are numbered from 1).
    seq: u64,
    /// Seq of the last write on the image (set by the sink).
    applied: Arc<AtomicU64>,
    /// Replaying: the logged reads of this exit, in order.
    supplied: VecDeque<Vec<u8>>,
    /// Recording: the reads of this exit, for the log.
    read_log: Vec<Vec<u8>>,
    /// Write records not yet taken by the VM.
    writes: Vec<u8>,
    /// Replaying: a read the log had no data for.
    diverged: Option<String>,
}

impl SharedView {
    fn new(disk: u8, file: File, applied: Arc<AtomicU64>) -> Self {
        SharedView {
            disk,
            file,
            mode: ViewMode::Direct,
            cache: BTreeMap::new(),
            seq: 0,
            applied,
            supplied: VecDeque::new(),
            read_log: Vec::new(),
            writes: Vec::new(),
            diverged: None,
        }
    }

    /// The image's size in bytes.
    pub fn size(&mut self) -> io::Result<u64> {
        self.file.seek(SeekFrom::End(0))
    }

    /// Note that this exit's replay went wrong (kept for the run loop).
    pub fn diverged(&mut self, why: String) {
        self.diverged.get_or_insert(why);
    }

    /// Replaying: what went wrong at this exit, if anything (a read the log
    /// had no data for, or logged reads left over); clears it.
    pub fn take_divergence(&mut self) -> Option<String> {
        let left = self.supplied.len();
        self.supplied.clear();
        match self.diverged.take() {
            Some(why) => Some(why),
            None if left > 0 => Some(format!(
                "the log holds {left} more read(s) of shared disk {} than the device made",
                self.disk
            )),
            None => None,
        }
    }

    /// The disk's index.
    pub fn disk(&self) -> u8 {
        self.disk
    }

    /// Where reads come from from now on.
    pub fn set_mode(&mut self, mode: ViewMode) {
        self.mode = mode;
    }

    /// The mode.
    pub fn mode(&self) -> ViewMode {
        self.mode
    }

    /// Replaying: the data of this exit's reads, in order.
    pub fn supply(&mut self, data: Vec<u8>) {
        self.supplied.push_back(data);
    }

    /// Recording: this exit's reads, for the log.
    pub fn take_reads(&mut self) -> Vec<Vec<u8>> {
        std::mem::take(&mut self.read_log)
    }

    /// The write records of this exit, for the write stream.
    pub fn take_writes(&mut self) -> Vec<u8> {
        // Replaying, the cache only served the exit that wrote it.
        if self.mode == ViewMode::Replay {
            self.cache.clear();
        }
        std::mem::take(&mut self.writes)
    }

    /// Drop cached sectors whose last write is on the image.
    fn prune(&mut self) {
        let applied = self.applied.load(Ordering::Acquire);
        self.cache.retain(|_, (seq, _)| *seq > applied);
    }

    /// Read `buf.len()` bytes (whole sectors) at byte `offset`.
    pub fn read(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), ViewError> {
        // The log's bytes first: replaying, and at the exit where a backup
        // goes live with only part of that exit's reads logged.
        if self.mode == ViewMode::Replay || !self.supplied.is_empty() {
            return match self.supplied.pop_front() {
                Some(d) if d.len() == buf.len() => {
                    buf.copy_from_slice(&d);
                    Ok(())
                }
                other => Err(ViewError::NotLogged {
                    disk: self.disk,
                    offset,
                    len: buf.len(),
                    found: other.map(|d| d.len()),
                }),
            };
        }
        // Prune before reading the image: a write that reaches the image
        // after the read keeps its cached copy until the next read.
        self.prune();
        self.file
            .read_exact_at(buf, offset)
            .map_err(|source| ViewError::Io {
                offset,
                len: buf.len(),
                source,
            })?;
        let first = offset / SECTOR;
        let last = (offset + buf.len() as u64).div_ceil(SECTOR);
        for (sector, (_, data)) in self.cache.range(first..last) {
            let at = ((sector - first) * SECTOR) as usize;
            buf[at..at + SECTOR as usize].copy_from_slice(data);
        }
        if self.mode == ViewMode::Record {
            self.read_log.push(buf.to_vec());
        }
        Ok(())
    }

    /// Write `data` (whole sectors) at byte `offset`: cached until it is
    /// on the image, and handed on as a record of the write stream.
    pub fn write(&mut self, offset: u64, data: &[u8]) {
        self.seq += 1;
        // Cached in every mode: replaying, only until the end of the exit
        // (reads come from the log), in case the backup goes live within
        // it and reads the image for the rest of it.
        for (i, chunk) in data.chunks(SECTOR as usize).enumerate() {
            self.cache
                .insert(offset / SECTOR + i as u64, (self.seq, chunk.into()));
        }
        self.writes
            .extend_from_slice(&write_record(self.disk, self.seq, offset, data));
    }

    /// Writes made and not yet on the image (for statistics and tests).
    pub fn cached_sectors(&self) -> usize {
        self.cache.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::boot::DiskSpec;

    fn image(bytes: usize) -> tempfile::NamedTempFile {
        let f = tempfile::NamedTempFile::new().unwrap();
        f.as_file().set_len(bytes as u64).unwrap();
        f
    }

    fn spec(path: &Path) -> DiskSpec {
        DiskSpec {
            path: path.to_owned(),
            read_only: false,
            shared: true,
        }
    }

    #[test]
    fn records_cross_piece_boundaries_and_bad_lengths_are_refused() {
        let mut stream = write_record(1, 7, 4096, &[9u8; 1024]);
        stream.extend(write_record(0, 8, 0, &[1u8; 512]));
        let mut d = RecordDecoder::default();
        let mut got = Vec::new();
        for piece in stream.chunks(100) {
            d.push(piece);
            while let Some(r) = d.next_record().unwrap() {
                got.push(r);
            }
        }
        assert_eq!(got.len(), 2);
        assert_eq!((got[0].disk, got[0].seq, got[0].offset), (1, 7, 4096));
        assert_eq!(got[0].data, vec![9u8; 1024]);
        assert_eq!((got[1].disk, got[1].seq, got[1].data.len()), (0, 8, 512));
        assert_eq!(d.pending(), 0);
        let mut bad = RecordDecoder::default();
        bad.push(&3u32.to_le_bytes());
        assert!(bad.next_record().is_err());
    }

    #[test]
    fn a_read_sees_writes_not_yet_on_the_image_and_only_until_they_are() {
        let img = image(64 << 10);
        let disks = SharedDisks::open(&[spec(img.path())]).unwrap();
        let mut view = disks.view(0).unwrap().unwrap();
        view.set_mode(ViewMode::Record);
        view.write(1024, &[5u8; 1024]);
        let mut buf = vec![0u8; 2048];
        view.read(512, &mut buf).unwrap();
        assert_eq!(&buf[..512], &[0u8; 512]);
        assert_eq!(&buf[512..1536], &[5u8; 1024]);
        assert_eq!(&buf[1536..], &[0u8; 512]);
        // Nothing reached the image yet.
        let mut on_disk = vec![0u8; 1024];
        img.as_file().read_exact_at(&mut on_disk, 1024).unwrap();
        assert_eq!(on_disk, vec![0u8; 1024]);
        // The sink writes the record; the cache lets go of it.
        let stream = view.take_writes();
        let mut sink = disks.sink(Vec::new());
        sink.release(0, &stream).unwrap();
        img.as_file().read_exact_at(&mut on_disk, 1024).unwrap();
        assert_eq!(on_disk, vec![5u8; 1024]);
        view.read(1024, &mut buf[..512]).unwrap();
        assert_eq!(view.cached_sectors(), 0);
        // Recording keeps every read for the log, in order.
        assert_eq!(view.take_reads().len(), 2);
    }

    #[test]
    fn a_later_write_wins_over_an_earlier_one_still_held() {
        let img = image(8 << 10);
        let disks = SharedDisks::open(&[spec(img.path())]).unwrap();
        let mut view = disks.view(0).unwrap().unwrap();
        view.write(0, &[1u8; 1024]);
        let first = view.take_writes();
        view.write(512, &[2u8; 512]);
        let second = view.take_writes();
        // Only the first write is on the image: the read still needs the
        // second from the cache.
        let mut sink = disks.sink(Vec::new());
        sink.release(0, &first).unwrap();
        let mut buf = vec![0u8; 1024];
        view.read(0, &mut buf).unwrap();
        assert_eq!(&buf[..512], &[1u8; 512]);
        assert_eq!(&buf[512..], &[2u8; 512]);
        sink.release(first.len() as u64, &second).unwrap();
        view.read(0, &mut buf).unwrap();
        assert_eq!(&buf[512..], &[2u8; 512]);
        assert_eq!(view.cached_sectors(), 0);
    }

    #[test]
    fn replaying_reads_come_from_the_log_and_a_missing_one_is_named() {
        let img = image(8 << 10);
        img.as_file().write_all_at(&[7u8; 512], 0).unwrap();
        let disks = SharedDisks::open(&[spec(img.path())]).unwrap();
        let mut view = disks.view(0).unwrap().unwrap();
        view.set_mode(ViewMode::Replay);
        view.supply(vec![3u8; 512]);
        let mut buf = vec![0u8; 512];
        view.read(0, &mut buf).unwrap();
        assert_eq!(buf, vec![3u8; 512], "the log's bytes, not the image's");
        let e = view.read(0, &mut buf).unwrap_err().to_string();
        assert!(
            e.contains("no data for a read of 512 bytes at byte 0"),
            "{e}"
        );
        view.supply(vec![3u8; 1024]);
        let e = view.read(0, &mut buf).unwrap_err().to_string();
        assert!(e.contains("holds 1024 bytes"), "{e}");
        // Replaying, a write is cached only until the end of its exit,
        // and still numbered and streamed.
        view.write(0, &[1u8; 512]);
        assert_eq!(view.cached_sectors(), 1);
        assert!(!view.take_writes().is_empty());
        assert_eq!(view.cached_sectors(), 0);
    }

    #[test]
    fn going_live_within_an_exit_reads_the_logged_bytes_then_the_image_and_its_writes() {
        let img = image(8 << 10);
        let disks = SharedDisks::open(&[spec(img.path())]).unwrap();
        let mut view = disks.view(0).unwrap().unwrap();
        view.set_mode(ViewMode::Replay);
        // Earlier in the exit, replaying: a write (not on the image yet).
        view.write(1024, &[6u8; 512]);
        // The log held one of the exit's reads; then the side went live.
        view.supply(vec![4u8; 512]);
        view.set_mode(ViewMode::Direct);
        let mut buf = vec![0u8; 512];
        view.read(0, &mut buf).unwrap();
        assert_eq!(buf, vec![4u8; 512], "the logged read first");
        view.read(1024, &mut buf).unwrap();
        assert_eq!(buf, vec![6u8; 512], "then the image, with the exit's write");
        assert_eq!(view.take_writes().len(), 4 + RECORD_HEAD + 512);
        assert_eq!(view.cached_sectors(), 1, "kept until it is on the image");
    }

    #[test]
    fn a_fence_line_is_read_from_its_first_line_and_an_unreadable_one_fences() {
        let img = image(4096);
        let path = Fence::path_of(img.path());
        let f = Fence::open(img.path(), 12, "backup:2:b").unwrap();
        // What a crash between writing a shorter line and cutting the old
        // one leaves: the new line first.
        std::fs::write(&path, "12 -\nrimary:1:a\n").unwrap();
        f.write(|| Ok(())).unwrap();
        f.claim().unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "12 backup:2:b\n");
        std::fs::write(&path, "12 a b\n").unwrap();
        assert!(matches!(
            f.write(|| Ok(())),
            Err(SharedDiskError::BadFence { .. })
        ));
    }

    #[test]
    fn a_shared_disk_must_be_a_regular_file() {
        let e = SharedDisks::open(&[spec(Path::new("/dev/null"))]).unwrap_err();
        assert!(e.to_string().contains("regular file"), "{e}");
    }

    #[test]
    fn the_fence_lets_one_claimant_of_the_newest_generation_write() {
        let img = image(4096);
        let old = Fence::open(img.path(), 10, "primary:1:a").unwrap();
        let backup = Fence::open(img.path(), 10, "backup:2:b").unwrap();
        old.join().unwrap();
        // Before any claim both sides of generation 10 may write.
        old.write(|| Ok(())).unwrap();
        backup.claim().unwrap();
        // The old primary woke up: it is fenced, and says by whom.
        let e = old.write(|| Ok(())).unwrap_err();
        assert!(matches!(e, SharedDiskError::Fenced { .. }), "{e}");
        assert!(
            e.to_string().contains("backup:2:b won generation 10"),
            "{e}"
        );
        assert!(old.claim().is_err());
        backup.write(|| Ok(())).unwrap();
        // A newer pair fences generation 10 altogether.
        let newer = Fence::open(img.path(), 11, "primary:3:c").unwrap();
        newer.join().unwrap();
        let e = backup.write(|| Ok(())).unwrap_err().to_string();
        assert!(e.contains("generation 11 has spoken"), "{e}");
        assert!(old.join().is_err(), "an older pair cannot form");
    }

    #[test]
    fn a_live_side_that_takes_a_new_backup_moves_to_its_generation() {
        let img = image(4096);
        // Generation 10: the backup went live (claimed), its primary is
        // stopped, not dead.
        let stale = Fence::open(img.path(), 10, "primary:1:a").unwrap();
        let live = Fence::open(img.path(), 10, "backup:2:b").unwrap();
        // A side that never claimed its generation cannot move it on.
        assert!(matches!(
            live.advance(11),
            Err(SharedDiskError::NotOwner { generation: 10, .. })
        ));
        assert_eq!(live.generation(), 10);
        live.claim().unwrap();
        // A new backup joined: the pair is of generation 11.
        live.advance(11).unwrap();
        assert!(live.advance(12).is_err(), "generation 11 not claimed yet");
        assert_eq!(live.generation(), 11);
        live.write(|| Ok(())).unwrap();
        assert!(stale.write(|| Ok(())).is_err(), "generation 10's loser");
        // The new backup wins generation 11 (its primary failed): the side
        // that was live may no longer write, and says why.
        let joined = Fence::open(img.path(), 11, "backup:3:c").unwrap();
        joined.claim().unwrap();
        joined.write(|| Ok(())).unwrap();
        let e = live.write(|| Ok(())).unwrap_err();
        assert!(
            e.to_string().contains("backup:3:c won generation 11")
                && e.to_string().contains("generation 11, backup:2:b"),
            "{e}"
        );
        // Had the backup failed instead, the live side claims generation
        // 11 itself and goes on writing.
        let img2 = image(4096);
        let live = Fence::open(img2.path(), 10, "backup:2:b").unwrap();
        live.claim().unwrap();
        live.advance(11).unwrap();
        live.claim().unwrap();
        live.advance(9).unwrap();
        assert_eq!(live.generation(), 11, "never moves back");
        assert_eq!(
            std::fs::read_to_string(Fence::path_of(img2.path())).unwrap(),
            "11 backup:2:b\n"
        );
        live.write(|| Ok(())).unwrap();
    }

    #[test]
    fn a_fenced_sink_writes_nothing_and_keeps_refusing() {
        let img = image(4096);
        let disks = SharedDisks::open(&[spec(img.path())]).unwrap();
        let mut view = disks.view(0).unwrap().unwrap();
        let mine = Fence::open(img.path(), 5, "primary:1:a").unwrap();
        mine.join().unwrap();
        let mut sink = disks.sink(vec![mine]);
        let flag = sink.fenced_flag();
        Fence::open(img.path(), 5, "backup:2:b")
            .unwrap()
            .claim()
            .unwrap();
        view.write(0, &[9u8; 512]);
        assert!(sink.release(0, &view.take_writes()).is_err());
        let mut on_disk = vec![0u8; 512];
        img.as_file().read_exact_at(&mut on_disk, 0).unwrap();
        assert_eq!(on_disk, vec![0u8; 512], "a fenced write never lands");
        let f = flag.get().unwrap();
        assert!(f.fenced && f.message.contains("fenced"), "{f:?}");
        assert!(sink.release(0, &[]).is_err());
    }

    #[test]
    fn a_bad_fence_file_is_named() {
        let img = image(4096);
        std::fs::write(Fence::path_of(img.path()), "garbage").unwrap();
        let f = Fence::open(img.path(), 1, "x").unwrap();
        let e = f.join().unwrap_err().to_string();
        assert!(e.contains(".vmft-fence") && e.contains("garbage"), "{e}");
    }
}
