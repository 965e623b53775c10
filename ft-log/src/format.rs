//! The byte format of a log (version 3), written and read as a stream.
//!
//! ```text
//! header: "VMFT-LOG" | version u16 | body length u32 | body | CRC32C u32
//!         (body: postcard-encoded LogHeader, at most MAX_HEADER bytes;
//!         CRC over version, length, body)
//! frame:  length u32 | sequence u64 | CRC32C u32 | stored payload
//!         (length: bits 0-30 the stored payload's size, bit 31 set when
//!         the stored payload is LZ4-compressed with its decompressed size
//!         (u32) prepended, as large entries such as epochs are;
//!         payload: a postcard-encoded Entry, at most MAX_FRAME bytes
//!         both stored and decompressed;
//!         CRC over the length field, the sequence and the stored payload)
//! ```
//!
//! All integers are little-endian. Sequence numbers start at 0 and increase
//! by one per frame, so a lost or repeated frame is noticed. The
//! [`LogWriter`] refuses an entry over its frame limit ([`MAX_FRAME`], or
//! less with [`LogWriter::with_max_frame`]) before writing any of it, and
//! [`LogWriter::write_epoch`] splits an epoch too large for one frame into
//! [`Entry::EpochPages`] frames followed by the [`Entry::Epoch`] frame
//! ([`crate::EpochAssembler`] joins them again). The [`Decoder`] accepts
//! bytes in chunks of any size (a socket, a file), refuses a frame over
//! its frame limit as soon as the frame's head arrives, checks a
//! compressed payload's size prefix against the limit before
//! decompressing, and never panics on bad input; every error names the
//! byte offset and, inside a frame, its sequence number.

use std::io::Write;
use std::ops::Range;

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::entry::{Entry, Epoch, Page};

/// Magic bytes at the start of a log.
pub const MAGIC: &[u8; 8] = b"VMFT-LOG";
/// Format version written and read by this code (2: compressed frames,
/// page deltas in epochs; 3: the frame CRC covers the length field and
/// its compressed bit too; 4: console input carries its cursor in the
/// console's input stream; 5: network frames received and released; 6:
/// shared-disk reads and released writes).
pub const VERSION: u16 = 6;
/// Largest frame payload accepted, stored and decompressed (an epoch
/// carries dirty pages). A writer or decoder may use a smaller limit
/// ([`LogWriter::with_max_frame`], [`Decoder::with_max_frame`]), never a
/// larger one; it stays below bit 31 of the length field.
pub const MAX_FRAME: usize = 256 << 20;
/// Largest header body accepted.
pub const MAX_HEADER: usize = 64 << 10;
const FRAME_HEAD: usize = 16;
/// Payloads at least this large are compressed when that makes them smaller.
pub const COMPRESS_MIN: usize = 1024;
/// Bit of the length field that marks a compressed payload.
const COMPRESSED: u32 = 1 << 31;

/// What the log was recorded for: enough to rebuild the VM and to refuse a
/// log recorded for another one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogHeader {
    /// Kernel path on the recording host.
    pub kernel: String,
    /// Initramfs path on the recording host.
    pub initrd: Option<String>,
    /// Guest memory in MiB.
    pub mem_mib: u64,
    /// Full kernel command line.
    pub cmdline: String,
    /// Hash of the configuration (kernel and initramfs contents, memory
    /// size, command line), hex.
    pub config_hash: String,
    /// Free-form description of the recorder.
    pub recorder: String,
    /// The snapshot the recording started from (path on the recording
    /// host), when it did not boot; its contents are in `config_hash`.
    pub snapshot: Option<String>,
}

