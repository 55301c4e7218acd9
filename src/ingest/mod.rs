//! GStreamer sources -> frames.
//!
//! Each source runs on its own thread: it builds a GStreamer pipeline from a launch string
//! (`rtspsrc`/`filesrc ! decodebin`/`videotestsrc`, then `videorate`, `videoconvert`,
//! `videoscale` to the first stage's input size and pixel format, then `appsink`), pulls samples,
//! and hands frames to the first stage's bounded queue. Decoding, scaling and colour conversion
//! happen in GStreamer; Rust only copies the final image.
//!
//! A live source (RTSP) that errors, ends, or stalls is torn down and rebuilt after a capped
//! exponential backoff, on its own thread, so other streams never notice. A file ends at EOS (or
//! starts again with `loop = true`).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use gstreamer as gst;
use gstreamer::prelude::*;
use gstreamer_app as gst_app;
use gstreamer_video as gst_video;

use crate::admission::Refused;
use crate::clock::SharedClock;
use crate::config::{ImageSpec, Pace, SourceKind, SourceSpec, Transport};
use crate::frame::{Frame, Image};
use crate::stats::Stats;

/// Errors of sources.
#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    /// GStreamer could not be initialised.
    #[error("GStreamer could not be initialised: {0}")]
    Init(String),
    /// A GStreamer element that the source needs is not installed.
    #[error("GStreamer element `{element}` is missing: install {package}")]
    MissingElement {
        /// Element factory name.
        element: String,
        /// Debian package that ships it.
        package: &'static str,
    },
    /// The launch string could not be turned into a pipeline.
    #[error("cannot build the GStreamer pipeline: {0}")]
    Build(String),
    /// The pipeline reported an error.
    #[error("GStreamer error from {element}: {message}")]
    Pipeline {
        /// The element that reported it.
        element: String,
        /// Error and debug text (credentials removed).
        message: String,
    },
}

/// Initialises GStreamer once.
pub fn init() -> Result<(), IngestError> {
    gst::init().map_err(|e| IngestError::Init(e.to_string()))
}

/// Checks that every element a launch string names is installed.
pub fn check_elements(elements: &[impl AsRef<str>]) -> Result<(), IngestError> {
    crate::elements::check(elements).map_err(|m| IngestError::MissingElement {
        element: m.element,
        package: m.package,
    })
}

/// Quotes a launch-string property value.
fn quote(s: &str) -> String {
    format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""))
}

/// The launch string of a source and the elements it needs. The string may contain credentials:
/// never log it.
pub fn launch_string(spec: &SourceSpec, fmt: &ImageSpec) -> (String, Vec<String>) {
    let mut elements: Vec<String> = ["identity", "videoconvert", "videoscale", "appsink"]
        .map(String::from)
        .to_vec();
    // The decoder: decodebin's choice, or NVIDIA's behind a parser (parsebin depayloads and
    // demuxes; the codec's parser gives the decoder the stream format it takes).
    let (decoder, decoder_elements) = match spec.decode.nvdec_elements() {
        Some((parser, dec)) => (
            format!("parsebin ! {parser} ! {dec}"),
            vec!["parsebin".to_string(), parser.to_string(), dec],
        ),
        None => ("decodebin".to_string(), vec!["decodebin".to_string()]),
    };
    let head = match &spec.kind {
        SourceKind::Rtsp {
            url,
            transport,
            latency_ms,
        } => {
            elements.push("rtspsrc".into());
            elements.extend(decoder_elements);
            let proto = match transport {
                Transport::Tcp => "tcp",
                Transport::Udp => "udp",
            };
            format!(
                "rtspsrc location={} protocols={proto} latency={latency_ms} ! {decoder}",
                quote(url)
            )
        }
        SourceKind::File { path } => {
            elements.push("filesrc".into());
            elements.extend(decoder_elements);
            format!(
                "filesrc location={} ! {decoder}",
                quote(&path.to_string_lossy())
            )
        }
        SourceKind::Test { pattern } => {
            elements.push("videotestsrc".into());
            let live = spec.pace == Pace::Realtime;
            let n = spec
                .num_buffers
                .map_or(String::new(), |n| format!(" num-buffers={n}"));
            let fps = spec.max_fps.unwrap_or(30);
            format!(
                "videotestsrc pattern={pattern} is-live={live}{n} ! video/x-raw,framerate={fps}/1"
            )
        }
    };
    let rate = match spec.max_fps {
        Some(f) if !matches!(spec.kind, SourceKind::Test { .. }) => {
            elements.push("videorate".into());
            format!(" ! videorate drop-only=true max-rate={f}")
        }
        _ => String::new(),
    };
    // Files in real time are paced by the pipeline clock right after decoding, before anything
    // may drop a frame (frames dropped after a synchronised sink would let the file race ahead of
    // the clock); live sources pace themselves.
    let pace = if matches!(spec.kind, SourceKind::File { .. }) && spec.pace == Pace::Realtime {
        " ! identity name=pace sync=true silent=true"
    } else {
        ""
    };
    // Width and height 0: the source's own size (square pixels).
    let size = if fmt.width > 0 && fmt.height > 0 {
        format!(",width={},height={}", fmt.width, fmt.height)
    } else {
        String::new()
    };
    let launch = format!(
        "{head}{pace}{rate} ! identity name=gate silent=true ! videoconvert ! videoscale ! video/x-raw,format={}{size},pixel-aspect-ratio=1/1 \
         ! appsink name=sink sync=false max-buffers=2 drop=false",
        fmt.pixel_format.gst_name(),
    );
    (launch, elements)
}

