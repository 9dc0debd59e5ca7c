//! Who the backend says it is.

use vhost_frontend::features::{
    describe_device_features, describe_protocol_features, VIRTIO_ID_BLOCK,
};
use vhost_frontend::probe::{ProbeMessage, RawSession};
use vhost_frontend::Request;

use crate::probe::context::{Ctx, DeviceGuess, Identity};
use crate::probe::Outcome;

/// The identity learned at the start, re-asked on a fresh connection: it must be the same.
pub fn identity(ctx: &mut Ctx) -> Outcome {
    let again = match ctx.connect() {
        Ok(s) => features(&s),
        Err(e) => return Outcome::Fail(e),
    };
    let id = &ctx.identity;
    if again != Some(id.features) {
        return Outcome::Fail(format!(
            "GET_FEATURES said {:#x}, then {again:x?} on a fresh connection",
            id.features
        ));
    }
    Outcome::Pass(describe(id))
}

fn features(s: &RawSession) -> Option<u64> {
    s.call(&ProbeMessage::bare(Request::GetFeatures, false))
        .u64()
}

/// One line: the device guess, features, protocol features, queues, config.
pub fn describe(id: &Identity) -> String {
    let device_id = (id.device == DeviceGuess::Blk).then_some(VIRTIO_ID_BLOCK);
    let mut s = format!(
        "device {} (guessed from feature bits); features {:#x} [{}]; protocol features {:#x} [{}]; \
         {} queue(s)",
        id.device.name(),
        id.features,
        describe_device_features(device_id, id.features),
        id.protocol_features,
        describe_protocol_features(id.protocol_features),
        id.queues
    );
    match (&id.config, id.device) {
        (Some(c), DeviceGuess::Blk) => s.push_str(&format!("; config: {}", describe_blk_config(c))),
        (Some(c), _) => s.push_str(&format!("; config: {} bytes", c.len())),
        (None, _) => s.push_str("; config: not read"),
    }
    s
}

/// virtio-blk's config space (virtio 1.2 §5.2.4): capacity, limits, block size, queues.
pub fn describe_blk_config(c: &[u8]) -> String {
    let u32_at = |at: usize| {
        c.get(at..at + 4)
            .map(|b| u32::from_le_bytes(b.try_into().unwrap_or([0; 4])))
    };
    let u64_at = |at: usize| {
        c.get(at..at + 8)
            .map(|b| u64::from_le_bytes(b.try_into().unwrap_or([0; 8])))
    };
    let u16_at = |at: usize| {
        c.get(at..at + 2)
            .map(|b| u16::from_le_bytes(b.try_into().unwrap_or([0; 2])))
    };
    let mut parts = Vec::new();
    if let Some(sectors) = u64_at(0) {
        parts.push(format!(
            "capacity {sectors} sectors ({} MiB)",
            sectors / 2048
        ));
    }
    if let Some(v) = u32_at(8) {
        parts.push(format!("size_max {v}"));
    }
    if let Some(v) = u32_at(12) {
        parts.push(format!("seg_max {v}"));
    }
    if let Some(v) = u32_at(20) {
        parts.push(format!("blk_size {v}"));
    }
    if let Some(v) = u16_at(34) {
        parts.push(format!("num_queues {v}"));
    }
    parts.join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blk_config_decodes_the_fields_present() {
        let mut c = vec![0u8; 36];
        c[0..8].copy_from_slice(&131072u64.to_le_bytes());
        c[20..24].copy_from_slice(&512u32.to_le_bytes());
        c[34..36].copy_from_slice(&2u16.to_le_bytes());
        let d = describe_blk_config(&c);
        assert!(d.contains("capacity 131072 sectors (64 MiB)"), "{d}");
        assert!(
            d.contains("blk_size 512") && d.contains("num_queues 2"),
            "{d}"
        );
        assert_eq!(
            describe_blk_config(&c[..8]),
            "capacity 131072 sectors (64 MiB)"
        );
    }
}
