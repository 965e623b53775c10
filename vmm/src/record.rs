//! The primary's door: the live door, with every exit, value, event,
//! injection, epoch and check written to the log at its position.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::Path;
use std::time::Duration;

use ft_log::{
    Entry, Epoch, ExitRecord, Fingerprint, LogHeader, LogWriter, ValueSource, WriteError,
};

use crate::nondet::{Door, DoorError, Due, LiveDoor, Mode, Recorder, Wake};

/// Exits buffered before they are written as one `Exits` entry.
const EXIT_BATCH: usize = 1024;
/// A `Check` entry every this many exits; every 16th carries a memory digest.
pub const CHECK_EVERY: u64 = 4096;

/// What one epoch cost.
#[derive(Debug, Clone, Copy)]
pub struct EpochStat {
    /// Pages carried.
    pub pages: usize,
    /// Encoded bytes.
    pub bytes: usize,
    /// Time the primary was paused to build and write it.
    pub pause: Duration,
}

/// Recording statistics.
#[derive(Debug, Default, Clone)]
pub struct RecordStats {
    /// Entries and bytes by kind.
    pub entries: BTreeMap<&'static str, (u64, u64)>,
    /// Interrupts injected at guest-caused exits.
    pub irqs_at_exits: u64,
    /// Interrupts injected right after an epoch.
    pub irqs_after_epochs: u64,
    /// Epochs.
    pub epochs: Vec<EpochStat>,
    /// Log bytes in all.
    pub bytes: u64,
}

/// The recording door.
pub struct RecordDoor {
    live: LiveDoor,
    writer: LogWriter<Box<dyn Write + Send>>,
    path: String,
    exits: Vec<ExitRecord>,
    first_exit: u64,
    last_check: u64,
    after_epoch: bool,
    /// Console input bytes logged so far.
    input_logged: u64,
    /// Statistics of the recording.
    pub stats: RecordStats,
}

impl RecordDoor {
    /// Create the log at `path` and write its header.
    pub fn create(path: &Path, header: &LogHeader, live: LiveDoor) -> Result<Self, DoorError> {
        let p = path.display().to_string();
        let io = |source| DoorError::Io {
            path: p.clone(),
            source,
        };
        let f = File::create(path).map_err(io)?;
        Self::to_writer(
            Box::new(BufWriter::with_capacity(1 << 20, f)),
            p,
            header,
            live,
        )
    }

    /// Record to any byte sink (the logging channel); `name` names it in
    /// errors.
    pub fn to_writer(
        sink: Box<dyn Write + Send>,
        name: String,
        header: &LogHeader,
        live: LiveDoor,
    ) -> Result<Self, DoorError> {
        let writer = LogWriter::new(sink, header).map_err(|source| DoorError::Io {
            path: name.clone(),
            source,
        })?;
        Ok(RecordDoor {
            live,
            writer,
            path: name,
            exits: Vec::new(),
            first_exit: 0,
            last_check: 0,
            after_epoch: false,
            input_logged: 0,
            stats: RecordStats::default(),
        })
    }

    /// Count console input from `n` bytes already handed to the guest
    /// (a recording that continues a run: re-protection).
    pub fn with_input_logged(mut self, n: u64) -> Self {
        self.input_logged = n;
        self
    }

    fn flush_exits(&mut self) -> Result<(), DoorError> {
        if self.exits.is_empty() {
            return Ok(());
        }
        let e = Entry::Exits {
            first: self.first_exit,
            exits: std::mem::take(&mut self.exits),
        };
        self.append(&e).map(|_| ())
    }

    fn append(&mut self, e: &Entry) -> Result<usize, DoorError> {
        let (_, n) = self
            .writer
            .append(e)
            .map_err(|err| write_error(&self.path, err))?;
        let s = self.stats.entries.entry(e.kind()).or_default();
        s.0 += 1;
        s.1 += n as u64;
        self.stats.bytes = self.writer.bytes();
        Ok(n)
    }

