//! Progress on stderr for large transfers, only when someone is watching.

use std::io::{IsTerminal, Read};
use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};

/// Transfers smaller than this finish before a bar would be worth drawing.
const THRESHOLD: u64 = 64 * 1024 * 1024;

/// A bar counting bytes up to `total`, or `None` when the transfer is small or stderr is not
/// a terminal (scripts and logs get no control sequences).
pub(crate) fn bar(total: u64, what: &str) -> Option<ProgressBar> {
    if total < THRESHOLD || !std::io::stderr().is_terminal() {
        return None;
    }
    let bar = ProgressBar::new(total);
    // The template is a constant; should it ever fail to parse, the default style is fine.
    if let Ok(style) = ProgressStyle::with_template(
        "{msg} [{bar:40}] {decimal_bytes}/{decimal_total_bytes} {decimal_bytes_per_sec} eta {eta}",
    ) {
        bar.set_style(style.progress_chars("=> "));
    }
    bar.set_message(what.to_owned());
    Some(bar)
}

/// A spinner for work whose progress cannot be observed (see [`bar`] for when).
pub(crate) fn spinner(total: u64, what: &str) -> Option<ProgressBar> {
    if total < THRESHOLD || !std::io::stderr().is_terminal() {
        return None;
    }
    let spinner = ProgressBar::new_spinner();
    spinner.set_message(what.to_owned());
    spinner.enable_steady_tick(Duration::from_millis(120));
    Some(spinner)
}

/// A reader that advances a bar by the bytes read through it.
#[derive(Debug)]
pub(crate) struct Counting<R> {
    inner: R,
    bar: Option<ProgressBar>,
}

impl<R> Counting<R> {
    pub(crate) fn new(inner: R, bar: Option<ProgressBar>) -> Self {
        Self { inner, bar }
    }
}

impl<R: Read> Read for Counting<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        if let Some(bar) = &self.bar {
            bar.inc(n as u64);
        }
        Ok(n)
    }
}