/// What a source shares with the rest of the pipeline.
#[derive(Clone)]
pub struct SourceContext {
    /// Index of the stream.
    pub stream: usize,
    /// The stream's lane into its flow.
    pub tx: crate::admission::Inlet,
    /// Counters.
    pub stats: Arc<Stats>,
    /// Pipeline clock (capture times and deadlines).
    pub clock: SharedClock,
    /// Latency budget in nanoseconds (shared, so that a reload can change it while running).
    pub slo: Arc<AtomicU64>,
    /// Set when the source must stop (the whole pipeline stops, or this stream is removed).
    pub stop: Arc<AtomicBool>,
    /// Frames all sources together may still ingest (`--max-frames`), if limited.
    pub budget: Option<Arc<AtomicU64>>,
    /// Told when the stream reconnects (recurrent stages start its state again).
    pub resets: Option<Arc<crate::recurrent::StreamResets>>,
}

/// Why one run of a GStreamer pipeline ended.
#[derive(Debug)]
enum RunEnd {
    Eos,
    Error(IngestError),
    Stall,
    Stop,
}

fn sleep_unless_stopped(d: Duration, stop: &AtomicBool) {
    let until = Instant::now() + d;
    while !stop.load(Ordering::SeqCst) {
        let now = Instant::now();
        if now >= until {
            return;
        }
        std::thread::sleep((until - now).min(Duration::from_millis(50)));
    }
}

