//! Polled output on the 8250 UART at 0x3f8 (COM1).

use crate::cpu::{inb, outb};
use core::fmt::{self, Write};

const COM1: u16 = 0x3f8;
const LINE_STATUS: u16 = COM1 + 5;
const TRANSMIT_EMPTY: u8 = 0x20;
const DATA_READY: u8 = 0x01;

pub fn init() {
    outb(COM1 + 1, 0x00); // no UART interrupts: output is polled
    outb(COM1 + 3, 0x03); // 8 data bits, no parity, one stop bit
}

fn put(byte: u8) {
    // A VMM's UART is normally always ready; bound the wait so a missing
    // UART (reads of 0) cannot hang the guest.
    for _ in 0..100_000 {
        if inb(LINE_STATUS) & TRANSMIT_EMPTY != 0 {
            break;
        }
    }
    outb(COM1, byte);
}

/// Whether a received byte waits in the UART (it is left there).
pub fn input_ready() -> bool {
    inb(LINE_STATUS) & DATA_READY != 0
}

pub struct Serial;

impl Write for Serial {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        s.bytes().for_each(put);
        Ok(())
    }
}

pub fn print(args: fmt::Arguments) {
    // Serial::write_str never fails.
    let _ = Serial.write_fmt(args);
}

/// Print one line on the serial port.
#[macro_export]
macro_rules! println {
    ($($arg:tt)*) => {
        $crate::serial::print(format_args!("{}\n", format_args!($($arg)*)))
    };
}
