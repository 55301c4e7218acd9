//! GStreamer elements a pipeline needs and the Debian package of each, so that a missing one is
//! named with what to install: by sources at start ([`crate::ingest`]) and by `validate` where a
//! pipeline file asks for one (NVIDIA's decoders).

/// A GStreamer element that is not installed (or, for NVIDIA's, not registered).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("GStreamer element `{element}` is missing: install {package}")]
pub struct MissingElement {
    /// Element factory name.
    pub element: String,
    /// Debian package that ships it.
    pub package: &'static str,
}

/// The Debian package that ships a GStreamer element (for error messages).
pub fn package_of(element: &str) -> &'static str {
    match element {
        "rtspsrc" | "videoflip" | "rtph264depay" | "qtdemux" => "gstreamer1.0-plugins-good",
        "x264enc" => "gstreamer1.0-plugins-ugly",
        "avdec_h264" => "gstreamer1.0-libav",
        "h264parse" | "h265parse" => "gstreamer1.0-plugins-bad",
        e if e.starts_with("nvh26") => {
            "gstreamer1.0-plugins-bad; GStreamer registers NVIDIA's decoders only where the driver's libcuda.so.1 and libnvcuvid.so.1 load, for each GPU they find (no NVIDIA driver or GPU here?)"
        }
        "textoverlay" | "clockoverlay" => "gstreamer1.0-x (pango) and gstreamer1.0-plugins-base",
        _ => "gstreamer1.0-plugins-base",
    }
}

/// Checks that every element is installed (GStreamer must be initialised).
pub fn check(elements: &[impl AsRef<str>]) -> Result<(), MissingElement> {
    for e in elements {
        let e = e.as_ref();
        if gstreamer::ElementFactory::find(e).is_none() {
            return Err(MissingElement {
                element: e.to_string(),
                package: package_of(e),
            });
        }
    }
    Ok(())
}
