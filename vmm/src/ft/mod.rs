//! Fault tolerance: the pieces a primary and a backup add to a run.
//!
//! - [`claim`]: the test-and-set at the arbiter before a side goes live;
//! - [`console_side`]: a side's end of the console stream (output, input,
//!   input confirmation);
//! - [`output`]: the output rule (held output on the primary, the backup's
//!   unreleased tail);
//! - [`pair`]: the primary's and the backup's boundary hooks, the channel
//!   as the primary's log sink (`LogLink`), joining backups and the
//!   hand-over, the backup's gate before going live;
//! - [`precopy`]: re-protection's memory copy while the guest runs, and
//!   when to pause for the rest;
//! - [`status`]: the operator's view of a side (served by [`crate::api`]);
//! - [`transfer`]: re-protection's state transfer (what precedes the log
//!   on a joining backup's link).

pub mod claim;
pub mod console_side;
pub mod output;
pub mod pair;
pub mod precopy;
pub mod status;
pub mod transfer;
