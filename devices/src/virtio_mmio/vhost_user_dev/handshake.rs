//! The handshake with a backend, re-runnable: the first connection learns who the backend is
//! (its [`Identity`]); a backend that comes back after a disconnect runs the same handshake and
//! must show the same identity, because the guest's driver already negotiated against it.
//!
//! ```text
//!  GET_FEATURES            VERSION_1 and PROTOCOL_FEATURES required
//!  GET_PROTOCOL_FEATURES
//!  SET_PROTOCOL_FEATURES   offered AND wanted (on a return: exactly what was agreed before)
//!  SET_OWNER
//!  GET_QUEUE_NUM           with MQ
//!  GET_CONFIG              the configuration space the guest reads (queue count, seg_max patched)
//! ```

use tracing::debug;
use vhost_frontend::connection::VhostUserFrontend;
use vhost_frontend::features::{self, PROTOCOL_CONFIG};

use super::{call, DeviceKind, VhostUserDeviceError, VhostUserDeviceOptions};

/// What a backend showed us in the handshake: everything the guest's view of the device rests on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Identity {
    /// Everything GET_FEATURES offered.
    pub backend_features: u64,
    /// The virtio bits the guest may be offered (offered AND known to us, plus VERSION_1).
    pub virtio_features: u64,
    /// The protocol features both sides use.
    pub protocol_features: u64,
    /// GET_QUEUE_NUM's answer (1 without MQ, the spec's default).
    pub queue_num: u64,
    /// The configuration space as the guest sees it (queue count and seg_max patched).
    pub config: Vec<u8>,
}

/// Runs the handshake. `wanted_protocol` is what we ask for (on a return: what was agreed).
pub(super) fn handshake(
    frontend: &mut dyn VhostUserFrontend,
    kind: &DeviceKind,
    options: &VhostUserDeviceOptions,
    wanted_protocol: u64,
) -> Result<Identity, VhostUserDeviceError> {
    // The shared handshake (vhost_frontend): GET_FEATURES, GET_PROTOCOL_FEATURES,
    // SET_PROTOCOL_FEATURES (offered AND wanted: setting a bit the backend did not offer makes
    // some backends hang up), SET_OWNER, GET_QUEUE_NUM.
    let negotiated = call(
        frontend.negotiate(kind.device_features, wanted_protocol),
        "the handshake",
    )?;
    let protocol_features = negotiated.protocol_features;
    if !features::has(protocol_features, PROTOCOL_CONFIG) {
        return Err(VhostUserDeviceError::MissingFeature(
            "protocol feature CONFIG in its GET_PROTOCOL_FEATURES reply (needed for GET_CONFIG)",
        ));
    }
    // Without MQ a backend serves one queue (the spec's default).
    let queue_num = negotiated.queue_num.unwrap_or(1);
    if queue_num < u64::from(options.num_queues) {
        return Err(VhostUserDeviceError::TooFewQueues {
            backend: queue_num,
            wanted: options.num_queues,
        });
    }

    let mut config = call(frontend.get_config(0, kind.config_size), "GET_CONFIG")?;
    if config.len() != kind.config_size as usize {
        return Err(VhostUserDeviceError::ConfigSize {
            asked: kind.config_size,
            got: config.len(),
        });
    }
    patch_config(kind, options, &mut config);
    Ok(Identity {
        backend_features: negotiated.backend_features,
        virtio_features: negotiated.virtio_features,
        protocol_features,
        queue_num,
        config,
    })
}

/// The guest must see the queue count we expose, not the backend's maximum; and seg_max for
/// *our* ring: it is the backend's promise for its largest ring, and without INDIRECT_DESC a
/// request on a ring of queue_size can carry at most queue_size - 2 data segments (plus header
/// and status). A larger seg_max would have the driver build chains the ring cannot hold.
fn patch_config(kind: &DeviceKind, options: &VhostUserDeviceOptions, config: &mut [u8]) {
    if let Some(offset) = kind.num_queues_config_offset {
        if let Some(field) = config.get_mut(offset..offset + 2) {
            field.copy_from_slice(&options.num_queues.to_le_bytes());
        }
    }
    if let Some(offset) = kind.seg_max_config_offset {
        if let Some(field) = config.get_mut(offset..offset + 4) {
            let limit = u32::from(options.queue_size.saturating_sub(2)).max(1);
            let offered = u32::from_le_bytes([field[0], field[1], field[2], field[3]]);
            if offered > limit {
                debug!(
                    offered,
                    limit, "vhost-user device: seg_max clamped to the ring"
                );
                field.copy_from_slice(&limit.to_le_bytes());
            }
        }
    }
}

impl Identity {
    /// What a returning backend changed, in words, or `None` when it is the same device. The
    /// guest's driver negotiated against the first identity and holds it (features, capacity,
    /// queues): a backend that now offers less, serves a different number of queues or shows a
    /// different configuration space cannot silently take its place.
    pub(super) fn differences(&self, returning: &Identity, kind: &DeviceKind) -> Option<String> {
        let mut changes = Vec::new();
        let lost = self.virtio_features & !returning.backend_features;
        if lost != 0 {
            changes.push(format!(
                "no longer offers {}",
                features::describe_device_features(Some(kind.device_type), lost)
            ));
        }
        let lost_protocol = self.protocol_features & !returning.protocol_features;
        if lost_protocol != 0 {
            changes.push(format!(
                "no longer offers protocol features {}",
                features::describe_protocol_features(lost_protocol)
            ));
        }
        if self.queue_num != returning.queue_num {
            changes.push(format!(
                "serves {} queues, not {}",
                returning.queue_num, self.queue_num
            ));
        }
        if self.config != returning.config {
            changes.push(describe_config_change(
                kind,
                &self.config,
                &returning.config,
            ));
        }
        (!changes.is_empty()).then(|| changes.join("; "))
    }
}

/// Names the change in a configuration space: the capacity for a block device (what an
/// operator who restarted the backend on another image must see), else the first byte range.
fn describe_config_change(kind: &DeviceKind, before: &[u8], after: &[u8]) -> String {
    let le64 = |bytes: &[u8]| {
        bytes
            .get(..8)
            .and_then(|b| <[u8; 8]>::try_from(b).ok())
            .map(u64::from_le_bytes)
    };
    if kind.device_type == features::VIRTIO_ID_BLOCK {
        if let (Some(was), Some(now)) = (le64(before), le64(after)) {
            if was != now {
                return format!("capacity is {now} sectors, not {was}");
            }
        }
    }
    let first = before
        .iter()
        .zip(after)
        .position(|(a, b)| a != b)
        .unwrap_or(before.len().min(after.len()));
    format!("configuration space differs from byte {first} on")
}
