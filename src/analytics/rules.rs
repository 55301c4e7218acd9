//! Analytics rules over tracked objects: directed line crossings and zones (enter, exit,
//! occupancy, dwell), with counts since the start and over time windows.
//!
//! Pure state per stream and rule, driven by the frame's media time; the publisher turns what
//! a frame caused into events for the sinks and current counts for the frame's result.

use std::collections::{BTreeMap, HashMap};

use serde::{Deserialize, Serialize};

/// `[[rule]]` as written in a pipeline file.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleConfig {
    /// Rule name, unique in the pipeline; events and counts are keyed by it.
    pub name: String,
    /// `line` or `zone`.
    #[serde(rename = "type")]
    pub kind: RuleKind,
    /// Streams it applies to (default: every stream).
    #[serde(default)]
    pub streams: Vec<String>,
    /// Classes it counts (labels, or class indices as strings; default: all).
    #[serde(default)]
    pub classes: Vec<String>,
    /// `line`: two points, `[[x1, y1], [x2, y2]]`.
    #[serde(default)]
    pub line: Option<Vec<[f32; 2]>>,
    /// `zone`: the polygon's corners, `[[x, y], ...]` (at least three).
    #[serde(default)]
    pub polygon: Option<Vec<[f32; 2]>>,
    /// The frame size `[width, height]` the points were measured on (they are scaled to each
    /// stream's actual size); without it the points are fractions of the frame (0..1).
    #[serde(default)]
    pub frame: Option<[f32; 2]>,
    /// Which point of a box stands for the object: `bottom` (centre of the bottom edge, where
    /// a person stands; default) or `center`.
    #[serde(default)]
    pub anchor: Anchor,
    /// `zone`: an object inside longer than this raises one `dwell` event, seconds.
    #[serde(default)]
    pub dwell_s: Option<f64>,
    /// Also count over windows of this many seconds: a `window` event at the end of each, and
    /// the counts of the current one in every result.
    #[serde(default)]
    pub window_s: Option<f64>,
}

/// Kind of rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum RuleKind {
    /// A directed line: crossings are counted in each direction.
    Line,
    /// A polygon: objects enter, stay and leave.
    Zone,
}

/// The point of a box that stands for its object.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Anchor {
    /// Centre of the bottom edge.
    #[default]
    Bottom,
    /// Centre of the box.
    Center,
}

/// Twice the signed area of a polygon.
fn area2(p: &[[f32; 2]]) -> f32 {
    (0..p.len())
        .map(|i| {
            let (a, b) = (p[i], p[(i + 1) % p.len()]);
            a[0] * b[1] - b[0] * a[1]
        })
        .sum()
}

fn cross(o: [f32; 2], a: [f32; 2], b: [f32; 2]) -> f32 {
    (a[0] - o[0]) * (b[1] - o[1]) - (a[1] - o[1]) * (b[0] - o[0])
}

/// Whether segments ab and cd cross at a point inside both.
fn segments_cross(a: [f32; 2], b: [f32; 2], c: [f32; 2], d: [f32; 2]) -> bool {
    let d1 = cross(a, b, c);
    let d2 = cross(a, b, d);
    let d3 = cross(c, d, a);
    let d4 = cross(c, d, b);
    d1 * d2 < 0.0 && d3 * d4 < 0.0
}

