//! A small RTSP server (gst-rtsp-server) for tests, soak runs and local experiments: it serves a
//! test pattern or an H.264 MP4 file on 127.0.0.1 (or another address).

use gstreamer as gst;
use gstreamer_rtsp_server as rtsp_server;
use gstreamer_rtsp_server::prelude::*;

/// Errors of the RTSP server.
#[derive(Debug, thiserror::Error)]
pub enum RtspError {
    /// GStreamer or the server failed to start.
    #[error("RTSP server: {0}")]
    Start(String),
}

/// What to serve.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    /// Address to bind.
    pub address: String,
    /// TCP port.
    pub port: u16,
    /// Mount path, e.g. `/cam`.
    pub mount: String,
    /// `test://PATTERN` or the path of an H.264 MP4 file.
    pub media: String,
}

/// The media factory launch line for `media`.
pub fn media_launch(media: &str) -> String {
    match media.strip_prefix("test://") {
        Some(pattern) => format!(
            "( videotestsrc is-live=true pattern={pattern} ! video/x-raw,width=640,height=480,framerate=15/1 \
             ! x264enc tune=zerolatency speed-preset=ultrafast key-int-max=15 ! rtph264pay name=pay0 pt=96 config-interval=1 )"
        ),
        None => format!(
            "( filesrc location=\"{}\" ! qtdemux ! h264parse ! rtph264pay name=pay0 pt=96 config-interval=1 )",
            media.replace('"', "\\\"")
        ),
    }
}

/// Serves until the process is stopped.
pub fn serve(cfg: &ServeConfig) -> Result<(), RtspError> {
    gst::init().map_err(|e| RtspError::Start(e.to_string()))?;
    let server = rtsp_server::RTSPServer::new();
    server.set_address(&cfg.address);
    server.set_service(&cfg.port.to_string());
    let mounts = server
        .mount_points()
        .ok_or_else(|| RtspError::Start("no mount points".into()))?;
    let factory = rtsp_server::RTSPMediaFactory::new();
    factory.set_launch(&media_launch(&cfg.media));
    factory.set_shared(true);
    mounts.add_factory(&cfg.mount, factory);
    let main_loop = gstreamer::glib::MainLoop::new(None, false);
    let _source = server.attach(None).map_err(|e| {
        RtspError::Start(format!(
            "cannot listen on {}:{}: {e}",
            cfg.address, cfg.port
        ))
    })?;
    tracing::info!(url = %format!("rtsp://{}:{}{}", cfg.address, cfg.port, cfg.mount), "Serving RTSP.");
    main_loop.run();
    Ok(())
}
