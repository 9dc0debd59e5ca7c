//! The test guest: a freestanding x86_64 kernel that runs one test chosen on
//! its command line, reports on the serial port and exits through port 0xf4.
//! See README.md for the design and the contract.
#![no_std]
#![no_main]
// Failures carry their reason inline (there is no allocator to box it).
#![allow(clippy::result_large_err)]

mod apic;
mod boot;
mod cpu;
mod idt;
mod mem;
mod outcome;
#[macro_use]
mod serial;
mod tests;
mod time;
mod virtio;

use core::sync::atomic::{AtomicU8, Ordering};
use test_guest::cmdline::{self, CmdlineError, Test};

const EXIT_PASS: u8 = 0;
const EXIT_FAIL: u8 = 1;
const EXIT_BAD_CMDLINE: u8 = 2;
const EXIT_EXCEPTION: u8 = 3;
/// Longest command line read (Linux's x86 COMMAND_LINE_SIZE).
const MAX_CMDLINE: usize = 2048;

/// The running test, for the last line printed by exception and panic paths.
static CURRENT_TEST: AtomicU8 = AtomicU8::new(0);
const TEST_NAMES: [&str; 8] = [
    "test-guest",
    "hello",
    "exit",
    "fault",
    "compute",
    "blk-write-verify",
    "blk-bench",
    "cpuid",
];

fn current_test_name() -> &'static str {
    TEST_NAMES[usize::from(CURRENT_TEST.load(Ordering::Relaxed))]
}

fn set_current_test(test: Test) {
    let index = TEST_NAMES
        .iter()
        .position(|&n| n == test.name())
        .unwrap_or(0);
    CURRENT_TEST.store(index as u8, Ordering::Relaxed);
}

/// The command line as a string slice: NUL-terminated at `addr`, at most
/// MAX_CMDLINE bytes; address 0 means none.
fn command_line(addr: u64) -> Result<&'static str, &'static str> {
    if addr == 0 {
        return Ok("");
    }
    let start = addr as *const u8;
    let mut len = 0;
    // SAFETY: the loader put a NUL-terminated string at `addr`, which the
    // identity map covers; the scan stops at MAX_CMDLINE.
    while len < MAX_CMDLINE && unsafe { core::ptr::read_volatile(start.add(len)) } != 0 {
        len += 1;
    }
    // SAFETY: the `len` bytes were just read.
    let bytes = unsafe { core::slice::from_raw_parts(start, len) };
    core::str::from_utf8(bytes).map_err(|_| "command line is not UTF-8")
}

/// Ring-3 entry, reached by `iretq` from boot.s with the command line's
/// physical address.
#[no_mangle]
extern "C" fn guest_main(cmdline_addr: u64) -> ! {
    idt::install();
    serial::init();
    let text = match command_line(cmdline_addr) {
        Ok(text) => text,
        Err(why) => {
            println!("test-guest: bad command line: {why}");
            cpu::exit(EXIT_BAD_CMDLINE);
        }
    };
    println!("test-guest: command line: {text}");
    let config = match cmdline::parse(text) {
        Ok(config) => config,
        Err(error @ CmdlineError::UnknownTest(_)) => {
            println!("test-guest: {error}");
            cpu::exit(EXIT_BAD_CMDLINE);
        }
        Err(error) => {
            println!("test-guest: bad command line: {error}");
            cpu::exit(EXIT_BAD_CMDLINE);
        }
    };
    set_current_test(config.test);
    let name = config.test.name();
    match tests::run(&config) {
        Ok(()) => {
            println!("test-guest: {name} PASS");
            cpu::exit(match config.test {
                Test::Exit(status) => status,
                _ => EXIT_PASS,
            });
        }
        Err(failure) => {
            println!("test-guest: {name} FAIL: {}", failure.as_str());
            cpu::exit(EXIT_FAIL);
        }
    }
}

/// Reached from the ring-0 exception stub (boot.s), on a stack of its own.
#[no_mangle]
extern "C" fn report_exception(vector: u64, error: u64, rip: u64) -> ! {
    println!("test-guest: exception {vector} error={error:#x} rip={rip:#x}");
    println!(
        "test-guest: {} FAIL: CPU exception {vector}",
        current_test_name()
    );
    cpu::exit(EXIT_EXCEPTION);
}

#[panic_handler]
fn panic(info: &core::panic::PanicInfo) -> ! {
    println!("test-guest: {} FAIL: panic: {info}", current_test_name());
    cpu::exit(EXIT_FAIL);
}

/// The precompiled `core` is built for unwinding and names this symbol in
/// its unwind tables; with panic=abort nothing ever calls it.
#[no_mangle]
extern "C" fn rust_eh_personality() {}