/// Runs one source until it ends or is stopped (on the caller's thread).
pub fn run_source(spec: &SourceSpec, fmt: &ImageSpec, ctx: &SourceContext) {
    let counters = ctx.stats.stream(ctx.stream);
    let uri = spec.redacted_uri();
    let mut backoff = spec.reconnect_min;
    let mut seq = 0u64;
    loop {
        if ctx.stop.load(Ordering::SeqCst) {
            break;
        }
        let seq_before = seq;
        let end = run_once(spec, fmt, ctx, &mut seq);
        let got_frames = seq > seq_before;
        match end {
            RunEnd::Stop => break,
            RunEnd::Error(e @ (IngestError::MissingElement { .. } | IngestError::Build(_))) => {
                counters.source_error();
                tracing::error!(stream = %spec.name, uri = %uri, error = %e, "Source cannot start.");
                break;
            }
            RunEnd::Eos if !spec.is_live() => {
                if spec.looping && got_frames {
                    tracing::debug!(stream = %spec.name, "End of file, starting again.");
                    continue;
                }
                tracing::info!(stream = %spec.name, frames = seq, "Source ended.");
                break;
            }
            RunEnd::Stall if !spec.is_live() => {
                counters.source_error();
                tracing::error!(stream = %spec.name, uri = %uri, timeout_ms = spec.stall_timeout.as_millis() as u64, "Source failed: no frame and no end of file within the stall timeout.");
                break;
            }
            RunEnd::Error(e) if !spec.is_live() => {
                counters.source_error();
                tracing::error!(stream = %spec.name, uri = %uri, error = %e, "Source failed.");
                break;
            }
            end => {
                if got_frames {
                    backoff = spec.reconnect_min;
                }
                let why = match end {
                    RunEnd::Eos => "end of stream".to_string(),
                    RunEnd::Stall => format!("no frame for {} ms", spec.stall_timeout.as_millis()),
                    RunEnd::Error(e) => {
                        counters.source_error();
                        e.to_string()
                    }
                    RunEnd::Stop => unreachable!("handled above"),
                };
                tracing::warn!(stream = %spec.name, uri = %uri, reason = %why, retry_in_ms = backoff.as_millis() as u64, "Source lost, reconnecting.");
                sleep_unless_stopped(backoff, &ctx.stop);
                if ctx.stop.load(Ordering::SeqCst) {
                    break;
                }
                counters.source_reconnected();
                if let Some(r) = &ctx.resets {
                    r.restarted(ctx.stream, ctx.clock.now());
                }
                backoff = (backoff * 2).min(spec.reconnect_max);
            }
        }
    }
}

/// Removes the source's credentials from text that GStreamer produced.
fn scrub(text: &str, spec: &SourceSpec) -> String {
    match &spec.kind {
        SourceKind::Rtsp { url, .. } => {
            let mut t = text.replace(url.as_str(), &spec.redacted_uri());
            if let Some(pw) = url
                .split("://")
                .nth(1)
                .and_then(|r| r.split('/').next())
                .and_then(|auth| auth.rsplit_once('@'))
                .and_then(|(userinfo, _)| userinfo.split_once(':'))
                .map(|(_, pw)| pw)
                .filter(|pw| !pw.is_empty())
            {
                t = t.replace(pw, "***");
            }
            t
        }
        _ => text.to_string(),
    }
}

fn run_once(spec: &SourceSpec, fmt: &ImageSpec, ctx: &SourceContext, seq: &mut u64) -> RunEnd {
    let (launch, elements) = launch_string(spec, fmt);
    if let Err(e) = check_elements(&elements) {
        return RunEnd::Error(e);
    }
    let pipeline = match gst::parse::launch(&launch) {
        Ok(p) => p,
        Err(e) => return RunEnd::Error(IngestError::Build(scrub(&e.to_string(), spec))),
    };
    let bin = pipeline.clone().dynamic_cast::<gst::Bin>().ok();
    if spec.pace != Pace::Fast || spec.is_live() {
        drop_early(bin.as_ref().and_then(|b| b.by_name("gate")), ctx);
        if let Some(b) = bin.as_ref().filter(|_| spec.is_live()) {
            drop_before_decode(b, spec.max_fps, ctx);
        }
    }
    let end = match bin.and_then(|b| b.by_name("sink")) {
        Some(sink) => match sink.dynamic_cast::<gst_app::AppSink>() {
            Ok(appsink) => pump(spec, ctx, &pipeline, &appsink, seq),
            Err(_) => RunEnd::Error(IngestError::Build("`sink` is not an appsink".into())),
        },
        None => RunEnd::Error(IngestError::Build("no appsink in the pipeline".into())),
    };
    let _ = pipeline.set_state(gst::State::Null);
    end
}