/// Log format errors.
#[derive(Debug, Clone, Error, PartialEq, Eq)]
pub enum LogError {
    /// The stream does not start with the magic bytes.
    #[error("not a vmft log (bad magic at offset 0)")]
    BadMagic,
    /// Another format version.
    #[error("log format version {found}, this vmft reads version {supported}")]
    Version {
        /// Version in the log.
        found: u16,
        /// Version supported.
        supported: u16,
    },
    /// The header is damaged.
    #[error("log header corrupt: {0}")]
    Header(String),
    /// A frame's length field is out of range.
    #[error("frame {seq} at offset {offset}: length {len} exceeds the maximum {max}")]
    FrameTooLarge {
        /// Expected sequence number.
        seq: u64,
        /// Byte offset of the frame.
        offset: u64,
        /// Length field (without the compressed bit).
        len: u64,
        /// The decoder's limit.
        max: u64,
    },
    /// The writer refuses an entry whose payload exceeds its frame limit;
    /// nothing of it was written and the log stays valid.
    #[error(
        "{kind} entry for frame {seq}: payload of {size} bytes exceeds the frame limit of {max} bytes"
    )]
    EntryTooLarge {
        /// Sequence number the frame would have had (for an epoch that
        /// cannot be split, its first frame's).
        seq: u64,
        /// Entry kind ([`Entry::kind`]).
        kind: &'static str,
        /// Encoded (decompressed) payload size; the stored size is never
        /// larger, as compression is used only when it makes it smaller.
        size: u64,
        /// The writer's limit.
        max: u64,
    },
    /// A frame's checksum does not match.
    #[error("frame {seq} at offset {offset}: checksum mismatch (stored {stored:#010x}, computed {computed:#010x})")]
    Checksum {
        /// Expected sequence number.
        seq: u64,
        /// Byte offset of the frame.
        offset: u64,
        /// CRC in the frame.
        stored: u32,
        /// CRC computed.
        computed: u32,
    },
    /// A frame carries the wrong sequence number (lost or repeated frame).
    #[error("frame at offset {offset}: sequence {found}, expected {expected}")]
    Sequence {
        /// Byte offset of the frame.
        offset: u64,
        /// Sequence expected.
        expected: u64,
        /// Sequence found.
        found: u64,
    },
    /// The payload does not decode as an entry.
    #[error("frame {seq} at offset {offset}: payload does not decode: {detail}")]
    Payload {
        /// Sequence number.
        seq: u64,
        /// Byte offset of the frame.
        offset: u64,
        /// Decoder message.
        detail: String,
    },
    /// Epoch pages for another epoch than the parts before them
    /// ([`crate::EpochAssembler`]).
    #[error("pages of epoch {found_index} after exit {found_pos} while epoch {index} after exit {pos} is being assembled")]
    EpochMismatch {
        /// Exit number of the epoch being assembled.
        pos: u64,
        /// Its index.
        index: u64,
        /// Exit number named by the part or epoch that arrived.
        found_pos: u64,
        /// Index named by the part or epoch that arrived.
        found_index: u64,
    },
    /// Epoch pages not followed by their epoch ([`crate::EpochAssembler`]).
    #[error("{parts} part(s) of epoch {index} after exit {pos} followed by {found} instead of the epoch")]
    EpochIncomplete {
        /// Exit number of the epoch being assembled.
        pos: u64,
        /// Its index.
        index: u64,
        /// Parts received.
        parts: u64,
        /// What came instead of the epoch.
        found: String,
    },
    /// The stream ended before the header was complete.
    #[error("log truncated at offset {offset}: {what}")]
    Truncated {
        /// Where the data ends.
        offset: u64,
        /// What was being read.
        what: String,
    },
    /// The stream ended inside a frame (or a damaged length field made a
    /// frame longer than the rest of the stream).
    #[error(
        "log truncated inside frame {seq} at offset {offset}: only {present} bytes of it present"
    )]
    FrameTruncated {
        /// Sequence number the frame should have.
        seq: u64,
        /// Byte offset of the frame.
        offset: u64,
        /// Bytes of the frame present.
        present: u64,
    },
}

/// Encode one entry's payload.
pub fn encode_entry(e: &Entry) -> Vec<u8> {
    postcard::to_stdvec(e).expect("entries always serialise")
}

/// Decode one entry's payload.
pub fn decode_entry(b: &[u8]) -> Result<Entry, String> {
    postcard::from_bytes(b).map_err(|e| e.to_string())
}

