//! `bench`: measurements of vmft against a baseline taken in the same run.
