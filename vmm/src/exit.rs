//! Why a VM stopped, and the exit status `vmm` gives it. A test kernel reports results through
//! the exit port; everything else that ends a VM is named in one line on stderr.

use std::fmt;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GuestExit {
    /// The guest wrote this byte to port 0xf4.
    ExitPort(u8),
    /// ACPI S5 through the FADT's sleep control register, or KVM's system-event shutdown.
    PowerOff,
    /// The guest asked for a reset (ACPI reset register, i8042 pulse, port 0xcf9, KVM system event).
    Reset { how: &'static str },
    /// KVM_EXIT_SHUTDOWN: on x86 this is a triple fault.
    TripleFault { cpu: u32, rip: u64 },
    /// KVM could not run or emulate the guest; the text names RIP, the bytes and a likely cause.
    InternalError { cpu: u32, detail: String },
    /// The VMM itself failed while the guest ran.
    VmmError(String),
}

impl GuestExit {
    /// 0 for power-off, V for a byte on the exit port, 1 for everything else.
    pub fn status(&self) -> i32 {
        match self {
            GuestExit::ExitPort(v) => *v as i32,
            GuestExit::PowerOff => 0,
            _ => 1,
        }
    }

    /// Whether the exit deserves a message: exits the guest chose are not errors.
    pub fn is_failure(&self) -> bool {
        !matches!(self, GuestExit::ExitPort(_) | GuestExit::PowerOff)
    }
}

impl fmt::Display for GuestExit {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        match self {
            GuestExit::ExitPort(v) => write!(f, "guest wrote {v} to the exit port"),
            GuestExit::PowerOff => write!(f, "guest powered off"),
            GuestExit::Reset { how } => write!(
                f,
                "guest requested a reset ({how}); vmm does not reboot guests"
            ),
            GuestExit::TripleFault { cpu, rip } => {
                write!(
                    f,
                    "guest triple fault on vCPU {cpu} (KVM_EXIT_SHUTDOWN) at rip={rip:#x}"
                )
            }
            GuestExit::InternalError { cpu, detail } => {
                write!(f, "KVM internal error on vCPU {cpu}: {detail}")
            }
            GuestExit::VmmError(e) => write!(f, "{e}"),
        }
    }
}
