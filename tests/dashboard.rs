//! The dashboard at `/`, opened by headless Chromium (Debian's `chromium`, installed by
//! `setup.sh`) on a running pipeline: a tile per stream with its name, a live preview that is not
//! blank and changes, charts with data points, and nothing on the browser's console. The
//! screenshots are kept under `target/test-artifacts/`.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

/// Headless Chromium on `url`, `args` added (a screenshot or the DOM): `(stdout, stderr)`.
fn chromium(profile: &Path, url: &str, args: &[&str]) -> (String, String) {
    let o = Command::new("chromium")
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--hide-scrollbars",
            "--enable-logging=stderr",
            "--v=0",
            "--window-size=1280,900",
            "--virtual-time-budget=4000",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .args(args)
        .arg(url)
        .output()
        .expect("chromium runs (./setup.sh installs it)");
    (
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

/// What the page logged on the console (Chromium logs every console message and every failed
/// resource load as `CONSOLE` with the page as its source).
fn console(stderr: &str, url: &str) -> Vec<String> {
    stderr
        .lines()
        .filter(|l| l.contains(":CONSOLE") && l.contains(url))
        .map(str::to_string)
        .collect()
}

/// The attribute `name` of the first tag in `html` that starts with `open`.
fn attr(html: &str, open: &str, name: &str) -> Option<String> {
    let tag = &html[html.find(open)?..];
    let tag = &tag[..tag.find('>')?];
    let at = tag.find(&format!("{name}=\""))? + name.len() + 2;
    Some(tag[at..at + tag[at..].find('"')?].to_string())
}

/// The grey pixels of `rect` (`x,y,w,h` in CSS pixels) of a screenshot.
fn crop(shot: &Path, rect: &str) -> Vec<f64> {
    let img = image::open(shot).unwrap().to_luma8();
    let r: Vec<u32> = rect.split(',').map(|v| v.parse().unwrap()).collect();
    let mut px = Vec::new();
    for y in r[1]..(r[1] + r[3]).min(img.height()) {
        for x in r[0]..(r[0] + r[2]).min(img.width()) {
            px.push(f64::from(img.get_pixel(x, y).0[0]));
        }
    }
    px
}

fn variance(px: &[f64]) -> f64 {
    let mean = px.iter().sum::<f64>() / px.len() as f64;
    px.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / px.len() as f64
}

fn artifacts() -> PathBuf {
    let d = common::root().join("target/test-artifacts");
    std::fs::create_dir_all(&d).unwrap();
    d
}

#[test]
fn the_dashboard_shows_a_live_tile_per_stream_with_charts_and_no_console_errors() {
    let dir = tempfile::tempdir().unwrap();
    let p = common::two_test_streams(dir.path(), "dash", 10, "");
    let (child, api) = common::start(
        &p,
        &dir.path().join("summary.json"),
        &["--api", "127.0.0.1:0", "--open"],
        &[],
    );
    common::wait_published(&api, 6);
    // The page is served without a token on loopback, from the binary.
    let (code, page) = common::http("GET", &format!("{api}/"), None, None);
    assert_eq!(code, 200);
    assert!(page.contains("<title>poolpipe</title>"));

    let url = format!("{api}/");
    let profile = dir.path().join("chromium");
    let mut crops = Vec::new();
    for round in 0..2 {
        let (dom, err) = chromium(&profile, &url, &["--dump-dom"]);
        assert!(console(&err, &api).is_empty(), "{:?}", console(&err, &api));
        let shot = artifacts().join(format!("dashboard-{round}.jpg"));
        let (_, err) = chromium(
            &profile,
            &url,
            &[&format!("--screenshot={}", shot.display())],
        );
        assert!(console(&err, &api).is_empty(), "{:?}", console(&err, &api));
        for name in ["left", "right"] {
            // A tile with the stream's name, its preview loaded (where it sits on the page).
            let tile = &dom[dom
                .find(&format!("data-stream=\"{name}\""))
                .unwrap_or_else(|| panic!("no tile for {name}: {dom}"))..];
            assert!(tile.contains(&format!(">{name}</span>")), "{tile}");
            let rect = attr(tile, "<img", "data-rect")
                .unwrap_or_else(|| panic!("{name}: the preview did not load: {tile}"));
            // Charts with data points (a poll a second, four seconds of virtual time).
            let points: u32 = attr(tile, "<svg", "data-points")
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
            assert!(points >= 2, "{name}: {points} points in its first chart");
            let px = crop(&shot, &rect);
            assert!(px.len() > 10_000, "{name}: preview at {rect}");
            let v = variance(&px);
            assert!(v > 100.0, "{name}: the preview is blank (variance {v:.1})");
            crops.push(px);
        }
        if round == 0 {
            std::thread::sleep(Duration::from_secs(2));
        }
    }
    // The previews moved on between the two screenshots (the ball moves; the frame number
    // drawn on each changes).
    for k in 0..2 {
        let (a, b) = (&crops[k], &crops[k + 2]);
        let n = a.len().min(b.len());
        let diff = (0..n).map(|i| (a[i] - b[i]).abs()).sum::<f64>() / n as f64;
        assert!(diff > 0.5, "preview {k} did not change ({diff:.2})");
    }
    assert!(common::stop(child).success());
}
