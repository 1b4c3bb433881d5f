//! Process-wide behaviour: abort on panic, fatal fault signals, and fencing a process by
//! identity.

use super::*;

/// SIGKILL exactly the process `id` names (through a pidfd, so a pid reused since cannot be
/// hit), never this process. False if it is not that process any more, or not ours to signal.
pub(super) fn fence_identity(id: &ProcessIdentity) -> bool {
    if id.pid == std::process::id() || id.pid < 2 {
        return false;
    }
    match liveness::Pidfd::open_identity(id) {
        Ok(fd) => fd.send_signal(libc::SIGKILL).is_ok(),
        Err(_) => false,
    }
}

/// Installs (once per process) a panic hook that prints the panic as Rust's default hook does,
/// then aborts: see [`OnPanic::Abort`].
pub(super) fn install_abort_on_panic() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            previous(info);
            error!(
                "panic: {info}; aborting the engine process (a failover: the standby takes over)"
            );
            std::process::abort();
        }));
    });
}

/// The handlers [`install_fatal_sent_fault_signals`] replaced: SIGSEGV's, then SIGBUS's.
static REPLACED_FAULT_HANDLERS: [std::sync::atomic::AtomicPtr<libc::sigaction>; 2] = [
    std::sync::atomic::AtomicPtr::new(std::ptr::null_mut()),
    std::sync::atomic::AtomicPtr::new(std::ptr::null_mut()),
];

/// Makes a SIGSEGV or SIGBUS sent with kill(2) end the process, as it ends any C program.
///
/// Rust's runtime handles both signals itself, to report a stack overflow: for any other
/// fault its handler restores the default action and returns, so a real fault re-executes
/// and kills the process — but a signal sent from outside is then swallowed once, and the
/// first `kill -SEGV` of an engine did nothing (`tests/deaths.rs` `*_sigsegv_sent`). This
/// installs (once per process) a handler that kills the process with the default action for
/// a sent signal (`si_code <= 0`: `SI_USER`, `SI_QUEUE`, `SI_TKILL`) and passes a real fault
/// to the handler it replaced (Rust's guard-page check), or to the default action.
pub(super) fn install_fatal_sent_fault_signals() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        for (i, sig) in [libc::SIGSEGV, libc::SIGBUS].into_iter().enumerate() {
            // SAFETY: sigaction with valid, initialised structs (all-zero is a valid
            // `sigaction`: no flags, empty mask); the handler is async-signal-safe (it reads
            // the siginfo, an atomic pointer, and calls sigaction/raise or the replaced
            // handler, which the runtime installed for exactly this signal).
            unsafe {
                let mut new: libc::sigaction = std::mem::zeroed();
                new.sa_sigaction = on_fault_signal as *const () as libc::sighandler_t;
                new.sa_flags = libc::SA_SIGINFO | libc::SA_ONSTACK;
                libc::sigemptyset(&mut new.sa_mask);
                let mut old: libc::sigaction = std::mem::zeroed();
                if libc::sigaction(sig, &new, &mut old) == 0 {
                    REPLACED_FAULT_HANDLERS[i].store(
                        Box::into_raw(Box::new(old)),
                        std::sync::atomic::Ordering::Release,
                    );
                }
            }
        }
    });
}

extern "C" fn on_fault_signal(
    sig: libc::c_int,
    info: *mut libc::siginfo_t,
    ctx: *mut libc::c_void,
) {
    let i = usize::from(sig != libc::SIGSEGV);
    let replaced = REPLACED_FAULT_HANDLERS[i].load(std::sync::atomic::Ordering::Acquire);
    let code = if info.is_null() {
        0
    } else {
        // SAFETY: the kernel passes a valid siginfo to an SA_SIGINFO handler.
        unsafe { (*info).si_code }
    };
    if code > 0 && !replaced.is_null() {
        // SAFETY: non-null only once stored, after sigaction installed this handler (a fault
        // in between sees null and takes the default action below: keep the null check); the
        // pointee is leaked, never freed or written again.
        let old = unsafe { &*replaced };
        let h = old.sa_sigaction;
        if h != libc::SIG_DFL && h != libc::SIG_IGN {
            if old.sa_flags & libc::SA_SIGINFO != 0 {
                // SAFETY: an SA_SIGINFO handler has this signature; we pass what we got.
                let f: extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut libc::c_void) =
                    unsafe { std::mem::transmute(h) };
                f(sig, info, ctx);
            } else {
                // SAFETY: a plain handler has this signature.
                let f: extern "C" fn(libc::c_int) = unsafe { std::mem::transmute(h) };
                f(sig);
            }
            return;
        }
    }
    // Sent from outside (or nothing to pass a fault to): the default action, now. A real
    // fault re-executes on return and dies of it; a sent one is raised again, pending while
    // this handler runs (the signal is blocked in it) and fatal once it returns.
    // SAFETY: sigaction and raise are async-signal-safe; the struct is valid (all-zero is
    // SIG_DFL with no flags and an empty mask).
    unsafe {
        let mut dfl: libc::sigaction = std::mem::zeroed();
        dfl.sa_sigaction = libc::SIG_DFL;
        libc::sigaction(sig, &dfl, std::ptr::null_mut());
        if code <= 0 {
            libc::raise(sig);
        }
    }
}