/// Encode the header.
pub fn encode_header(h: &LogHeader) -> Vec<u8> {
    let body = postcard::to_stdvec(h).expect("header always serialises");
    let mut out = MAGIC.to_vec();
    let mut checked = VERSION.to_le_bytes().to_vec();
    checked.extend_from_slice(&(body.len() as u32).to_le_bytes());
    checked.extend_from_slice(&body);
    out.extend_from_slice(&checked);
    out.extend_from_slice(&crc32c::crc32c(&checked).to_le_bytes());
    out
}

/// Errors writing a log.
#[derive(Debug, Error)]
pub enum WriteError {
    /// The sink failed.
    #[error("writing the log: {0}")]
    Io(#[from] std::io::Error),
    /// The entry cannot be framed ([`LogError::EntryTooLarge`]); nothing of
    /// it was written.
    #[error(transparent)]
    Log(#[from] LogError),
}

/// Encode one frame with sequence number `seq`, refusing a payload over
/// [`MAX_FRAME`].
pub fn encode_frame(seq: u64, entry: &Entry) -> Result<Vec<u8>, LogError> {
    encode_frame_within(seq, entry, MAX_FRAME)
}

/// Encode one frame whose payload, stored and decompressed, is at most
/// `max` bytes (`max` at most [`MAX_FRAME`]).
fn encode_frame_within(seq: u64, entry: &Entry, max: usize) -> Result<Vec<u8>, LogError> {
    debug_assert!(max <= MAX_FRAME);
    let mut payload = encode_entry(entry);
    // The stored payload is the encoded one or, when that is smaller, its
    // compressed form: bounding the encoded size bounds both.
    if payload.len() > max {
        return Err(LogError::EntryTooLarge {
            seq,
            kind: entry.kind(),
            size: payload.len() as u64,
            max: max as u64,
        });
    }
    let mut len_field = payload.len() as u32;
    if payload.len() >= COMPRESS_MIN {
        let packed = lz4_flex::compress_prepend_size(&payload);
        if packed.len() < payload.len() {
            len_field = packed.len() as u32 | COMPRESSED;
            payload = packed;
        }
    }
    let mut out = Vec::with_capacity(FRAME_HEAD + payload.len());
    out.extend_from_slice(&len_field.to_le_bytes());
    out.extend_from_slice(&seq.to_le_bytes());
    let crc = crc32c::crc32c_append(crc32c::crc32c(&out), &payload);
    out.extend_from_slice(&crc.to_le_bytes());
    out.extend_from_slice(&payload);
    Ok(out)
}

/// Postcard size of a value.
fn encoded_size<T: Serialize + ?Sized>(v: &T) -> usize {
    postcard::experimental::serialized_size(v).expect("entries always serialise")
}

/// Split `epoch` into entries whose payloads are at most `max` bytes each:
/// [`Entry::EpochPages`] parts with the first pages, then the
/// [`Entry::Epoch`] with as many of the last pages as fit. One entry when
/// the whole epoch fits. `seq` is the first frame's, for errors.
fn split_epoch(mut epoch: Epoch, max: usize, seq: u64) -> Result<Vec<Entry>, LogError> {
    let too_large = |kind, size: usize| LogError::EntryTooLarge {
        seq,
        kind,
        size: size as u64,
        max: max as u64,
    };
    let pages = std::mem::take(&mut epoch.pages);
    let (pos, index) = (epoch.pos, epoch.index);
    // Size of a page vector's length prefix.
    let count = |n: usize| encoded_size(&n);
    let page_sizes: Vec<usize> = pages.iter().map(encoded_size).collect();
    let entry = Entry::Epoch(Box::new(epoch));
    // Everything in the final entry but its pages and their count.
    let epoch_head = encoded_size(&entry) - count(0);
    let Entry::Epoch(mut epoch) = entry else {
        unreachable!("built as an epoch")
    };
    // The final entry takes the longest run of last pages that fits.
    let mut size = epoch_head + count(0);
    if size > max {
        return Err(too_large("epoch", size));
    }
    let mut tail = pages.len();
    while tail > 0 {
        let k = pages.len() - tail + 1;
        let next = size - count(k - 1) + count(k) + page_sizes[tail - 1];
        if next > max {
            break;
        }
        size = next;
        tail -= 1;
    }
    // The pages before go into parts, filled in order.
    let part_head = encoded_size(&Entry::EpochPages {
        pos,
        index,
        pages: Vec::new(),
    }) - count(0);
    let mut part_lens = Vec::new();
    let mut start = 0;
    while start < tail {
        let mut end = start;
        let mut size = part_head + count(0);
        while end < tail {
            let k = end - start + 1;
            let next = size - count(k - 1) + count(k) + page_sizes[end];
            if next > max {
                break;
            }
            size = next;
            end += 1;
        }
        if end == start {
            return Err(too_large(
                "epoch-pages",
                part_head + count(1) + page_sizes[start],
            ));
        }
        part_lens.push(end - start);
        start = end;
    }
    let mut pages = pages.into_iter();
    let mut out: Vec<Entry> = part_lens
        .into_iter()
        .map(|n| Entry::EpochPages {
            pos,
            index,
            pages: pages.by_ref().take(n).collect::<Vec<Page>>(),
        })
        .collect();
    epoch.pages = pages.collect();
    out.push(Entry::Epoch(epoch));
    Ok(out)
}

/// Writes a log to any byte sink.
pub struct LogWriter<W: Write> {
    out: W,
    next_seq: u64,
    bytes: u64,
    max_frame: usize,
}

impl<W: Write> LogWriter<W> {
    /// Write the header and return a writer for the frames, with the frame
    /// limit [`MAX_FRAME`]. A header the decoder would refuse (body over
    /// [`MAX_HEADER`]) is refused with an `InvalidInput` error wrapping
    /// [`LogError::Header`], before anything is written.
    pub fn new(mut out: W, header: &LogHeader) -> std::io::Result<Self> {
        let h = encode_header(header);
        let body = h.len() - (MAGIC.len() + 2 + 4 + 4);
        if body > MAX_HEADER {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                LogError::Header(format!(
                    "header body of {body} bytes exceeds the maximum {MAX_HEADER}"
                )),
            ));
        }
        out.write_all(&h)?;
        Ok(LogWriter {
            out,
            next_seq: 0,
            bytes: h.len() as u64,
            max_frame: MAX_FRAME,
        })
    }

