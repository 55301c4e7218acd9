//! Tracking and rules in a running pipeline: a [`StreamAnalytics`] for every stream, created
//! when the stream starts and freed when it is removed, fed by the publisher (the one place every
//! frame of a stream passes, whichever route and worker it took).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

pub use crate::analytics::FrameAnalytics;
use crate::analytics::StreamAnalytics;
use crate::config::AnalyticsSpec;
use crate::frame::{Frame, StageOutput};

/// The analytics of every stream.
pub struct Analytics {
    /// Whether the pipeline tracks at all (read without a lock for every frame).
    active: AtomicBool,
    spec: Mutex<AnalyticsSpec>,
    streams: Mutex<HashMap<usize, (String, StreamAnalytics)>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Analytics {
    /// Analytics as the pipeline file says (nothing happens without a tracker).
    pub fn new(spec: &AnalyticsSpec) -> Arc<Self> {
        Arc::new(Self {
            active: AtomicBool::new(spec.tracker.is_some()),
            spec: Mutex::new(spec.clone()),
            streams: Mutex::new(HashMap::new()),
        })
    }

    /// Whether the pipeline tracks and runs rules.
    pub fn is_active(&self) -> bool {
        self.active.load(Ordering::Relaxed)
    }

    fn state(spec: &AnalyticsSpec, name: &str) -> Option<StreamAnalytics> {
        let t = spec.tracker.as_ref()?;
        Some(StreamAnalytics::new(t, &spec.rules, name))
    }

    /// Stream `index` (named `name`) starts: fresh tracks and counts.
    pub fn start_stream(&self, index: usize, name: &str) {
        let state = Self::state(&lock(&self.spec), name);
        let mut streams = lock(&self.streams);
        match state {
            Some(s) => {
                streams.insert(index, (name.to_string(), s));
            }
            None => {
                streams.remove(&index);
            }
        }
    }

    /// Stream `index` was removed: its state is freed (frames of it still in flight are
    /// published without analytics).
    pub fn end_stream(&self, index: usize) {
        lock(&self.streams).remove(&index);
    }

    /// The pipeline file was reloaded: every running stream starts over with the new settings
    /// (its track ids go on from where they were; a stream added again starts from 1).
    pub fn reconfigure(&self, spec: &AnalyticsSpec) {
        let mut old = lock(&self.spec);
        if *old == *spec {
            return;
        }
        *old = spec.clone();
        self.active.store(spec.tracker.is_some(), Ordering::Relaxed);
        let mut streams = lock(&self.streams);
        let old: Vec<(usize, String, u64)> = streams
            .iter()
            .map(|(i, (n, s))| (*i, n.clone(), s.tracker.next_id()))
            .collect();
        streams.clear();
        for (i, n, next) in old {
            if let Some(mut s) = Self::state(spec, &n) {
                // New tracks, but never an id the old tracker gave.
                s.tracker = s.tracker.numbering_from(next);
                streams.insert(i, (n, s));
            }
        }
    }

    /// Tracks the frame's objects (setting their `track_id`) and runs the rules; None when the
    /// pipeline does not track, the frame's stream has no analytics or its route no tracked
    /// detector.
    pub fn process(&self, f: &mut Frame) -> Option<FrameAnalytics> {
        if !self.is_active() {
            return None;
        }
        let pos = lock(&self.spec).tracked.get(f.route).copied().flatten()?;
        let mut streams = lock(&self.streams);
        let (_, st) = streams.get_mut(&f.stream)?;
        let Some(StageOutput::Objects(objects)) = f.outputs.get_mut(pos) else {
            return None;
        };
        // Media time: the frame's timestamp where the source has one.
        let t = f.pts.map_or(f.captured as f64 / 1e9, |p| p.as_secs_f64());
        Some(st.step(t, f.seq, (f.image.width, f.image.height), objects))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::analytics::tracker::TrackerParams;
    use crate::frame::{BBox, Image, Object, PixelFormat};

    fn frame(stream: usize, seq: u64, x: f32) -> Frame {
        Frame {
            stream,
            seq,
            pts: Some(std::time::Duration::from_millis(seq * 100)),
            captured_wall: std::time::SystemTime::now(),
            captured: 0,
            deadline: u64::MAX,
            image: Arc::new(Image::black(100, 100, PixelFormat::RGB)),
            outputs: vec![StageOutput::Objects(vec![Object {
                label: "person".into(),
                class_id: 0,
                score: 0.9,
                bbox: BBox {
                    x,
                    y: 10.0,
                    w: 10.0,
                    h: 20.0,
                },
                track_id: None,
            }])],
            stage_nanos: vec![0],
            entered_stage: 0,
            activation: None,
            kept: None,
            held: None,
            route: 0,
            priority: 1,
        }
    }

    fn ids(f: &Frame) -> Vec<Option<u64>> {
        match &f.outputs[0] {
            StageOutput::Objects(o) => o.iter().map(|o| o.track_id).collect(),
            _ => Vec::new(),
        }
    }

    #[test]
    fn streams_get_their_own_tracks_from_start_to_removal() {
        let spec = AnalyticsSpec {
            tracker: Some(TrackerParams::default()),
            rules: Vec::new(),
            tracked: vec![Some(0)],
        };
        let a = Analytics::new(&spec);
        a.start_stream(0, "a");
        a.start_stream(1, "b");
        for seq in 0..3 {
            let mut f = frame(0, seq, 10.0 + seq as f32);
            assert!(a.process(&mut f).is_some());
            assert_eq!(ids(&f), vec![Some(1)]);
            // Stream b numbers its own tracks.
            let mut g = frame(1, seq, 50.0);
            a.process(&mut g);
            assert_eq!(ids(&g), vec![Some(1)]);
        }
        assert_eq!(lock(&a.streams).len(), 2);
        // Removed: its state is gone and its late frames pass untouched.
        a.end_stream(0);
        assert_eq!(lock(&a.streams).len(), 1);
        let mut f = frame(0, 3, 13.0);
        assert!(a.process(&mut f).is_none());
        assert_eq!(ids(&f), vec![None]);
        // Added again: tracks start over.
        a.start_stream(0, "a");
        let mut f = frame(0, 4, 14.0);
        a.process(&mut f);
        assert_eq!(ids(&f), vec![Some(1)]);
        // A reload with the same settings keeps the tracks; new settings start them over, with
        // the rules that apply to each stream.
        a.reconfigure(&spec);
        let mut f = frame(1, 3, 50.0);
        a.process(&mut f);
        assert_eq!(ids(&f), vec![Some(1)]);
        let mut rule: crate::analytics::rules::RuleConfig = toml::from_str(
            "name = \"door\"\ntype = \"line\"\nline = [[0.5, 0.0], [0.5, 1.0]]\nstreams = [\"b\"]",
        )
        .unwrap();
        rule.anchor = crate::analytics::rules::Anchor::Center;
        let with_rule = AnalyticsSpec {
            rules: vec![rule],
            ..spec.clone()
        };
        a.reconfigure(&with_rule);
        let mut f = frame(1, 4, 50.0);
        let out = a.process(&mut f).unwrap();
        assert!(out.counts.contains_key("door"));
        assert_eq!(
            ids(&f),
            vec![Some(2)],
            "a fresh tracker, confirmed at once, numbering on"
        );
        let mut g = frame(0, 5, 15.0);
        assert!(
            a.process(&mut g).unwrap().counts.is_empty(),
            "stream a has no rule"
        );
    }

    #[test]
    fn a_frame_that_arrives_late_gets_ids_but_moves_no_rule() {
        let rule: crate::analytics::rules::RuleConfig = toml::from_str(
            "name = \"door\"\ntype = \"line\"\nline = [[0.5, 0.0], [0.5, 1.0]]\nanchor = \"center\"",
        )
        .unwrap();
        let a = Analytics::new(&AnalyticsSpec {
            tracker: Some(TrackerParams::default()),
            rules: vec![rule],
            tracked: vec![Some(0)],
        });
        a.start_stream(0, "a");
        // A 40 px wide person walking left across x = 50; the frame of seq 3 comes late, from
        // where the person was then (right of the line).
        let wide = |seq: u64, centre: f32| {
            let mut f = frame(0, seq, centre - 20.0);
            if let StageOutput::Objects(o) = &mut f.outputs[0] {
                o[0].bbox.w = 40.0;
            }
            f
        };
        let mut events = Vec::new();
        for (seq, centre) in [
            (0, 70.0),
            (1, 64.0),
            (2, 58.0),
            (4, 46.0),
            (3, 53.0),
            (5, 40.0),
        ] {
            let mut f = wide(seq, centre);
            events.extend(a.process(&mut f).unwrap().events);
            assert_eq!(ids(&f), vec![Some(1)], "seq {seq}");
        }
        assert_eq!(events.len(), 1, "{events:?}");
        assert_eq!(events[0].direction, Some("in"));
    }
}
