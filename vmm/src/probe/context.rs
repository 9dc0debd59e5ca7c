//! What every check shares: the backend's identity (learned once), fresh connections with the
//! handshake done, and REPLY_ACK-aware sending that says what became of a message.

use std::path::Path;
use std::time::Duration;

use vhost_frontend::features::{
    bit_mask, has, PROTOCOL_CONFIG, PROTOCOL_INFLIGHT_SHMFD, PROTOCOL_MQ, PROTOCOL_REPLY_ACK,
    VHOST_F_LOG_ALL, VHOST_USER_F_PROTOCOL_FEATURES, VIRTIO_F_ACCESS_PLATFORM, VIRTIO_F_IN_ORDER,
    VIRTIO_F_NOTIFICATION_DATA, VIRTIO_F_RING_PACKED, VIRTIO_F_RING_RESET,
};
use vhost_frontend::probe::{Answer, ProbeMessage, RawSession};
use vhost_frontend::wire::{ConfigSpace, FLAG_NEED_REPLY, MAX_QUEUES};
use vhost_frontend::Request;

use super::target::{Liveness, Target};

/// The device types the probe knows how to guess from feature bits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceGuess {
    Blk,
    Net,
    Unknown,
}

impl DeviceGuess {
    pub fn name(self) -> &'static str {
        match self {
            DeviceGuess::Blk => "virtio-blk",
            DeviceGuess::Net => "virtio-net",
            DeviceGuess::Unknown => "unknown",
        }
    }

    /// vhost-user carries no device type: guess from the device-specific feature bits.
    /// virtio-net's MRG_RXBUF (15) with CTRL_VQ (17); virtio-blk's BLK_SIZE (6) or FLUSH (9)
    /// without those.
    pub fn from_features(features: u64) -> DeviceGuess {
        if has(features, 15) && has(features, 17) {
            DeviceGuess::Net
        } else if has(features, 6) || has(features, 9) {
            DeviceGuess::Blk
        } else {
            DeviceGuess::Unknown
        }
    }
}

/// What the backend says about itself, asked once at the start.
#[derive(Debug, Clone)]
pub struct Identity {
    pub features: u64,
    pub protocol_features: u64,
    /// Virtqueues: GET_QUEUE_NUM when MQ is offered (twice that for virtio-net, which counts
    /// queue pairs), else 1.
    pub queues: u16,
    pub device: DeviceGuess,
    /// GET_CONFIG's bytes (when CONFIG is offered and the read worked).
    pub config: Option<Vec<u8>>,
}

impl Identity {
    /// Asks the backend over one connection; an error when it does not answer the basics.
    pub fn learn(socket: &Path, timeout: Duration) -> Result<Identity, String> {
        let s = RawSession::connect_retrying(socket, timeout)
            .map_err(|e| format!("cannot connect: {e}"))?;
        let features = ask_u64(&s, Request::GetFeatures)?;
        let protocol_features = if has(features, VHOST_USER_F_PROTOCOL_FEATURES) {
            ask_u64(&s, Request::GetProtocolFeatures)?
        } else {
            0
        };
        // As QEMU does: the protocol features are set before GET_QUEUE_NUM (rust-vmm's backends
        // answer it only once MQ is acked).
        if has(features, VHOST_USER_F_PROTOCOL_FEATURES) {
            let set = ProbeMessage::u64(
                Request::SetProtocolFeatures,
                acked_protocol_features(protocol_features),
                false,
            );
            s.send(&set)
                .map_err(|e| format!("SET_PROTOCOL_FEATURES: {e}"))?;
        }
        let device = DeviceGuess::from_features(features);
        let queues = if has(protocol_features, PROTOCOL_MQ) {
            let n = ask_u64(&s, Request::GetQueueNum)?;
            // virtio-net counts queue pairs (an rx and a tx virtqueue each).
            let n = if device == DeviceGuess::Net {
                n.saturating_mul(2)
            } else {
                n
            };
            u16::try_from(n).unwrap_or(u16::MAX).max(1)
        } else {
            1
        };

        let config = if has(protocol_features, PROTOCOL_CONFIG) {
            set_features(&s, features, acked_protocol_features(protocol_features))
                .and_then(|()| {
                    s.send(&ProbeMessage::bare(Request::SetOwner, false))
                        .map_err(|e| e.to_string())
                })
                .ok();
            read_config(&s, device)
        } else {
            None
        };
        Ok(Identity {
            features,
            protocol_features,
            queues,
            device,
            config,
        })
    }