    /// Limit every frame's payload, stored and decompressed, to `max`
    /// bytes (a channel with smaller buffers); a limit above [`MAX_FRAME`]
    /// is lowered to it.
    pub fn with_max_frame(mut self, max: usize) -> Self {
        self.max_frame = max.min(MAX_FRAME);
        self
    }

    /// The frame payload limit.
    pub fn max_frame(&self) -> usize {
        self.max_frame
    }

    /// Append an entry; returns its sequence number and encoded size. An
    /// entry whose payload exceeds the frame limit is refused with
    /// [`LogError::EntryTooLarge`] and nothing is written (epochs can be
    /// split: [`LogWriter::write_epoch`]).
    pub fn append(&mut self, e: &Entry) -> Result<(u64, usize), WriteError> {
        let seq = self.next_seq;
        let f = encode_frame_within(seq, e, self.max_frame)?;
        self.out.write_all(&f)?;
        self.next_seq += 1;
        self.bytes += f.len() as u64;
        Ok((seq, f.len()))
    }

    /// Append an epoch as one [`Entry::Epoch`] frame or, when that frame
    /// would exceed the frame limit, as [`Entry::EpochPages`] parts (pages
    /// in order, from the first) followed by the [`Entry::Epoch`] with the
    /// remaining pages, each frame within the limit; the reader puts them
    /// back together with [`crate::EpochAssembler`]. Returns the frames'
    /// sequence numbers and their total size. When the epoch cannot be
    /// split within the limit (its vCPU state, or one page, does not fit a
    /// frame) it is refused with [`LogError::EntryTooLarge`] and nothing is
    /// written.
    pub fn write_epoch(&mut self, epoch: Epoch) -> Result<(Range<u64>, usize), WriteError> {
        let first = self.next_seq;
        let mut frames = Vec::new();
        for (i, e) in split_epoch(epoch, self.max_frame, first)?
            .iter()
            .enumerate()
        {
            frames.push(encode_frame_within(first + i as u64, e, self.max_frame)?);
        }
        let mut total = 0;
        for f in &frames {
            self.out.write_all(f)?;
            self.next_seq += 1;
            self.bytes += f.len() as u64;
            total += f.len();
        }
        Ok((first..self.next_seq, total))
    }

