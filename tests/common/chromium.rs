//! Headless Chromium for the status page: screenshots at a given width, and the page's layout
//! measured in the browser.

use std::path::{Path, PathBuf};
use std::time::Duration;

/// The Chromium binary; `./scripts/test` installs Debian's `chromium` when it is missing.
pub fn binary() -> String {
    for c in ["chromium", "chromium-browser", "google-chrome"] {
        if std::process::Command::new("sh")
            .args(["-c", &format!("command -v {c}")])
            .output()
            .is_ok_and(|o| o.status.success())
        {
            return c.to_string();
        }
    }
    panic!("headless Chromium is required for the status page tests; ./scripts/test installs Debian's `chromium`");
}

/// A headless browser with its own profile directory.
pub struct Browser {
    binary: String,
    profile: PathBuf,
}

impl Browser {
    pub fn new(dir: &Path) -> Browser {
        Browser {
            binary: binary(),
            profile: dir.join("chromium-profile"),
        }
    }

    fn args(&self, width: u32, height: u32) -> Vec<String> {
        [
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--hide-scrollbars",
        ]
        .iter()
        .map(|s| s.to_string())
        .chain([
            format!("--window-size={width},{height}"),
            format!("--user-data-dir={}", self.profile.display()),
        ])
        .collect()
    }

    async fn run(&self, width: u32, height: u32, extra: &[String], url: &str) -> (String, String) {
        let run = tokio::process::Command::new(&self.binary)
            .args(self.args(width, height))
            .args(extra)
            .arg(url)
            .kill_on_drop(true)
            .output();
        let out = tokio::time::timeout(Duration::from_secs(40), run)
            .await
            .expect("chromium answers in time")
            .expect("chromium runs");
        (
            String::from_utf8_lossy(&out.stdout).to_string(),
            String::from_utf8_lossy(&out.stderr).to_string(),
        )
    }

    /// The DOM once the page has loaded.
    pub async fn dom(&self, width: u32, url: &str) -> String {
        self.run(width, 900, &["--dump-dom".into()], url).await.0
    }

    /// A PNG of the page at this width; panics unless a real image was written.
    pub async fn screenshot(&self, width: u32, height: u32, url: &str, to: &Path) {
        let _ = std::fs::remove_file(to);
        let (_, stderr) = self
            .run(
                width,
                height,
                &[format!("--screenshot={}", to.display())],
                url,
            )
            .await;
        let len = std::fs::metadata(to).map(|m| m.len()).unwrap_or(0);
        assert!(
            len > 1000,
            "screenshot {} not written: {stderr}",
            to.display()
        );
        let head = std::fs::read(to).expect("png");
        assert_eq!(&head[1..4], b"PNG", "{} is a PNG", to.display());
    }
}

/// Where screenshots are kept for people to look at.
pub fn artifacts() -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("test-artifacts");
    std::fs::create_dir_all(&dir).expect("artifacts dir");
    dir
}
