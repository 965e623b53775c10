//! The durable register file of the built-in arbiter.
//!
//! `decisions.log` in the data directory holds an 8-byte header and then one
//! record per decision: a 4-byte length, a CRC32C of the payload, and the
//! payload (VM id, generation, owner). A decision is appended and `fsync`ed
//! before anyone is told about it, so every answered decision survives
//! `kill -9` and power loss.
//!
//! A failed append (write or `fsync` error) is rolled back: the log is
//! truncated to its last durable record and that is synced, so neither a
//! partial record nor a record whose sync failed stays in the file; the
//! claims of that batch are answered with an error and nothing of it becomes
//! visible. If the rollback fails too, the [`Appender`] stops for good
//! ([`StoreError::Stopped`]) and the server with it.
//!
//! On open, a torn last record (the file ends inside a record: a write that
//! was in progress when the process died, never answered) is dropped and the
//! log is compacted. Anything else that does not check out is corruption and
//! the store refuses to open, naming the file and the byte offset: a bad
//! record length, a record whose stated length does not match its contents,
//! or a complete record with a bad checksum, wherever it is (a torn write
//! leaves a correct prefix of what was written, never a complete record
//! with wrong bytes). Compaction writes a new file, syncs it and renames it
//! over the old one, then syncs the directory, so it is atomic; a new data
//! directory is synced into its parent.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use thiserror::Error;
use tracing::{error, info, warn};

use crate::protocol::MAX_NAME;
use crate::Decision;

const HEADER: &[u8; 8] = b"VMFTARB1";
const LOG_NAME: &str = "decisions.log";
/// Bytes before a record's payload: length and CRC32C.
const RECORD_HEAD: usize = 8;
/// Smallest payload: one-byte VM id, generation, one-byte owner.
const MIN_PAYLOAD: usize = 2 + 1 + 8 + 2 + 1;
/// Largest payload: both names at their longest.
const MAX_PAYLOAD: usize = 2 + MAX_NAME + 8 + 2 + MAX_NAME;

/// Store errors.
#[derive(Debug, Error)]
pub enum StoreError {
    /// File system error.
    #[error("arbiter store {path}: {source}")]
    Io {
        /// File involved.
        path: PathBuf,
        /// Underlying error.
        source: std::io::Error,
    },
    /// The log is damaged.
    #[error("arbiter store {path}: corrupt record at byte offset {offset}: {detail}; refusing to start (decisions after it would be lost)")]
    Corrupt {
        /// File involved.
        path: PathBuf,
        /// Offset of the bad record.
        offset: u64,
        /// What is wrong.
        detail: String,
    },
    /// The file is not an arbiter log.
    #[error("arbiter store {0}: not an arbiter decision log (bad header)")]
    BadHeader(PathBuf),
    /// An append failed and could not be rolled back: the file may hold
    /// bytes that are not durable decisions, so nothing more is appended.
    #[error("arbiter store {path}: stopped: {reason}")]
    Stopped {
        /// File involved.
        path: PathBuf,
        /// The failure and the failed rollback.
        reason: String,
    },
}

impl StoreError {
    fn io(path: &Path) -> impl Fn(std::io::Error) -> StoreError + '_ {
        move |source| StoreError::Io {
            path: path.to_path_buf(),
            source,
        }
    }
}

/// One claim of a batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claim {
    /// VM id.
    pub vm: String,
    /// Generation.
    pub generation: u64,
    /// Who claims.
    pub claimant: String,
}

/// Decisions for a batch of claims, and the log records that make the new
/// ones durable.
#[derive(Debug, Default)]
pub struct Plan {
    /// One decision per claim, in order.
    pub decisions: Vec<Decision>,
    /// Records to append.
    pub records: Vec<u8>,
    /// New decisions to apply once written.
    pub new: Vec<((String, u64), String)>,
}

/// Failures a test makes the next append meet.
#[cfg(test)]
#[derive(Debug, Default)]
pub(crate) struct Faults {
    /// The next append writes this many bytes of its records, then fails.
    pub write_fails_after: Option<usize>,
    /// The next append's data sync fails (its write went through).
    pub sync_fails: bool,
    /// The next rollback fails.
    pub rollback_fails: bool,
}

/// The appending end of the log: writes records, syncs them, and rolls a
/// failed append back to the last durable record.
#[derive(Debug)]
pub struct Appender {
    file: File,
    path: PathBuf,
    /// Length of the log up to the end of its last durable record.
    durable_len: u64,
    /// Why appending stopped (a rollback failed), if it did.
    stopped: Option<String>,
    #[cfg(test)]
    pub(crate) faults: Faults,
}

