//! One human-readable line per vhost-user message, for `--trace-vhost` and for learning the protocol:
//!
//! ```text
//! vhost-user[blk0] -> SET_VRING_ADDR idx=0 desc=0x7f3a00001000 avail=0x7f3a00002000 used=0x7f3a00003000 fds=0
//! vhost-user[blk0] <- GET_FEATURES reply features=0x175007e46 (SIZE_MAX SEG_MAX ... PROTOCOL_FEATURES VERSION_1) fds=0
//! ```
//!
//! Decoding reuses the wire decoders; a payload that does not decode is shown as such (the trace must
//! never fail or panic on what a hostile peer sent). Nothing a peer sends reaches a line as text:
//! numbers are formatted, config bytes shown as hex. The one string, the connection's name (a
//! socket path), goes through [`printable`], so a newline in it cannot forge a second line.

use std::borrow::Cow;
use std::fmt::Write;

use crate::features::{describe_device_features, describe_protocol_features};
use crate::wire::{
    ConfigSpace, Header, InflightDescription, MemoryTable, Request, SingleMemoryRegion, U64Payload,
    VringAddr, VringFdIndex, VringState, WireError,
};

/// Which way a message travels, seen from the frontend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// Frontend to backend (`->`).
    ToBackend,
    /// Backend to frontend (`<-`).
    FromBackend,
}

impl Direction {
    fn arrow(self) -> &'static str {
        match self {
            Direction::ToBackend => "->",
            Direction::FromBackend => "<-",
        }
    }
}

/// The trace line for one message. `peer` names the connection (empty: no name shown).
pub fn describe_message(
    direction: Direction,
    peer: &str,
    header: &Header,
    payload: &[u8],
    fd_count: usize,
) -> String {
    describe_device_message(None, direction, peer, header, payload, fd_count)
}

/// As [`describe_message`] for a device of virtio type `device_id`: its own feature bits are
/// named (`SEG_MAX FLUSH MQ ...` for virtio-blk) instead of shown as `dev-bitN`.
pub fn describe_device_message(
    device_id: Option<u32>,
    direction: Direction,
    peer: &str,
    header: &Header,
    payload: &[u8],
    fd_count: usize,
) -> String {
    let mut line = String::from("vhost-user");
    if !peer.is_empty() {
        let _ = write!(line, "[{}]", printable(peer));
    }
    let _ = write!(line, " {} ", direction.arrow());
    match Request::from_code(header.request) {
        Ok(request) => line.push_str(request.name()),
        Err(_) => {
            let _ = write!(line, "request#{}", header.request);
        }
    }
    if header.is_reply() {
        line.push_str(" reply");
    }
    if header.need_reply() {
        line.push_str(" need_reply");
    }
    let fields = match Request::from_code(header.request) {
        Ok(request) if header.is_reply() => describe_reply(device_id, request, payload),
        Ok(request) => describe_request(device_id, request, payload),
        Err(_) => Ok(format!("size={}", payload.len())),
    };
    match fields {
        Ok(text) if text.is_empty() => {}
        Ok(text) => {
            line.push(' ');
            line.push_str(&text);
        }
        Err(err) => {
            let _ = write!(line, " size={} (undecodable: {err})", payload.len());
        }
    }
    let _ = write!(line, " fds={fd_count}");
    line
}