/// Drops a decoded frame before colour conversion and scaling when the stream's lane is full of
/// frames fresh enough to keep (captured within a tenth of the SLO), so that an overloaded
/// pipeline does not spend its CPU converting frames it would drop anyway (counted as
/// `dropped_overload`, and `dropped_early`). Once the waiting frames are older than that, a new
/// one is converted and replaces the oldest. Frames of a `fast` file wait instead.
fn drop_early(gate: Option<gst::Element>, ctx: &SourceContext) {
    let Some(pad) = gate.and_then(|g| g.static_pad("src")) else {
        return;
    };
    let inlet = ctx.tx.clone();
    let counters = ctx.stats.stream(ctx.stream);
    let clock = ctx.clock.clone();
    let slo = ctx.slo.clone();
    pad.add_probe(gst::PadProbeType::BUFFER, move |_, _| {
        let max_age = slo.load(Ordering::Relaxed) / 10;
        if inlet.full_of_fresh(clock.now(), max_age) {
            counters.frame_dropped_early();
            gst::PadProbeReturn::Drop
        } else {
            gst::PadProbeReturn::Ok
        }
    });
}

/// On a live source, cuts a group of pictures short before decoding: a coded frame (not a key
/// frame) that arrives while the stream's lane is full of fresh frames, when the next key frame
/// is due within the freshness window (a tenth of the SLO; the group's length is learnt from the
/// last two key frames), is dropped before the decoder with every frame after it up to the next
/// key frame (`dropped_before_decode`). Dropping the rest of a group is safe: later frames of
/// the group may refer to the dropped one, but they are dropped too, and the key frame refers to
/// nothing before it; a published frame is never decoded from a missing reference. Cutting only
/// the end of a group keeps the stream fresh: a new frame comes within the window. Only where
/// every coded frame would become a frame of the stream: a `max_fps` below the stream's own rate
/// (frames `videorate` would leave out) turns it off, so that `ingested` counts the same frames
/// either way. Not for files: a file is paced after decoding, and frames dropped before that
/// would let it race ahead.
fn drop_before_decode(bin: &gst::Bin, max_fps: Option<u32>, ctx: &SourceContext) {
    let ctx = ctx.clone();
    bin.connect_deep_element_added(move |_, _, element| {
        let video_decoder = element
            .factory()
            .and_then(|f| f.metadata(gst::ELEMENT_METADATA_KLASS).map(str::to_string))
            .is_some_and(|k| k.contains("Decoder") && k.contains("Video"));
        let Some(pad) = element.static_pad("sink").filter(|_| video_decoder) else {
            return;
        };
        let inlet = ctx.tx.clone();
        let counters = ctx.stats.stream(ctx.stream);
        let clock = ctx.clock.clone();
        let slo = ctx.slo.clone();
        let gop = std::sync::Mutex::new(Gop::default());
        pad.add_probe(gst::PadProbeType::BUFFER, move |pad, info| {
            let Some(buffer) = info.buffer() else {
                return gst::PadProbeReturn::Ok;
            };
            let key = !buffer.flags().contains(gst::BufferFlags::DELTA_UNIT);
            let pts = buffer.pts().map(|t| t.nseconds());
            let mut g = gop.lock().unwrap_or_else(|e| e.into_inner());
            let drop = g.next(key, pts, |next_key_in| {
                let max_age = slo.load(Ordering::Relaxed) / 10;
                next_key_in <= max_age
                    && inlet.full_of_fresh(clock.now(), max_age)
                    && every_frame_counts(pad, max_fps)
            });
            if drop {
                counters.frame_dropped_before_decode();
                gst::PadProbeReturn::Drop
            } else {
                gst::PadProbeReturn::Ok
            }
        });
    });
}

/// A stream's groups of pictures, as seen before the decoder.
#[derive(Debug, Default)]
struct Gop {
    /// Time stamp of the last key frame.
    last_key: Option<u64>,
    /// Time between the last two key frames.
    length: Option<u64>,
    /// Whether the rest of the current group is being dropped.
    dropping: bool,
}

impl Gop {
    /// Whether to drop a coded frame: never a key frame (it ends any cut); once a frame is
    /// dropped, every frame up to the next key frame; else a frame for which `cut(time until the
    /// next key frame is due)` says so.
    fn next(&mut self, key: bool, pts: Option<u64>, cut: impl FnOnce(u64) -> bool) -> bool {
        if key {
            if let (Some(now), Some(last)) = (pts, self.last_key) {
                self.length = now.checked_sub(last).filter(|l| *l > 0);
            }
            self.last_key = pts;
            self.dropping = false;
            return false;
        }
        if !self.dropping
            && let (Some(now), Some(last), Some(len)) = (pts, self.last_key, self.length)
        {
            self.dropping = cut((last + len).saturating_sub(now));
        }
        self.dropping
    }
}