impl Appender {
    fn new(file: File, path: PathBuf, durable_len: u64) -> Self {
        Appender {
            file,
            path,
            durable_len,
            stopped: None,
            #[cfg(test)]
            faults: Faults::default(),
        }
    }

    /// Append `records` and sync them (one `fdatasync` for the whole batch).
    /// On `Ok` they are durable. On [`StoreError::Io`] the log was rolled
    /// back to its previous durable end (and that synced): none of them is
    /// in the log and the appender can be used again. On
    /// [`StoreError::Stopped`] the rollback failed too, and every later
    /// append fails the same way.
    pub fn append(&mut self, records: &[u8]) -> Result<(), StoreError> {
        if records.is_empty() {
            return Ok(());
        }
        if let Some(reason) = &self.stopped {
            return Err(StoreError::Stopped {
                path: self.path.clone(),
                reason: reason.clone(),
            });
        }
        match self.write_and_sync(records) {
            Ok(()) => {
                self.durable_len += records.len() as u64;
                Ok(())
            }
            Err(failure) => match self.roll_back() {
                Ok(()) => {
                    warn!(
                        path = %self.path.display(),
                        error = %failure,
                        durable_len = self.durable_len,
                        "append failed; log rolled back to its last durable record"
                    );
                    Err(StoreError::Io {
                        path: self.path.clone(),
                        source: failure,
                    })
                }
                Err(e) => {
                    let reason = format!(
                        "append failed ({failure}) and the rollback to byte {} failed ({e})",
                        self.durable_len
                    );
                    error!(path = %self.path.display(), %reason, "arbiter store stopped");
                    self.stopped = Some(reason.clone());
                    Err(StoreError::Stopped {
                        path: self.path.clone(),
                        reason,
                    })
                }
            },
        }
    }

    fn write_and_sync(&mut self, records: &[u8]) -> std::io::Result<()> {
        #[cfg(test)]
        if let Some(n) = self.faults.write_fails_after.take() {
            self.file.write_all(&records[..n.min(records.len())])?;
            return Err(std::io::Error::other("injected write failure"));
        }
        self.file.write_all(records)?;
        #[cfg(test)]
        if std::mem::take(&mut self.faults.sync_fails) {
            return Err(std::io::Error::other("injected fsync failure"));
        }
        self.file.sync_data()
    }

    /// Cut the log back to its last durable record and make the new length
    /// durable (`fsync`: the length is metadata). The file is in append
    /// mode, so the next write lands at the new end.
    fn roll_back(&mut self) -> std::io::Result<()> {
        #[cfg(test)]
        if std::mem::take(&mut self.faults.rollback_fails) {
            return Err(std::io::Error::other("injected rollback failure"));
        }
        self.file.set_len(self.durable_len)?;
        self.file.sync_all()
    }

    /// Length of the log up to its last durable record.
    pub fn durable_len(&self) -> u64 {
        self.durable_len
    }
}

/// What opening the store found.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Recovery {
    /// Decisions loaded.
    pub decisions: usize,
    /// Bytes of a torn final record that were dropped.
    pub torn_bytes: u64,
}

/// The register file: decisions in memory, backed by the log.
#[derive(Debug)]
pub struct Store {
    dir: PathBuf,
    appender: Arc<Mutex<Appender>>,
    decisions: HashMap<(String, u64), String>,
    order: Vec<(String, u64)>,
}

fn encode_record(vm: &str, generation: u64, owner: &str) -> Vec<u8> {
    let mut p = Vec::with_capacity(32);
    p.extend_from_slice(&(vm.len() as u16).to_le_bytes());
    p.extend_from_slice(vm.as_bytes());
    p.extend_from_slice(&generation.to_le_bytes());
    p.extend_from_slice(&(owner.len() as u16).to_le_bytes());
    p.extend_from_slice(owner.as_bytes());
    let mut r = Vec::with_capacity(p.len() + RECORD_HEAD);
    r.extend_from_slice(&(p.len() as u32).to_le_bytes());
    r.extend_from_slice(&crc32c::crc32c(&p).to_le_bytes());
    r.extend_from_slice(&p);
    r
}

