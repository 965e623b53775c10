//! Laboratories on one machine: hosts and networks made from Linux network
//! namespaces, for the host-network tests, the network bench and drills
//! that play several hosts on one machine ([`netns`]), and links with
//! delay and jitter between them ([`relay`]); and the end-to-end witness
//! of what a user saw across failovers ([`audit`]).

pub mod audit;
pub mod netns;
pub mod relay;
