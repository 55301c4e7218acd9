//! poolpipe: a video analytics stream processor.
//!
//! Camera streams come in through GStreamer, every frame runs through a chain of neural-network
//! stages on pools of workers, a batcher groups frames at every stage under per-frame deadlines,
//! and results go to sinks. See `README.md` for how to run it.
//!
//! # Layout
//!
//! Files import downwards only (no cycles between files of `src/`):
//!
//! - [`cli`]: the command line, one file per subcommand (`run`, `validate`/`check`, `split`,
//!   `profile`, `plan`, `simulate`, `serve-rtsp`; `bench` lives in [`mod@bench`]) and the one error
//!   type that maps to the exit codes. `main.rs` only calls it.
//! - [`mod@bench`]: the `bench` subcommands that print measured figures.
//! - [`api`]: the HTTP API of a running pipeline (the dashboard page, health, status, metrics,
//!   streams, snapshots and previews, reload), started by `cli` on the [`pipeline::Live`]
//!   handle of a started pipeline.
//! - [`metrics`]: Prometheus metrics read from the pipeline's counters at scrape time.
//! - [`pipeline`]: builds and runs the stage graph. `build` (a route's queues and threads;
//!   engines), `replan` (re-planning while running), `graph` (queues, batcher threads, pools),
//!   `worker` (a pool's worker threads), `recurrent` (a recurrent stage's threads),
//!   `publisher` (the result schema and the sinks),
//!   `stage` (what each model kind does to a batch), `live` (changes while running).
//! - [`sim`]: the discrete-event simulator: plans served on a virtual clock by the runtime's
//!   batcher driver, with arrivals (Poisson, bursty, traces) and a search for the 99% load.
//! - [`outputs`]: `[[output]]`s: annotated JPEG snapshots, MP4 recordings and RTSP streams,
//!   each on its own bounded queue and thread.
//! - [`control`]: the online control plane: when to re-plan, and re-planning (the simulator's
//!   supervisor and `pipeline::replan` use it).
//! - [`recurrent`]: recurrent stages: a cell run step by step with per-stream or per-item state,
//!   under cellular (or padded) batching; the pipeline's worker threads, tests and
//!   `bench recurrent` drive it.
//! - [`cluster`]: a pipeline across machines: the wire format and gRPC links between the front
//!   node and the nodes that run some of its workers (a remote worker is a `StageRunner`).
//! - [`ingest`]: GStreamer sources (RTSP, files, test patterns) -> frames, with reconnects.
//! - [`device`]: device kinds of pools (`cpu`, `emulated:<class>`, `cuda:N`, `tensorrt:N`) and
//!   the emulated device.
//! - [`engine`]: the `Engine` trait and its backends (ONNX Runtime on the CPU or a GPU, no-op),
//!   and the `StageRunner` trait that devices and engines implement for the pipeline.
//! - [`gpu`]: NVIDIA GPUs (feature `gpu`): what the machine has, telemetry, and the CUDA/TensorRT
//!   provider options of a session; every failure a clear error.
//! - [`elements`]: GStreamer elements a pipeline needs, and the package of each.
//! - [`postprocess`]: turning model outputs into results (classes, text boxes, text, detector
//!   boxes).
//! - [`analytics`]: what follows detections: a multi-object tracker and line/zone rules (pure
//!   state per stream, run by the publisher).
//! - [`config`]: pipeline files and model manifests: parse (TOML with key spans), validate
//!   (pure, collects every error with file:line:column), resolve into a runnable description.
//! - [`batcher`]: batching policies (pure state: fixed, AIMD, reservation-based deadline, the
//!   analytic batch size and wait of a fixed stage, and
//!   `cell`: cellular and padded batching of a recurrent cell's steps), the
//!   one batcher driver (a step: what is late, what goes to which worker, when to look again)
//!   and the batcher thread's loop over it, shared by the runtime, the simulator and the tests.
//! - [`planner`]: the MILP planner (cuts, classes, shares, batch sizes, device counts), its
//!   baselines and an independent plan checker.
//! - [`profile`]: latency profiles per block, device class, share and batch size; cut sizes.
//! - [`partition`]: cut points of ONNX graphs, block extraction, balanced splitting.
//! - [`admission`]: each flow's front: a lane per stream, taken fairly by priority (smooth
//!   weighted round robin, [`wrr`]) and spread over the flow's routes by planned throughput.
//! - [`demand`]: each flow's arrival rate over sliding windows and its burstiness (index of
//!   dispersion), from counts sampled by the run loop.
//! - [`stats`]: per-stream and per-stage counters, bumped through one named method per event.
//! - [`sinks`]: where results go: JSON lines, MQTT, NATS, Redis Streams, Kafka, HTTP webhooks,
//!   each behind a bounded buffer with retries and delivery counters.
//! - [`histogram`]: the log-scale latency histogram of stats, sinks and metrics.
//! - [`panics`]: what is kept of a pipeline thread's panic.
//! - [`osd`]: the on-screen display: a frame's results drawn on a copy of its image; JPEG.
//! - [`frame`]: the frame that flows through a pipeline and what stages attach to it.
//! - [`clock`]: monotonic time behind a trait, so time-dependent logic can be driven by tests.
//! - [`progress`]: progress of long commands on stderr, only when it is a terminal.
//! - [`alloc`]: glibc allocator settings that keep RSS flat over long runs.
//! - [`rtsp`]: a small RTSP server (used by tests and for local experiments).

pub mod admission;
pub mod alloc;
pub mod analytics;
pub mod api;
pub mod batcher;
pub mod bench;
pub mod cli;
pub mod clock;
pub mod cluster;
pub mod config;
pub mod control;
pub mod demand;
pub mod device;
pub mod elements;
pub mod engine;
pub mod frame;
pub mod gpu;
pub mod histogram;
pub mod ingest;
pub mod metrics;
pub mod osd;
pub mod outputs;
pub mod panics;
pub mod partition;
pub mod pipeline;
pub mod planner;
pub mod postprocess;
pub mod profile;
pub mod progress;
pub mod recurrent;
pub mod rtsp;
pub mod sim;
pub mod sinks;
pub mod stats;
pub mod wrr;