impl RuleConfig {
    /// Problems with the rule, as (key relative to the rule, message); `labels` are the
    /// tracked detector's (empty: unknown, class names are not checked).
    pub fn problems(&self, labels: &[String]) -> Vec<(&'static str, String)> {
        let mut out = Vec::new();
        // The name goes into topics, subjects and keys of every broker.
        if self.name.is_empty()
            || !self
                .name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            out.push((
                "name",
                format!(
                    "`{}`: rule names take letters, digits, `-` and `_` (they become part of event topics)",
                    self.name
                ),
            ));
        }
        let (w, h) = match self.frame {
            Some([w, h]) if w > 0.0 && h > 0.0 => (w, h),
            Some(f) => {
                out.push(("frame", format!("{f:?}: width and height must be positive")));
                (1.0, 1.0)
            }
            None => (1.0, 1.0),
        };
        let inside = |p: &[f32; 2]| (0.0..=w).contains(&p[0]) && (0.0..=h).contains(&p[1]);
        let bounds = if self.frame.is_some() {
            format!("inside the {w}x{h} frame")
        } else {
            "fractions of the frame in [0, 1] (or give `frame = [width, height]` for pixels)".into()
        };
        match self.kind {
            RuleKind::Line => {
                if self.polygon.is_some() {
                    out.push((
                        "polygon",
                        "a `line` rule takes `line`, not `polygon`".into(),
                    ));
                }
                match &self.line {
                    None => out.push(("line", "missing: `line = [[x1, y1], [x2, y2]]`".into())),
                    Some(l) if l.len() != 2 => {
                        out.push(("line", format!("{} points: a line has exactly 2", l.len())))
                    }
                    Some(l) if l[0] == l[1] => {
                        out.push(("line", "the two points are the same".into()))
                    }
                    Some(l) => {
                        if let Some(p) = l.iter().find(|p| !inside(p)) {
                            out.push((
                                "line",
                                format!("point {p:?} is outside the frame: points are {bounds}"),
                            ));
                        }
                    }
                }
                if self.dwell_s.is_some() {
                    out.push(("dwell_s", "applies to `zone` rules only".into()));
                }
            }
            RuleKind::Zone => {
                if self.line.is_some() {
                    out.push(("line", "a `zone` rule takes `polygon`, not `line`".into()));
                }
                match &self.polygon {
                    None => out.push((
                        "polygon",
                        "missing: `polygon = [[x, y], ...]` (three or more corners)".into(),
                    )),
                    Some(p) if p.len() < 3 => out.push((
                        "polygon",
                        format!("{} corners: a polygon needs at least 3", p.len()),
                    )),
                    Some(p) => {
                        if let Some(q) = p.iter().find(|q| !inside(q)) {
                            out.push((
                                "polygon",
                                format!("corner {q:?} is outside the frame: corners are {bounds}"),
                            ));
                        } else if area2(p).abs() < 1e-9 {
                            out.push((
                                "polygon",
                                "the polygon has no area (its corners are on one line)".into(),
                            ));
                        } else {
                            let n = p.len();
                            let crossing = (0..n).any(|i| {
                                (i + 2..n).any(|j| {
                                    (i + 1) % n != j
                                        && (j + 1) % n != i
                                        && segments_cross(
                                            p[i],
                                            p[(i + 1) % n],
                                            p[j],
                                            p[(j + 1) % n],
                                        )
                                })
                            });
                            if crossing {
                                out.push(("polygon", "the polygon's edges cross each other: list the corners in order around it".into()));
                            }
                        }
                    }
                }
                if let Some(d) = self.dwell_s
                    && !(d > 0.0 && d.is_finite())
                {
                    out.push((
                        "dwell_s",
                        format!("{d}: expected a positive number of seconds"),
                    ));
                }
            }
        }
        if let Some(wnd) = self.window_s
            && !(wnd > 0.0 && wnd.is_finite())
        {
            out.push((
                "window_s",
                format!("{wnd}: expected a positive number of seconds"),
            ));
        }
        if !labels.is_empty() {
            for c in &self.classes {
                if !labels.contains(c) && c.parse::<usize>().is_err() {
                    out.push((
                        "classes",
                        format!("`{c}` is not a label of the tracked detector"),
                    ));
                }
            }
        }
        out
    }
}

/// A tracked object as the rules see it.
#[derive(Debug, Clone, PartialEq)]
pub struct Tracked<'a> {
    /// Track id.
    pub id: u64,
    /// Label.
    pub label: &'a str,
    /// Class index.
    pub class_id: usize,
    /// Box corners in frame pixels.
    pub corners: [f32; 4],
}

/// Something a rule saw happen.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Event {
    /// The rule.
    pub rule: String,
    /// `line_crossed`, `zone_entered`, `zone_exited`, `zone_dwell` or `window`.
    pub event: &'static str,
    /// The object (absent for `window`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub track_id: Option<u64>,
    /// Its label.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub label: Option<String>,
    /// Its class index.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub class_id: Option<usize>,
    /// `line_crossed`: `in` or `out`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub direction: Option<&'static str>,
    /// `zone_exited` and `zone_dwell`: seconds inside so far.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dwell_s: Option<f64>,
    /// `zone_exited`: the track ended inside the zone rather than walking out.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub lost: bool,
    /// `window`: its counts, and its start and end (media seconds).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub window: Option<WindowCounts>,
}

