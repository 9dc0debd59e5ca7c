//! The VMM library: configuration, guest memory, boot, vCPUs, devices. `main.rs` is a thin CLI
//! over this; tests build a `VmConfig` directly.

pub mod boot;
pub mod config;
pub mod cpu_model;
pub mod device_manager;
pub mod event_loop;
pub mod exit;
pub mod layout;
pub mod legacy;
pub mod memory;
pub mod terminal;
pub mod vcpu;
pub mod virtio;
pub mod vm;
