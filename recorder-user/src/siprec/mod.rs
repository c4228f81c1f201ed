//! (in progress)
pub mod session;
