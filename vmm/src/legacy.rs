//! The handful of PC I/O ports a guest expects: COM1, the exit port, the ACPI sleep/reset
//! register, and the reset paths of old (i8042 pulse, port 0xcf9). Anything else reads as 0xff.

use std::io::Write;

use devices::serial::SerialPort;

use crate::boot::acpi::{S5_SLEEP_TYPE, SLEEP_ENABLE};
use crate::exit::GuestExit;
use crate::layout::{ACPI_RESET_VALUE, ACPI_SLEEP_CONTROL_PORT, COM1_PORT, EXIT_PORT};

const I8042_COMMAND_PORT: u16 = 0x64;
const I8042_RESET_PULSE: u8 = 0xfe;
const RESET_CONTROL_PORT: u16 = 0xcf9;

pub struct LegacyIo<W: Write> {
    pub serial: SerialPort<W>,
}

impl<W: Write> LegacyIo<W> {
    pub fn new(serial: SerialPort<W>) -> Self {
        LegacyIo { serial }
    }

    pub fn read(&mut self, port: u16, data: &mut [u8]) {
        match port {
            p if (COM1_PORT..COM1_PORT + 8).contains(&p) && data.len() == 1 => {
                data[0] = self.serial.read((p - COM1_PORT) as u8)
            }
            // i8042 status: nothing to read, input buffer empty (so Linux's reset loop proceeds).
            I8042_COMMAND_PORT => data.fill(0),
            _ => data.fill(0xff),
        }
    }

    /// Returns Some when the write ends the VM.
    pub fn write(&mut self, port: u16, data: &[u8]) -> Option<GuestExit> {
        let v = *data.first()?;
        match port {
            p if (COM1_PORT..COM1_PORT + 8).contains(&p) => {
                self.serial.write((p - COM1_PORT) as u8, v);
                None
            }
            EXIT_PORT => Some(GuestExit::ExitPort(v)),
            ACPI_SLEEP_CONTROL_PORT => {
                if v & SLEEP_ENABLE != 0 && (v >> 2) & 0x7 == S5_SLEEP_TYPE {
                    Some(GuestExit::PowerOff)
                } else if v == ACPI_RESET_VALUE {
                    Some(GuestExit::Reset {
                        how: "ACPI reset register",
                    })
                } else {
                    None
                }
            }
            I8042_COMMAND_PORT if v == I8042_RESET_PULSE => Some(GuestExit::Reset {
                how: "i8042 reset pulse",
            }),
            // Bit 2 of 0xcf9 starts the reset.
            RESET_CONTROL_PORT if v & 0x4 != 0 => Some(GuestExit::Reset { how: "port 0xcf9" }),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmm_sys_util::eventfd::EventFd;

    fn io() -> LegacyIo<Vec<u8>> {
        LegacyIo::new(SerialPort::new(EventFd::new(0).unwrap(), Vec::new()))
    }

    #[test]
    fn exits() {
        let mut io = io();
        assert_eq!(io.write(EXIT_PORT, &[7]), Some(GuestExit::ExitPort(7)));
        assert_eq!(
            io.write(
                ACPI_SLEEP_CONTROL_PORT,
                &[(S5_SLEEP_TYPE << 2) | SLEEP_ENABLE]
            ),
            Some(GuestExit::PowerOff)
        );
        assert!(matches!(
            io.write(ACPI_SLEEP_CONTROL_PORT, &[ACPI_RESET_VALUE]),
            Some(GuestExit::Reset { .. })
        ));
        assert!(matches!(
            io.write(0x64, &[0xfe]),
            Some(GuestExit::Reset { .. })
        ));
        assert_eq!(io.write(0x80, &[1]), None);
        io.write(COM1_PORT, b"A");
        assert_eq!(io.serial.writer_mut().as_slice(), b"A");
        let mut d = [0u8; 1];
        io.read(0x1234, &mut d);
        assert_eq!(d, [0xff]);
    }
}