    fn write(&mut self, e: &Entry) -> Result<usize, DoorError> {
        self.flush_exits()?;
        self.append(e)
    }

    /// Write an epoch, split into frames under the writer's limit.
    fn write_epoch(&mut self, e: Epoch) -> Result<usize, DoorError> {
        self.flush_exits()?;
        let (_, n) = self
            .writer
            .write_epoch(e)
            .map_err(|err| write_error(&self.path, err))?;
        let s = self.stats.entries.entry("epoch").or_default();
        s.0 += 1;
        s.1 += n as u64;
        self.stats.bytes = self.writer.bytes();
        Ok(n)
    }
}

fn write_error(path: &str, err: WriteError) -> DoorError {
    match err {
        WriteError::Io(source) => DoorError::Io {
            path: path.to_string(),
            source,
        },
        WriteError::Log(source) => DoorError::Log {
            path: path.to_string(),
            source,
        },
    }
}

impl Door for RecordDoor {
    fn mode(&self) -> Mode {
        Mode::Record
    }

    fn into_live(self: Box<Self>) -> Option<LiveDoor> {
        let mut this = *self;
        let _ = this.flush();
        // Dropping `this` flushes again: its stand-in door has nothing.
        let stand_in = LiveDoor::new(0, None, crate::vcpu::Kicker::for_current_thread());
        Some(std::mem::replace(&mut this.live, stand_in))
    }

    fn exit(&mut self, pos: u64, rec: ExitRecord) -> Result<(), DoorError> {
        if self.exits.is_empty() {
            self.first_exit = pos;
        }
        self.exits.push(rec);
        if self.exits.len() >= EXIT_BATCH {
            self.flush_exits()?;
        }
        Ok(())
    }

    fn clock_ns(&mut self, pos: u64) -> Result<u64, DoorError> {
        let value = self.live.clock_ns(pos)?;
        self.write(&Entry::Value {
            pos,
            source: ValueSource::Clock,
            value,
        })?;
        Ok(value)
    }

    fn wall_clock_secs(&mut self, pos: u64) -> Result<i64, DoorError> {
        let value = self.live.wall_clock_secs(pos)?;
        self.write(&Entry::Value {
            pos,
            source: ValueSource::WallClock,
            value: value as u64,
        })?;
        Ok(value)
    }

    fn due(
        &mut self,
        pos: u64,
        timer_deadline: Option<u64>,
        rx_room: usize,
    ) -> Result<Due, DoorError> {
        let due = self.live.due(pos, timer_deadline, rx_room)?;
        if let Some(now_ns) = due.timer_now {
            self.write(&Entry::Timer { pos, now_ns })?;
        }
        if !due.input.is_empty() {
            self.write(&Entry::ConsoleInput {
                pos,
                bytes: due.input.clone(),
                next: due.input_next,
            })?;
            self.input_logged += due.input.len() as u64;
        }
        Ok(due)
    }

    fn net_rx(&mut self, pos: u64, ready: bool) -> Result<Option<Vec<u8>>, DoorError> {
        let frame = self.live.net_rx(pos, ready)?;
        if let Some(f) = &frame {
            self.write(&Entry::NetRx {
                pos,
                frame: f.clone(),
            })?;
        }
        Ok(frame)
    }

    fn pending(&mut self, timer_deadline: Option<u64>) -> bool {
        self.live.pending(timer_deadline)
    }

    fn interrupt(
        &mut self,
        pos: u64,
        offer: Option<u8>,
        fp: &mut dyn FnMut() -> Fingerprint,
    ) -> Result<Option<u8>, DoorError> {
        if let Some(vector) = offer {
            let fingerprint = fp();
            self.write(&Entry::Interrupt {
                pos,
                vector,
                fingerprint,
            })?;
            if self.after_epoch {
                self.stats.irqs_after_epochs += 1;
            } else {
                self.stats.irqs_at_exits += 1;
            }
        }
        self.after_epoch = false;
        Ok(offer)
    }

