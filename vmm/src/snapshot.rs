//! Snapshot file format and the little-endian encoder/decoder that device
//! and vCPU state use.
//!
//! File layout (all integers little-endian):
//!
//! | bytes | field |
//! | --- | --- |
//! | 8 | magic `VMFTSNAP` |
//! | 4 | format version ([`FORMAT_VERSION`]) |
//! | 8 | body length `n` |
//! | n | body: sections written by [`crate::vm`] |
//! | 4 | CRC32C of the body |
//!
//! A file with another magic, another version, a short body or a checksum
//! mismatch is refused with an error naming the file and the problem.

use std::fs::File;
use std::io::{BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use thiserror::Error;

/// Magic bytes at the start of every snapshot.
pub const MAGIC: &[u8; 8] = b"VMFTSNAP";
/// Current snapshot format version (3: the MMIO devices' state follows
/// the port devices').
pub const FORMAT_VERSION: u32 = 3;

/// Snapshot errors.
#[derive(Debug, Error)]
pub enum SnapshotError {
    /// The file could not be read or written.
    #[error("snapshot {path}: {source}")]
    Io {
        /// File involved.
        path: PathBuf,
        /// Underlying error.
        source: std::io::Error,
    },
    /// Not a vmft snapshot.
    #[error("snapshot {0}: not a vmft snapshot (bad magic)")]
    BadMagic(PathBuf),
    /// Written by another format version.
    #[error("snapshot {path}: format version {found}, this vmft reads version {expected}")]
    Version {
        /// File involved.
        path: PathBuf,
        /// Version in the file.
        found: u32,
        /// Version supported.
        expected: u32,
    },
    /// The body is shorter than the header says.
    #[error("snapshot {path}: truncated ({got} of {want} bytes)")]
    Truncated {
        /// File involved.
        path: PathBuf,
        /// Bytes present.
        got: u64,
        /// Bytes expected.
        want: u64,
    },
    /// The checksum does not match: the file is corrupt.
    #[error("snapshot {path}: checksum mismatch (stored {stored:#010x}, computed {computed:#010x}); the file is corrupt")]
    Checksum {
        /// File involved.
        path: PathBuf,
        /// CRC in the file.
        stored: u32,
        /// CRC of the body read.
        computed: u32,
    },
    /// A section ended early while decoding.
    #[error("snapshot body ends early while reading {0}")]
    Short(&'static str),
    /// A decoded value is not acceptable.
    #[error("snapshot content invalid: {0}")]
    Invalid(String),
}

/// Append-only little-endian encoder.
#[derive(Debug, Default)]
pub struct Encoder {
    buf: Vec<u8>,
}

impl Encoder {
    /// An empty encoder.
    pub fn new() -> Self {
        Self::default()
    }
    /// Append a byte.
    pub fn u8(&mut self, v: u8) {
        self.buf.push(v);
    }
    /// Append a bool as one byte.
    pub fn bool(&mut self, v: bool) {
        self.buf.push(v as u8);
    }
    /// Append a u16.
    pub fn u16(&mut self, v: u16) {
        self.buf.extend_from_slice(&v.to_le_bytes());
    }
    /// Append a u32.
    pub fn u32(&mut self, v: u32) {
        self.buf.extend_from_slice(&v.to_le_bytes());
    }
    /// Append a u64.
    pub fn u64(&mut self, v: u64) {
        self.buf.extend_from_slice(&v.to_le_bytes());
    }
    /// Append an i64.
    pub fn i64(&mut self, v: i64) {
        self.buf.extend_from_slice(&v.to_le_bytes());
    }
    /// Append an optional u64 (presence byte, then value).
    pub fn opt_u64(&mut self, v: Option<u64>) {
        self.bool(v.is_some());
        self.u64(v.unwrap_or(0));
    }
    /// Append a length-prefixed byte string.
    pub fn bytes(&mut self, v: &[u8]) {
        self.u64(v.len() as u64);
        self.buf.extend_from_slice(v);
    }
    /// Append raw bytes with no length.
    pub fn raw(&mut self, v: &[u8]) {
        self.buf.extend_from_slice(v);
    }
    /// The encoded bytes.
    pub fn into_bytes(self) -> Vec<u8> {
        self.buf
    }
}

/// Little-endian decoder over a byte slice.
#[derive(Debug)]
pub struct Decoder<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Decoder<'a> {
    /// Decode from `buf`.
    pub fn new(buf: &'a [u8]) -> Self {
        Decoder { buf, pos: 0 }
    }
    fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], SnapshotError> {
        let end = self.pos.checked_add(n).ok_or(SnapshotError::Short(what))?;
        if end > self.buf.len() {
            return Err(SnapshotError::Short(what));
        }
        let s = &self.buf[self.pos..end];
        self.pos = end;
        Ok(s)
    }
    /// Read a byte.
    pub fn u8(&mut self) -> Result<u8, SnapshotError> {
        Ok(self.take(1, "u8")?[0])
    }
    /// Read a bool.
    pub fn bool(&mut self) -> Result<bool, SnapshotError> {
        match self.u8()? {
            0 => Ok(false),
            1 => Ok(true),
            v => Err(SnapshotError::Invalid(format!("boolean byte {v}"))),
        }
    }
    /// Read a u16.
    pub fn u16(&mut self) -> Result<u16, SnapshotError> {
        Ok(u16::from_le_bytes(self.take(2, "u16")?.try_into().unwrap()))
    }
    /// Read a u32.
    pub fn u32(&mut self) -> Result<u32, SnapshotError> {
        Ok(u32::from_le_bytes(self.take(4, "u32")?.try_into().unwrap()))
    }
    /// Read a u64.
    pub fn u64(&mut self) -> Result<u64, SnapshotError> {
        Ok(u64::from_le_bytes(self.take(8, "u64")?.try_into().unwrap()))
    }
    /// Read an i64.
    pub fn i64(&mut self) -> Result<i64, SnapshotError> {
        Ok(i64::from_le_bytes(self.take(8, "i64")?.try_into().unwrap()))
    }
    /// Read an optional u64.
    pub fn opt_u64(&mut self) -> Result<Option<u64>, SnapshotError> {
        let present = self.bool()?;
        let v = self.u64()?;
        Ok(present.then_some(v))
    }
    /// Read a length-prefixed byte string.
    pub fn bytes(&mut self) -> Result<&'a [u8], SnapshotError> {
        let n = self.u64()?;
        let n = usize::try_from(n).map_err(|_| SnapshotError::Short("bytes"))?;
        self.take(n, "bytes")
    }
    /// Read exactly `n` raw bytes.
    pub fn bytes_exact(&mut self, n: usize) -> Result<&'a [u8], SnapshotError> {
        self.take(n, "raw bytes")
    }
    /// Bytes not yet read.
    pub fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }
}