    pub fn offers(&self, protocol_bit: u32) -> bool {
        has(self.protocol_features, protocol_bit)
    }
}

fn ask_u64(s: &RawSession, request: Request) -> Result<u64, String> {
    let answer = s.call(&ProbeMessage::bare(request, false));
    answer
        .u64()
        .ok_or_else(|| format!("{} got {}", request.name(), answer.describe()))
}

/// The device's config space: as much of it as the backend will read (blk: 60 bytes).
fn read_config(s: &RawSession, device: DeviceGuess) -> Option<Vec<u8>> {
    let sizes: &[u32] = match device {
        DeviceGuess::Blk => &[60, 36, 24],
        _ => &[60, 8],
    };
    for &size in sizes {
        let window = ConfigSpace::request(0, size).ok()?;
        let m = ProbeMessage::new(Request::GetConfig, window.encode(), false);
        match s.call(&m) {
            Answer::Reply { payload, .. } if payload.len() == 12 + size as usize => {
                return Some(payload[12..].to_vec())
            }
            Answer::Reply { .. } => continue,
            _ => return None,
        }
    }
    None
}

/// Virtio features the probe acks: what is offered, less what would oblige it to more than a
/// split ring in plain memory (packed rings, logging, IOTLB, notification data, in-order).
pub fn acked_features(offered: u64) -> u64 {
    let refused = [
        VIRTIO_F_RING_PACKED,
        VHOST_F_LOG_ALL,
        VIRTIO_F_ACCESS_PLATFORM,
        VIRTIO_F_NOTIFICATION_DATA,
        VIRTIO_F_IN_ORDER,
        VIRTIO_F_RING_RESET,
    ]
    .iter()
    .fold(0, |m, &bit| m | bit_mask(bit));
    offered & !refused
}

/// Protocol features the probe sets: the offered ones among those it implements.
pub fn acked_protocol_features(offered: u64) -> u64 {
    let known = [
        PROTOCOL_MQ,
        PROTOCOL_REPLY_ACK,
        PROTOCOL_CONFIG,
        PROTOCOL_INFLIGHT_SHMFD,
    ]
    .iter()
    .fold(0, |m, &bit| m | bit_mask(bit));
    offered & known
}

/// SET_FEATURES (the `offered` bits the probe can drive) and, when the backend has protocol
/// features, SET_PROTOCOL_FEATURES with `protocol`: what a frontend sends before SET_OWNER.
fn set_features(s: &RawSession, offered: u64, protocol: u64) -> Result<(), String> {
    let send = |m: ProbeMessage| s.send(&m).map_err(|e| format!("{}: {e}", m.name()));
    send(ProbeMessage::u64(
        Request::SetFeatures,
        acked_features(offered),
        false,
    ))?;
    if has(offered, VHOST_USER_F_PROTOCOL_FEATURES) {
        send(ProbeMessage::u64(
            Request::SetProtocolFeatures,
            protocol,
            false,
        ))?;
    }
    Ok(())
}

/// What became of a message that has no reply of its own.
#[derive(Debug, PartialEq, Eq)]
pub enum Ack {
    /// REPLY_ACK status 0.
    Accepted,
    /// REPLY_ACK status other than 0.
    Refused(u64),
    /// No REPLY_ACK: the backend still answered the next GET_FEATURES. Whether it took or
    /// ignored the message cannot be seen.
    Survived,
    Closed,
    TimedOut,
    Broken(String),
}

impl Ack {
    /// The refusal a hostile message deserves: an error status or a clean close.
    pub fn is_refusal(&self) -> bool {
        matches!(self, Ack::Refused(_) | Ack::Closed)
    }