    fn check(
        &mut self,
        pos: u64,
        compute: &mut dyn FnMut(bool) -> (Fingerprint, Option<u64>),
    ) -> Result<(), DoorError> {
        if pos == 0 || !pos.is_multiple_of(CHECK_EVERY) || pos == self.last_check {
            return Ok(());
        }
        self.last_check = pos;
        let (fingerprint, memory) = compute(pos.is_multiple_of(CHECK_EVERY * 16));
        self.write(&Entry::Check {
            pos,
            fingerprint,
            memory,
        })?;
        Ok(())
    }

    fn finish(
        &mut self,
        pos: u64,
        reason: &str,
        digest: &mut dyn FnMut() -> String,
    ) -> Result<(), DoorError> {
        self.write(&Entry::End {
            pos,
            reason: reason.to_string(),
            digest: digest(),
        })?;
        self.flush()
    }

    fn wait(&mut self, deadline_ns: Option<u64>) -> Wake {
        // Let the backup see everything up to the idle point.
        let _ = self.writer.flush();
        self.live.wait(deadline_ns)
    }

    fn flush(&mut self) -> Result<(), DoorError> {
        self.flush_exits()?;
        self.writer.flush().map_err(|source| DoorError::Io {
            path: self.path.clone(),
            source,
        })
    }

    fn recorder(&mut self) -> Option<&mut dyn Recorder> {
        Some(self)
    }
}

impl Recorder for RecordDoor {
    fn log_epoch(&mut self, _pos: u64, epoch: Epoch) -> Result<(), DoorError> {
        let start = std::time::Instant::now();
        let pages = epoch.pages.len();
        let bytes = self.write_epoch(epoch)?;
        self.stats.epochs.push(EpochStat {
            pages,
            bytes,
            pause: start.elapsed(),
        });
        self.after_epoch = true;
        Ok(())
    }

    fn barrier(&mut self) -> Result<u64, DoorError> {
        self.flush()?;
        Ok(self.writer.bytes())
    }

    fn input_logged(&self) -> u64 {
        self.input_logged
    }

    fn released(&mut self, offset: u64) -> Result<(), DoorError> {
        self.write(&Entry::Released { offset }).map(|_| ())
    }

    fn net_released(&mut self, offset: u64) -> Result<(), DoorError> {
        self.write(&Entry::NetReleased { offset }).map(|_| ())
    }

    fn disk_read(&mut self, pos: u64, disk: u8, data: Vec<u8>) -> Result<(), DoorError> {
        self.write(&Entry::DiskRead { pos, disk, data }).map(|_| ())
    }

    fn disk_released(&mut self, offset: u64) -> Result<(), DoorError> {
        self.write(&Entry::DiskReleased { offset }).map(|_| ())
    }

    fn stats(&self) -> RecordStats {
        self.stats.clone()
    }
}

impl Drop for RecordDoor {
    fn drop(&mut self) {
        let _ = self.flush();
    }
}

/// What a VM starts from: a fresh boot, or a snapshot.
#[derive(Debug, Clone)]
pub enum VmSource {
    /// Boot a kernel.
    Boot(crate::boot::BootConfig),
    /// Restore a snapshot file, with the disks it was taken with (their
    /// contents as they were when it was taken).
    Restore {
        /// The snapshot.
        snapshot: std::path::PathBuf,
        /// The disks, in the same order.
        disks: Vec<crate::boot::DiskSpec>,
        /// The network cards, in the same order.
        nets: Vec<crate::boot::NetSpec>,
    },
}

impl VmSource {
    /// The VM's disks.
    pub fn disks(&self) -> &[crate::boot::DiskSpec] {
        match self {
            VmSource::Boot(cfg) => &cfg.disks,
            VmSource::Restore { disks, .. } => disks,
        }
    }