/// Write `body` to `path` with header and checksum, atomically (temp file
/// then rename), so a crash never leaves a half-written snapshot behind.
pub fn write_file(path: &Path, body: &[u8]) -> Result<(), SnapshotError> {
    let io = |source| SnapshotError::Io {
        path: path.to_path_buf(),
        source,
    };
    let tmp = path.with_extension("tmp");
    {
        let f = File::create(&tmp).map_err(io)?;
        let mut w = BufWriter::new(f);
        w.write_all(MAGIC).map_err(io)?;
        w.write_all(&FORMAT_VERSION.to_le_bytes()).map_err(io)?;
        w.write_all(&(body.len() as u64).to_le_bytes())
            .map_err(io)?;
        w.write_all(body).map_err(io)?;
        w.write_all(&crc32c::crc32c(body).to_le_bytes())
            .map_err(io)?;
        let f = w.into_inner().map_err(|e| io(e.into_error()))?;
        f.sync_all().map_err(io)?;
    }
    std::fs::rename(&tmp, path).map_err(io)
}

/// A snapshot file's bytes for `body` (what [`write_file`] writes).
pub fn file_bytes(body: &[u8]) -> Vec<u8> {
    let mut b = Vec::with_capacity(body.len() + 24);
    b.extend_from_slice(MAGIC);
    b.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    b.extend_from_slice(&(body.len() as u64).to_le_bytes());
    b.extend_from_slice(body);
    b.extend_from_slice(&crc32c::crc32c(body).to_le_bytes());
    b
}

/// Write a snapshot file's `bytes` (received whole, e.g. in a state
/// transfer) to `path`, atomically; [`read_file`] verifies them.
pub fn write_file_bytes(path: &Path, bytes: &[u8]) -> Result<(), SnapshotError> {
    let io = |source| SnapshotError::Io {
        path: path.to_path_buf(),
        source,
    };
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, bytes).map_err(io)?;
    std::fs::rename(&tmp, path).map_err(io)
}

/// Read and verify a snapshot file; returns the body.
pub fn read_file(path: &Path) -> Result<Vec<u8>, SnapshotError> {
    let p = || path.to_path_buf();
    let io = |source| SnapshotError::Io { path: p(), source };
    let mut f = File::open(path).map_err(io)?;
    let mut header = [0u8; 20];
    let mut got = 0;
    while got < header.len() {
        match f.read(&mut header[got..]).map_err(io)? {
            0 => break,
            n => got += n,
        }
    }
    if got < 8 || &header[..8] != MAGIC {
        return Err(SnapshotError::BadMagic(p()));
    }
    if got < 20 {
        return Err(SnapshotError::Truncated {
            path: p(),
            got: got as u64,
            want: 20,
        });
    }
    let version = u32::from_le_bytes(header[8..12].try_into().unwrap());
    if version != FORMAT_VERSION {
        return Err(SnapshotError::Version {
            path: p(),
            found: version,
            expected: FORMAT_VERSION,
        });
    }
    let len = u64::from_le_bytes(header[12..20].try_into().unwrap());
    let file_len = f.metadata().map_err(io)?.len();
    if file_len < 20 + len + 4 {
        return Err(SnapshotError::Truncated {
            path: p(),
            got: file_len.saturating_sub(24),
            want: len,
        });
    }
    let mut body = vec![0u8; len as usize];
    f.read_exact(&mut body).map_err(io)?;
    let mut crc = [0u8; 4];
    f.read_exact(&mut crc).map_err(io)?;
    let stored = u32::from_le_bytes(crc);
    let computed = crc32c::crc32c(&body);
    if stored != computed {
        return Err(SnapshotError::Checksum {
            path: p(),
            stored,
            computed,
        });
    }
    Ok(body)
}

