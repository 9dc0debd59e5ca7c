//! A standalone backend's socket: listen on a path and serve one frontend at a time, for ever.
//!
//! ```text
//!  listen_on ─► bind (a stale socket file is replaced) ─► loop { accept ─► session::serve }
//! ```
//!
//! A frontend leaving, or breaking the protocol, ends its session only; the next one is served.
//! One at a time: a second frontend's connect waits in the listen backlog until the first one's
//! session ends (a client that never completes the handshake is dropped after the handshake
//! timeout, see the server's module docs).

use std::io;
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::UnixListener;
use std::path::Path;
use std::time::Duration;

use tracing::{info, warn};

use super::device::VhostUserDevice;
use super::session::serve;
use super::ServeError;

/// Listens on `socket_path` and serves `device` to one frontend at a time, for ever. A stale
/// socket file left by an earlier run is replaced; any other file at that path is an error, as is
/// a failing `accept`. Returns only with an error.
pub fn listen_on<D: VhostUserDevice>(
    device: &D,
    socket_path: &Path,
    handshake_timeout: Duration,
) -> Result<(), ServeError> {
    let listen_err = |source| ServeError::Listen {
        path: socket_path.to_path_buf(),
        source,
    };
    if let Ok(meta) = std::fs::symlink_metadata(socket_path) {
        if !meta.file_type().is_socket() {
            return Err(listen_err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                "path exists and is not a socket",
            )));
        }
        std::fs::remove_file(socket_path).map_err(listen_err)?;
    }
    let listener = UnixListener::bind(socket_path).map_err(listen_err)?;
    info!(socket = %socket_path.display(), backend = D::TRACE_NAME, "vhost-user backend listening");
    loop {
        match listener.accept() {
            Ok((stream, _)) => {
                info!("vhost-user frontend connected");
                match serve(device, stream, handshake_timeout) {
                    Ok(()) => info!("session ended; waiting for the next frontend"),
                    Err(e) => warn!("session failed: {e}; waiting for the next frontend"),
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(listen_err(e)),
        }
    }
}
