//! The durable register file of the built-in arbiter.
//!
//! `decisions.log` in the data directory holds an 8-byte header and then one
//! record per decision: a 4-byte length, a CRC32C of the payload, and the
//! payload (VM id, generation, owner). A decision is appended and `fsync`ed
//! before anyone is told about it, so every answered decision survives
//! `kill -9` and power loss. On open, a torn record at the very end (a write
//! that was in progress when the process died, never answered) is dropped
//! and the log is compacted; a bad record anywhere else is corruption and
//! the store refuses to open, naming the offset. Compaction writes a new
//! file, syncs it and renames it over the old one, so it is atomic.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use thiserror::Error;
use tracing::{info, warn};

use crate::Decision;

const HEADER: &[u8; 8] = b"VMFTARB1";
const LOG_NAME: &str = "decisions.log";
const MAX_RECORD: usize = 4 + 2 * (2 + 255) + 8;

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
    /// The log is damaged before its end.
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

impl Plan {
    /// Append the records and fsync (one sync for the whole batch).
    pub fn write(&self, file: &mut File, path: &Path) -> Result<(), StoreError> {
        if self.records.is_empty() {
            return Ok(());
        }
        let io = |source| StoreError::Io {
            path: path.to_path_buf(),
            source,
        };
        file.write_all(&self.records).map_err(io)?;
        file.sync_data().map_err(io)
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
    file: File,
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
    let mut r = Vec::with_capacity(p.len() + 8);
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

/// Write exactly `decisions` (in `order`) as the log in `dir`, atomically
/// (temporary file, fsync, rename, fsync of the directory), and return the
/// new log opened for appending.
fn write_log(
    dir: &Path,
    order: &[(String, u64)],
    decisions: &HashMap<(String, u64), String>,
) -> Result<File, StoreError> {
    let path = dir.join(LOG_NAME);
    let tmp = dir.join(format!("{LOG_NAME}.tmp"));
    let io = |source| StoreError::Io {
        path: path.clone(),
        source,
    };
    let mut buf = HEADER.to_vec();
    for key in order {
        buf.extend_from_slice(&encode_record(&key.0, key.1, &decisions[key]));
    }
    {
        let mut f = File::create(&tmp).map_err(io)?;
        f.write_all(&buf).map_err(io)?;
        f.sync_all().map_err(io)?;
    }
    std::fs::rename(&tmp, &path).map_err(io)?;
    sync_dir(dir).map_err(io)?;
    OpenOptions::new().append(true).open(&path).map_err(io)
}

fn sync_dir(dir: &Path) -> std::io::Result<()> {
    File::open(dir)?.sync_all()
}

impl Store {
    /// Open (or create) the store in `dir`, recovering from a crash.
    pub fn open(dir: &Path) -> Result<(Store, Recovery), StoreError> {
        let path = dir.join(LOG_NAME);
        let io = |source| StoreError::Io {
            path: path.clone(),
            source,
        };
        std::fs::create_dir_all(dir).map_err(io)?;
        // A compaction that died before its rename left only a temp file.
        let _ = std::fs::remove_file(dir.join(format!("{LOG_NAME}.tmp")));
        let mut bytes = Vec::new();
        match File::open(&path) {
            Ok(mut f) => {
                f.read_to_end(&mut bytes).map_err(io)?;
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io(e)),
        }
        let mut decisions = HashMap::new();
        let mut order = Vec::new();
        let mut recovery = Recovery::default();
        let mut rewrite = bytes.is_empty();
        if !bytes.is_empty() {
            if bytes.len() < HEADER.len() {
                // The header itself was torn: nothing was ever decided.
                recovery.torn_bytes = bytes.len() as u64;
                rewrite = true;
            } else if &bytes[..8] != HEADER {
                return Err(StoreError::BadHeader(path));
            } else {
                let mut at = HEADER.len();
                while at < bytes.len() {
                    let rest = &bytes[at..];
                    let corrupt = |detail: String| StoreError::Corrupt {
                        path: path.clone(),
                        offset: at as u64,
                        detail,
                    };
                    if rest.len() < 8 {
                        recovery.torn_bytes = rest.len() as u64;
                        break;
                    }
                    let len = u32::from_le_bytes(rest[..4].try_into().unwrap()) as usize;
                    let crc = u32::from_le_bytes(rest[4..8].try_into().unwrap());
                    if len > MAX_RECORD {
                        if rest.len() < 8 + MAX_RECORD {
                            recovery.torn_bytes = rest.len() as u64;
                            break;
                        }
                        return Err(corrupt(format!("record length {len}")));
                    }
                    if rest.len() < 8 + len {
                        recovery.torn_bytes = rest.len() as u64;
                        break;
                    }
                    let payload = &rest[8..8 + len];
                    let is_last = rest.len() == 8 + len;
                    if crc32c::crc32c(payload) != crc {
                        if is_last {
                            recovery.torn_bytes = rest.len() as u64;
                            break;
                        }
                        return Err(corrupt("checksum mismatch".into()));
                    }
                    let Some((vm, generation, owner)) = decode_payload(payload) else {
                        return Err(corrupt("payload does not parse".into()));
                    };
                    let key = (vm, generation);
                    if let Some(first) = decisions.get(&key) {
                        if first != &owner {
                            return Err(corrupt(format!(
                                "second owner {owner:?} for a key owned by {first:?}"
                            )));
                        }
                    } else {
                        decisions.insert(key.clone(), owner);
                        order.push(key);
                    }
                    at += 8 + len;
                }
                if recovery.torn_bytes > 0 {
                    warn!(
                        path = %path.display(),
                        torn_bytes = recovery.torn_bytes,
                        "dropping a torn final record (never acknowledged)"
                    );
                    rewrite = true;
                }
            }
        }
        recovery.decisions = decisions.len();
        let file = if rewrite {
            write_log(dir, &order, &decisions)?
        } else {
            OpenOptions::new().append(true).open(&path).map_err(io)?
        };
        let store = Store {
            dir: dir.to_path_buf(),
            file,
            decisions,
            order,
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
        self.file = write_log(&self.dir, &self.order, &self.decisions)?;
        Ok(())
    }

    /// The decision for (vm, generation), if made.
    pub fn owner(&self, vm: &str, generation: u64) -> Option<&str> {
        self.decisions
            .get(&(vm.to_string(), generation))
            .map(String::as_str)
    }

    /// Test-and-set: the first claimant wins forever; its repeats win again.
    /// A new decision is on disk (fsync) before this returns.
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
        let mut file = self.log_file()?;
        plan.write(&mut file, &self.log_path())?;
        self.apply(plan.new);
        Ok(plan.decisions.into_iter().next().expect("one claim"))
    }

    /// Decide a batch of claims against the durable decisions, in order
    /// (a later claim in the batch loses to an earlier new winner). Nothing
    /// is visible to readers until [`Plan::write`] and [`Store::apply`].
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

    /// A second handle on the log for a committer that writes while
    /// readers use the store (valid until the next [`Store::compact`]).
    pub fn log_file(&self) -> Result<File, StoreError> {
        self.file.try_clone().map_err(|source| StoreError::Io {
            path: self.log_path(),
            source,
        })
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
        let mut f = s.log_file().unwrap();
        plan.write(&mut f, &dir.path().join(LOG_NAME)).unwrap();
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
}
