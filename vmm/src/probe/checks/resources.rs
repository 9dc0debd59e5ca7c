//! Resources and liveness, for every backend type: memory that shrinks under the backend,
//! eventfds whose shared flags change, clients that say nothing or trickle, sizes and fd counts
//! beyond the protocol's.

use std::os::fd::OwnedFd;
use std::time::{Duration, Instant};

use vhost_frontend::features::{has, VHOST_USER_F_PROTOCOL_FEATURES};
use vhost_frontend::probe::fds::{add_to_eventfd, eventfd, set_nonblock};
use vhost_frontend::probe::{Answer, ProbeMessage, RawSession};
use vhost_frontend::wire::{MemoryTable, Request};

use super::{all_cases, refused, setup_failed};
use crate::probe::context::{Ack, Ctx, DeviceGuess};
use crate::probe::rings::{ring_setup, start_queue0};
use crate::probe::Outcome;

/// How long a second client waits while a silent one holds the backend.
const SILENT_WAIT: Duration = Duration::from_secs(20);
/// An eventfd counter one short of full: the next write of 1 would block (or fail).
const FULL: u64 = 0xffff_ffff_ffff_fffe;

fn enable(ctx: &Ctx) -> bool {
    has(ctx.identity.features, VHOST_USER_F_PROTOCOL_FEATURES)
}

/// GET_VRING_BASE on queue 0: the ring stops and the backend answers, or it does not.
fn stop_ring(s: &RawSession) -> Answer {
    s.call(&ProbeMessage::vring_state(
        Request::GetVringBase,
        0,
        0,
        false,
    ))
}

pub fn memory_shrink(ctx: &mut Ctx) -> Outcome {
    let s = match ctx.session() {
        Ok(s) => s,
        Err(e) => return setup_failed(e),
    };
    let (ram, fds) = match ring_setup(&s, false) {
        Ok(r) => r,
        Err(o) => return o,
    };
    // The memory table is mapped; now the file under it goes away.
    if let Err(e) = ram.file.set_len(0) {
        return setup_failed(format!("ftruncate: {e}"));
    }
    let started = start_queue0(&s, &fds, enable(ctx));
    std::thread::sleep(Duration::from_millis(200));
    let what = match started {
        Ok(()) => "ring started and kicked on RAM shrunk to 0 bytes".to_string(),
        Err(e) => format!("starting the ring on shrunk RAM: {e}"),
    };
    match stop_ring(&s.raw) {
        Answer::Reply { .. } => Outcome::Pass(format!("{what}; GET_VRING_BASE answered")),
        Answer::Closed => Outcome::Pass(format!("{what}; the connection was closed")),
        other => Outcome::Fail(format!("{what}; GET_VRING_BASE got {}", other.describe())),
    }
}

