//! Annotated video out of a running pipeline (`[[output]]`): JPEG snapshots, MP4 recordings
//! and RTSP streams of the published frames with their results drawn on them ([`crate::osd`]).
//!
//! The publisher offers each published frame to every output that takes its stream. An output
//! has its own bounded queue and thread: when it falls behind, the frames it cannot take are
//! dropped and counted in its own counters, and nothing else waits. Its thread draws the
//! frame and writes it: a JPEG file, a frame of the stream's MP4 recording (GStreamer:
//! `x264enc ! h264parse ! splitmuxsink` with `mp4mux`, rotated by duration or size, finalised
//! at shutdown), or a frame of the stream's RTSP mount (`rtsp.rs`).

mod file;
mod rtsp;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::thread::JoinHandle;
use std::time::Instant;

use serde::Serialize;

use crate::config::{DrawItem, OutputKind, OutputSpec, SnapshotWhen};
use crate::frame::{Frame, StageOutput};
use crate::osd::{Canvas, Show, Style};

/// Why an output could not start.
#[derive(Debug, thiserror::Error)]
pub enum OutputError {
    /// Its folder cannot be made or written.
    #[error("output `{output}`: cannot write to {}: {source}", folder.display())]
    Folder {
        /// Output name.
        output: String,
        /// The folder.
        folder: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// GStreamer or the RTSP server failed to start.
    #[error("output `{output}`: {message}")]
    Start {
        /// Output name.
        output: String,
        /// Why.
        message: String,
    },
    /// The thread could not start.
    #[error("output `{0}`: cannot start a thread")]
    Thread(String),
}

/// Counters of one output.
#[derive(Debug, Default)]
pub struct OutputCounters {
    /// Frames taken into its queue.
    pub taken: AtomicU64,
    /// Frames written (a snapshot file, a frame of a recording, a frame sent to RTSP clients).
    pub written: AtomicU64,
    /// Frames dropped because its queue was full.
    pub dropped: AtomicU64,
    /// Frames it failed to write.
    pub failed: AtomicU64,
    /// Frames of an RTSP output not sent because no client was watching the stream.
    pub unwatched: AtomicU64,
}

/// Counters of one output at one moment.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct OutputSummary {
    /// Name.
    pub name: String,
    /// Kind.
    pub kind: &'static str,
    /// Frames taken into its queue.
    pub taken: u64,
    /// Frames written.
    pub written: u64,
    /// Frames dropped because its queue was full.
    pub dropped: u64,
    /// Frames it failed to write.
    pub failed: u64,
    /// RTSP: frames no client was watching.
    pub unwatched: u64,
    /// RTSP: where each stream is served.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub urls: Vec<String>,
}

/// One frame for an output's thread.
struct Job {
    stream: Arc<str>,
    frame: Frame,
    /// The display's header line.
    header: String,
    /// Where a `jpeg` output writes it.
    file: Option<PathBuf>,
}

/// A running output, as the publisher sees it.
pub struct Output {
    spec: OutputSpec,
    tx: Option<flume::Sender<Job>>,
    counters: Arc<OutputCounters>,
    thread: Option<JoinHandle<()>>,
    /// `jpeg`: when each stream's last snapshot was taken.
    last: HashMap<Arc<str>, Instant>,
    /// `rtsp`: the server (its mounts are made as streams come).
    rtsp: Option<Arc<rtsp::Server>>,
}

/// What the drawing of an output looks like.
fn style(spec: &OutputSpec) -> (Style, Show) {
    let has = |d: DrawItem| spec.draw.contains(&d);
    (
        Style {
            thickness: spec.thickness,
            font_px: spec.font_px,
            header: has(DrawItem::Header),
            palette: if spec.colors.is_empty() {
                Style::default().palette
            } else {
                spec.colors.clone()
            },
        },
        Show {
            boxes: has(DrawItem::Boxes),
            labels: has(DrawItem::Labels),
            text: has(DrawItem::Text),
            classes: has(DrawItem::Classes),
        },
    )
}

/// The job's frame with what `spec` draws on it.
fn draw(spec: &OutputSpec, job: &Job) -> Canvas {
    let (style, show) = style(spec);
    let mut c = Canvas::from_image(&job.frame.image);
    c.draw(
        &crate::osd::marks_with(&job.frame.outputs, show),
        &job.header,
        &style,
        crate::osd::system_font(),
    );
    c
}

