//! What a message the server does not accept gets back: the one place the NEED_REPLY policy for
//! failures lives.
//!
//! A failed message must never leave the frontend believing it succeeded, and must never get a
//! reply of the wrong shape (the frontend would read it as a value). So:
//!
//! ```text
//!  the request's reply (ReplyKind)   with NEED_REPLY                 without NEED_REPLY
//!  an ack (SET_*, unknown codes)     failure ack (u64 1), go on      Refused: logged, go on
//!                                                                    Breach:  session ends
//!  GET_CONFIG                        empty payload (ConfigFailed),   Refused: the same, go on
//!                                    go on                           Breach:  session ends
//!  GET_INFLIGHT_FD                   mmap_size 0 and no fd ("no      Refused: the same, go on
//!                                    buffer", as QEMU reads it),     Breach:  session ends
//!                                    go on
//!  a value (GET_FEATURES, GET_QUEUE_NUM, GET_VRING_BASE, ...):  no failure form exists, and any
//!                                    reply would be read as a value: the session ends
//! ```
//!
//! A GET_* request always gets a reply, NEED_REPLY or not (`ReplyKind`), which is why a refused
//! GET_CONFIG or GET_INFLIGHT_FD is answered without NEED_REPLY too. Without NEED_REPLY a breach
//! still ends the session, as for every other request: the frontend did not ask to be told.

use vhost_frontend::wire::{BackendReply, Header, InflightDescription, ReplyKind, Request};

/// Why a message was not accepted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Failure {
    /// A legitimate "no" (e.g. SET_CONFIG on a read-only config space): the session goes on.
    Refused(String),
    /// The message breaks the protocol or asks for what was not negotiated.
    Breach(String),
}

/// What the session does about a failed message.
#[derive(Debug)]
pub enum FailureAnswer {
    /// Send this reply, which the frontend reads as "failed"; the session goes on.
    Reply(FailureReply),
    /// Send nothing (log the reason); the session goes on.
    Silent,
    /// End the session (the reason, with the request named, is its error).
    EndSession,
}

/// A reply the frontend reads as "failed".
#[derive(Debug)]
pub enum FailureReply {
    /// The failure form of a known request (an ack, ConfigFailed, or an inflight reply with no
    /// buffer), encoded with `BackendReply::encode`.
    Typed(BackendReply),
    /// The failure ack for a request code this crate does not know (no `Request` to build a
    /// `BackendReply::Ack` from): `BackendReply::encode_ack_for_code`.
    AckForCode(u32),
}

/// The REPLY_ACK status of a failure (anything non-zero; libvhost-user and QEMU use 1).
pub const FAILURE_STATUS: u64 = 1;

impl FailureReply {
    /// Header, payload and fds to send (a failure reply never carries an fd).
    pub fn encode(&self) -> (Header, Vec<u8>) {
        match self {
            FailureReply::Typed(reply) => {
                let (header, payload, fds) = reply.encode();
                debug_assert!(fds.is_empty(), "a failure reply carries no fd");
                (header, payload)
            }
            FailureReply::AckForCode(code) => {
                BackendReply::encode_ack_for_code(*code, FAILURE_STATUS)
            }
        }
    }

    /// For the log line: what the frontend is told.
    pub fn describe(&self) -> &'static str {
        match self {
            FailureReply::AckForCode(_) | FailureReply::Typed(BackendReply::Ack { .. }) => {
                "a failure ack"
            }
            FailureReply::Typed(BackendReply::ConfigFailed) => "an empty GET_CONFIG reply (failed)",
            FailureReply::Typed(BackendReply::Inflight { .. }) => {
                "an inflight reply without a buffer (mmap_size 0)"
            }
            FailureReply::Typed(_) => "a failure reply",
        }
    }
}

