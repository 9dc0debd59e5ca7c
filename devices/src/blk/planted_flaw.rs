//! Planted flaws: known bugs of real backends, put back into ours on purpose, so that the tools
//! that hunt for them (`vmm reconnect-test` for recovery bugs, `vmm probe` for the control-plane
//! defences) can be shown to catch each one. A checker that never saw its bug is a checker that
//! may never fail.
//!
//! Only a build with the `planted-flaws` cargo feature can switch a flaw on (the test crate's
//! `flawed-blk-backend` binary; `vmm` itself never enables the feature). Without it
//! [`PlantedFlaws`] is empty and every question it answers is a constant `false`, so the normal
//! data path carries no trace of them.

use std::time::Duration;

/// One recovery bug, as it was found in the wild.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PlantedFlaw {
    /// Resubmitted writes are answered OK without touching the disk: the guest is told its data
    /// is safe, the disk keeps the block's older contents.
    AckResubmittedWithoutWriting,
    /// The inflight region is negotiated (GET/SET_INFLIGHT_FD succeed) but never written or read:
    /// a restart re-reads the avail ring from SET_VRING_BASE, as a backend without tracking does,
    /// while the frontend believes it is protected.
    IgnoreInflightRegion,
    /// Recovery rolls back only the head of the last batch, not every entry of it (the
    /// libvhost-user and DPDK code this project's inflight notes describe): the other entries of
    /// a published batch run again.
    RollBackOneEntry,
    /// GET_INFLIGHT_FD sizes its region from whatever geometry it is asked for (still with
    /// checked arithmetic), not bounded by the device's queues and ring limit: DPDK's and
    /// libvhost-user's handler. `vmm probe`'s inflight-queue-count catches it.
    UncheckedInflightGeometry,
    /// A refused SET_INFLIGHT_FD keeps its fd open: the seed review's fd leak on an error path.
    /// The probe's inflight-set-* checks catch it through /proc/PID/fd.
    LeakRefusedInflightFd,
    /// SET_PROTOCOL_FEATURES takes bits that were never offered. unoffered-protocol-bit.
    AcceptUnofferedProtocolBits,
    /// No handshake timeout: a client that connects and says nothing holds the backend for
    /// ever. silent-client.
    NoHandshakeTimeout,
}

impl PlantedFlaw {
    pub const ALL: [PlantedFlaw; 7] = [
        PlantedFlaw::AckResubmittedWithoutWriting,
        PlantedFlaw::IgnoreInflightRegion,
        PlantedFlaw::RollBackOneEntry,
        PlantedFlaw::UncheckedInflightGeometry,
        PlantedFlaw::LeakRefusedInflightFd,
        PlantedFlaw::AcceptUnofferedProtocolBits,
        PlantedFlaw::NoHandshakeTimeout,
    ];

    /// The name on the command line of `flawed-blk-backend --flaw`.
    pub fn name(self) -> &'static str {
        match self {
            PlantedFlaw::AckResubmittedWithoutWriting => "ack-resubmitted-without-writing",
            PlantedFlaw::IgnoreInflightRegion => "ignore-inflight-region",
            PlantedFlaw::RollBackOneEntry => "roll-back-one-entry",
            PlantedFlaw::UncheckedInflightGeometry => "unchecked-inflight-geometry",
            PlantedFlaw::LeakRefusedInflightFd => "leak-refused-inflight-fd",
            PlantedFlaw::AcceptUnofferedProtocolBits => "accept-unoffered-protocol-bits",
            PlantedFlaw::NoHandshakeTimeout => "no-handshake-timeout",
        }
    }

    pub fn from_name(name: &str) -> Option<PlantedFlaw> {
        PlantedFlaw::ALL.into_iter().find(|f| f.name() == name)
    }
}

/// Which flaws a backend carries, and the test knob that makes the batch flaw reachable.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PlantedFlaws {
    #[cfg(feature = "planted-flaws")]
    flaw: Option<PlantedFlaw>,
    /// Let completions gather this long before they are published as one batch, then hold the
    /// published batch open (used ring moved, region not yet closed) as long, so a kill often
    /// finds a batch of several entries open. Not a flaw (with whole-batch rollback nothing is
    /// lost); what makes `RollBackOneEntry` visible.
    #[cfg(feature = "planted-flaws")]
    hold_batches: Option<Duration>,
}

impl PlantedFlaws {
    /// No flaw: what every normal build has.
    pub const NONE: PlantedFlaws = PlantedFlaws {
        #[cfg(feature = "planted-flaws")]
        flaw: None,
        #[cfg(feature = "planted-flaws")]
        hold_batches: None,
    };

    #[cfg(feature = "planted-flaws")]
    pub fn new(flaw: Option<PlantedFlaw>, hold_batches: Option<Duration>) -> Self {
        PlantedFlaws { flaw, hold_batches }
    }

    /// Whether `flaw` is planted.
    #[inline]
    pub fn has(&self, flaw: PlantedFlaw) -> bool {
        #[cfg(feature = "planted-flaws")]
        return self.flaw == Some(flaw);
        #[cfg(not(feature = "planted-flaws"))]
        {
            let _ = flaw;
            false
        }
    }

    /// How long to gather a batch, and to hold it open once published (None: not at all).
    #[inline]
    pub fn hold_batches(&self) -> Option<Duration> {
        #[cfg(feature = "planted-flaws")]
        return self.hold_batches;
        #[cfg(not(feature = "planted-flaws"))]
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_a_normal_build_has_none() {
        for flaw in PlantedFlaw::ALL {
            assert_eq!(PlantedFlaw::from_name(flaw.name()), Some(flaw));
            assert!(!PlantedFlaws::NONE.has(flaw));
        }
        assert_eq!(PlantedFlaw::from_name("none"), None);
        assert_eq!(PlantedFlaws::NONE.hold_batches(), None);
    }
}