fn describe_request(
    device_id: Option<u32>,
    request: Request,
    p: &[u8],
) -> Result<String, WireError> {
    Ok(match request {
        Request::SetFeatures => {
            let f = U64Payload::decode(p)?.0;
            format!(
                "features={f:#x} ({})",
                describe_device_features(device_id, f)
            )
        }
        Request::SetProtocolFeatures => {
            let f = U64Payload::decode(p)?.0;
            format!(
                "protocol_features={f:#x} ({})",
                describe_protocol_features(f)
            )
        }
        Request::SetMemTable => {
            let table = MemoryTable::decode(p)?;
            let mut s = format!("regions={}", table.regions.len());
            for r in &table.regions {
                let _ = write!(
                    s,
                    " [gpa={:#x} size={:#x} uaddr={:#x} off={:#x}]",
                    r.guest_phys_addr, r.memory_size, r.userspace_addr, r.mmap_offset
                );
            }
            s
        }
        Request::AddMemReg | Request::RemMemReg => {
            let r = SingleMemoryRegion::decode(p)?.0;
            format!(
                "gpa={:#x} size={:#x} uaddr={:#x} off={:#x}",
                r.guest_phys_addr, r.memory_size, r.userspace_addr, r.mmap_offset
            )
        }
        Request::SetVringNum => {
            let s = VringState::decode(p)?;
            format!("idx={} num={}", s.index, s.num)
        }
        Request::SetVringBase => {
            let s = VringState::decode(p)?;
            format!("idx={} base={}", s.index, s.num)
        }
        Request::GetVringBase => format!("idx={}", VringState::decode(p)?.index),
        Request::SetVringEnable => {
            let s = VringState::decode(p)?;
            format!("idx={} enable={}", s.index, s.num)
        }
        Request::SetVringAddr => {
            let a = VringAddr::decode(p)?;
            format!(
                "idx={} desc={:#x} avail={:#x} used={:#x} log={:#x} flags={:#x}",
                a.index,
                a.desc_user_addr,
                a.avail_user_addr,
                a.used_user_addr,
                a.log_guest_addr,
                a.flags
            )
        }
        Request::SetVringKick | Request::SetVringCall | Request::SetVringErr => {
            let v = VringFdIndex::decode(p)?;
            format!(
                "idx={}{}",
                v.index,
                if v.no_fd { " no_fd (polling)" } else { "" }
            )
        }
        Request::GetConfig | Request::SetConfig => {
            let c = ConfigSpace::decode(p)?;
            let mut s = format!("offset={:#x} size={} flags={}", c.offset, c.size(), c.flags);
            if request == Request::SetConfig {
                let _ = write!(s, " data={}", hex_prefix(&c.payload));
            }
            s
        }
        Request::GetInflightFd | Request::SetInflightFd => {
            let d = InflightDescription::decode(p)?;
            let mut s = format!("num_queues={} queue_size={}", d.num_queues, d.queue_size);
            if request == Request::SetInflightFd {
                let _ = write!(
                    s,
                    " mmap_size={} mmap_offset={:#x}",
                    d.mmap_size, d.mmap_offset
                );
            }
            s
        }
        Request::SetStatus => format!("status={:#x}", U64Payload::decode(p)?.0),
        _ if p.is_empty() => String::new(),
        _ => format!("size={}", p.len()),
    })
}

fn describe_reply(device_id: Option<u32>, request: Request, p: &[u8]) -> Result<String, WireError> {
    Ok(match request {
        Request::GetFeatures => {
            let f = U64Payload::decode(p)?.0;
            format!(
                "features={f:#x} ({})",
                describe_device_features(device_id, f)
            )
        }
        Request::GetProtocolFeatures => {
            let f = U64Payload::decode(p)?.0;
            format!(
                "protocol_features={f:#x} ({})",
                describe_protocol_features(f)
            )
        }
        Request::GetQueueNum => format!("queues={}", U64Payload::decode(p)?.0),
        Request::GetMaxMemSlots => format!("slots={}", U64Payload::decode(p)?.0),
        Request::GetStatus => format!("status={:#x}", U64Payload::decode(p)?.0),
        Request::GetVringBase => {
            let s = VringState::decode(p)?;
            format!("idx={} base={}", s.index, s.num)
        }
        Request::GetConfig => {
            let c = ConfigSpace::decode(p)?;
            format!(
                "offset={:#x} size={} data={}",
                c.offset,
                c.size(),
                hex_prefix(&c.payload)
            )
        }
        Request::GetInflightFd => {
            let d = InflightDescription::decode(p)?;
            format!("mmap_size={} mmap_offset={:#x}", d.mmap_size, d.mmap_offset)
        }
        // Everything else that replies does so with a REPLY_ACK status.
        _ => {
            let status = U64Payload::decode(p)?.0;
            format!(
                "ack={status}{}",
                if status == 0 { " (ok)" } else { " (failed)" }
            )
        }
    })
}

