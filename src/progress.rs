//! Progress bars (indicatif, with ETA) for long steps. When stderr is not a terminal (CI,
//! logs redirected to a file) the bar is hidden and progress is logged every 10% instead.

use std::sync::OnceLock;

use indicatif::{MultiProgress, ProgressBar, ProgressStyle};

/// All bars of concurrently running steps share one display.
fn multi() -> &'static MultiProgress {
    static MP: OnceLock<MultiProgress> = OnceLock::new();
    MP.get_or_init(MultiProgress::new)
}

pub struct Progress {
    bar: ProgressBar,
    label: String,
}

impl Progress {
    pub fn new(label: &str, total: u64) -> Self {
        let bar = multi().add(ProgressBar::new(total));
        bar.set_style(
            ProgressStyle::with_template(
                "{prefix:>10} [{bar:30}] {pos}/{len} {elapsed_precise} eta {eta_precise} {msg}",
            )
            .expect("valid template")
            .progress_chars("=> "),
        );
        bar.set_prefix(label.to_string());
        Self {
            bar,
            label: label.to_string(),
        }
    }

    pub fn inc(&self, msg: String) {
        self.bar.set_message(msg.clone());
        self.bar.inc(1);
        let (pos, len) = (self.bar.position(), self.bar.length().unwrap_or(0));
        if self.bar.is_hidden() && len >= 10 && pos % (len / 10) == 0 {
            tracing::info!(
                "    {}: {pos}/{len} ({}%), eta {}s, {msg}",
                self.label,
                100 * pos / len,
                self.bar.eta().as_secs()
            );
        }
    }

    pub fn finish(&self) {
        self.bar.finish_and_clear();
    }
}