    /// The VM's network cards.
    pub fn nets(&self) -> &[crate::boot::NetSpec] {
        match self {
            VmSource::Boot(cfg) => &cfg.nets,
            VmSource::Restore { nets, .. } => nets,
        }
    }
}

/// Errors describing a VM's configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// A kernel, initramfs or snapshot file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// The snapshot is not usable.
    #[error(transparent)]
    Snapshot(#[from] crate::snapshot::SnapshotError),
    /// KVM could not report the CPUID table.
    #[error("cannot read the CPUID table from KVM: {0}")]
    Cpuid(String),
}

/// Feed a file's length and contents to `h`, reading it in pieces (a
/// disk image may be large).
fn hash_file(h: &mut sha2::Sha256, path: &Path) -> Result<(), ConfigError> {
    use sha2::Digest;
    use std::io::Read;
    let err = |source| ConfigError::Read {
        path: path.display().to_string(),
        source,
    };
    let mut f = File::open(path).map_err(err)?;
    let len = f.metadata().map_err(err)?.len();
    h.update(len.to_le_bytes());
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).map_err(err)?;
        if n == 0 {
            return Ok(());
        }
        h.update(&buf[..n]);
    }
}

fn read(path: &Path) -> Result<Vec<u8>, ConfigError> {
    std::fs::read(path).map_err(|source| ConfigError::Read {
        path: path.display().to_string(),
        source,
    })
}

/// Hash of everything that defines the VM a log belongs to: kernel and
/// initramfs contents, memory size and command line (or the snapshot's
/// contents), each disk's access mode, size and contents, and the CPUID
/// table the guest sees on this host (see [`crate::vcpu::cpuid_digest`]).
/// Primary and backup must agree on it.
pub fn config_hash(src: &VmSource) -> Result<String, ConfigError> {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    if let VmSource::Restore { snapshot, .. } = src {
        return config_hash_of_state(&read(snapshot)?, src.disks(), src.nets());
    }
    match src {
        VmSource::Boot(cfg) => {
            h.update(b"vmft-config-v2\0boot\0");
            h.update(read(&cfg.kernel)?);
            h.update([0u8]);
            if let Some(i) = &cfg.initrd {
                h.update(read(i)?);
            }
            h.update([0u8]);
            h.update(cfg.mem_mib.to_le_bytes());
            h.update(cfg.cmdline.as_bytes());
        }
        VmSource::Restore { .. } => unreachable!("hashed above"),
    }
    hash_devices(h, src.disks(), src.nets())
}

/// [`config_hash`] of a VM restored from the snapshot file `state` (its
/// bytes), with `disks` and `nets`.
pub fn config_hash_of_state(
    state: &[u8],
    disks: &[crate::boot::DiskSpec],
    nets: &[crate::boot::NetSpec],
) -> Result<String, ConfigError> {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    h.update(b"vmft-config-v2\0snapshot\0");
    h.update(state);
    hash_devices(h, disks, nets)
}

/// The configuration hash of a state transfer's log: the state taken in
/// the pause (`state`, a snapshot body up to memory) with `disks` and
/// `nets`; writable disks by size and access only (the transfer carries
/// their bytes), read-only ones by contents as always.
pub fn config_hash_of_transfer(
    state: &[u8],
    disks: &[crate::boot::DiskSpec],
    nets: &[crate::boot::NetSpec],
) -> Result<String, ConfigError> {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    h.update(b"vmft-config-v2\0transfer\0");
    h.update(state);
    hash_devices_with(h, disks, nets, false)
}

/// The devices' part of [`config_hash`], and the hash.
fn hash_devices(
    h: sha2::Sha256,
    disks: &[crate::boot::DiskSpec],
    nets: &[crate::boot::NetSpec],
) -> Result<String, ConfigError> {
    hash_devices_with(h, disks, nets, true)
}

