//! Every line cutover prints goes through here: stdout and stderr writes that never panic.
//!
//! `println!` panics when stdout is a closed pipe (`cutover plan status x.toml | head -1`
//! gets EPIPE once `head` is gone), which would end a plan run without recording its end.
//! Here a write that fails is dropped; the first EPIPE on a stream is remembered, and that
//! stream is not written again (a pipe does not come back). Use [`outln!`] and [`errln!`]
//! instead of `println!` and `eprintln!`, and [`err_writer`] for writers (tracing).

use std::io::{ErrorKind, Write};
use std::sync::atomic::{AtomicBool, Ordering};

static STDOUT_GONE: AtomicBool = AtomicBool::new(false);
static STDERR_GONE: AtomicBool = AtomicBool::new(false);

/// The two streams a command prints to.
#[derive(Clone, Copy)]
enum Stream {
    Out,
    Err,
}

impl Stream {
    fn gone(self) -> &'static AtomicBool {
        match self {
            Stream::Out => &STDOUT_GONE,
            Stream::Err => &STDERR_GONE,
        }
    }

    /// Write `bytes` whole (under the stream's lock, so lines of threads never mix);
    /// errors are dropped, EPIPE is remembered.
    fn write(self, bytes: &[u8]) {
        let gone = self.gone();
        if gone.load(Ordering::Relaxed) {
            return;
        }
        let r = match self {
            Stream::Out => {
                let mut o = std::io::stdout().lock();
                o.write_all(bytes).and_then(|()| o.flush())
            }
            Stream::Err => std::io::stderr().lock().write_all(bytes),
        };
        if let Err(e) = r {
            if e.kind() == ErrorKind::BrokenPipe {
                gone.store(true, Ordering::Relaxed);
            }
        }
    }
}

/// One line on stdout (what [`outln!`] calls).
pub fn out_line(args: std::fmt::Arguments<'_>) {
    Stream::Out.write(format!("{args}\n").as_bytes());
}

/// One line on stderr (what [`errln!`] calls).
pub fn err_line(args: std::fmt::Arguments<'_>) {
    Stream::Err.write(format!("{args}\n").as_bytes());
}

/// Text already split into lines (each ending in `\n`) on stdout, in one write.
pub fn out_text(text: &str) {
    Stream::Out.write(text.as_bytes());
}

/// Whether stdout was found to be a closed pipe (whoever read it is gone).
pub fn stdout_gone() -> bool {
    Stream::Out.gone().load(Ordering::Relaxed)
}

/// `println!` that never panics: see the module's documentation.
macro_rules! outln {
    () => {
        $crate::print::out_line(format_args!(""))
    };
    ($($arg:tt)*) => {
        $crate::print::out_line(format_args!($($arg)*))
    };
}

/// `eprintln!` that never panics: see the module's documentation.
macro_rules! errln {
    () => {
        $crate::print::err_line(format_args!(""))
    };
    ($($arg:tt)*) => {
        $crate::print::err_line(format_args!($($arg)*))
    };
}

pub(crate) use {errln, outln};

/// A writer to stderr that never fails (for tracing's log lines, whose own fallback on a
/// failed write is an `eprintln!`, which would panic on a closed stderr).
pub struct ErrWriter;

impl Write for ErrWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        Stream::Err.write(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Makes an [`ErrWriter`] (tracing-subscriber's `with_writer` takes a function).
pub fn err_writer() -> ErrWriter {
    ErrWriter
}