/// `text` fit for one log line: control characters (newline, carriage return, ESC, ...) are escaped
/// as `\n`, `\u{1b}`, so a string from outside (a path, a name) can neither end the line nor drive
/// the terminal. Borrowed when there is nothing to escape.
pub fn printable(text: &str) -> Cow<'_, str> {
    if !text.chars().any(char::is_control) {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    Cow::Owned(out)
}

/// The first 16 bytes as hex, with an ellipsis if there are more.
fn hex_prefix(bytes: &[u8]) -> String {
    let mut s: String = bytes.iter().take(16).map(|b| format!("{b:02x}")).collect();
    if bytes.len() > 16 {
        s.push_str("..");
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_vring_addr_line() {
        let addr = VringAddr {
            index: 0,
            flags: 0,
            desc_user_addr: 0x7f00_0000_1000,
            used_user_addr: 0x7f00_0000_3000,
            avail_user_addr: 0x7f00_0000_2000,
            log_guest_addr: 0,
        };
        let p = addr.encode();
        let h = Header::for_request(Request::SetVringAddr, p.len(), true);
        assert_eq!(
            describe_message(Direction::ToBackend, "blk0", &h, &p, 0),
            "vhost-user[blk0] -> SET_VRING_ADDR need_reply idx=0 desc=0x7f0000001000 avail=0x7f0000002000 \
             used=0x7f0000003000 log=0x0 flags=0x0 fds=0"
        );
    }

    #[test]
    fn reply_lines_name_features_and_acks() {
        let p = U64Payload(0x1_4000_0000).encode();
        let h = Header::for_reply(Request::GetFeatures, p.len());
        assert_eq!(
            describe_message(Direction::FromBackend, "", &h, &p, 0),
            "vhost-user <- GET_FEATURES reply features=0x140000000 (PROTOCOL_FEATURES VERSION_1) fds=0"
        );
        let h = Header::for_reply(Request::SetMemTable, 8);
        assert_eq!(
            describe_message(Direction::FromBackend, "x", &h, &U64Payload(1).encode(), 0),
            "vhost-user[x] <- SET_MEM_TABLE reply ack=1 (failed) fds=0"
        );
    }

    #[test]
    fn a_name_cannot_forge_a_line() {
        let h = Header::for_request(Request::GetFeatures, 0, false);
        let line = describe_message(
            Direction::ToBackend,
            "/tmp/a\nvhost-user[blk0] <- GET_FEATURES reply\u{1b}[2J",
            &h,
            &[],
            0,
        );
        assert_eq!(line.lines().count(), 1, "{line}");
        assert!(!line.contains('\u{1b}'), "{line}");
        assert_eq!(
            line,
            "vhost-user[/tmp/a\\nvhost-user[blk0] <- GET_FEATURES reply\\u{1b}[2J] -> GET_FEATURES fds=0"
        );
        assert!(matches!(printable("blk0"), Cow::Borrowed("blk0")));
    }

    #[test]
    fn hostile_bytes_are_shown_not_fatal() {
        let h = Header {
            request: 9,
            flags: 1,
            size: 3,
        };
        let line = describe_message(Direction::FromBackend, "", &h, &[1, 2, 3], 2);
        assert!(
            line.starts_with("vhost-user <- SET_VRING_ADDR size=3 (undecodable:"),
            "{line}"
        );
        assert!(line.ends_with("fds=2"), "{line}");
        let h = Header {
            request: 4242,
            flags: 5,
            size: 1,
        };
        assert_eq!(
            describe_message(Direction::FromBackend, "", &h, &[0], 0),
            "vhost-user <- request#4242 reply size=1 fds=0"
        );
        // Every request code, as request and as reply, with junk payloads of several sizes.
        for code in 0..50 {
            for flags in [1, 5, 9] {
                for len in [0, 1, 8, 24, 40, 300] {
                    let payload = vec![0xffu8; len];
                    let h = Header {
                        request: code,
                        flags,
                        size: len as u32,
                    };
                    let _ = describe_message(Direction::ToBackend, "", &h, &payload, 0);
                }
            }
        }
    }
}
