//! The kernel/user ABI of the recorder's XDP program.
//!
//! One definition, used by the XDP program (`src/main.rs`, built for `bpfel-unknown-none`) and by
//! userspace (`recorder-user`, with the `user` feature, which adds `aya::Pod`). Every type is
//! `#[repr(C)]`, fixed-width, with explicit padding that must be zero (hash map keys are hashed
//! as raw bytes), and its size is asserted at compile time.
#![no_std]

pub mod abi;
