//! Ctrl-C and SIGTERM while training: the first asks the loop to stop after the current step
//! (which it saves), the second ends the process at once. Files are written atomically, so even
//! then only complete ones are left.
//!
//! Hand-written on `libc` (already in the tree) rather than the `ctrlc` crate, which would add
//! `nix` for two `sigaction` calls.
use std::sync::atomic::{AtomicUsize, Ordering};

static SIGNALS: AtomicUsize = AtomicUsize::new(0);

/// The exit code of a run ended by a signal, as shells report Ctrl-C.
pub const EXIT_CODE: i32 = 130;

/// The error of a run stopped by Ctrl-C or SIGTERM: its message says what was kept and how to go
/// on; the process exits with `EXIT_CODE`.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Stopped(pub String);

/// True once a stop was asked for (since `Handler::install`).
pub fn requested() -> bool {
    SIGNALS.load(Ordering::SeqCst) > 0
}

/// Catches SIGINT and SIGTERM while it lives; dropping it gives them back their default action
/// (end the process), for the parts of a run that have nothing to save.
pub struct Handler(());

#[cfg(unix)]
const FIRST: &[u8] = b"\nstopping after this step, which is saved (Ctrl-C again: stop at once)\n";

#[cfg(unix)]
extern "C" fn on_signal(_: libc::c_int) {
    // only async-signal-safe calls here: an atomic, write(2) and _exit(2)
    if SIGNALS.fetch_add(1, Ordering::SeqCst) == 0 {
        // SAFETY: a static buffer written to stderr
        unsafe { libc::write(2, FIRST.as_ptr().cast(), FIRST.len()) };
    } else {
        // SAFETY: _exit ends the process without running anything else
        unsafe { libc::_exit(EXIT_CODE) };
    }
}

#[cfg(unix)]
fn set(action: libc::sighandler_t) {
    for sig in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: a zeroed sigaction with a valid handler (ours, or SIG_DFL)
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = action;
            libc::sigemptyset(&mut sa.sa_mask);
            sa.sa_flags = libc::SA_RESTART;
            libc::sigaction(sig, &sa, std::ptr::null_mut());
        }
    }
}

impl Handler {
    pub fn install() -> Self {
        SIGNALS.store(0, Ordering::SeqCst);
        #[cfg(unix)]
        set(on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t);
        Handler(())
    }
}

impl Drop for Handler {
    fn drop(&mut self) {
        #[cfg(unix)]
        set(libc::SIG_DFL);
    }
}