/// Plain C structs whose bytes may be copied out and back in.
///
/// # Safety
///
/// Implement only for `repr(C)` structs of integers (and arrays of them)
/// with no implicit padding, for which every bit pattern is a valid value.
pub unsafe trait Pod: Default {}

// SAFETY: kvm-bindings' bindgen structs are repr(C) integers and integer
// arrays, with explicit padding fields; any bit pattern is a valid value.
unsafe impl Pod for kvm_bindings::kvm_regs {}
// SAFETY: as above.
unsafe impl Pod for kvm_bindings::kvm_sregs {}
// SAFETY: as above.
unsafe impl Pod for kvm_bindings::kvm_fpu {}
// SAFETY: as above.
unsafe impl Pod for kvm_bindings::kvm_xsave {}
// SAFETY: as above.
unsafe impl Pod for kvm_bindings::kvm_xcrs {}
// SAFETY: as above.
unsafe impl Pod for kvm_bindings::kvm_debugregs {}
// SAFETY: as above.
unsafe impl Pod for kvm_bindings::kvm_vcpu_events {}

/// View a plain-old-data value as bytes.
pub fn pod_bytes<T: Pod>(v: &T) -> &[u8] {
    // SAFETY: `T: Pod` is a repr(C) struct of integers without implicit
    // padding, so every byte is initialised; the slice borrows `v` and
    // cannot outlive it.
    unsafe { std::slice::from_raw_parts(v as *const T as *const u8, std::mem::size_of::<T>()) }
}

/// Rebuild a plain-old-data value from bytes written by [`pod_bytes`].
pub fn pod_from_bytes<T: Pod>(b: &[u8]) -> Result<T, SnapshotError> {
    if b.len() != std::mem::size_of::<T>() {
        return Err(SnapshotError::Invalid(format!(
            "{} is {} bytes, expected {}",
            std::any::type_name::<T>(),
            b.len(),
            std::mem::size_of::<T>()
        )));
    }
    let mut v = T::default();
    // SAFETY: the destination is a valid, aligned `T` of exactly `b.len()`
    // bytes, and every bit pattern is a valid `T` (the `Pod` contract).
    unsafe {
        std::ptr::copy_nonoverlapping(b.as_ptr(), &mut v as *mut T as *mut u8, b.len());
    }
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encoder_decoder_round_trip() {
        let mut e = Encoder::new();
        e.u8(1);
        e.u16(0x1234);
        e.u32(0xdead_beef);
        e.u64(u64::MAX);
        e.i64(-5);
        e.opt_u64(Some(9));
        e.opt_u64(None);
        e.bytes(b"abc");
        let b = e.into_bytes();
        let mut d = Decoder::new(&b);
        assert_eq!(d.u8().unwrap(), 1);
        assert_eq!(d.u16().unwrap(), 0x1234);
        assert_eq!(d.u32().unwrap(), 0xdead_beef);
        assert_eq!(d.u64().unwrap(), u64::MAX);
        assert_eq!(d.i64().unwrap(), -5);
        assert_eq!(d.opt_u64().unwrap(), Some(9));
        assert_eq!(d.opt_u64().unwrap(), None);
        assert_eq!(d.bytes().unwrap(), b"abc");
        assert!(matches!(d.u8(), Err(SnapshotError::Short(_))));
    }

    #[test]
    fn file_round_trip_and_corruption_detected() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.snap");
        write_file(&path, b"hello body").unwrap();
        assert_eq!(read_file(&path).unwrap(), b"hello body");

        let mut bytes = std::fs::read(&path).unwrap();
        bytes[22] ^= 0x01;
        std::fs::write(&path, &bytes).unwrap();
        assert!(matches!(
            read_file(&path),
            Err(SnapshotError::Checksum { .. })
        ));

        bytes[22] ^= 0x01;
        bytes[8] = 9;
        std::fs::write(&path, &bytes).unwrap();
        assert!(matches!(
            read_file(&path),
            Err(SnapshotError::Version { found: 9, .. })
        ));

        std::fs::write(&path, b"\x7fELF not a snapshot").unwrap();
        assert!(matches!(read_file(&path), Err(SnapshotError::BadMagic(_))));

        write_file(&path, b"hello body").unwrap();
        let full = std::fs::read(&path).unwrap();
        std::fs::write(&path, &full[..full.len() - 6]).unwrap();
        assert!(matches!(
            read_file(&path),
            Err(SnapshotError::Truncated { .. })
        ));
    }
}
