//! `compute`: about one second of pure ring-3 work, to show the guest runs
//! natively (on PVM, ring 0 would be ~1000x slower).

use crate::outcome::Outcome;
use crate::time::{self, Instant};

const RUN_MS: u64 = 1000;
/// Iterations between two looks at the clock.
const BATCH: u64 = 1 << 20;

pub fn run() -> Outcome {
    let Some((khz, source)) = time::calibrate() else {
        crate::fail!("cannot calibrate the TSC (no PIT on port 0x61, no CPUID frequency)");
    };
    println!("compute: tsc_khz={khz} source={}", source.name());
    let start = Instant::now();
    let mut iterations: u64 = 0;
    let mut state: u64 = 0x9E37_79B9_7F4A_7C15;
    loop {
        for _ in 0..BATCH {
            // A dependent chain the compiler cannot fold away.
            state = core::hint::black_box(state.rotate_left(5) ^ iterations);
            iterations += 1;
        }
        if start.elapsed_ms() >= RUN_MS {
            break;
        }
    }
    let us = start.elapsed_us().max(1);
    let per_sec = u128::from(iterations) * 1_000_000 / u128::from(us);
    println!(
        "compute: iterations={iterations} ms={} iterations_per_sec={per_sec}",
        us / 1000
    );
    Ok(())
}