/// The module docs' table: how to answer `failure` of the message with `header` (whose request
/// code may be unknown, or known with a payload that did not decode).
pub fn answer(header: &Header, failure: &Failure) -> FailureAnswer {
    let breach = matches!(failure, Failure::Breach(_));
    let need_reply = header.need_reply();
    let Ok(request) = Request::from_code(header.request) else {
        return match (need_reply, breach) {
            (true, _) => FailureAnswer::Reply(FailureReply::AckForCode(header.request)),
            (false, true) => FailureAnswer::EndSession,
            (false, false) => FailureAnswer::Silent,
        };
    };
    let failure_form = match ReplyKind::of(request) {
        ReplyKind::Ack => BackendReply::Ack {
            request,
            status: FAILURE_STATUS,
        },
        ReplyKind::Config => BackendReply::ConfigFailed,
        // The frontend's asked geometry may not have decoded: every field 0, which is all
        // "no buffer" needs (QEMU looks at mmap_size only).
        ReplyKind::Inflight => BackendReply::Inflight {
            description: InflightDescription {
                mmap_size: 0,
                mmap_offset: 0,
                num_queues: 0,
                queue_size: 0,
            },
            fd: None,
        },
        ReplyKind::U64 | ReplyKind::VringState => return FailureAnswer::EndSession,
    };
    let reply_due = need_reply || request.always_replies();
    match (need_reply, breach) {
        (true, _) => FailureAnswer::Reply(FailureReply::Typed(failure_form)),
        (false, true) => FailureAnswer::EndSession,
        (false, false) if reply_due => FailureAnswer::Reply(FailureReply::Typed(failure_form)),
        (false, false) => FailureAnswer::Silent,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vhost_frontend::wire::{U64Payload, FLAG_NEED_REPLY, VERSION};

    /// A request header with `code`, NEED_REPLY as given.
    fn header(code: u32, need_reply: bool) -> Header {
        Header {
            request: code,
            flags: VERSION | if need_reply { FLAG_NEED_REPLY } else { 0 },
            size: 0,
        }
    }

    fn refused() -> Failure {
        Failure::Refused("no".into())
    }

    fn breach() -> Failure {
        Failure::Breach("bad".into())
    }

    /// The wire bytes of the answer, or how the session goes on without one.
    fn sent(
        code: u32,
        need_reply: bool,
        failure: Failure,
    ) -> Result<(Header, Vec<u8>), &'static str> {
        match answer(&header(code, need_reply), &failure) {
            FailureAnswer::Reply(reply) => Ok(reply.encode()),
            FailureAnswer::Silent => Err("silent"),
            FailureAnswer::EndSession => Err("ends"),
        }
    }

    #[test]
    fn acked_requests_get_a_failure_ack_only_with_need_reply() {
        for code in [Request::SetVringNum.code(), Request::SetStatus.code(), 99] {
            for failure in [refused(), breach()] {
                let (header, payload) = sent(code, true, failure).unwrap();
                assert_eq!((header.request, header.size), (code, 8));
                assert!(header.is_reply());
                assert_eq!(U64Payload::decode(&payload).unwrap().0, FAILURE_STATUS);
            }
            assert_eq!(sent(code, false, refused()).unwrap_err(), "silent");
            assert_eq!(sent(code, false, breach()).unwrap_err(), "ends");
        }
    }

    #[test]
    fn get_config_and_get_inflight_fd_get_their_own_failure_form() {
        let config = Request::GetConfig.code();
        let inflight = Request::GetInflightFd.code();
        for (need_reply, failure) in [(true, breach()), (true, refused()), (false, refused())] {
            let (header, payload) = sent(config, need_reply, failure.clone()).unwrap();
            assert_eq!((header.request, header.size), (config, 0), "ConfigFailed");
            assert!(payload.is_empty());
            let (header, payload) = sent(inflight, need_reply, failure).unwrap();
            assert_eq!(header.request, inflight);
            let description = InflightDescription::decode(&payload).unwrap();
            assert_eq!(description.mmap_size, 0, "no buffer");
        }
        assert_eq!(sent(config, false, breach()).unwrap_err(), "ends");
        assert_eq!(sent(inflight, false, breach()).unwrap_err(), "ends");
    }

    /// A reply that carries a value has no failure form: a u64 "1" would be read as features,
    /// queue count or a vring base, so the session ends instead.
    #[test]
    fn value_replies_have_no_failure_form_and_end_the_session() {
        for request in [
            Request::GetFeatures,
            Request::GetProtocolFeatures,
            Request::GetQueueNum,
            Request::GetVringBase,
            Request::GetMaxMemSlots,
            Request::GetStatus,
        ] {
            for need_reply in [true, false] {
                for failure in [refused(), breach()] {
                    assert_eq!(
                        sent(request.code(), need_reply, failure).unwrap_err(),
                        "ends",
                        "{request}"
                    );
                }
            }
        }
    }
}