    /// Flush the sink.
    pub fn flush(&mut self) -> std::io::Result<()> {
        self.out.flush()
    }

    /// Bytes written so far, header included.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Frames written so far.
    pub fn frames(&self) -> u64 {
        self.next_seq
    }

    /// The sink.
    pub fn into_inner(self) -> W {
        self.out
    }
}

/// A decoded frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    /// Sequence number.
    pub seq: u64,
    /// Byte offset of the frame in the stream.
    pub offset: u64,
    /// The entry.
    pub entry: Entry,
}

/// Incremental decoder: feed bytes with [`Decoder::push`], take the header
/// and frames as they complete, call [`Decoder::finish`] at end of stream.
#[derive(Debug)]
pub struct Decoder {
    buf: Vec<u8>,
    /// Offset in the stream of `buf[0]`.
    base: u64,
    header: Option<LogHeader>,
    next_seq: u64,
    failed: Option<LogError>,
    max_frame: usize,
}

impl Default for Decoder {
    fn default() -> Self {
        Decoder {
            buf: Vec::new(),
            base: 0,
            header: None,
            next_seq: 0,
            failed: None,
            max_frame: MAX_FRAME,
        }
    }
}

impl Decoder {
    /// A decoder at the start of a stream, with the frame limit
    /// [`MAX_FRAME`].
    pub fn new() -> Self {
        Self::default()
    }

    /// Refuse frames whose payload, stored or decompressed, exceeds `max`
    /// bytes; a limit above [`MAX_FRAME`] is lowered to it.
    pub fn with_max_frame(mut self, max: usize) -> Self {
        self.max_frame = max.min(MAX_FRAME);
        self
    }