/// Counts per direction or event, per label.
pub type Counts = BTreeMap<String, BTreeMap<String, u64>>;

/// Counts of one window.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct WindowCounts {
    /// Start, media seconds.
    pub start_s: f64,
    /// End, media seconds.
    pub end_s: f64,
    /// Per direction (`line`) or event (`zone`: `entered`, `exited`), per label.
    pub counts: Counts,
}

/// Per-object memory of a rule.
#[derive(Debug, Clone)]
struct Seen {
    /// Time of the last frame it was in, media seconds.
    last: f64,
    /// `line`: the side it was last clearly on (+1 or -1; 0 until known).
    side: i8,
    /// Its anchor point last frame.
    point: [f32; 2],
    /// `zone`: since when it is inside.
    inside_since: Option<f64>,
    /// `zone`: whether its dwell event was raised.
    dwelt: bool,
    label: String,
    class_id: usize,
}

/// How far (px) from a line an anchor must be to be on one side of it: crossings are not
/// counted twice when a box jitters on the line.
const LINE_BAND: f32 = 2.0;

/// A rule's state on one stream.
#[derive(Debug, Clone)]
pub struct RuleState {
    cfg: RuleConfig,
    /// The objects it has seen, by track id.
    seen: HashMap<u64, Seen>,
    /// Totals since the start: per direction/event, per label.
    totals: Counts,
    /// The current window (start, counts).
    window: Option<(f64, Counts)>,
    /// How long an object not seen is remembered (the tracker's lost-track buffer), seconds.
    forget_s: f64,
    /// The last media time, to see a jump back (a loop or a restart).
    last_t: Option<f64>,
}

impl RuleState {
    /// A fresh state; objects unseen for `forget_s` are forgotten (a zone counts them out).
    pub fn new(cfg: RuleConfig, forget_s: f64) -> Self {
        Self {
            cfg,
            seen: HashMap::new(),
            totals: BTreeMap::new(),
            window: None,
            forget_s,
            last_t: None,
        }
    }

    /// The rule's name.
    pub fn name(&self) -> &str {
        &self.cfg.name
    }

    fn counts_class(&self, o: &Tracked<'_>) -> bool {
        self.cfg.classes.is_empty()
            || self
                .cfg
                .classes
                .iter()
                .any(|c| c == o.label || c.parse::<usize>().ok() == Some(o.class_id))
    }

    /// The rule's geometry in this frame's pixels.
    fn points(&self, frame: (u32, u32)) -> Vec<[f32; 2]> {
        let (sx, sy) = match self.cfg.frame {
            Some([w, h]) => (frame.0 as f32 / w, frame.1 as f32 / h),
            None => (frame.0 as f32, frame.1 as f32),
        };
        let pts = match self.cfg.kind {
            RuleKind::Line => self.cfg.line.as_deref(),
            RuleKind::Zone => self.cfg.polygon.as_deref(),
        };
        pts.unwrap_or_default()
            .iter()
            .map(|p| [p[0] * sx, p[1] * sy])
            .collect()
    }

    fn anchor(&self, c: &[f32; 4]) -> [f32; 2] {
        match self.cfg.anchor {
            Anchor::Bottom => [(c[0] + c[2]) / 2.0, c[3]],
            Anchor::Center => [(c[0] + c[2]) / 2.0, (c[1] + c[3]) / 2.0],
        }
    }

    fn count(&mut self, what: &str, label: &str) {
        *self
            .totals
            .entry(what.into())
            .or_default()
            .entry(label.into())
            .or_default() += 1;
        if let Some((_, w)) = &mut self.window {
            *w.entry(what.into())
                .or_default()
                .entry(label.into())
                .or_default() += 1;
        }
    }

