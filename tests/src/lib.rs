//! Shared helpers for the end-to-end tests: network namespaces, veth pairs, traffic.
pub mod net;
