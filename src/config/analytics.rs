//! `[tracker]` and `[[rule]]`: what follows a detector, checked against the pipeline's stages
//! and sources.

use super::load::Validator;
use super::manifest::ModelKind;
use super::{RouteSpec, SourceSpec, StageSpec};
use crate::analytics::rules::RuleConfig;
use crate::analytics::tracker::TrackerParams;

/// Tracking and rules of a pipeline.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct AnalyticsSpec {
    /// The tracker (present when the file has `[tracker]` or any `[[rule]]`).
    pub tracker: Option<TrackerParams>,
    /// Rules in file order.
    pub rules: Vec<RuleConfig>,
    /// Per route: the position in the route of the detect stage whose objects are tracked.
    pub tracked: Vec<Option<usize>>,
}

impl Validator<'_, '_> {
    /// Reads and checks `[tracker]` and the `[[rule]]`s.
    pub(super) fn analytics(
        &mut self,
        stages: &[StageSpec],
        routes: &[RouteSpec],
        sources: Option<&[SourceSpec]>,
    ) -> AnalyticsSpec {
        let mut tracker: Option<TrackerParams> = match self.section("tracker") {
            Some(v) => self.part("tracker", v),
            None => None,
        };
        let mut rules = Vec::new();
        for (base, v) in self.items_optional("rule") {
            if let Some(r) = self.part::<RuleConfig>(&base, v) {
                rules.push((base, r));
            }
        }
        if tracker.is_none() && !rules.is_empty() {
            tracker = Some(TrackerParams::default()); // rules follow tracks
        }
        let Some(t) = &tracker else {
            return AnalyticsSpec::default();
        };
        for (k, m) in t.problems() {
            self.err(&format!("tracker.{k}"), m);
        }
        // The tracked stage of every route: the one named, else the route's last detector.
        let tracked: Vec<Option<usize>> = routes
            .iter()
            .map(|r| {
                r.stages.iter().rposition(|&i| {
                    let s = &stages[i];
                    s.model.kind == ModelKind::Detect
                        && t.input.as_ref().is_none_or(|n| *n == s.name)
                })
            })
            .collect();
        if !stages.is_empty() && tracked.iter().all(Option::is_none) {
            let key = if t.input.is_some() && self.has("tracker.input") {
                "tracker.input"
            } else if self.has("tracker") {
                "tracker"
            } else {
                "rule[0]"
            };
            self.err(
                key,
                match &t.input {
                    Some(n) => format!("no detect stage named `{n}`: the tracker follows the objects of a `detect` stage"),
                    None => "the tracker needs a `detect` stage (a model of kind `detect`) to follow".into(),
                },
            );
        }
        // Labels of the first tracked detector, to check the rules' classes.
        let labels: Vec<String> = routes
            .iter()
            .zip(&tracked)
            .find_map(|(r, t)| t.map(|t| &stages[r.stages[t]]))
            .map(|s| s.model.detect.names.clone())
            .unwrap_or_default();
        let mut names = std::collections::HashSet::new();
        for (base, r) in &rules {
            if !names.insert(r.name.clone()) {
                self.err(
                    &format!("{base}.name"),
                    format!("a rule named `{}` already exists", r.name),
                );
            }
            for (k, m) in r.problems(&labels) {
                let key = format!("{base}.{k}");
                let key = if self.has(&key) { key } else { base.clone() };
                self.err(&key, m);
            }
            if let Some(sources) = sources {
                for s in &r.streams {
                    if !sources.iter().any(|x| &x.name == s) {
                        self.err(
                            &format!("{base}.streams"),
                            format!("no [[source]] named `{s}`"),
                        );
                    }
                }
            }
        }
        AnalyticsSpec {
            tracker,
            rules: rules.into_iter().map(|(_, r)| r).collect(),
            tracked,
        }
    }
}