    /// Feeds the tracked objects of one frame (media time `t`, frame size `frame`) and returns
    /// the events it caused.
    pub fn update(&mut self, t: f64, frame: (u32, u32), objects: &[Tracked<'_>]) -> Vec<Event> {
        let mut events = Vec::new();
        if self.last_t.is_some_and(|l| t < l - 1.0) {
            // The stream started over: objects are new, counts go on.
            self.seen.clear();
            self.window = None;
        }
        self.last_t = Some(t);
        if let Some(wnd) = self.cfg.window_s {
            match &self.window {
                None => self.window = Some((t, BTreeMap::new())),
                Some((start, _)) if t >= start + wnd => {
                    let (start, counts) = self.window.take().unwrap_or_default();
                    events.push(Event {
                        window: Some(WindowCounts {
                            start_s: start,
                            end_s: start + wnd,
                            counts,
                        }),
                        ..self.event("window")
                    });
                    // Windows are back to back; a gap longer than a window starts a new one now.
                    let next = if t < start + 2.0 * wnd {
                        start + wnd
                    } else {
                        t
                    };
                    self.window = Some((next, BTreeMap::new()));
                }
                _ => {}
            }
        }
        let pts = self.points(frame);
        for o in objects {
            if !self.counts_class(o) {
                continue;
            }
            let p = self.anchor(&o.corners);
            let prev = self.seen.get(&o.id).cloned();
            let mut s = prev.clone().unwrap_or(Seen {
                last: t,
                side: 0,
                point: p,
                inside_since: None,
                dwelt: false,
                label: o.label.to_string(),
                class_id: o.class_id,
            });
            match self.cfg.kind {
                RuleKind::Line if pts.len() == 2 => {
                    let (a, b) = (pts[0], pts[1]);
                    let len = ((b[0] - a[0]).powi(2) + (b[1] - a[1]).powi(2))
                        .sqrt()
                        .max(1e-6);
                    let dist = cross(a, b, p) / len;
                    let side = if dist > LINE_BAND {
                        1
                    } else if dist < -LINE_BAND {
                        -1
                    } else {
                        0
                    };
                    if side != 0 {
                        if s.side != 0 && side != s.side {
                            // Crossed: through the segment itself, not its extension.
                            let m = [(p[0] + s.point[0]) / 2.0, (p[1] + s.point[1]) / 2.0];
                            let along = ((m[0] - a[0]) * (b[0] - a[0])
                                + (m[1] - a[1]) * (b[1] - a[1]))
                                / (len * len);
                            if (0.0..=1.0).contains(&along) {
                                let dir = if side > 0 { "in" } else { "out" };
                                self.count(dir, o.label);
                                events.push(Event {
                                    direction: Some(dir),
                                    ..self.object_event("line_crossed", o)
                                });
                            }
                        }
                        s.side = side;
                        s.point = p;
                    }
                }
                RuleKind::Zone => {
                    let inside = point_in_polygon(p, &pts);
                    match (s.inside_since, inside) {
                        (None, true) => {
                            s.inside_since = Some(t);
                            s.dwelt = false;
                            self.count("entered", o.label);
                            events.push(self.object_event("zone_entered", o));
                        }
                        (Some(since), false) => {
                            s.inside_since = None;
                            self.count("exited", o.label);
                            events.push(Event {
                                dwell_s: Some(round3(t - since)),
                                ..self.object_event("zone_exited", o)
                            });
                        }
                        (Some(since), true) => {
                            if let Some(d) = self.cfg.dwell_s
                                && !s.dwelt
                                && t - since >= d
                            {
                                s.dwelt = true;
                                self.count("dwelled", o.label);
                                events.push(Event {
                                    dwell_s: Some(round3(t - since)),
                                    ..self.object_event("zone_dwell", o)
                                });
                            }
                        }
                        (None, false) => {}
                    }
                }
                RuleKind::Line => {}
            }
            s.last = t;
            self.seen.insert(o.id, s);
        }
        // Forget objects gone for longer than the tracker keeps them; one inside a zone leaves.
        let gone: Vec<u64> = self
            .seen
            .iter()
            .filter(|(_, s)| t - s.last > self.forget_s)
            .map(|(id, _)| *id)
            .collect();
        for id in gone {
            let s = self.seen.remove(&id).unwrap_or_else(|| unreachable!());
            if let Some(since) = s.inside_since {
                self.count("exited", &s.label);
                events.push(Event {
                    track_id: Some(id),
                    label: Some(s.label.clone()),
                    class_id: Some(s.class_id),
                    dwell_s: Some(round3(s.last - since)),
                    lost: true,
                    ..self.event("zone_exited")
                });
            }
        }
        events
    }

    /// Objects inside the zone now.
    pub fn occupancy(&self) -> usize {
        self.seen
            .values()
            .filter(|s| s.inside_since.is_some())
            .count()
    }

    /// What a frame's result shows of the rule: totals, the current window's counts, and a
    /// zone's occupancy.
    pub fn counts(&self) -> serde_json::Value {
        let mut v = serde_json::json!({ "total": self.totals });
        if let Some((start, w)) = &self.window {
            v["window"] = serde_json::json!({ "start_s": round3(*start), "counts": w });
        }
        if self.cfg.kind == RuleKind::Zone {
            v["occupancy"] = self.occupancy().into();
        }
        v
    }

    fn event(&self, event: &'static str) -> Event {
        Event {
            rule: self.cfg.name.clone(),
            event,
            track_id: None,
            label: None,
            class_id: None,
            direction: None,
            dwell_s: None,
            lost: false,
            window: None,
        }
    }

    fn object_event(&self, event: &'static str, o: &Tracked<'_>) -> Event {
        Event {
            track_id: Some(o.id),
            label: Some(o.label.to_string()),
            class_id: Some(o.class_id),
            ..self.event(event)
        }
    }
}

fn round3(v: f64) -> f64 {
    (v * 1e3).round() / 1e3
}

/// Even-odd rule.
pub fn point_in_polygon(p: [f32; 2], poly: &[[f32; 2]]) -> bool {
    let mut inside = false;
    let n = poly.len();
    for i in 0..n {
        let (a, b) = (poly[i], poly[(i + n - 1) % n]);
        if (a[1] > p[1]) != (b[1] > p[1])
            && p[0] < (b[0] - a[0]) * (p[1] - a[1]) / (b[1] - a[1]) + a[0]
        {
            inside = !inside;
        }
    }
    inside
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(points: [[f32; 2]; 2]) -> RuleConfig {
        RuleConfig {
            name: "gate".into(),
            kind: RuleKind::Line,
            streams: vec![],
            classes: vec!["person".into()],
            line: Some(points.to_vec()),
            polygon: None,
            frame: Some([100.0, 100.0]),
            anchor: Anchor::Center,
            dwell_s: None,
            window_s: None,
        }
    }

    fn obj(id: u64, label: &str, cx: f32, cy: f32) -> Tracked<'_> {
        Tracked {
            id,
            label,
            class_id: 0,
            corners: [cx - 5.0, cy - 5.0, cx + 5.0, cy + 5.0],
        }
    }