    pub fn describe(&self) -> String {
        match self {
            Ack::Accepted => "accepted (ack 0)".into(),
            Ack::Refused(status) => format!("refused (ack {status})"),
            Ack::Survived => "no REPLY_ACK; still answering".into(),
            Ack::Closed => "connection closed".into(),
            Ack::TimedOut => "no answer".into(),
            Ack::Broken(why) => format!("malformed answer: {why}"),
        }
    }
}

/// One connection with the handshake done.
pub struct Session {
    pub raw: RawSession,
    /// REPLY_ACK was negotiated: every ack-able message gets NEED_REPLY.
    pub reply_ack: bool,
}

impl Session {
    /// Sends `message` (with NEED_REPLY when REPLY_ACK is on) and says what became of it.
    pub fn ack(&self, mut message: ProbeMessage) -> Ack {
        if self.reply_ack {
            message.header.flags |= FLAG_NEED_REPLY;
            return match self.raw.call(&message) {
                Answer::Reply { header, .. } if header.request != message.header.request => {
                    Ack::Broken(format!(
                        "the ack names request {} instead of {}",
                        header.request, message.header.request
                    ))
                }
                reply @ Answer::Reply { .. } => match reply.u64() {
                    Some(0) => Ack::Accepted,
                    Some(status) => Ack::Refused(status),
                    None => Ack::Broken(reply.describe()),
                },
                Answer::Closed => Ack::Closed,
                Answer::TimedOut => Ack::TimedOut,
                Answer::Broken(why) => Ack::Broken(why),
            };
        }
        if self.raw.send(&message).is_err() {
            return Ack::Closed;
        }
        match self
            .raw
            .call(&ProbeMessage::bare(Request::GetFeatures, false))
        {
            Answer::Reply { .. } => Ack::Survived,
            Answer::Closed => Ack::Closed,
            Answer::TimedOut => Ack::TimedOut,
            Answer::Broken(why) => Ack::Broken(why),
        }
    }

    /// Like [`Session::ack`], for set-up steps that must succeed.
    pub fn setup(&self, message: ProbeMessage) -> Result<(), String> {
        let name = message.name();
        match self.ack(message) {
            Ack::Accepted | Ack::Survived => Ok(()),
            other => Err(format!("set-up step {name}: {}", other.describe())),
        }
    }
}

/// The shared state of a probe run.
pub struct Ctx {
    pub target: Target,
    pub identity: Identity,
    pub timeout: Duration,
    pub allow_huge: bool,
    /// Whether GET_INFLIGHT_FD is answered without INFLIGHT_SHMFD offered (asked once).
    inflight_answered_anyway: Option<bool>,
}

impl Ctx {
    pub fn new(target: Target, identity: Identity, timeout: Duration, allow_huge: bool) -> Ctx {
        Ctx {
            target,
            identity,
            timeout,
            allow_huge,
            inflight_answered_anyway: None,
        }
    }

    /// A fresh connection that the backend is known to serve: GET_FEATURES (what every frontend
    /// sends first) was answered on it. A backend that re-creates its socket after each
    /// frontend (vhost-device-vsock) leaves a window in which a connection reaches the old,
    /// dying listener and is never served; such a connection is dropped and made again.
    pub fn connect(&mut self) -> Result<RawSession, String> {
        let deadline = std::time::Instant::now() + self.timeout;
        loop {
            let s = self.connect_silent()?;
            match s.call_within(
                &ProbeMessage::bare(Request::GetFeatures, false),
                Duration::from_secs(1),
            ) {
                Answer::Reply { .. } => return Ok(s),
                other if std::time::Instant::now() >= deadline => {
                    return Err(format!(
                        "a fresh connection's GET_FEATURES got {}",
                        other.describe()
                    ))
                }
                _ => std::thread::sleep(Duration::from_millis(50)),
            }
        }
    }

    /// A fresh connection, nothing sent on it. A one-session backend whose session was used
    /// is started again first.
    pub fn connect_silent(&mut self) -> Result<RawSession, String> {
        self.target.fresh_session()?;
        RawSession::connect_retrying(&self.target.socket, self.timeout)
            .map_err(|e| format!("connect: {e}"))
    }

