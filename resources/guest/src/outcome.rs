//! How a test ends: Ok, or a failure with a reason (formatted into a fixed
//! buffer: the guest has no allocator).

use core::fmt::{self, Write};

const REASON_CAPACITY: usize = 240;

pub struct Failure {
    text: [u8; REASON_CAPACITY],
    len: usize,
}

impl Failure {
    pub fn new(args: fmt::Arguments) -> Self {
        let mut failure = Failure {
            text: [0; REASON_CAPACITY],
            len: 0,
        };
        // Writing into the buffer truncates instead of failing.
        let _ = failure.write_fmt(args);
        failure
    }

    pub fn as_str(&self) -> &str {
        // Only whole UTF-8 sequences are ever appended (see write_str).
        core::str::from_utf8(&self.text[..self.len]).unwrap_or("(reason not printable)")
    }
}

impl Write for Failure {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        let room = REASON_CAPACITY - self.len;
        let mut take = s.len().min(room);
        while !s.is_char_boundary(take) {
            take -= 1;
        }
        self.text[self.len..self.len + take].copy_from_slice(&s.as_bytes()[..take]);
        self.len += take;
        Ok(())
    }
}

pub type Outcome = Result<(), Failure>;

/// Return early from a test with a failure reason.
#[macro_export]
macro_rules! fail {
    ($($arg:tt)*) => {
        return Err($crate::outcome::Failure::new(format_args!($($arg)*)))
    };
}
