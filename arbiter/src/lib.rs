//! `arbiter`: the test-and-set service that decides which side of a
//! fault-tolerant pair goes live, and its client (issue 3).
