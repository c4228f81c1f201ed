//! The XDP program (in progress).