fn decode_payload(p: &[u8]) -> Option<(String, u64, String)> {
    let take_str = |p: &[u8], at: usize| -> Option<(String, usize)> {
        let n = u16::from_le_bytes(p.get(at..at + 2)?.try_into().ok()?) as usize;
        let s = std::str::from_utf8(p.get(at + 2..at + 2 + n)?).ok()?;
        Some((s.to_string(), at + 2 + n))
    };
    let (vm, at) = take_str(p, 0)?;
    let generation = u64::from_le_bytes(p.get(at..at + 8)?.try_into().ok()?);
    let (owner, end) = take_str(p, at + 8)?;
    (end == p.len()).then_some((vm, generation, owner))
}

/// Whether `partial`, the bytes present of a payload that should be `len`
/// bytes long, can be the start of such a payload: the name lengths it
/// shows must add up to `len`. A torn write leaves a correct prefix, so a
/// contradiction means the length field is damaged (and what follows may be
/// acknowledged records).
fn torn_prefix_fits(len: usize, partial: &[u8]) -> Result<(), String> {
    let u16_at = |at: usize| {
        partial
            .get(at..at + 2)
            .map(|b| u16::from_le_bytes([b[0], b[1]]) as usize)
    };
    let Some(vm_len) = u16_at(0) else {
        return Ok(());
    };
    if vm_len == 0 || vm_len > MAX_NAME {
        return Err(format!("VM id length {vm_len}"));
    }
    let owner_at = 2 + vm_len + 8;
    if len < owner_at + 2 + 1 || len > owner_at + 2 + MAX_NAME {
        return Err(format!(
            "record length {len} does not fit a VM id of {vm_len} bytes"
        ));
    }
    let Some(owner_len) = u16_at(owner_at) else {
        return Ok(());
    };
    if owner_at + 2 + owner_len != len {
        return Err(format!(
            "record length {len} does not match its contents ({} bytes)",
            owner_at + 2 + owner_len
        ));
    }
    Ok(())
}

/// The decisions in a log's bytes.
#[derive(Debug, Default)]
struct Scan {
    decisions: HashMap<(String, u64), String>,
    order: Vec<(String, u64)>,
    /// Bytes of an incomplete last record (or header).
    torn_bytes: u64,
}

/// Read a whole log (`bytes` of the file at `path`): every complete record
/// must check out; only an incomplete last record is dropped as torn.
fn scan(bytes: &[u8], path: &Path) -> Result<Scan, StoreError> {
    let mut out = Scan::default();
    if bytes.len() < HEADER.len() {
        // The header itself was torn (a prefix of it): nothing was decided.
        if !HEADER.starts_with(bytes) {
            return Err(StoreError::BadHeader(path.to_path_buf()));
        }
        out.torn_bytes = bytes.len() as u64;
        return Ok(out);
    }
    if &bytes[..HEADER.len()] != HEADER {
        return Err(StoreError::BadHeader(path.to_path_buf()));
    }
    let mut at = HEADER.len();
    while at < bytes.len() {
        let rest = &bytes[at..];
        let corrupt = |detail: String| StoreError::Corrupt {
            path: path.to_path_buf(),
            offset: at as u64,
            detail,
        };
        if rest.len() >= 4 {
            let len = u32::from_le_bytes(rest[..4].try_into().unwrap()) as usize;
            if !(MIN_PAYLOAD..=MAX_PAYLOAD).contains(&len) {
                return Err(corrupt(format!(
                    "record length {len} (valid: {MIN_PAYLOAD} to {MAX_PAYLOAD})"
                )));
            }
            if rest.len() >= RECORD_HEAD + len {
                let crc = u32::from_le_bytes(rest[4..8].try_into().unwrap());
                let payload = &rest[RECORD_HEAD..RECORD_HEAD + len];
                if crc32c::crc32c(payload) != crc {
                    return Err(corrupt(format!(
                        "checksum mismatch in a complete record of {} bytes{}",
                        RECORD_HEAD + len,
                        if rest.len() > RECORD_HEAD + len {
                            " followed by more records"
                        } else {
                            " at the end of the file"
                        }
                    )));
                }
                let Some((vm, generation, owner)) = decode_payload(payload) else {
                    return Err(corrupt("payload does not parse".into()));
                };
                let key = (vm, generation);
                if let Some(first) = out.decisions.get(&key) {
                    if first != &owner {
                        return Err(corrupt(format!(
                            "second owner {owner:?} for a key owned by {first:?}"
                        )));
                    }
                } else {
                    out.decisions.insert(key.clone(), owner);
                    out.order.push(key);
                }
                at += RECORD_HEAD + len;
                continue;
            }
            // The file ends inside this record: torn, if what is there can
            // be the start of it.
            let partial = rest.get(RECORD_HEAD..).unwrap_or(&[]);
            torn_prefix_fits(len, partial).map_err(|d| {
                corrupt(format!(
                    "{d}; the record runs past the end of the file, but is not a torn write"
                ))
            })?;
        }
        out.torn_bytes = rest.len() as u64;
        break;
    }
    Ok(out)
}