    /// Add bytes received.
    pub fn push(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    fn consume(&mut self, n: usize) {
        self.buf.drain(..n);
        self.base += n as u64;
    }

    fn fail<T>(&mut self, e: LogError) -> Result<T, LogError> {
        self.failed = Some(e.clone());
        Err(e)
    }

    /// The header, once enough bytes arrived (`Ok(None)` until then).
    pub fn header(&mut self) -> Result<Option<&LogHeader>, LogError> {
        if let Some(e) = &self.failed {
            return Err(e.clone());
        }
        if self.header.is_none() {
            let b = &self.buf;
            let n = b.len().min(MAGIC.len());
            if b[..n] != MAGIC[..n] {
                return self.fail(LogError::BadMagic);
            }
            if b.len() < 14 {
                return Ok(None);
            }
            let version = u16::from_le_bytes([b[8], b[9]]);
            if version != VERSION {
                return self.fail(LogError::Version {
                    found: version,
                    supported: VERSION,
                });
            }
            let len = u32::from_le_bytes(b[10..14].try_into().unwrap()) as usize;
            if len > MAX_HEADER {
                return self.fail(LogError::Header(format!("header length {len}")));
            }
            if b.len() < 14 + len + 4 {
                return Ok(None);
            }
            let stored = u32::from_le_bytes(b[14 + len..18 + len].try_into().unwrap());
            let computed = crc32c::crc32c(&b[8..14 + len]);
            if stored != computed {
                return self.fail(LogError::Header(format!(
                    "checksum mismatch (stored {stored:#010x}, computed {computed:#010x})"
                )));
            }
            let h: LogHeader = match postcard::from_bytes(&b[14..14 + len]) {
                Ok(h) => h,
                Err(e) => return self.fail(LogError::Header(e.to_string())),
            };
            self.header = Some(h);
            self.consume(18 + len);
        }
        Ok(self.header.as_ref())
    }

    /// The next complete frame, `Ok(None)` if more bytes are needed.
    pub fn next_frame(&mut self) -> Result<Option<Frame>, LogError> {
        if self.header()?.is_none() {
            return Ok(None);
        }
        let b = &self.buf;
        if b.len() < FRAME_HEAD {
            return Ok(None);
        }
        let offset = self.base;
        let seq_expected = self.next_seq;
        let len_field = u32::from_le_bytes(b[0..4].try_into().unwrap());
        let compressed = len_field & COMPRESSED != 0;
        let len = (len_field & !COMPRESSED) as usize;
        if len > self.max_frame {
            return self.fail(LogError::FrameTooLarge {
                seq: seq_expected,
                offset,
                len: len as u64,
                max: self.max_frame as u64,
            });
        }
        if b.len() < FRAME_HEAD + len {
            return Ok(None);
        }
        let seq = u64::from_le_bytes(b[4..12].try_into().unwrap());
        let stored = u32::from_le_bytes(b[12..16].try_into().unwrap());
        let payload = &b[FRAME_HEAD..FRAME_HEAD + len];
        let computed = crc32c::crc32c_append(crc32c::crc32c(&b[..12]), payload);
        if stored != computed {
            return self.fail(LogError::Checksum {
                seq: seq_expected,
                offset,
                stored,
                computed,
            });
        }
        if seq != seq_expected {
            return self.fail(LogError::Sequence {
                offset,
                expected: seq_expected,
                found: seq,
            });
        }
        let unpacked;
        let payload = if compressed {
            match unpack(payload, self.max_frame) {
                Ok(p) => {
                    unpacked = p;
                    &unpacked[..]
                }
                Err(detail) => {
                    return self.fail(LogError::Payload {
                        seq,
                        offset,
                        detail,
                    })
                }
            }
        } else {
            payload
        };
        let entry = match decode_entry(payload) {
            Ok(e) => e,
            Err(detail) => {
                return self.fail(LogError::Payload {
                    seq,
                    offset,
                    detail,
                })
            }
        };
        self.consume(FRAME_HEAD + len);
        self.next_seq += 1;
        Ok(Some(Frame { seq, offset, entry }))
    }

    /// Check that the stream ended on a frame boundary.
    pub fn finish(&mut self) -> Result<(), LogError> {
        if let Some(e) = &self.failed {
            return Err(e.clone());
        }
        if self.header.is_none() {
            if self.buf.is_empty() {
                return Err(LogError::Truncated {
                    offset: 0,
                    what: "the log is empty".into(),
                });
            }
            self.header()?;
            if self.header.is_none() {
                return Err(LogError::Truncated {
                    offset: self.base + self.buf.len() as u64,
                    what: "inside the header".into(),
                });
            }
        }
        if !self.buf.is_empty() {
            return Err(LogError::FrameTruncated {
                seq: self.next_seq,
                offset: self.base,
                present: self.buf.len() as u64,
            });
        }
        Ok(())
    }

    /// Sequence number of the next frame.
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }
}

/// Decompress a stored payload: the size prefix is checked against the
/// limit `max` before LZ4 allocates that much.
fn unpack(stored: &[u8], max: usize) -> Result<Vec<u8>, String> {
    let Some(&[a, b, c, d]) = stored.get(..4) else {
        return Err("compressed payload shorter than its size prefix".into());
    };
    let n = u32::from_le_bytes([a, b, c, d]) as u64;
    if n > max as u64 {
        return Err(format!(
            "compressed payload declares {n} bytes decompressed, over the maximum {max}"
        ));
    }
    lz4_flex::decompress_size_prepended(stored).map_err(|e| format!("LZ4: {e}"))
}

/// Decode a whole log held in memory.
pub fn decode_all(bytes: &[u8]) -> Result<(LogHeader, Vec<Frame>), LogError> {
    let mut d = Decoder::new();
    d.push(bytes);
    let mut frames = Vec::new();
    while let Some(f) = d.next_frame()? {
        frames.push(f);
    }
    d.finish()?;
    let h = d.header()?.cloned().expect("finish checked the header");
    Ok((h, frames))
}