/// [`hash_devices`], own disks by contents (`contents`) or by size.
fn hash_devices_with(
    mut h: sha2::Sha256,
    disks: &[crate::boot::DiskSpec],
    nets: &[crate::boot::NetSpec],
    contents: bool,
) -> Result<String, ConfigError> {
    use sha2::Digest;
    // Disks: each one's access and contents (the backup must hold the same
    // bytes as the primary; separate copies are compared here). A shared
    // disk is outside the VM: its size only (reads come from the log, and
    // the image moves on after a recording).
    for d in disks {
        h.update(b"\0disk\0");
        h.update([d.read_only as u8, d.shared as u8]);
        // A transfer carries (and checks) the writable images' bytes, not
        // the read-only ones': those are compared here as at any start.
        if d.shared || (!contents && !d.read_only) {
            let len = std::fs::metadata(&d.path)
                .map_err(|source| ConfigError::Read {
                    path: d.path.display().to_string(),
                    source,
                })?
                .len();
            h.update(len.to_le_bytes());
        } else {
            hash_file(&mut h, &d.path)?;
        }
    }
    // Network cards: the guest sees their MACs (each side has its own tap).
    for n in nets {
        h.update(b"\0net\0");
        h.update(n.mac);
    }
    h.update([0u8]);
    h.update(
        crate::vcpu::cpuid_digest()
            .map_err(ConfigError::Cpuid)?
            .as_bytes(),
    );
    Ok(h.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

/// The log header for a recording of `src`.
pub fn log_header(src: &VmSource) -> Result<LogHeader, ConfigError> {
    let config_hash = config_hash(src)?;
    Ok(match src {
        VmSource::Boot(cfg) => LogHeader {
            kernel: cfg.kernel.display().to_string(),
            initrd: cfg.initrd.as_ref().map(|p| p.display().to_string()),
            mem_mib: cfg.mem_mib,
            cmdline: cfg.cmdline.clone(),
            config_hash,
            recorder: recorder_id(),
            snapshot: None,
        },
        VmSource::Restore { snapshot: path, .. } => {
            let (mem_mib, cmdline) = crate::vm::snapshot_summary(path)?;
            LogHeader {
                kernel: String::new(),
                initrd: None,
                mem_mib,
                cmdline,
                config_hash,
                recorder: recorder_id(),
                snapshot: Some(path.display().to_string()),
            }
        }
    })
}

/// The recorder named in log headers: this vmft and its version. Replay
/// refuses a log from another version, whose entries or vCPU states may
/// mean something else.
pub fn recorder_id() -> String {
    format!("vmft {}", env!("CARGO_PKG_VERSION"))
}

impl RecordStats {
    /// Human-readable report.
    pub fn report(&self, guest_secs: f64) -> String {
        use std::fmt::Write as _;
        let mut s = String::new();
        let _ = writeln!(s, "vmft record statistics");
        let _ = writeln!(
            s,
            "  log bytes: {} ({:.0} bytes per second of guest time)",
            self.bytes,
            self.bytes as f64 / guest_secs.max(1e-9)
        );
        for (k, (n, b)) in &self.entries {
            let _ = writeln!(s, "    {k:<14} {n:>8} entries {b:>12} bytes");
        }
        let _ = writeln!(
            s,
            "  interrupts injected at exits: {}, right after epochs: {}",
            self.irqs_at_exits, self.irqs_after_epochs
        );
        let pages: usize = self.epochs.iter().map(|e| e.pages).sum();
        let max_pause = self
            .epochs
            .iter()
            .map(|e| e.pause)
            .max()
            .unwrap_or_default();
        let _ = writeln!(
            s,
            "  epochs: {} ({} pages in all, largest pause {:.2} ms)",
            self.epochs.len(),
            pages,
            max_pause.as_secs_f64() * 1000.0
        );
        s
    }
}
