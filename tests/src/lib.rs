//! Shared helpers for the end-to-end tests (paths to built artifacts, process runners).