/// Write exactly `decisions` (in `order`) as the log in `dir`, atomically
/// (temporary file, fsync, rename, fsync of the directory), and return an
/// appender on the new log.
fn write_log(
    dir: &Path,
    order: &[(String, u64)],
    decisions: &HashMap<(String, u64), String>,
) -> Result<Appender, StoreError> {
    let path = dir.join(LOG_NAME);
    let tmp = dir.join(format!("{LOG_NAME}.tmp"));
    let io = StoreError::io(&path);
    let mut buf = HEADER.to_vec();
    for key in order {
        buf.extend_from_slice(&encode_record(&key.0, key.1, &decisions[key]));
    }
    {
        let mut f = File::create(&tmp).map_err(&io)?;
        f.write_all(&buf).map_err(&io)?;
        f.sync_all().map_err(&io)?;
    }
    std::fs::rename(&tmp, &path).map_err(&io)?;
    sync_dir(dir).map_err(&io)?;
    let file = OpenOptions::new().append(true).open(&path).map_err(&io)?;
    Ok(Appender::new(file, path.clone(), buf.len() as u64))
}

#[cfg(test)]
thread_local! {
    /// Directories this thread synced, for tests.
    static SYNCED_DIRS: std::cell::RefCell<Vec<PathBuf>> = const { std::cell::RefCell::new(Vec::new()) };
}

fn sync_dir(dir: &Path) -> std::io::Result<()> {
    #[cfg(test)]
    SYNCED_DIRS.with(|d| d.borrow_mut().push(dir.to_path_buf()));
    File::open(dir)?.sync_all()
}

/// `create_dir_all`, and each directory it creates is synced into its
/// parent, so the data directory (and the log in it) survives power loss.
fn create_dir_durable(dir: &Path) -> std::io::Result<()> {
    let mut missing = Vec::new();
    let mut p = dir;
    loop {
        match std::fs::metadata(p) {
            Ok(m) if m.is_dir() => break,
            Ok(_) => {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::NotADirectory,
                    format!("{} is not a directory", p.display()),
                ))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                missing.push(p);
                match p.parent() {
                    Some(parent) if !parent.as_os_str().is_empty() => p = parent,
                    _ => break, // relative path: its parent is the working directory
                }
            }
            Err(e) => return Err(e),
        }
    }
    for d in missing.into_iter().rev() {
        match std::fs::create_dir(d) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(e),
        }
        let parent = match d.parent() {
            Some(parent) if !parent.as_os_str().is_empty() => parent,
            _ => Path::new("."),
        };
        sync_dir(parent)?;
    }
    Ok(())
}

impl Store {
    /// Open (or create) the store in `dir`, recovering from a crash.
    pub fn open(dir: &Path) -> Result<(Store, Recovery), StoreError> {
        let path = dir.join(LOG_NAME);
        let io = StoreError::io(&path);
        create_dir_durable(dir).map_err(StoreError::io(dir))?;
        // A compaction that died before its rename left only a temp file.
        let _ = std::fs::remove_file(dir.join(format!("{LOG_NAME}.tmp")));
        let mut bytes = Vec::new();
        match File::open(&path) {
            Ok(mut f) => {
                f.read_to_end(&mut bytes).map_err(&io)?;
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io(e)),
        }
        let scan = scan(&bytes, &path)?;
        let recovery = Recovery {
            decisions: scan.decisions.len(),
            torn_bytes: scan.torn_bytes,
        };
        if recovery.torn_bytes > 0 {
            warn!(
                path = %path.display(),
                torn_bytes = recovery.torn_bytes,
                "dropping a torn final record (never acknowledged)"
            );
        }
        let appender = if bytes.is_empty() || recovery.torn_bytes > 0 {
            write_log(dir, &scan.order, &scan.decisions)?
        } else {
            let file = OpenOptions::new().append(true).open(&path).map_err(&io)?;
            Appender::new(file, path.clone(), bytes.len() as u64)
        };
        let store = Store {
            dir: dir.to_path_buf(),
            appender: Arc::new(Mutex::new(appender)),
            decisions: scan.decisions,
            order: scan.order,
        };
        info!(decisions = recovery.decisions, "arbiter store open");
        Ok((store, recovery))
    }