/// Whether a result matches a snapshot condition: a box or top class labelled with one of
/// `when.classes`, or (with `when.text`) recognised text.
pub fn matches(when: &SnapshotWhen, outputs: &[StageOutput]) -> bool {
    let class = |l: &str| when.classes.iter().any(|c| c == l);
    outputs.iter().any(|o| match o {
        StageOutput::Objects(objs) => objs.iter().any(|x| class(&x.label)),
        StageOutput::Classes(c) => c.first().is_some_and(|x| class(&x.label)),
        StageOutput::State(s) => s.top.as_ref().is_some_and(|x| class(&x.label)),
        StageOutput::Texts(lines) => when.text && lines.iter().any(|t| !t.text.trim().is_empty()),
        _ => false,
    })
}

/// Makes `folder` and checks that a file can be written in it.
fn writable(name: &str, folder: &Path) -> Result<(), OutputError> {
    let fail = |source| OutputError::Folder {
        output: name.to_string(),
        folder: folder.to_path_buf(),
        source,
    };
    std::fs::create_dir_all(folder).map_err(fail)?;
    let probe = folder.join(format!(".poolpipe-probe-{}", std::process::id()));
    std::fs::write(&probe, b"").map_err(fail)?;
    let _ = std::fs::remove_file(probe);
    Ok(())
}

/// Starts an output: its folder checked (or its RTSP server listening) and its thread running.
pub fn open(spec: &OutputSpec) -> Result<Output, OutputError> {
    let counters = Arc::new(OutputCounters::default());
    let (tx, rx) = flume::bounded::<Job>(spec.queue);
    let mut spec = spec.clone();
    let rtsp = match spec.kind {
        OutputKind::Jpeg | OutputKind::File => {
            writable(&spec.name, &spec.folder)?;
            // Results name snapshots by absolute path.
            if let Ok(abs) = std::fs::canonicalize(&spec.folder) {
                spec.folder = abs;
            }
            None
        }
        OutputKind::Rtsp => Some(Arc::new(rtsp::Server::start(&spec)?)),
    };
    let thread = {
        let own = spec.clone();
        let counters = counters.clone();
        let rtsp = rtsp.clone();
        std::thread::Builder::new()
            .name(format!("output-{}", spec.name))
            .spawn(move || match own.kind {
                OutputKind::Jpeg => run_jpeg(&own, &rx, &counters),
                OutputKind::File => file::run(&own, &rx, &counters),
                OutputKind::Rtsp => {
                    if let Some(server) = rtsp {
                        server.run(&own, &rx, &counters);
                    }
                }
            })
            .map_err(|_| OutputError::Thread(spec.name.clone()))?
    };
    tracing::info!(output = %spec.name, kind = spec.kind.as_str(), "Output started.");
    Ok(Output {
        spec,
        tx: Some(tx),
        counters,
        thread: Some(thread),
        last: HashMap::new(),
        rtsp,
    })
}

impl Output {
    /// Its counters.
    pub fn counters(&self) -> &Arc<OutputCounters> {
        &self.counters
    }

    /// Its spec.
    pub fn spec(&self) -> &OutputSpec {
        &self.spec
    }

    /// Offers a frame of `stream` that was just published. Returns the file a `jpeg` output
    /// will write it to (what the result names), when it takes one. Never waits.
    pub fn offer(
        &mut self,
        stream: &Arc<str>,
        f: &Frame,
        overlay: &crate::osd::Overlay,
        now: Instant,
    ) -> Option<PathBuf> {
        if !self.spec.takes(stream) {
            return None;
        }
        let file = if self.spec.kind == OutputKind::Jpeg {
            let when = &self.spec.when;
            let due = when
                .every
                .is_some_and(|e| self.last.get(stream).is_none_or(|t| now - *t >= e));
            if !due && !matches(when, &f.outputs) {
                return None;
            }
            Some(
                self.spec
                    .folder
                    .join(format!("{}-{:08}.jpg", sanitize(stream), f.seq)),
            )
        } else {
            None
        };
        let tx = self.tx.as_ref()?;
        let job = Job {
            stream: stream.clone(),
            frame: f.clone(),
            header: crate::osd::header(stream, f, overlay),
            file: file.clone(),
        };
        match tx.try_send(job) {
            Ok(()) => {
                self.counters.taken.fetch_add(1, Relaxed);
                if self.spec.kind == OutputKind::Jpeg {
                    self.last.insert(stream.clone(), now);
                }
                file
            }
            Err(_) => {
                self.counters.dropped.fetch_add(1, Relaxed);
                None
            }
        }
    }

