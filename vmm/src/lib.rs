//! The VMM library: configuration, memory, boot, vCPUs.
