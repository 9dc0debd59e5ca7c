//! The hardware-independent half of the test guest: command line parsing, the
//! block pattern and the virtqueue event-index arithmetic. It builds `no_std`
//! for the guest and with `std` for the host unit tests (`cargo test --lib`).
#![cfg_attr(not(test), no_std)]

pub mod cmdline;
pub mod pattern;
pub mod ring_event;
