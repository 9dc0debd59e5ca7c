//! Connects to a vhost-user backend, performs the handshake with tracing on, and prints what the
//! backend offers. A way to watch the protocol against a real peer:
//!
//! ```text
//! qemu-storage-daemon --blockdev driver=file,node-name=f,filename=disk.img \
//!     --export type=vhost-user-blk,id=e,node-name=f,addr.type=unix,addr.path=/tmp/vu.sock &
//! cargo run -p vhost-frontend --example probe -- /tmp/vu.sock
//! ```

use std::time::Duration;

use vhost_frontend::features::{
    bit_mask, describe_protocol_features, describe_virtio_features, has, PROTOCOL_CONFIG,
    PROTOCOL_INFLIGHT_SHMFD, PROTOCOL_MQ, PROTOCOL_REPLY_ACK,
};
use vhost_frontend::{Frontend, VhostUserFrontend};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let path = std::env::args()
        .nth(1)
        .ok_or("usage: probe SOCKET [--inflight]")?;
    let ask_inflight = std::env::args().any(|a| a == "--inflight");
    let mut frontend = Frontend::connect(&path)?;
    frontend.set_trace(true);
    frontend.set_reply_timeout(Some(Duration::from_secs(5)))?;

    // Only protocol bits this frontend implements: a backend may act on any bit we set (BACKEND_REQ,
    // for one, makes it expect a second socket).
    let wanted_protocol = bit_mask(PROTOCOL_MQ)
        | bit_mask(PROTOCOL_REPLY_ACK)
        | bit_mask(PROTOCOL_CONFIG)
        | bit_mask(PROTOCOL_INFLIGHT_SHMFD);
    let negotiated = frontend.negotiate(u64::MAX, wanted_protocol)?;
    println!(
        "backend features:  {:#x} ({})",
        negotiated.backend_features,
        describe_virtio_features(negotiated.backend_features)
    );
    println!(
        "protocol features: {:#x} ({})",
        negotiated.protocol_features,
        describe_protocol_features(negotiated.protocol_features)
    );
    println!("queues: {:?}", negotiated.queue_num);
    if has(negotiated.protocol_features, PROTOCOL_CONFIG) {
        let config = frontend.get_config(0, 60)?;
        println!("config space (60 bytes): {config:02x?}");
    }
    // Only ask for an inflight buffer when offered, or when told to (a small one: 1 queue x 128).
    if has(negotiated.protocol_features, PROTOCOL_INFLIGHT_SHMFD) || ask_inflight {
        match frontend.get_inflight_fd(1, 128)? {
            Some(buffer) => println!("inflight buffer: {:?}", buffer.description),
            None => println!("backend keeps no inflight buffer"),
        }
    }
    Ok(())
}
