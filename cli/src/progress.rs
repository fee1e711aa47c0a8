//! Progress on stderr for large transfers, only when someone is watching.

use std::fs::File;
use std::io::{IsTerminal, Seek};
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

/// Moves `bar` along with the read offset of `file` until the returned guard is dropped.
///
/// The offset belongs to the open file description, so every handle cloned from `file` (the
/// one the upload reads through) moves it. Following it costs nothing per byte, unlike a
/// reader that counts what passes through it: `read_to_end` cannot read through such a
/// wrapper into uninitialised memory and zeroes every buffer first (6% of a remote upload
/// client's CPU, on the thread that reads and cuts).
pub(crate) fn follow_reads(bar: &ProgressBar, file: &File) -> std::io::Result<Following> {
    let file = file.try_clone()?;
    let bar = bar.clone();
    let task = tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_millis(100));
        loop {
            tick.tick().await;
            if let Ok(at) = (&file).stream_position() {
                bar.set_position(at);
            }
        }
    });
    Ok(Following(task))
}

/// Stops following a file's reads when dropped (see [`follow_reads`]).
#[derive(Debug)]
pub(crate) struct Following(tokio::task::JoinHandle<()>);

impl Drop for Following {
    fn drop(&mut self) {
        self.0.abort();
    }
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};

    use super::*;

    #[tokio::test]
    async fn the_bar_follows_reads_through_another_handle() {
        let mut file = tempfile::tempfile().unwrap();
        file.write_all(&[7u8; 10_000]).unwrap();
        let mut reader = file.try_clone().unwrap();
        reader.rewind().unwrap();
        let bar = ProgressBar::hidden();
        let following = follow_reads(&bar, &file).unwrap();
        let mut first = [0u8; 4_000];
        reader.read_exact(&mut first).unwrap();
        tokio::time::sleep(Duration::from_millis(250)).await;
        assert_eq!(bar.position(), 4_000);
        drop(following);
        reader.read_to_end(&mut Vec::new()).unwrap();
        tokio::time::sleep(Duration::from_millis(250)).await;
        assert_eq!(bar.position(), 4_000, "a dropped guard stops following");
    }
}
