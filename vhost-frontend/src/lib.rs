//! The vhost-user protocol: wire format shared by both sides, and the frontend connection.
