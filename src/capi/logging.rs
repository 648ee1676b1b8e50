//! Routes the `log` crate's messages to a C callback, or to standard error under `SAMOPT_LOG`.
//!
//! Installed as the cdylib's logger by the first `sam_create`; a Rust program that links the rlib
//! keeps its own logger, since the C entry points are not called there.

use std::ffi::{CString, c_void};
use std::sync::{Once, RwLock};

use super::{SamLogCallback, SamLogLevel};

#[derive(Clone, Copy)]
struct Sink {
    callback: SamLogCallback,
    user: *mut c_void,
}

// SAFETY: the host promises (sam_set_log_callback's contract) that the callback may be called
// from any thread with its `user` pointer.
unsafe impl Send for Sink {}
// SAFETY: as above.
unsafe impl Sync for Sink {}

static SINK: RwLock<Sink> = RwLock::new(Sink { callback: None, user: std::ptr::null_mut() });
static INSTALL: Once = Once::new();

struct Logger;

static LOGGER: Logger = Logger;

fn env_level() -> log::LevelFilter {
    match std::env::var("SAMOPT_LOG").as_deref().map(str::to_ascii_lowercase).as_deref() {
        Ok("error") => log::LevelFilter::Error,
        Ok("info") => log::LevelFilter::Info,
        Ok("debug") | Ok("trace") => log::LevelFilter::Debug,
        Ok(_) => log::LevelFilter::Warn,
        Err(_) => log::LevelFilter::Off,
    }
}

impl log::Log for Logger {
    fn enabled(&self, metadata: &log::Metadata<'_>) -> bool {
        // Only samopt's own messages, not those of the graphics stack it runs on.
        metadata.target().starts_with("samopt")
    }

    fn log(&self, record: &log::Record<'_>) {
        if !self.enabled(record.metadata()) {
            return;
        }
        // A copy, so that the callback runs without the lock: it may set another callback.
        let sink = *SINK.read().unwrap_or_else(|e| e.into_inner());
        let level: SamLogLevel = match record.level() {
            log::Level::Error => 1,
            log::Level::Warn => 2,
            log::Level::Info => 3,
            _ => 4,
        };
        match sink.callback {
            Some(cb) => {
                let text = CString::new(record.args().to_string().replace('\0', " ")).unwrap_or_default();
                // SAFETY: the host registered this callback for exactly this use.
                unsafe { cb(level, text.as_ptr(), sink.user) };
            }
            None if record.level() <= env_level() => eprintln!("{}", record.args()),
            None => {}
        }
    }

    fn flush(&self) {}
}

/// Makes this module the `log` crate's logger, once.
pub(super) fn install() {
    INSTALL.call_once(|| {
        if log::set_logger(&LOGGER).is_ok() {
            log::set_max_level(log::LevelFilter::Debug);
        }
    });
}

pub(super) fn set_callback(callback: SamLogCallback, user: *mut c_void) {
    install();
    *SINK.write().unwrap_or_else(|e| e.into_inner()) = Sink { callback, user };
}
