//! Laboratories on one machine: hosts and networks made from Linux network
//! namespaces, for the host-network tests, the network bench and drills
//! that play several hosts on one machine.

pub mod netns;
