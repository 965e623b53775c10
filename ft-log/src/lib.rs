//! `ft-log`: the log that the primary streams to the backup.
//!
//! - [`entry`](mod@entry): what is logged (exits, input values, timer and console
//!   events, interrupt injections with positions, epochs, fingerprints),
//!   and [`EpochAssembler`], which joins an epoch split over frames.
//! - [`format`](mod@format): header and frames (length, sequence number, CRC32C), the
//!   writer (frame size limit, epoch splitting) and an incremental decoder
//!   that takes bytes in any chunks.
//! - [`channel`](mod@channel): the authenticated TCP channel that carries
//!   the log from primary to backup, with acknowledgements, heartbeats,
//!   flow control and failure detection.
//!
//! Payloads are encoded with postcard: see `bench/README.md` for the
//! measurement against bincode 2.0.1 that chose it.

pub mod channel;
pub mod entry;
pub mod format;

pub use channel::{
    load_token_file, BackupLink, BackupListener, ChannelConfig, ChannelError, EndState, LogReader,
    PeerState, PrimaryHandle, PrimaryLink,
};
pub use entry::{
    Entry, Epoch, EpochAssembler, ExitKind, ExitRecord, Fingerprint, InputCursor, Page,
    ValueSource, PAGE_SIZE,
};
pub use format::{decode_all, Decoder, Frame, LogError, LogHeader, LogWriter, WriteError};
