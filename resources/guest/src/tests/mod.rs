//! The tests the command line can select.

mod blk;
mod compute;
pub mod cpuid;

use crate::outcome::Outcome;
use test_guest::cmdline::{Config, Test};

pub fn run(config: &Config) -> Outcome {
    match config.test {
        Test::Hello => {
            println!("hello: Hello from the test guest (ring 3, x86_64)");
            Ok(())
        }
        Test::Exit(status) => {
            println!("exit: exiting with status {status}");
            Ok(())
        }
        Test::Fault => {
            println!("test-guest: deliberate triple fault");
            crate::idt::triple_fault();
            crate::fail!("the triple fault did not end the VM")
        }
        Test::Compute => compute::run(),
        Test::BlkWriteVerify => blk::write_verify(config),
        Test::BlkBench => blk::bench(config),
        Test::Cpuid => cpuid::run(),
    }
}