    /// What status reads of it.
    pub fn view(&self) -> OutputView {
        OutputView {
            spec: self.spec.clone(),
            counters: self.counters.clone(),
            rtsp: self.rtsp.clone(),
        }
    }

    /// Lets its thread finish what it holds (recordings are finalised) and waits for it.
    pub fn close(mut self) {
        drop(self.tx.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        if let Some(r) = self.rtsp.take() {
            r.stop();
        }
    }
}

/// An output as status reads it (the output itself lives in the publisher).
#[derive(Clone)]
pub struct OutputView {
    spec: OutputSpec,
    counters: Arc<OutputCounters>,
    rtsp: Option<Arc<rtsp::Server>>,
}

impl OutputView {
    /// Its counters now.
    pub fn summary(&self) -> OutputSummary {
        let c = &self.counters;
        OutputSummary {
            name: self.spec.name.clone(),
            kind: self.spec.kind.as_str(),
            taken: c.taken.load(Relaxed),
            written: c.written.load(Relaxed),
            dropped: c.dropped.load(Relaxed),
            failed: c.failed.load(Relaxed),
            unwatched: c.unwatched.load(Relaxed),
            urls: self
                .rtsp
                .as_deref()
                .map(rtsp::Server::urls)
                .unwrap_or_default(),
        }
    }
}

/// A stream name as part of a file name.
fn sanitize(stream: &str) -> String {
    stream
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "-_.".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect()
}

fn run_jpeg(spec: &OutputSpec, rx: &flume::Receiver<Job>, counters: &OutputCounters) {
    for job in rx.iter() {
        let Some(path) = &job.file else { continue };
        let written = draw(spec, &job)
            .jpeg(spec.quality)
            .map_err(|e| e.to_string())
            .and_then(|bytes| {
                // Written whole, then renamed: a reader never sees half a file.
                let tmp = path.with_extension("jpg.part");
                std::fs::write(&tmp, bytes)
                    .and_then(|()| std::fs::rename(&tmp, path))
                    .map_err(|e| e.to_string())
            });
        match written {
            Ok(()) => {
                counters.written.fetch_add(1, Relaxed);
            }
            Err(e) => {
                counters.failed.fetch_add(1, Relaxed);
                tracing::warn!(output = %spec.name, file = %path.display(), error = %e, "Snapshot not written.");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::{BBox, Class, Object, TextLine};

    fn object(label: &str) -> StageOutput {
        StageOutput::Objects(vec![Object {
            bbox: BBox {
                x: 0.0,
                y: 0.0,
                w: 1.0,
                h: 1.0,
            },
            label: label.into(),
            class_id: 0,
            score: 0.9,
            track_id: None,
        }])
    }

    #[test]
    fn snapshot_conditions_match_classes_and_text() {
        let when = SnapshotWhen {
            every: None,
            classes: vec!["person".into()],
            text: false,
        };
        assert!(matches(&when, &[object("person")]));
        assert!(!matches(&when, &[object("car")]));
        let top = |l: &str| {
            StageOutput::Classes(vec![Class {
                id: 1,
                label: l.into(),
                score: 0.5,
            }])
        };
        assert!(matches(&when, &[top("person")]));
        let text = StageOutput::Texts(vec![TextLine {
            bbox: BBox {
                x: 0.0,
                y: 0.0,
                w: 1.0,
                h: 1.0,
            },
            text: "AB 123".into(),
            score: 0.9,
        }]);
        assert!(!matches(&when, std::slice::from_ref(&text)));
        let when = SnapshotWhen { text: true, ..when };
        assert!(matches(&when, &[text]));
        assert!(!matches(&when, &[StageOutput::Nothing]));
        assert_eq!(sanitize("cam 1/a"), "cam_1_a");
    }
}