    /// Path of the decision log.
    pub fn log_path(&self) -> PathBuf {
        self.dir.join(LOG_NAME)
    }

    /// Rewrite the log with exactly the current decisions, atomically.
    pub fn compact(&mut self) -> Result<(), StoreError> {
        let mut appender = lock(&self.appender);
        *appender = write_log(&self.dir, &self.order, &self.decisions)?;
        Ok(())
    }

    /// The decision for (vm, generation), if made.
    pub fn owner(&self, vm: &str, generation: u64) -> Option<&str> {
        self.decisions
            .get(&(vm.to_string(), generation))
            .map(String::as_str)
    }

    /// Test-and-set: the first claimant wins forever; its repeats win again.
    /// A new decision is on disk (fsync) before this returns; if it cannot
    /// be made durable, it is not made (an error, and the register stays
    /// open).
    pub fn test_and_set(
        &mut self,
        vm: &str,
        generation: u64,
        claimant: &str,
    ) -> Result<Decision, StoreError> {
        let claim = Claim {
            vm: vm.to_string(),
            generation,
            claimant: claimant.to_string(),
        };
        let plan = self.plan(std::slice::from_ref(&claim));
        lock(&self.appender).append(&plan.records)?;
        self.apply(plan.new);
        Ok(plan.decisions.into_iter().next().expect("one claim"))
    }

    /// Decide a batch of claims against the durable decisions, in order
    /// (a later claim in the batch loses to an earlier new winner). Nothing
    /// is visible to readers until [`Appender::append`] of the plan's
    /// records succeeded and [`Store::apply`] ran.
    pub fn plan(&self, claims: &[Claim]) -> Plan {
        let mut pending: HashMap<(String, u64), String> = HashMap::new();
        let mut plan = Plan::default();
        for c in claims {
            let key = (c.vm.clone(), c.generation);
            let owner = self.decisions.get(&key).or_else(|| pending.get(&key));
            let d = match owner {
                Some(o) if *o == c.claimant => Decision::Won,
                Some(o) => Decision::Lost { owner: o.clone() },
                None => {
                    plan.records.extend_from_slice(&encode_record(
                        &c.vm,
                        c.generation,
                        &c.claimant,
                    ));
                    pending.insert(key.clone(), c.claimant.clone());
                    plan.new.push((key, c.claimant.clone()));
                    Decision::Won
                }
            };
            plan.decisions.push(d);
        }
        plan
    }

    /// Make decisions of a written plan visible.
    pub fn apply(&mut self, new: Vec<((String, u64), String)>) {
        for (key, owner) in new {
            if self.decisions.insert(key.clone(), owner).is_none() {
                self.order.push(key);
            }
        }
    }

    /// The log's appender, shared with a committer that writes while
    /// readers use the store.
    pub fn appender(&self) -> Arc<Mutex<Appender>> {
        self.appender.clone()
    }

    /// Number of decisions.
    pub fn len(&self) -> usize {
        self.decisions.len()
    }

    /// Whether nothing was decided yet.
    pub fn is_empty(&self) -> bool {
        self.decisions.is_empty()
    }
}

