//! `ft-log`: the log that the primary streams to the backup.
//!
//! It will hold the entry types (inputs, interrupt positions, device DMA,
//! state fingerprints), their versioned, checksummed framing, and the
//! streaming channel with acknowledgements and heartbeats (issue 4).
//! Nothing is implemented here yet: the monitor's record/replay door
//! (`vmm::nondet`) is the interface this crate will plug into.
