//! What happens to detections after the model: a multi-object tracker ([`tracker`]) gives them
//! identities across frames, and rules ([`rules`]) turn tracks into events (line crossings,
//! zone entries, exits and dwell) and counts. [`StreamAnalytics`] is both for one stream.
//!
//! All of it is pure state per stream, driven by the frame's media time, so tests and the
//! benchmark drive it directly; the pipeline runs it where every frame of a stream ends up (the
//! publisher).

pub mod rules;
pub mod tracker;

use crate::frame::Object;
use rules::{Event, RuleConfig, RuleState, Tracked};
use tracker::{Detection, Tracker, TrackerParams};

/// What one frame caused.
#[derive(Debug, Default)]
pub struct FrameAnalytics {
    /// Events, in the order the rules raised them.
    pub events: Vec<Event>,
    /// Each rule's counts after the frame, by rule name.
    pub counts: serde_json::Map<String, serde_json::Value>,
}

/// The tracker and the rule states of one stream.
#[derive(Debug, Clone)]
pub struct StreamAnalytics {
    /// The stream's tracker.
    pub tracker: Tracker,
    rules: Vec<RuleState>,
}

impl StreamAnalytics {
    /// Fresh state for stream `stream`: a tracker, and the rules that apply to it (objects a
    /// rule has not seen for the tracker's lost-track time are forgotten).
    pub fn new(params: &TrackerParams, rules: &[RuleConfig], stream: &str) -> Self {
        let forget = params.max_lost_ms as f64 / 1e3;
        Self {
            tracker: Tracker::new(params.clone()),
            rules: rules
                .iter()
                .filter(|r| r.streams.is_empty() || r.streams.iter().any(|s| s == stream))
                .map(|r| RuleState::new(r.clone(), forget))
                .collect(),
        }
    }

    /// Tracks the objects of frame `seq` at media time `t` (setting their `track_id`) and runs
    /// the rules on a frame of `size` pixels.
    pub fn step(
        &mut self,
        t: f64,
        seq: u64,
        size: (u32, u32),
        objects: &mut [Object],
    ) -> FrameAnalytics {
        let dets: Vec<Detection> = objects
            .iter()
            .map(|o| Detection {
                class: o.class_id,
                score: o.score,
                corners: o.bbox.corners(),
            })
            .collect();
        let before = self.tracker.out_of_order;
        for (o, id) in objects.iter_mut().zip(self.tracker.update(t, seq, &dets)) {
            o.track_id = id;
        }
        // A frame older than the last one tracked gets ids, but the rules have moved on: fed an
        // earlier position they would see objects cross back.
        let stale = self.tracker.out_of_order > before;
        let tracked: Vec<Tracked<'_>> = objects
            .iter()
            .zip(&dets)
            .filter_map(|(o, d)| {
                Some(Tracked {
                    id: o.track_id?,
                    label: &o.label,
                    class_id: o.class_id,
                    corners: d.corners,
                })
            })
            .collect();
        let mut out = FrameAnalytics::default();
        for r in &mut self.rules {
            if !stale {
                out.events.extend(r.update(t, size, &tracked));
            }
            out.counts.insert(r.name().to_string(), r.counts());
        }
        out
    }
}
