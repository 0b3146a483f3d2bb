//! The examples' progress bars.

use indicatif::{ProgressBar, ProgressStyle};

/// A bar of `len` steps labelled `what`, with elapsed time and a message slot.
pub fn bar(len: usize, what: &str) -> Result<ProgressBar, Box<dyn std::error::Error>> {
    let b = ProgressBar::new(len as u64);
    b.set_style(ProgressStyle::with_template(&format!(
        "{what:>12} {{bar:40}} {{pos}}/{{len}} {{elapsed}} {{msg}}"
    ))?);
    Ok(b)
}