/// Whether every coded frame on `pad` would become a frame of the stream: its frame rate is
/// known and no above `max_fps`.
fn every_frame_counts(pad: &gst::Pad, max_fps: Option<u32>) -> bool {
    let Some(max) = max_fps else { return true };
    pad.current_caps()
        .and_then(|c| {
            c.structure(0)
                .and_then(|st| st.get::<gst::Fraction>("framerate").ok())
        })
        .is_some_and(|f| f.numer() > 0 && f.denom() > 0 && f.numer() <= max as i32 * f.denom())
}

fn pump(
    spec: &SourceSpec,
    ctx: &SourceContext,
    pipeline: &gst::Element,
    appsink: &gst_app::AppSink,
    seq: &mut u64,
) -> RunEnd {
    let bus = match pipeline.bus() {
        Some(b) => b,
        None => return RunEnd::Error(IngestError::Build("pipeline without a bus".into())),
    };
    if let Err(e) = pipeline.set_state(gst::State::Playing) {
        // The bus usually holds the reason.
        if let Some(end) = bus_error(&bus, spec) {
            return end;
        }
        return RunEnd::Error(IngestError::Build(e.to_string()));
    }
    let mut last_frame = Instant::now();
    let mut video_info: Option<gst_video::VideoInfo> = None;
    loop {
        if ctx.stop.load(Ordering::SeqCst) {
            return RunEnd::Stop;
        }
        if let Some(end) = bus_error(&bus, spec) {
            return end;
        }
        match appsink.try_pull_sample(gst::ClockTime::from_mseconds(100)) {
            Some(sample) => {
                last_frame = Instant::now();
                if let Some(end) = deliver(spec, ctx, &sample, &mut video_info, seq) {
                    return end;
                }
            }
            None => {
                if appsink.is_eos() {
                    return RunEnd::Eos;
                }
                // Files stall too: a demuxer can wait forever on a damaged file (seen with an
                // MP4 cut short), which would keep the pipeline from ever ending.
                if last_frame.elapsed() > spec.stall_timeout {
                    return RunEnd::Stall;
                }
            }
        }
    }
}

/// An error waiting on the bus, if any.
fn bus_error(bus: &gst::Bus, spec: &SourceSpec) -> Option<RunEnd> {
    while let Some(msg) = bus.pop_filtered(&[gst::MessageType::Error, gst::MessageType::Warning]) {
        match msg.view() {
            gst::MessageView::Error(err) => {
                let element = msg
                    .src()
                    .map(|s| s.path_string().to_string())
                    .unwrap_or_else(|| "?".into());
                let debug = err.debug().map(|d| format!(" ({d})")).unwrap_or_default();
                return Some(RunEnd::Error(IngestError::Pipeline {
                    element,
                    message: scrub(&format!("{}{debug}", err.error()), spec),
                }));
            }
            gst::MessageView::Warning(w) => {
                tracing::debug!(stream = %spec.name, warning = %scrub(&w.error().to_string(), spec), "GStreamer warning.");
            }
            _ => {}
        }
    }
    None
}

/// A decoded GStreamer buffer whose first `len` bytes are the packed image.
struct PackedPixels {
    /// The buffer, mapped for reading for as long as the frame lives.
    mapped: gst::MappedBuffer<gst::buffer::Readable>,
    /// Bytes of the image (the buffer may be longer).
    len: usize,
}

impl AsRef<[u8]> for PackedPixels {
    fn as_ref(&self) -> &[u8] {
        &self.mapped.as_slice()[..self.len]
    }
}

