//! A minimal virtio driver stack: the virtio-mmio (version 2) transport, one
//! split virtqueue in static memory, and a virtio-blk device on top.

pub mod blk;
mod dma;
mod mmio;
mod queue;
