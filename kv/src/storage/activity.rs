//! A hook the storage threads call as a write makes progress, so the process can keep its
//! async worker awake for the steps that follow.
//!
//! Why: a write crosses threads several times (the log writer's flush, the apply on the
//! blocking pool, the answer back on the async worker), and each crossing to a parked thread
//! costs a wake-up, tens of microseconds on a virtual machine. The node keeps one worker
//! spinning for a short window after each request (`aspen_node::busy_poll`); a lone put can
//! outlast that window, and the worker then parks just before the apply's answer arrives.
//! Calling the hook when a log flush completes and when an apply starts keeps the window open
//! while the write is still on its way. No hook set (tests, tools): nothing happens.

use std::sync::OnceLock;

static HOOK: OnceLock<fn()> = OnceLock::new();

/// Sets the process's hook (the first call wins; later ones are ignored).
pub fn set_activity_hook(hook: fn()) {
    let _ = HOOK.set(hook);
}

/// A write made progress: a log flush of entries finished, or an apply started.
pub(crate) fn progressed() {
    if let Some(hook) = HOOK.get() {
        hook();
    }
}
