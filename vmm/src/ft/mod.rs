//! Fault tolerance: the pieces a primary and a backup add to a run.
//!
//! - [`claim`]: the test-and-set at the arbiter before a side goes live;
//! - [`output`]: the output rule (held output on the primary, the backup's
//!   unreleased tail).

pub mod claim;
pub mod output;
