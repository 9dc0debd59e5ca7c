//! COM1: an 8250/16550 UART (vm-superio) whose interrupt line is an eventfd the VMM registers
//! as a KVM irqfd on GSI 4, so raising it needs no ioctl from the vCPU thread.

use std::io::Write;

use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

/// vm-superio raises its interrupt through this: a write to the irqfd's eventfd.
pub struct EventFdTrigger(EventFd);

impl Trigger for EventFdTrigger {
    type E = std::io::Error;
    fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}

impl EventFdTrigger {
    pub fn new(fd: EventFd) -> Self {
        EventFdTrigger(fd)
    }
}

/// The UART with its port window (8 registers at `base`).
pub struct SerialPort<W: Write> {
    uart: Serial<EventFdTrigger, vm_superio::serial::NoEvents, W>,
}

impl<W: Write> SerialPort<W> {
    pub fn new(irq: EventFd, out: W) -> Self {
        SerialPort {
            uart: Serial::new(EventFdTrigger::new(irq), out),
        }
    }

    pub fn read(&mut self, offset: u8) -> u8 {
        self.uart.read(offset)
    }

    pub fn write(&mut self, offset: u8, value: u8) {
        // A failed interrupt or output write must not kill the vCPU; the guest sees a lost byte.
        if let Err(e) = self.uart.write(offset, value) {
            tracing::debug!("serial write at offset {offset}: {e:?}");
        }
    }

    /// Host input for the guest; returns how many bytes the FIFO took (it may be full).
    pub fn enqueue_input(&mut self, bytes: &[u8]) -> usize {
        self.uart.enqueue_raw_bytes(bytes).unwrap_or(0)
    }

    pub fn writer_mut(&mut self) -> &mut W {
        self.uart.writer_mut()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn output_reaches_the_writer_and_input_raises_the_irq() {
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut s = SerialPort::new(irq.try_clone().unwrap(), Vec::new());
        for b in b"hi" {
            s.write(0, *b);
        }
        assert_eq!(s.writer_mut().as_slice(), b"hi");
        s.write(1, 0x01); // IER: interrupt on received data
        assert_eq!(s.enqueue_input(b"x"), 1);
        assert_eq!(irq.read().unwrap(), 1);
        assert_eq!(s.read(0), b'x');
    }
}
