//! `poolpipe serve-rtsp`: a test pattern or an H.264 MP4 over RTSP.

use super::CliError;

/// Arguments of `poolpipe serve-rtsp`.
#[derive(Debug, clap::Args)]
pub struct ServeRtspArgs {
    /// `test://PATTERN` or an MP4 file.
    pub media: String,
    /// TCP port.
    #[arg(long, default_value_t = 8554)]
    pub port: u16,
    /// Address to bind.
    #[arg(long, default_value = "127.0.0.1")]
    pub address: String,
    /// Mount path.
    #[arg(long, default_value = "/cam")]
    pub mount: String,
}

/// Serves until killed.
pub fn run(a: ServeRtspArgs) -> Result<(), CliError> {
    crate::rtsp::serve(&crate::rtsp::ServeConfig {
        address: a.address,
        port: a.port,
        mount: a.mount,
        media: a.media,
    })
    .map_err(|e| CliError::Runtime(e.to_string()))
}
