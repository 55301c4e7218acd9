//! poolpipe: a video analytics stream processor.
//!
//! Camera streams come in through GStreamer, every frame runs through a chain of neural-network
//! stages on pools of workers, a batcher groups frames at every stage under per-frame deadlines,
//! and results go to sinks. See `README.md` for how to run it and `../shared/DESIGN.md` for why.
//!
//! # Layout
//!
//! - [`alloc`]: glibc allocator settings that keep RSS flat over long runs.
//! - [`api`]: the HTTP API of a running pipeline (health, status, metrics, streams, reload).
//! - [`cli`]: the command line (`run`, `validate`, `split`, `profile`, `bench`, `serve-rtsp`);
//!   `main.rs` only calls it.
//! - [`config`]: pipeline files and model manifests: load, validate (pure, collects every error
//!   with file:line:column), resolve into a runnable description.
//! - [`clock`]: monotonic time behind a trait, so time-dependent logic can be driven by tests.
//! - [`frame`]: the frame that flows through a pipeline and what stages attach to it.
//! - [`ingest`]: GStreamer sources (RTSP, files, test patterns) -> frames, with reconnects.
//! - [`batcher`]: batching policies (pure state): fixed, AIMD, reservation-based deadline.
//! - [`device`]: device kinds of pools (`cpu`, `emulated:<class>`) and the emulated device.
//! - [`engine`]: the synchronous `Engine` trait and its backends (ONNX Runtime on the CPU, no-op).
//! - [`postprocess`]: turning model outputs into results (classes, text boxes, text).
//! - [`metrics`]: Prometheus metrics read from the pipeline's counters at scrape time.
//! - [`partition`]: cut points of ONNX graphs, block extraction, balanced splitting.
//! - [`pipeline`]: builds and runs the stage graph: channels, workers, accounting, shutdown.
//! - [`planner`]: the MILP planner (cuts, classes, shares, batch sizes, device counts), its
//!   baselines and an independent plan checker.
//! - [`profile`]: latency profiles per block, device class, share and batch size; cut sizes.
//! - [`sim`]: the discrete-event simulator: plans served on a virtual clock by the runtime's
//!   batching policies, with arrivals (Poisson, bursty, traces) and a search for the 99% load.
//! - [`sinks`]: where results go: JSON lines, MQTT, NATS, Redis Streams, Kafka, HTTP webhooks,
//!   each behind a bounded buffer with retries and delivery counters.
//! - [`stats`]: per-stream and per-stage counters and latency samples.
//! - [`rtsp`]: a small RTSP server (used by tests and for local experiments).
//! - [`bench`]: the `bench` subcommands that print measured figures.

pub mod alloc;
pub mod api;
pub mod batcher;
pub mod bench;
pub mod cli;
pub mod clock;
pub mod config;
pub mod device;
pub mod engine;
pub mod frame;
pub mod ingest;
pub mod metrics;
pub mod partition;
pub mod pipeline;
pub mod planner;
pub mod postprocess;
pub mod profile;
pub mod rtsp;
pub mod sim;
pub mod sinks;
pub mod stats;
