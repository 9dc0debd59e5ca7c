//! Feeds arbitrary bytes to every decoder a peer's bytes reach: the header, a frontend request as
//! the backend decodes it, each reply payload as the frontend decodes it, and the trace line.
//! Any panic is a bug: decoders must answer hostile input with a typed error.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vhost_frontend::trace::{describe_message, Direction};
use vhost_frontend::wire::{
    ConfigSpace, FrontendMessage, Header, InflightDescription, MemoryTable, SingleMemoryRegion,
    U64Payload, VringAddr, VringFdIndex, VringState, HEADER_SIZE,
};

fuzz_target!(|data: &[u8]| {
    if data.len() < HEADER_SIZE {
        let _ = Header::decode(data);
        return;
    }
    let (head, payload) = data.split_at(HEADER_SIZE);
    if let Ok(header) = Header::decode(head) {
        // The socket layer reads exactly header.size bytes; mimic that when the input allows.
        let payload = payload.get(..header.size as usize).unwrap_or(payload);
        let _ = FrontendMessage::decode(&header, payload, Vec::new());
        let _ = describe_message(Direction::FromBackend, "fuzz", &header, payload, 0);
    }
    let _ = U64Payload::decode(payload);
    let _ = VringState::decode(payload);
    let _ = VringAddr::decode(payload);
    let _ = VringFdIndex::decode(payload);
    let _ = MemoryTable::decode(payload);
    let _ = SingleMemoryRegion::decode(payload);
    let _ = ConfigSpace::decode(payload);
    let _ = InflightDescription::decode(payload);
});