    #[test]
    fn a_track_crossing_a_line_is_one_event_in_its_direction() {
        // A horizontal line drawn left to right across the middle: `in` is downwards.
        let mut r = RuleState::new(line([[10.0, 50.0], [90.0, 50.0]]), 1.5);
        let mut events = Vec::new();
        for f in 0..30 {
            // Walks down with a 1 px jitter across the line's band.
            let y = 30.0 + f as f32 * 1.5 + if f % 2 == 0 { 0.8 } else { -0.8 };
            events.extend(r.update(
                f as f64 * 0.1,
                (200, 200),
                &[obj(7, "person", 100.0, y * 2.0)],
            ));
        }
        assert_eq!(events.len(), 1, "{events:?}");
        assert_eq!(events[0].event, "line_crossed");
        assert_eq!(events[0].direction, Some("in"));
        assert_eq!(events[0].track_id, Some(7));
        assert_eq!(r.counts()["total"]["in"]["person"], 1);
        // Walking back up is `out`.
        let mut back = Vec::new();
        for f in 30..60 {
            let y = 75.0 - (f - 30) as f32 * 1.5;
            back.extend(r.update(
                f as f64 * 0.1,
                (200, 200),
                &[obj(7, "person", 100.0, y * 2.0)],
            ));
        }
        assert_eq!(
            back.iter().map(|e| e.direction).collect::<Vec<_>>(),
            vec![Some("out")]
        );
        // Passing beside the segment, or of another class, counts nothing.
        let mut none = Vec::new();
        for f in 0..30 {
            let y = 30.0 + f as f32 * 1.5;
            none.extend(r.update(
                6.0 + f as f64 * 0.1,
                (200, 200),
                &[
                    obj(8, "person", 195.0, y * 2.0),
                    obj(9, "car", 100.0, y * 2.0),
                ],
            ));
        }
        assert!(none.is_empty(), "{none:?}");
    }