/// Lock, ignoring poisoning (the data behind these locks stays consistent:
/// every update is a single assignment or insert).
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_claim_wins_and_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let (mut s, r) = Store::open(dir.path()).unwrap();
        assert_eq!(r.decisions, 0);
        assert_eq!(s.test_and_set("vm", 1, "a").unwrap(), Decision::Won);
        assert_eq!(
            s.test_and_set("vm", 1, "b").unwrap(),
            Decision::Lost { owner: "a".into() }
        );
        assert_eq!(
            s.test_and_set("vm", 1, "a").unwrap(),
            Decision::Won,
            "retry"
        );
        assert_eq!(
            s.test_and_set("vm", 2, "b").unwrap(),
            Decision::Won,
            "new generation"
        );
        drop(s);
        let (s, r) = Store::open(dir.path()).unwrap();
        assert_eq!(r.decisions, 2);
        assert_eq!(s.owner("vm", 1), Some("a"));
        assert_eq!(s.owner("vm", 2), Some("b"));
        assert_eq!(s.owner("vm", 3), None);
    }

    #[test]
    fn torn_tail_is_dropped_at_every_cut() {
        let dir = tempfile::tempdir().unwrap();
        {
            let (mut s, _) = Store::open(dir.path()).unwrap();
            s.test_and_set("vm", 1, "a").unwrap();
            s.test_and_set("vm", 2, "b").unwrap();
        }
        let path = dir.path().join(LOG_NAME);
        let full = std::fs::read(&path).unwrap();
        let first_end = HEADER.len() + encode_record("vm", 1, "a").len();
        for cut in first_end..full.len() {
            std::fs::write(&path, &full[..cut]).unwrap();
            let (s, r) = Store::open(dir.path()).unwrap();
            assert_eq!(s.owner("vm", 1), Some("a"), "cut at {cut}");
            assert_eq!(s.owner("vm", 2), None, "cut at {cut}");
            assert_eq!(r.torn_bytes, (cut - first_end) as u64);
            // Compacted: a second open finds nothing torn.
            drop(s);
            let (_, r) = Store::open(dir.path()).unwrap();
            assert_eq!(r.torn_bytes, 0);
        }
    }

    #[test]
    fn corruption_before_the_end_refuses_to_open() {
        let dir = tempfile::tempdir().unwrap();
        {
            let (mut s, _) = Store::open(dir.path()).unwrap();
            s.test_and_set("vm", 1, "a").unwrap();
            s.test_and_set("vm", 2, "b").unwrap();
        }
        let path = dir.path().join(LOG_NAME);
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[HEADER.len() + 10] ^= 0x01; // inside the first record's payload
        std::fs::write(&path, &bytes).unwrap();
        let err = Store::open(dir.path()).unwrap_err();
        assert!(
            matches!(err, StoreError::Corrupt { offset: 8, .. }),
            "{err}"
        );

        std::fs::write(&path, b"NOTALOG!xxxxxxxx").unwrap();
        assert!(matches!(
            Store::open(dir.path()),
            Err(StoreError::BadHeader(_))
        ));
    }

    #[test]
    fn batch_decides_in_order_and_is_durable() {
        let dir = tempfile::tempdir().unwrap();
        let (mut s, _) = Store::open(dir.path()).unwrap();
        s.test_and_set("vm", 1, "z").unwrap();
        let c = |vm: &str, who: &str| Claim {
            vm: vm.into(),
            generation: 1,
            claimant: who.into(),
        };
        let plan = s.plan(&[
            c("a", "x"),
            c("a", "y"),
            c("vm", "x"),
            c("a", "x"),
            c("b", "y"),
        ]);
        assert_eq!(
            plan.decisions,
            vec![
                Decision::Won,
                Decision::Lost { owner: "x".into() },
                Decision::Lost { owner: "z".into() },
                Decision::Won,
                Decision::Won
            ]
        );
        assert_eq!(s.owner("a", 1), None, "not visible before it is written");
        s.appender().lock().unwrap().append(&plan.records).unwrap();
        s.apply(plan.new);
        assert_eq!(s.owner("a", 1), Some("x"));
        drop(s);
        let (s, r) = Store::open(dir.path()).unwrap();
        assert_eq!(r.decisions, 3);
        assert_eq!(s.owner("b", 1), Some("y"));
    }

    #[test]
    fn leftover_compaction_temp_is_ignored() {
        let dir = tempfile::tempdir().unwrap();
        {
            let (mut s, _) = Store::open(dir.path()).unwrap();
            s.test_and_set("vm", 1, "a").unwrap();
        }
        std::fs::write(dir.path().join("decisions.log.tmp"), b"garbage").unwrap();
        let (s, _) = Store::open(dir.path()).unwrap();
        assert_eq!(s.owner("vm", 1), Some("a"));
        assert!(!dir.path().join("decisions.log.tmp").exists());
    }

    fn three_records(dir: &Path) -> (PathBuf, Vec<u8>, [usize; 3]) {
        {
            let (mut s, _) = Store::open(dir).unwrap();
            s.test_and_set("vm", 1, "a").unwrap();
            s.test_and_set("vm", 2, "b").unwrap();
            s.test_and_set("vm", 3, "c").unwrap();
        }
        let path = dir.join(LOG_NAME);
        let bytes = std::fs::read(&path).unwrap();
        let r = encode_record("vm", 1, "a").len();
        (path, bytes, [8, 8 + r, 8 + 2 * r])
    }

    fn assert_corrupt_at(dir: &Path, path: &Path, at: usize) -> String {
        let err = Store::open(dir).unwrap_err();
        match &err {
            StoreError::Corrupt { offset, .. } => assert_eq!(*offset, at as u64, "{err}"),
            other => panic!("expected corruption at {at}, got {other}"),
        }
        let msg = err.to_string();
        assert!(msg.contains(&path.display().to_string()), "{msg}");
        assert!(msg.contains(&format!("byte offset {at}")), "{msg}");
        msg
    }

    #[test]
    fn complete_last_record_with_a_bad_checksum_is_corruption() {
        let dir = tempfile::tempdir().unwrap();
        let (path, mut bytes, [_, _, third]) = three_records(dir.path());
        let last = bytes.len() - 1;
        bytes[last] ^= 0x20; // the owner's name in the last record
        std::fs::write(&path, &bytes).unwrap();
        let msg = assert_corrupt_at(dir.path(), &path, third);
        assert!(msg.contains("checksum"), "{msg}");
        // Refused, not repaired: the file is untouched.
        assert_eq!(std::fs::read(&path).unwrap(), bytes);
    }

    #[test]
    fn bad_length_followed_by_records_is_corruption() {
        let dir = tempfile::tempdir().unwrap();
        let (path, bytes, [_, second, _]) = three_records(dir.path());
        for bad in [0u32, 3, MAX_PAYLOAD as u32 + 1, 600, u32::MAX] {
            let mut b = bytes.clone();
            b[second..second + 4].copy_from_slice(&bad.to_le_bytes());
            std::fs::write(&path, &b).unwrap();
            let msg = assert_corrupt_at(dir.path(), &path, second);
            assert!(msg.contains(&format!("record length {bad}")), "{msg}");
        }
    }

    #[test]
    fn length_past_the_end_over_acknowledged_records_is_corruption() {
        let dir = tempfile::tempdir().unwrap();
        let (path, bytes, [_, second, _]) = three_records(dir.path());
        // A damaged but plausible length that runs past the end of the file,
        // hiding the third (acknowledged) record.
        let mut b = bytes.clone();
        let len = (bytes.len() - second) as u32 + 10;
        assert!((len as usize) <= MAX_PAYLOAD);
        b[second..second + 4].copy_from_slice(&len.to_le_bytes());
        std::fs::write(&path, &b).unwrap();
        let msg = assert_corrupt_at(dir.path(), &path, second);
        assert!(msg.contains("not a torn write"), "{msg}");
    }

    #[test]
    fn torn_last_record_of_a_batch_is_dropped_and_the_rest_kept() {
        let dir = tempfile::tempdir().unwrap();
        let (path, bytes, [_, second, third]) = three_records(dir.path());
        // A batch of two records (second and third) whose write was cut
        // inside the third: the complete second record stays.
        for cut in third + 1..bytes.len() {
            std::fs::write(&path, &bytes[..cut]).unwrap();
            let (s, r) = Store::open(dir.path()).unwrap();
            assert_eq!(r.torn_bytes, (cut - third) as u64, "cut {cut}");
            assert_eq!(s.owner("vm", 2), Some("b"));
            assert_eq!(s.owner("vm", 3), None);
            assert_eq!(std::fs::read(&path).unwrap(), bytes[..third], "truncated");
        }
        assert!(second < third);
    }

    #[test]
    fn torn_header_is_dropped_but_a_foreign_file_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(LOG_NAME);
        std::fs::write(&path, &HEADER[..5]).unwrap();
        let (s, r) = Store::open(dir.path()).unwrap();
        assert_eq!((r.torn_bytes, s.len()), (5, 0));
        drop(s);
        std::fs::write(&path, b"NOT").unwrap();
        assert!(matches!(
            Store::open(dir.path()),
            Err(StoreError::BadHeader(_))
        ));
    }

    fn log_len(s: &Store) -> u64 {
        std::fs::metadata(s.log_path()).unwrap().len()
    }

    #[test]
    fn failed_write_is_rolled_back_and_the_log_reopens() {
        let dir = tempfile::tempdir().unwrap();
        let (mut s, _) = Store::open(dir.path()).unwrap();
        assert_eq!(s.test_and_set("vm", 1, "a").unwrap(), Decision::Won);
        let good = log_len(&s);
        // The write stops after 5 bytes (a partial record) and fails.
        s.appender().lock().unwrap().faults.write_fails_after = Some(5);
        let err = s.test_and_set("vm", 2, "b").unwrap_err();
        assert!(matches!(err, StoreError::Io { .. }), "{err}");
        assert_eq!(log_len(&s), good, "partial record cut off");
        assert_eq!(s.owner("vm", 2), None, "failed claim not decided");
        // The store goes on: new decisions land after the last good record.
        assert_eq!(s.test_and_set("vm", 3, "c").unwrap(), Decision::Won);
        assert_eq!(s.test_and_set("vm", 2, "d").unwrap(), Decision::Won);
        drop(s);
        let (s, r) = Store::open(dir.path()).unwrap();
        assert_eq!(
            r,
            Recovery {
                decisions: 3,
                torn_bytes: 0
            }
        );
        assert_eq!(s.owner("vm", 1), Some("a"));
        assert_eq!(s.owner("vm", 2), Some("d"));
        assert_eq!(s.owner("vm", 3), Some("c"));
    }

    #[test]
    fn failed_fsync_is_rolled_back_and_a_later_claimant_wins() {
        let dir = tempfile::tempdir().unwrap();
        let (mut s, _) = Store::open(dir.path()).unwrap();
        s.test_and_set("vm", 1, "a").unwrap();
        let good = log_len(&s);
        // The record is written in full, but its fsync fails: it must not
        // stay in the file beside a later decision for the same register.
        s.appender().lock().unwrap().faults.sync_fails = true;
        assert!(s.test_and_set("vm", 2, "b").is_err());
        assert_eq!(log_len(&s), good);
        assert_eq!(s.owner("vm", 2), None);
        assert_eq!(s.test_and_set("vm", 2, "e").unwrap(), Decision::Won);
        assert_eq!(
            s.test_and_set("vm", 2, "b").unwrap(),
            Decision::Lost { owner: "e".into() }
        );
        drop(s);
        let (s, r) = Store::open(dir.path()).unwrap();
        assert_eq!(r.decisions, 2);
        assert_eq!(s.owner("vm", 2), Some("e"));
    }

    #[test]
    fn failed_rollback_stops_the_appender_for_good() {
        let dir = tempfile::tempdir().unwrap();
        let (mut s, _) = Store::open(dir.path()).unwrap();
        s.test_and_set("vm", 1, "a").unwrap();
        {
            let app = s.appender();
            let mut app = app.lock().unwrap();
            app.faults.write_fails_after = Some(3);
            app.faults.rollback_fails = true;
        }
        let err = s.test_and_set("vm", 2, "b").unwrap_err();
        assert!(matches!(err, StoreError::Stopped { .. }), "{err}");
        assert!(err.to_string().contains("rollback"), "{err}");
        let err = s.test_and_set("vm", 3, "c").unwrap_err();
        assert!(matches!(err, StoreError::Stopped { .. }), "{err}");
        assert_eq!((s.owner("vm", 2), s.owner("vm", 3)), (None, None));
        assert_eq!(
            s.test_and_set("vm", 1, "a").unwrap(),
            Decision::Won,
            "answers from durable decisions need no append"
        );
        drop(s);
        // What the failed append left is a torn tail: dropped on open.
        let (s, r) = Store::open(dir.path()).unwrap();
        assert_eq!(
            r,
            Recovery {
                decisions: 1,
                torn_bytes: 3
            }
        );
        assert_eq!(s.owner("vm", 2), None);
    }

    #[test]
    fn nested_missing_data_dirs_are_created_and_synced_into_their_parents() {
        let base = tempfile::tempdir().unwrap();
        let dir = base.path().join("a").join("b").join("c");
        SYNCED_DIRS.with(|d| d.borrow_mut().clear());
        let (mut s, _) = Store::open(&dir).unwrap();
        let synced = SYNCED_DIRS.with(|d| d.borrow().clone());
        let expect = [
            base.path().to_path_buf(),
            base.path().join("a"),
            base.path().join("a").join("b"),
            dir.clone(), // after the new log was renamed into place
        ];
        assert_eq!(synced, expect);
        s.test_and_set("vm", 1, "a").unwrap();
        drop(s);
        SYNCED_DIRS.with(|d| d.borrow_mut().clear());
        let (s, _) = Store::open(&dir).unwrap();
        assert_eq!(s.owner("vm", 1), Some("a"));
        assert!(
            SYNCED_DIRS.with(|d| d.borrow().is_empty()),
            "nothing created, nothing to sync"
        );
        // A file in the way is an error, not a data directory.
        let file = base.path().join("file");
        std::fs::write(&file, b"x").unwrap();
        assert!(matches!(
            Store::open(&file.join("d")),
            Err(StoreError::Io { .. })
        ));
    }
}
