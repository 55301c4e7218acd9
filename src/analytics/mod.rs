//! What happens to detections after the model: a multi-object tracker ([`tracker`]) gives them
//! identities across frames, and rules ([`rules`]) turn tracks into events (line crossings,
//! zone entries, exits and dwell) and counts.
//!
//! Both are pure state per stream, driven by the frame's media time, so tests and the
//! simulator can drive them; the pipeline runs them where every frame of a stream ends up (the
//! publisher).

pub mod rules;
pub mod tracker;