    /// A fresh connection with features, protocol features (those the probe knows, plus
    /// `extra_protocol`) and SET_OWNER sent.
    pub fn session_with(&mut self, extra_protocol: u64) -> Result<Session, String> {
        let raw = self.connect()?;
        let protocol = acked_protocol_features(self.identity.protocol_features) | extra_protocol;
        set_features(&raw, self.identity.features, protocol)?;
        let session = Session {
            raw,
            reply_ack: has(protocol, PROTOCOL_REPLY_ACK),
        };
        session.setup(ProbeMessage::bare(Request::SetOwner, false))?;
        Ok(session)
    }

    pub fn session(&mut self) -> Result<Session, String> {
        self.session_with(0)
    }

    /// Whether the inflight checks apply: INFLIGHT_SHMFD is offered, or GET_INFLIGHT_FD is
    /// answered with a region anyway (libvhost-user and DPDK do: a frontend may never use it, a
    /// hostile one can). `Err` with the reason they do not.
    pub fn inflight_applies(&mut self) -> Result<(), String> {
        if self.identity.offers(PROTOCOL_INFLIGHT_SHMFD) {
            return Ok(());
        }
        let answered = match self.inflight_answered_anyway {
            Some(a) => a,
            None => {
                let a = self.session().is_ok_and(|s| {
                    let m = ProbeMessage::get_inflight(1, 256);
                    matches!(s.raw.call(&m), Answer::Reply { fds, .. } if !fds.is_empty())
                });
                self.inflight_answered_anyway = Some(a);
                a
            }
        };
        if answered {
            Ok(())
        } else {
            Err("INFLIGHT_SHMFD not offered and GET_INFLIGHT_FD not answered".into())
        }
    }

    /// Whether INFLIGHT_SHMFD is offered (else: answered anyway, see `inflight_applies`).
    pub fn inflight_offered(&self) -> bool {
        self.identity.offers(PROTOCOL_INFLIGHT_SHMFD)
    }

    /// The queue count a well-formed inflight request names.
    /// (At most the wire's MAX_QUEUES: DPDK's net backend says 128 queues, more than a region
    /// the probe builds can describe.)
    pub fn queues(&self) -> u16 {
        self.identity.queues.clamp(1, MAX_QUEUES)
    }

    /// The backend answers, or is started again with `--restart`; `Err` when it is down. What
    /// the runner saw right after the previous check (`seen`) stands for a fresh look: one
    /// liveness connection per check, not two.
    pub fn ensure_up(&mut self, seen: Option<Liveness>) -> Result<(), String> {
        if self.target.one_session {
            return self.target.fresh_session();
        }
        let liveness = match seen {
            Some(l) => l,
            None => self.target.liveness(),
        };
        match liveness {
            Liveness::Answers => Ok(()),
            _ if self.target.can_restart() => self.target.restart(),
            down => Err(format!(
                "the backend no longer answers ({})",
                down.describe()
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_guesses_follow_the_real_backends_feature_words() {
        // qemu-storage-daemon 10.0.2 and DPDK 22.11's vhost library (notes §4).
        assert_eq!(DeviceGuess::from_features(0x1_7500_7e46), DeviceGuess::Blk);
        assert_eq!(DeviceGuess::from_features(0xd_7c66_e7cb), DeviceGuess::Net);
        assert_eq!(
            DeviceGuess::from_features(1 << 32 | 1 << 30),
            DeviceGuess::Unknown
        );
    }

    #[test]
    fn the_probe_never_acks_what_it_cannot_drive() {
        let all = u64::MAX;
        let acked = acked_features(all);
        assert!(!has(acked, VIRTIO_F_RING_PACKED) && !has(acked, VHOST_F_LOG_ALL));
        assert!(has(acked, VHOST_USER_F_PROTOCOL_FEATURES));
        let p = acked_protocol_features(all);
        assert_eq!(p.count_ones(), 4);
    }
}
