//! The host terminal while a guest owns the console: characters go to the guest as typed (no
//! line buffering, no local echo: the guest echoes), and the terminal is restored however `vmm`
//! ends. Ctrl-C still ends `vmm` (ISIG stays on), and restores the terminal on the way out.

use std::io::IsTerminal;
use std::sync::OnceLock;

/// The terminal settings found at start, for the signal handler and the guard.
static SAVED: OnceLock<libc::termios> = OnceLock::new();

/// Restores the saved settings on drop.
pub struct RawConsole;

impl RawConsole {
    /// Puts stdin in character-at-a-time mode when it is a terminal; otherwise does nothing.
    pub fn enable() -> Option<RawConsole> {
        if !std::io::stdin().is_terminal() {
            return None;
        }
        // SAFETY: termios is plain data; tcgetattr fills it and its result is checked.
        let mut t: libc::termios = unsafe { std::mem::zeroed() };
        // SAFETY: fd 0 is stdin, `t` is a valid termios to fill.
        if unsafe { libc::tcgetattr(libc::STDIN_FILENO, &mut t) } != 0 {
            return None;
        }
        let _ = SAVED.set(t);
        let mut raw = t;
        raw.c_lflag &= !(libc::ICANON | libc::ECHO);
        raw.c_cc[libc::VMIN] = 1;
        raw.c_cc[libc::VTIME] = 0;
        for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP, libc::SIGQUIT] {
            // SAFETY: the handler only calls async-signal-safe functions (tcsetattr, _exit).
            unsafe { libc::signal(sig, restore_and_exit as *const () as libc::sighandler_t) };
        }
        // SAFETY: fd 0 is stdin and `raw` is a valid termios.
        if unsafe { libc::tcsetattr(libc::STDIN_FILENO, libc::TCSANOW, &raw) } != 0 {
            return None;
        }
        Some(RawConsole)
    }
}

fn restore() {
    if let Some(t) = SAVED.get() {
        // SAFETY: fd 0 is stdin and `t` is the termios it had at start.
        unsafe { libc::tcsetattr(libc::STDIN_FILENO, libc::TCSANOW, t) };
    }
}

extern "C" fn restore_and_exit(sig: libc::c_int) {
    restore();
    // SAFETY: _exit is async-signal-safe; 128 + signal is the shell's convention.
    unsafe { libc::_exit(128 + sig) };
}

impl Drop for RawConsole {
    fn drop(&mut self) {
        restore();
    }
}
