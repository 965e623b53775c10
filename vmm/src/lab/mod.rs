//! Laboratories on one machine: hosts and networks made from Linux network
//! namespaces, for the host-network tests, the network bench and drills
//! that play several hosts on one machine ([`netns`]), and links with
//! delay and jitter between them ([`relay`]).

pub mod netns;
pub mod relay;
