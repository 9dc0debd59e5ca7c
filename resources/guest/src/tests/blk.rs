use crate::outcome::Outcome;
use test_guest::cmdline::Config;

pub fn write_verify(_config: &Config) -> Outcome {
    crate::fail!("not implemented yet")
}

pub fn bench(_config: &Config) -> Outcome {
    crate::fail!("not implemented yet")
}