/// Turns a sample into a frame and hands it on. Returns `Some` when the source must stop.
fn deliver(
    spec: &SourceSpec,
    ctx: &SourceContext,
    sample: &gst::Sample,
    video_info: &mut Option<gst_video::VideoInfo>,
    seq: &mut u64,
) -> Option<RunEnd> {
    let counters = ctx.stats.stream(ctx.stream);
    let (Some(buffer), Some(caps)) = (sample.buffer(), sample.caps()) else {
        return None;
    };
    if video_info.is_none() {
        *video_info = gst_video::VideoInfo::from_caps(caps).ok();
    }
    let info = video_info.as_ref()?;
    let (w, h) = (info.width() as usize, info.height() as usize);
    let stride = info.stride()[0] as usize;
    let pixels: crate::frame::Pixels = if stride == w * 3 {
        // Rows are packed: keep GStreamer's buffer, no copy.
        let mapped = buffer.copy().into_mapped_buffer_readable().ok()?;
        if mapped.len() < w * h * 3 {
            return None;
        }
        Box::new(PackedPixels {
            mapped,
            len: w * h * 3,
        })
    } else {
        let map = buffer.map_readable().ok()?;
        let data = map.as_slice();
        if data.len() < stride * (h - 1) + w * 3 {
            return None;
        }
        let mut rows = Vec::with_capacity(w * h * 3);
        for y in 0..h {
            rows.extend_from_slice(&data[y * stride..y * stride + w * 3]);
        }
        Box::new(rows)
    };
    let format = if info.format() == gst_video::VideoFormat::Bgr {
        crate::frame::PixelFormat::BGR
    } else {
        crate::frame::PixelFormat::RGB
    };
    let pts = buffer.pts().map(|t| Duration::from_nanos(t.nseconds()));
    let this_seq = *seq;
    *seq += 1;
    if let Some(budget) = &ctx.budget
        && budget
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_err()
    {
        return Some(RunEnd::Stop);
    }
    let now = ctx.clock.now();
    let mut frame = Frame::new(
        ctx.stream,
        this_seq,
        Arc::new(Image {
            width: w as u32,
            height: h as u32,
            format,
            data: pixels,
        }),
        now,
        now + ctx.slo.load(Ordering::Relaxed),
    );
    frame.pts = pts;
    let blocking = !spec.is_live() && spec.pace == Pace::Fast;
    if blocking {
        // Offline processing: wait for room, but stay responsive to a stop.
        let mut frame = frame;
        loop {
            match ctx.tx.send_timeout(frame, Duration::from_millis(100)) {
                Ok(()) => {
                    counters.frame_ingested();
                    return None;
                }
                Err(Refused::Full(f)) => {
                    if ctx.stop.load(Ordering::SeqCst) {
                        return Some(RunEnd::Stop);
                    }
                    frame = *f;
                }
                Err(Refused::Closed(_)) => return Some(RunEnd::Stop),
            }
        }
    }
    counters.frame_ingested();
    match ctx.tx.try_send(frame) {
        Ok(None) => None,
        Ok(Some(_older)) => {
            // The lane was full: its oldest frame made room for this one.
            counters.frame_dropped_overload();
            None
        }
        Err(Refused::Full(_)) => {
            counters.frame_dropped_overload();
            None
        }
        Err(Refused::Closed(_)) => {
            // The pipeline is gone; the frame was counted, so count where it went.
            counters.frame_dropped_overload();
            Some(RunEnd::Stop)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    fn spec(kind: SourceKind) -> SourceSpec {
        SourceSpec {
            name: "cam".into(),
            decode: Default::default(),
            kind,
            max_fps: Some(5),
            looping: false,
            pace: Pace::Realtime,
            reconnect_min: Duration::from_millis(10),
            reconnect_max: Duration::from_millis(100),
            stall_timeout: Duration::from_secs(1),
            num_buffers: None,
            flow: None,
            priority: 1,
        }
    }

    #[test]
    fn launch_strings_scale_to_the_model_and_quote_paths() {
        let fmt = ImageSpec::passthrough();
        let (l, el) = launch_string(
            &spec(SourceKind::File {
                path: PathBuf::from("/tmp/a \"b\".mp4"),
            }),
            &fmt,
        );
        assert!(
            l.starts_with("filesrc location=\"/tmp/a \\\"b\\\".mp4\" ! decodebin"),
            "{l}"
        );
        assert!(l.contains("videorate drop-only=true max-rate=5"), "{l}");
        assert!(l.contains("format=RGB,width=320,height=240"), "{l}");
        assert!(
            l.contains("decodebin ! identity name=pace sync=true"),
            "real-time files are paced before anything drops a frame: {l}"
        );
        assert!(el.iter().any(|e| e == "filesrc"));
        // NVIDIA's decoder on GPU 1, behind parsebin and the codec's parser.
        let mut nv = spec(SourceKind::Rtsp {
            url: "rtsp://h/x".into(),
            transport: Transport::Tcp,
            latency_ms: 50,
        });
        nv.decode = crate::config::Decode::Nvdec { gpu: 1, h265: true };
        let (l, el) = launch_string(&nv, &fmt);
        assert!(
            l.contains("! parsebin ! h265parse ! nvh265device1dec !"),
            "{l}"
        );
        assert!(
            el.iter().any(|e| e == "nvh265device1dec") && !el.iter().any(|e| e == "decodebin"),
            "{el:?}"
        );
        nv.decode = crate::config::Decode::Nvdec {
            gpu: 0,
            h265: false,
        };
        assert!(
            launch_string(&nv, &fmt)
                .0
                .contains("! h264parse ! nvh264dec !")
        );
        let (l, _) = launch_string(
            &spec(SourceKind::Rtsp {
                url: "rtsp://u:p@h/x".into(),
                transport: Transport::Udp,
                latency_ms: 50,
            }),
            &fmt,
        );
        assert!(l.contains("protocols=udp latency=50"), "{l}");
        assert!(
            !l.contains("sync=true"),
            "live sources pace themselves: {l}"
        );
    }

    #[test]
    fn only_the_end_of_a_group_of_pictures_is_cut_and_key_frames_always_pass() {
        const MS: u64 = 1_000_000;
        let mut g = Gop::default();
        // Groups of 10 frames at 10 frames/s; cut when the next key frame is due within 300 ms.
        let mut decoded = Vec::new();
        for i in 0..40u64 {
            let key = i % 10 == 0;
            if !g.next(key, Some(i * 100 * MS), |due| due <= 300 * MS) {
                decoded.push(i);
            }
        }
        // The first group is only measured; afterwards frames 7, 8, 9 of each group go.
        let expected: Vec<u64> = (0..40u64).filter(|i| *i < 10 || i % 10 < 7).collect();
        assert_eq!(decoded, expected);
        // Once cut, the rest of the group goes even where `cut` would say no; the key frame
        // ends it.
        let mut g = Gop::default();
        assert!(!g.next(true, Some(0), |_| true));
        assert!(!g.next(true, Some(1000), |_| true));
        assert!(g.next(false, Some(1100), |_| true));
        assert!(g.next(false, Some(1200), |_| false));
        assert!(!g.next(true, Some(2000), |_| true));
        assert!(!g.next(false, Some(2100), |_| false));
        // Without time stamps nothing is cut.
        let mut g = Gop::default();
        assert!(!g.next(true, None, |_| true));
        assert!(!g.next(false, None, |_| true));
    }

    #[test]
    fn scrub_removes_passwords() {
        let s = spec(SourceKind::Rtsp {
            url: "rtsp://admin:hunter2@cam/live".into(),
            transport: Transport::Tcp,
            latency_ms: 50,
        });
        let t = scrub(
            "could not open rtsp://admin:hunter2@cam/live; auth hunter2 failed",
            &s,
        );
        assert!(!t.contains("hunter2"), "{t}");
        assert!(t.contains("rtsp://admin:***@cam/live"), "{t}");
    }

    #[test]
    fn a_missing_element_is_named() {
        init().unwrap();
        let e = check_elements(&["videoconvert", "no-such-element-xyz"]).unwrap_err();
        assert!(e.to_string().contains("`no-such-element-xyz`"), "{e}");
    }
}
