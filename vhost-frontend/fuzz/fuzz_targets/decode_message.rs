//! Feeds arbitrary bytes to every decoder a peer's bytes reach: the header, a frontend request as
//! the backend decodes it, a backend reply as the frontend decodes it (`BackendReply`, and each
//! payload decoder alone), and the trace line.
//! Any panic is a bug: decoders must answer hostile input with a typed error.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vhost_frontend::trace::{describe_message, Direction};
use vhost_frontend::wire::{
    BackendReply, ConfigSpace, FrontendMessage, Header, InflightDescription, MemoryTable,
    SingleMemoryRegion, U64Payload, VringAddr, VringFdIndex, VringState, HEADER_SIZE,
};
use vhost_frontend::Request;

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
        // As the reply the frontend expects to the header's request, and to every other one (the
        // code check refuses those first; GET_* replies for any code reach the payload decoders).
        if let Ok(request) = header.request_kind() {
            let _ = BackendReply::decode(request, &header, payload, Vec::new());
        }
        for &request in Request::ALL.iter().filter(|r| r.always_replies()) {
            let reply = Header {
                request: request.code(),
                ..header
            };
            let _ = BackendReply::decode(request, &reply, payload, Vec::new());
        }
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