pub fn eventfd_flags(ctx: &mut Ctx) -> Outcome {
    let s = match ctx.session() {
        Ok(s) => s,
        Err(e) => return setup_failed(e),
    };
    let (ram, fds) = match ring_setup(&s, true) {
        Ok(r) => r,
        Err(o) => return o,
    };
    let dup = |fd: &OwnedFd| fd.try_clone().map_err(|e| e.to_string());
    let handed = dup(&fds.call)
        .and_then(|c| {
            s.setup(ProbeMessage::vring_fd(
                Request::SetVringCall,
                0,
                Some(c),
                false,
            ))
        })
        .and_then(|()| dup(&fds.err))
        .and_then(|e| {
            s.setup(ProbeMessage::vring_fd(
                Request::SetVringErr,
                0,
                Some(e),
                false,
            ))
        });
    if let Err(e) = handed {
        return setup_failed(e);
    }
    // After the backend had its chance to set O_NONBLOCK on the shared descriptions: fill the
    // counters it writes to (our own writes non-blocking: the backend may have signalled
    // already), then clear O_NONBLOCK under it.
    let flipped = [&fds.call, &fds.err]
        .iter()
        .try_for_each(|fd| fill(fd))
        .and_then(|()| {
            [&fds.call, &fds.err, &fds.kick]
                .iter()
                .try_for_each(|fd| set_nonblock(fd, false))
        });
    if let Err(e) = flipped {
        return setup_failed(e.to_string());
    }
    let kicked = dup(&fds.kick)
        .and_then(|k| {
            s.setup(ProbeMessage::vring_fd(
                Request::SetVringKick,
                0,
                Some(k),
                false,
            ))
        })
        .and_then(|()| {
            if enable(ctx) {
                s.setup(ProbeMessage::vring_state(
                    Request::SetVringEnable,
                    0,
                    1,
                    false,
                ))
            } else {
                Ok(())
            }
        })
        .and_then(|()| add_to_eventfd(&fds.kick, 1).map_err(|e| e.to_string()));
    if let Err(e) = kicked {
        return setup_failed(e);
    }
    let start = Instant::now();
    let mut completed = false;
    while start.elapsed() < Duration::from_secs(2) {
        if ram.completed() {
            completed = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let request = match (ctx.identity.device, completed) {
        (DeviceGuess::Blk, true) => "the GET_ID request completed",
        (DeviceGuess::Blk, false) => "the GET_ID request did not complete in 2 s",
        (_, true) => "the ring's request was used",
        (_, false) => "the ring's request was not used (it is a virtio-blk request)",
    };
    match stop_ring(&s.raw) {
        Answer::Reply { .. } => Outcome::Pass(format!(
            "blocking call/err eventfds with full counters: {request}; GET_VRING_BASE answered"
        )),
        Answer::Closed => Outcome::Pass(format!("{request}; the connection was closed")),
        other => Outcome::Fail(format!(
            "blocking call/err eventfds with full counters: {request}; GET_VRING_BASE got {} \
             (wedged in a write to a full eventfd?)",
            other.describe()
        )),
    }
}

/// Makes `fd`'s counter [`FULL`] without ever blocking: O_NONBLOCK on, drain, write.
fn fill(fd: &OwnedFd) -> std::io::Result<()> {
    set_nonblock(fd, true)?;
    let mut buf = [0u8; 8];
    // SAFETY: reads at most 8 bytes into a live buffer from an fd we own; EAGAIN (empty) is fine.
    unsafe {
        libc::read(
            std::os::fd::AsRawFd::as_raw_fd(fd),
            buf.as_mut_ptr().cast(),
            8,
        )
    };
    add_to_eventfd(fd, FULL)
}

pub fn silent_client(ctx: &mut Ctx) -> Outcome {
    let silent = match ctx.connect_silent() {
        Ok(s) => s,
        Err(e) => return setup_failed(e),
    };
    // The next frontend tries until SILENT_WAIT is up; a connection the backend closes
    // unanswered (it may be re-creating its socket) is made again.
    let start = Instant::now();
    let mut answer = Answer::TimedOut;
    let mut closed = 0;
    while let Some(left) = SILENT_WAIT.checked_sub(start.elapsed()) {
        let second = match RawSession::connect_retrying(&ctx.target.socket, left) {
            Ok(s) => s,
            Err(e) => {
                return Outcome::Fail(format!(
                    "while a client that says nothing is connected, the next frontend cannot \
                     connect for {} s: {e}{} (any local user who can connect can lock the VM out)",
                    SILENT_WAIT.as_secs(),
                    if e.kind() == std::io::ErrorKind::NotFound {
                        "; the backend removed its socket once the silent client was accepted"
                    } else {
                        ""
                    }
                ))
            }
        };
        let get = ProbeMessage::bare(Request::GetFeatures, false);
        answer = second.call_within(&get, SILENT_WAIT.saturating_sub(start.elapsed()));
        match answer {
            Answer::Closed => {
                closed += 1;
                std::thread::sleep(Duration::from_millis(50));
            }
            _ => break,
        }
    }
    let closed = match closed {
        0 => String::new(),
        n => format!(" ({n} of its connections closed unanswered meanwhile)"),
    };
    let waited = start.elapsed();
    let dropped = silent.closed_within(Duration::ZERO);
    drop(silent);
    match answer {
        Answer::Reply { .. } if dropped => Outcome::Pass(format!(
            "the silent client was dropped; the next one was answered after {:.1} s{closed}",
            waited.as_secs_f64()
        )),
        Answer::Reply { .. } => Outcome::Pass(format!(
            "the next client was answered after {:.1} s while the silent one stayed connected{closed}",
            waited.as_secs_f64()
        )),
        other => Outcome::Fail(format!(
            "a client that connects and says nothing held the backend for over {} s: the next \
             frontend got {}{closed} (any local user who can connect can lock the VM out)",
            SILENT_WAIT.as_secs(),
            other.describe()
        )),
    }
}

pub fn trickle(ctx: &mut Ctx) -> Outcome {
    let s = match ctx.connect() {
        Ok(s) => s,
        Err(e) => return setup_failed(e),
    };
    let m = ProbeMessage::bare(Request::GetFeatures, false);
    if let Err(e) = s.send_trickled(&m, 1, Duration::from_millis(20)) {
        return Outcome::Fail(format!("sending GET_FEATURES a byte at a time: {e}"));
    }
    match s.recv() {
        answer @ Answer::Reply { .. } if answer.u64() == Some(ctx.identity.features) => {
            Outcome::Pass("GET_FEATURES sent a byte every 20 ms: answered correctly".into())
        }
        other => Outcome::Fail(format!(
            "GET_FEATURES sent a byte every 20 ms: {}",
            other.describe()
        )),
    }
}

pub fn oversized_header(ctx: &mut Ctx) -> Outcome {
    let s = match ctx.connect() {
        Ok(s) => s,
        Err(e) => return setup_failed(e),
    };
    let m = ProbeMessage::u64(Request::SetFeatures, 0, false).claiming_size(u32::MAX);
    if s.send(&m).is_err() {
        return Outcome::Pass("closed the connection".into());
    }
    if s.closed_within(ctx.timeout) {
        Outcome::Pass("a header claiming 4 GiB of payload: connection closed".into())
    } else {
        Outcome::Fail(format!(
            "a header claiming 4 GiB of payload: the connection is still open after {} s \
             (waiting for the payload instead of refusing the size)",
            ctx.timeout.as_secs()
        ))
    }
}

pub fn oversized_payload(ctx: &mut Ctx) -> Outcome {
    // One session at a time: many backends serve one frontend and queue the next.
    let first = match ctx.session() {
        Ok(s) => refused(
            "SET_FEATURES with 1024 payload bytes",
            s.ack(ProbeMessage::new(
                Request::SetFeatures,
                vec![0; 1024],
                false,
            )),
            "a u64 message of the wrong size was taken",
        ),
        Err(e) => return setup_failed(e),
    };
    // nregions 255 in a payload with room for 8 regions.
    let mut payload = MemoryTable { regions: vec![] }.encode();
    payload[0..4].copy_from_slice(&255u32.to_le_bytes());
    payload.resize(8 + 32 * 8, 0);
    let second = match ctx.session() {
        Ok(s) => refused(
            "SET_MEM_TABLE claiming 255 regions",
            s.ack(ProbeMessage::new(Request::SetMemTable, payload, false)),
            "a region count beyond the payload (and the protocol's 8) was taken",
        ),
        Err(e) => return setup_failed(e),
    };
    all_cases(vec![first, second])
}

pub fn many_fds(ctx: &mut Ctx) -> Outcome {
    let s = match ctx.session() {
        Ok(s) => s,
        Err(e) => return setup_failed(e),
    };
    let fds: Result<Vec<OwnedFd>, _> = (0..16).map(|_| eventfd(true, 0)).collect();
    let fds = match fds {
        Ok(f) => f,
        Err(e) => return setup_failed(e.to_string()),
    };
    let m = ProbeMessage::u64(Request::SetVringCall, 0, false).with_fds(fds);
    let ack = s.ack(m);
    let note = if ctx.target.pid().is_some() {
        "the runner checks that none was kept"
    } else {
        "without --pid the probe cannot see whether any leaked"
    };
    match ack {
        Ack::TimedOut | Ack::Broken(_) => {
            Outcome::Fail(format!("SET_VRING_CALL with 16 fds: {}", ack.describe()))
        }
        _ => Outcome::Pass(format!(
            "SET_VRING_CALL with 16 fds: {}; {note}",
            ack.describe()
        )),
    }
}
