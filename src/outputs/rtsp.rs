//! `rtsp` outputs: each stream's drawn frames as H.264 at `rtsp://ADDRESS:PORT/STREAM`
//! (gst-rtsp-server, in this process, on its own GLib main context and thread).
//!
//! A stream is mounted at its first frame (its picture size fixes the caps). The mount's media
//! is shared by its clients and made when the first one connects:
//! `appsrc ! videoconvert ! x264enc tune=zerolatency speed-preset=ultrafast ! rtph264pay`. While
//! no client watches a stream its frames are not encoded (counted as `unwatched`).

use std::collections::HashMap;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use gstreamer as gst;
use gstreamer::glib;
use gstreamer::prelude::*;
use gstreamer_app as gst_app;
use gstreamer_rtsp_server as rtsp_server;
use gstreamer_rtsp_server::prelude::*;

use super::{Job, OutputCounters, OutputError, draw, sanitize};
use crate::config::OutputSpec;

/// The appsrc of each watched stream, with the picture size its caps were made for.
type Sources = Arc<Mutex<HashMap<String, gst_app::AppSrc>>>;

/// A running RTSP server of one output.
pub struct Server {
    server: rtsp_server::RTSPServer,
    main_loop: glib::MainLoop,
    thread: Mutex<Option<JoinHandle<()>>>,
    sources: Sources,
    /// Streams mounted, with their picture size.
    mounted: Mutex<HashMap<String, (u32, u32)>>,
    base: String,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Server {
    /// Listens on the output's address and port (a port in use is an error here, at start).
    pub fn start(spec: &OutputSpec) -> Result<Server, OutputError> {
        let fail = |message: String| OutputError::Start {
            output: spec.name.clone(),
            message,
        };
        gst::init().map_err(|e| fail(e.to_string()))?;
        // gst-rtsp-server binds lazily on some systems; a listener first makes "in use" certain.
        std::net::TcpListener::bind((spec.address.as_str(), spec.port)).map_err(|e| {
            fail(format!(
                "cannot listen for RTSP on {}:{}: {e}",
                spec.address, spec.port
            ))
        })?;
        let server = rtsp_server::RTSPServer::new();
        server.set_address(&spec.address);
        server.set_service(&spec.port.to_string());
        let context = glib::MainContext::new();
        server.attach(Some(&context)).map_err(|e| {
            fail(format!(
                "cannot listen for RTSP on {}:{}: {e}",
                spec.address, spec.port
            ))
        })?;
        let main_loop = glib::MainLoop::new(Some(&context), false);
        let thread = {
            let l = main_loop.clone();
            std::thread::Builder::new()
                .name(format!("rtsp-{}", spec.name))
                .spawn(move || l.run())
                .map_err(|_| OutputError::Thread(spec.name.clone()))?
        };
        let base = format!("rtsp://{}:{}", spec.address, spec.port);
        tracing::info!(output = %spec.name, url = %format!("{base}/STREAM"), "RTSP output listening.");
        Ok(Server {
            server,
            main_loop,
            thread: Mutex::new(Some(thread)),
            sources: Arc::default(),
            mounted: Mutex::new(HashMap::new()),
            base,
        })
    }

    /// Where each mounted stream is served.
    pub fn urls(&self) -> Vec<String> {
        let mut u: Vec<String> = lock(&self.mounted)
            .keys()
            .map(|m| format!("{}/{m}", self.base))
            .collect();
        u.sort();
        u
    }

    /// Mounts `stream` at `/STREAM` for pictures of `size`.
    fn mount(&self, spec: &OutputSpec, mount: &str, size: (u32, u32)) {
        let Some(mounts) = self.server.mount_points() else {
            return;
        };
        let factory = rtsp_server::RTSPMediaFactory::new();
        factory.set_launch(&format!(
            "( appsrc name=src is-live=true format=time do-timestamp=true \
             caps=video/x-raw,format=RGB,width={},height={},framerate=0/1 \
             ! videoconvert ! video/x-raw,format=I420 \
             ! x264enc tune=zerolatency speed-preset=ultrafast bitrate={} key-int-max=15 \
             ! rtph264pay name=pay0 pt=96 config-interval=1 )",
            size.0, size.1, spec.bitrate_kbps
        ));
        factory.set_shared(true);
        let sources = self.sources.clone();
        let name = mount.to_string();
        factory.connect_media_configure(move |_, media| {
            let element = media.element();
            let src = element
                .downcast_ref::<gst::Bin>()
                .and_then(|b| b.by_name("src"))
                .and_then(|e| e.downcast::<gst_app::AppSrc>().ok());
            if let Some(src) = src {
                src.set_max_bytes(16 * 1024 * 1024);
                lock(&sources).insert(name.clone(), src);
            }
            let (sources, name) = (sources.clone(), name.clone());
            media.connect_unprepared(move |_| {
                lock(&sources).remove(&name);
            });
        });
        mounts.add_factory(&format!("/{mount}"), factory);
        tracing::info!(output = %spec.name, url = %format!("{}/{mount}", self.base), "Stream served over RTSP.");
    }

    /// The output's thread: mounts streams as they come, and draws and pushes each frame of a
    /// watched stream.
    pub fn run(&self, spec: &OutputSpec, rx: &flume::Receiver<Job>, counters: &OutputCounters) {
        for job in rx.iter() {
            let mount = sanitize(&job.stream);
            let size = (job.frame.image.width, job.frame.image.height);
            let known = lock(&self.mounted).get(&mount).copied();
            match known {
                None => {
                    self.mount(spec, &mount, size);
                    lock(&self.mounted).insert(mount.clone(), size);
                }
                Some(s) if s != size => {
                    // The caps were made for the first size; a stream that changes size keeps
                    // its mount and these frames are not sent.
                    counters.failed.fetch_add(1, Relaxed);
                    continue;
                }
                Some(_) => {}
            }
            let Some(src) = lock(&self.sources).get(&mount).cloned() else {
                counters.unwatched.fetch_add(1, Relaxed);
                continue;
            };
            let canvas = draw(spec, &job);
            match src.push_buffer(gst::Buffer::from_mut_slice(canvas.data)) {
                Ok(_) => {
                    counters.written.fetch_add(1, Relaxed);
                }
                Err(_) => {
                    counters.unwatched.fetch_add(1, Relaxed);
                }
            }
        }
    }

    /// Stops serving.
    pub fn stop(&self) {
        for (_, src) in lock(&self.sources).drain() {
            let _ = src.end_of_stream();
        }
        self.main_loop.quit();
        if let Some(t) = lock(&self.thread).take() {
            let _ = t.join();
        }
    }
}
