//! The hardware-independent half of the test guest: command line parsing and
//! the block pattern. It builds `no_std` for the guest and with `std` for the
//! host unit tests (`cargo test --lib`).
#![cfg_attr(not(test), no_std)]

pub mod cmdline;
pub mod pattern;
