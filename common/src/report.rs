//! One line for an error and everything that caused it.
//!
//! Our error messages say what failed and, after `; `, what to do about it
//! (`cannot write /x; free space in state_dir and rerun`). They never quote
//! their cause: the cause is their `source()`. [`Chain`] puts the pieces in
//! reading order: every failure from the outermost to the root cause joined
//! by `: `, then every piece of advice, so the line reads
//! `cannot write /x: No space left on device (os error 28); free space in
//! state_dir and rerun`. Logs and the binaries' `error:` line both use it.

use std::error::Error;
use std::fmt;

/// Displays an error and its sources on one line (see the module docs).
pub struct Chain<'a>(pub &'a (dyn Error + 'static));

impl fmt::Display for Chain<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut hints = Vec::new();
        let mut cause = Some(self.0);
        let mut first = true;
        while let Some(e) = cause {
            let text = e.to_string();
            let (failure, hint) = match text.split_once("; ") {
                Some((failure, hint)) => (failure.to_owned(), Some(hint.to_owned())),
                None => (text, None),
            };
            if !first {
                f.write_str(": ")?;
            }
            f.write_str(&failure)?;
            hints.extend(hint);
            first = false;
            cause = e.source();
        }
        for hint in hints {
            write!(f, "; {hint}")?;
        }
        Ok(())
    }
}

/// [`Chain`] as a string.
pub fn one_line(e: &(dyn Error + 'static)) -> String {
    Chain(e).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("cannot write {path}; free space and rerun")]
    struct Disk {
        path: &'static str,
        #[source]
        source: std::io::Error,
    }

    #[derive(Debug, thiserror::Error)]
    #[error("apply failed")]
    struct Outer(#[source] Disk);

    #[test]
    fn failures_in_order_then_the_advice() {
        let io = || std::io::Error::new(std::io::ErrorKind::StorageFull, "No space left on device");
        let disk = Disk { path: "/x", source: io() };
        assert_eq!(one_line(&disk), "cannot write /x: No space left on device; free space and rerun");
        assert_eq!(
            one_line(&Outer(Disk { path: "/x", source: io() })),
            "apply failed: cannot write /x: No space left on device; free space and rerun"
        );
        // A cause that repeats words of the message is still printed whole.
        let echo = Disk { path: "/x", source: std::io::Error::other("cannot write") };
        assert_eq!(one_line(&echo), "cannot write /x: cannot write; free space and rerun");
        assert_eq!(format!("{}", Chain(&io())), "No space left on device");
    }
}