    fn zone(dwell: f64) -> RuleConfig {
        RuleConfig {
            name: "yard".into(),
            kind: RuleKind::Zone,
            line: None,
            polygon: Some(vec![[0.2, 0.2], [0.6, 0.2], [0.6, 0.6], [0.2, 0.6]]),
            frame: None,
            dwell_s: Some(dwell),
            window_s: Some(5.0),
            ..line([[0.0, 0.0], [1.0, 1.0]])
        }
    }

    #[test]
    fn zones_raise_enter_dwell_and_exit_and_keep_occupancy() {
        let mut r = RuleState::new(zone(2.0), 1.5);
        let mut ev = Vec::new();
        // Frame 100x100; the zone is 20..60. Walks right through it at 1 px per 0.1 s.
        for f in 0..80 {
            let x = 5.0 + f as f32;
            let t = f as f64 * 0.1;
            ev.extend(r.update(t, (100, 100), &[obj(3, "person", x, 40.0)]));
            if f == 30 {
                assert_eq!(r.occupancy(), 1);
            }
        }
        let kinds: Vec<&str> = ev
            .iter()
            .map(|e| e.event)
            .filter(|e| *e != "window")
            .collect();
        assert_eq!(kinds, vec!["zone_entered", "zone_dwell", "zone_exited"]);
        let exit = ev.iter().find(|e| e.event == "zone_exited").unwrap();
        // Anchor x enters at 20 (frame 15) and leaves after 60 (frame 56): 4.1 s inside.
        assert!((exit.dwell_s.unwrap() - 4.1).abs() < 0.11, "{exit:?}");
        assert_eq!(r.occupancy(), 0);
        // Windows of 5 s: one closed at t = 5 with the entry in it.
        let w: Vec<&Event> = ev.iter().filter(|e| e.event == "window").collect();
        assert_eq!(w.len(), 1);
        assert_eq!(w[0].window.as_ref().unwrap().counts["entered"]["person"], 1);
        // An object that vanishes inside is counted out once the tracker would drop it.
        let mut r = RuleState::new(zone(100.0), 1.5);
        r.update(0.0, (100, 100), &[obj(4, "person", 40.0, 40.0)]);
        assert_eq!(r.occupancy(), 1);
        assert!(r.update(1.0, (100, 100), &[]).is_empty());
        let lost = r.update(2.0, (100, 100), &[]);
        assert_eq!(lost.len(), 1);
        assert!(lost[0].lost && lost[0].event == "zone_exited");
        assert_eq!(r.occupancy(), 0);
    }

    #[test]
    fn malformed_geometry_is_refused() {
        let keys = |c: RuleConfig| {
            c.problems(&["person".into()])
                .into_iter()
                .map(|p| p.0)
                .collect::<Vec<_>>()
        };
        assert!(keys(line([[10.0, 50.0], [90.0, 50.0]])).is_empty());
        assert_eq!(keys(line([[10.0, 50.0], [190.0, 50.0]])), vec!["line"]);
        assert_eq!(keys(line([[10.0, 50.0], [10.0, 50.0]])), vec!["line"]);
        let mut z = zone(1.0);
        assert!(keys(z.clone()).is_empty());
        z.polygon = Some(vec![[0.1, 0.1], [0.5, 0.5]]);
        assert_eq!(keys(z.clone()), vec!["polygon"]);
        // A bow tie: edges cross.
        z.polygon = Some(vec![[0.1, 0.1], [0.5, 0.5], [0.5, 0.1], [0.1, 0.5]]);
        assert_eq!(keys(z.clone()), vec!["polygon"]);
        z.polygon = Some(vec![[0.1, 0.1], [0.2, 0.2], [0.3, 0.3]]);
        assert_eq!(keys(z.clone()), vec!["polygon"]);
        z.polygon = Some(vec![[0.1, 0.1], [1.5, 0.2], [0.3, 0.9]]);
        assert_eq!(keys(z.clone()), vec!["polygon"]);
        let mut c = zone(1.0);
        c.classes = vec!["unicorn".into()];
        assert_eq!(keys(c), vec!["classes"]);
        assert!(point_in_polygon(
            [0.3, 0.3],
            zone(1.0).polygon.as_deref().unwrap()
        ));
        assert!(!point_in_polygon(
            [0.7, 0.3],
            zone(1.0).polygon.as_deref().unwrap()
        ));
    }
}
