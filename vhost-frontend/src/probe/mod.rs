//! Building blocks of `vmm probe`, a conformance and hostile-input checker for any vhost-user
//! backend: a raw frontend that can send anything the wire can carry (any code, flags, size and
//! fd count, also what the typed [`crate::wire`] encoders would never produce) and that waits for
//! every answer with a bound, telling a reply from a close from silence.
//!
//! ```text
//!  ProbeMessage::get_inflight(0xffff, 0xffff) ─► RawSession::call ─► Answer::{Reply, Closed, TimedOut, Broken}
//!  fds::{memfd, sealed_memfd, eventfd}         ─► the fds a message carries (owned: closed on drop)
//! ```
//!
//! The checks themselves (what to send, how to judge the answer) live in the `vmm` binary
//! (`vmm/src/probe`); these parts live here so the fuzz targets drive a backend with the very
//! messages the probe builds.

pub mod fds;
pub mod message;
pub mod session;

pub use message::ProbeMessage;
pub use session::{Answer, RawSession};
