//! `vmm`: the vmft KVM monitor.
//!
//! A minimal x86-64 monitor with one vCPU and a userspace irqchip, built
//! so that every nondeterministic input passes through one door
//! ([`nondet::Door`]) where record and replay hook in. See
//! `docs/ARCHITECTURE.md` for the data path and which module owns what.

pub mod api;
pub mod boot;
pub mod console;
pub mod deadline;
pub mod devices;
pub mod emulate;
pub mod epoch;
pub mod ft;
pub mod image;
pub mod lab;
pub mod memory;
pub mod netio;
pub mod nondet;
pub mod record;
pub mod replay;
pub mod shared_disk;
pub mod snapshot;
pub mod stats;
pub mod stop;
pub mod terminal;
pub mod vcpu;
pub mod vm;
pub mod watchdog;
