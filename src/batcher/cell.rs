//! Cellular batching for recurrent stages (BatchMaker, EuroSys '18).
//!
//! A recurrent cell runs once per step of each item. With **cellular** batching the batch of every
//! step is assembled anew from the items that wait at the cell: an item that arrives joins at the
//! next step, and one that ends leaves at once. With **padded** batching (graph batching, what a
//! system that batches whole sequences does) a group of items starts together and the cell runs
//! over the whole group until its longest item ends; items that ended earlier keep their rows
//! (padding), and newcomers wait for the next group. Both run the same cell on the same engine.
//!
//! Items of one `group` (the frames of one stream, whose state passes from one to the next) run
//! in order, at most one per step.
//!
//! Under the `deadline` policy an item that cannot finish its expected remaining steps by its
//! deadline is dropped before it takes more steps. The expected remaining steps of an item that
//! has run `d` steps are estimated from the lengths of the last [`HISTORY`] items that ended
//! (per model: per stage): the mean of `L - d` over those with `L > d`, so an item deep in a long
//! tail is expected to run longer; at least one step, at most its step limit; one step before any
//! item has ended. The latency of a step at batch size `b` is the running mean of measured steps
//! at that size (the nearest measured size, scaled, until `b` itself has been measured).
//!
//! Pure state driven by the time passed in, like the other policies.

use serde::{Deserialize, Serialize};

use crate::clock::Nanos;

/// How a recurrent stage forms the batch of a step.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum CellBatching {
    /// Every step's batch is assembled from the items waiting at the cell.
    #[default]
    Cellular,
    /// A group runs until its longest item ends (graph batching, the baseline).
    Padded,
}

/// Ended items whose lengths estimate the remaining steps of the others.
pub const HISTORY: usize = 1024;

/// An item that runs steps of the cell.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CellItem {
    /// Unique id.
    pub id: u64,
    /// Items of one group run in id order, one per step (per-stream state).
    pub group: Option<u64>,
    /// When it must have ended.
    pub deadline: Nanos,
    /// Most steps it runs.
    pub limit: u32,
}

#[derive(Debug, Clone)]
struct Waiting {
    item: CellItem,
    done: u32,
    ended: bool,
}

/// The items of one step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Step {
    /// Items that run this step, in the order of the batch's rows.
    pub ids: Vec<u64>,
    /// Extra rows that compute nothing useful (padded batching: items of the group that ended).
    pub padding: usize,
}

impl Step {
    /// Rows the cell runs.
    pub fn rows(&self) -> usize {
        self.ids.len() + self.padding
    }
}

/// Lengths of recently ended items, with their counts by length for answering
/// [`remaining`](Self::remaining) without a pass over the history.
#[derive(Debug, Clone, Default)]
pub struct Lengths {
    ring: Vec<u32>,
    next: usize,
    /// Ended items in the history by length.
    by_len: Vec<u32>,
    /// `above[d]` = (items longer than `d`, the sum of their lengths); rebuilt when stale.
    above: Vec<(u64, u64)>,
    stale: bool,
}

impl Lengths {
    /// Records an ended item's length.
    pub fn record(&mut self, steps: u32) {
        if self.ring.len() < HISTORY {
            self.ring.push(steps);
        } else {
            let old = std::mem::replace(&mut self.ring[self.next], steps);
            self.by_len[old as usize] -= 1;
        }
        self.next = (self.next + 1) % HISTORY;
        if self.by_len.len() <= steps as usize {
            self.by_len.resize(steps as usize + 1, 0);
        }
        self.by_len[steps as usize] += 1;
        self.stale = true;
    }

    /// Expected steps still to run for an item that has run `done` of at most `limit`.
    pub fn remaining(&mut self, done: u32, limit: u32) -> u32 {
        if self.stale {
            self.stale = false;
            self.above = vec![(0, 0); self.by_len.len()];
            let mut acc = (0u64, 0u64);
            for d in (0..self.by_len.len()).rev() {
                self.above[d] = acc;
                let c = u64::from(self.by_len[d]);
                acc = (acc.0 + c, acc.1 + c * d as u64);
            }
        }
        let left = limit.saturating_sub(done).max(1);
        match self.above.get(done as usize) {
            Some(&(n, sum)) if n > 0 => {
                ((sum - n * u64::from(done)).div_ceil(n) as u32).clamp(1, left)
            }
            _ => 1,
        }
    }
}

/// Measured step latency per batch size.
#[derive(Debug, Clone, Default)]
pub struct StepCost {
    /// `(mean nanos, samples)` per batch size (index = size).
    by_size: Vec<(f64, u64)>,
}

impl StepCost {
    /// Records a step of `rows` rows that took `nanos`.
    pub fn observe(&mut self, rows: usize, nanos: Nanos) {
        if self.by_size.len() <= rows {
            self.by_size.resize(rows + 1, (0.0, 0));
        }
        let (mean, n) = &mut self.by_size[rows];
        // The running mean of the first 16, then an exponential mean that follows drift.
        *n += 1;
        let w = 1.0 / (*n).min(16) as f64;
        *mean += (nanos as f64 - *mean) * w;
    }

    /// Expected latency of a step of `rows` rows (0 before any step was measured).
    pub fn latency(&self, rows: usize) -> Nanos {
        if let Some((m, n)) = self.by_size.get(rows)
            && *n > 0
        {
            return *m as Nanos;
        }
        // The nearest measured size: a larger batch does not take less than a smaller one, and
        // takes at most proportionally more.
        let measured = self.by_size.iter().enumerate().filter(|(_, (_, n))| *n > 0);
        let below = measured.clone().rfind(|(s, _)| *s < rows);
        let above = measured.clone().find(|(s, _)| *s > rows);
        match (below, above) {
            (Some((s, (m, _))), None) => (m * rows as f64 / s as f64) as Nanos,
            (_, Some((_, (m, _)))) => *m as Nanos,
            (None, None) => 0,
        }
    }
}

/// The items waiting at a cell and how the next step's batch is formed.
#[derive(Debug)]
pub struct CellScheduler {
    batching: CellBatching,
    max_batch: usize,
    drop_late: bool,
    margin: Nanos,
    /// Items not yet ended (and, in padded batching, the ended ones of the running group), in
    /// arrival order.
    items: Vec<Waiting>,
    /// Padded batching: ids of the running group.
    group: Vec<u64>,
    lengths: Lengths,
    cost: StepCost,
}

impl CellScheduler {
    /// A scheduler; `drop_late`: the `deadline` policy.
    pub fn new(batching: CellBatching, max_batch: usize, drop_late: bool, margin: Nanos) -> Self {
        Self {
            batching,
            max_batch: max_batch.max(1),
            drop_late,
            margin,
            items: Vec::new(),
            group: Vec::new(),
            lengths: Lengths::default(),
            cost: StepCost::default(),
        }
    }

    /// How batches are formed.
    pub fn batching(&self) -> CellBatching {
        self.batching
    }

    /// Queues an item.
    pub fn push(&mut self, item: CellItem) {
        self.items.push(Waiting {
            item,
            done: 0,
            ended: false,
        });
    }

    /// Items not ended.
    pub fn len(&self) -> usize {
        self.items.iter().filter(|w| !w.ended).count()
    }

    /// Whether no item waits or runs.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Removes an item (its frame went another way); whether it was there.
    pub fn remove(&mut self, id: u64) -> bool {
        let before = self.items.len();
        self.items.retain(|w| w.item.id != id);
        self.group.retain(|g| *g != id);
        before != self.items.len()
    }

    /// Steps item `id` has run.
    #[cfg(test)]
    fn done(&self, id: u64) -> Option<u32> {
        self.items.iter().find(|w| w.item.id == id).map(|w| w.done)
    }

    /// Records a measured step.
    pub fn observe(&mut self, rows: usize, nanos: Nanos) {
        self.cost.observe(rows, nanos);
    }

    /// Items (not ended) that cannot end by their deadline at `now`, removed (empty unless
    /// dropping late items).
    pub fn take_late(&mut self, now: Nanos) -> Vec<u64> {
        if !self.drop_late {
            return Vec::new();
        }
        let live = self.len();
        let rows = match self.batching {
            CellBatching::Cellular => live.min(self.max_batch),
            CellBatching::Padded => self.group.len().max(live.min(self.max_batch)),
        };
        let step = self.cost.latency(rows.max(1));
        let lengths = &mut self.lengths;
        let remaining: Vec<u64> = self
            .items
            .iter()
            .map(|w| u64::from(lengths.remaining(w.done, w.item.limit)))
            .collect();
        // Padded: an item outside the running group first waits for the group's longest item.
        let in_group = |w: &Waiting| self.group.contains(&w.item.id);
        let group_left = self
            .items
            .iter()
            .zip(&remaining)
            .filter(|(w, _)| !w.ended && in_group(w))
            .map(|(_, r)| *r)
            .max()
            .unwrap_or(0);
        let mut late = Vec::new();
        for (w, r) in self.items.iter().zip(&remaining) {
            if w.ended {
                continue;
            }
            let mut steps = *r;
            if self.batching == CellBatching::Padded && !in_group(w) {
                steps += group_left;
            }
            if now + steps * step + self.margin > w.item.deadline {
                late.push(w.item.id);
            }
        }
        for id in &late {
            self.remove(*id);
        }
        late
    }

    /// Up to `max_batch` items by earliest deadline, one per group, the oldest of each.
    fn pick(&self) -> Vec<u64> {
        let mut order: Vec<&Waiting> = self.items.iter().filter(|w| !w.ended).collect();
        order.sort_by_key(|w| (w.item.deadline, w.item.id));
        // A group's oldest item holds it: a later one waits even when it sorts first.
        let mut oldest: std::collections::HashMap<u64, u64> = std::collections::HashMap::new();
        for w in self.items.iter().filter(|w| !w.ended) {
            if let Some(g) = w.item.group {
                oldest.entry(g).or_insert(w.item.id);
            }
        }
        let mut picked = Vec::new();
        for w in order {
            if picked.len() == self.max_batch {
                break;
            }
            if let Some(g) = w.item.group
                && oldest.get(&g) != Some(&w.item.id)
            {
                continue;
            }
            picked.push(w.item.id);
        }
        picked
    }

    /// The items of the next step, if any.
    pub fn next_step(&mut self) -> Option<Step> {
        match self.batching {
            CellBatching::Cellular => {
                let ids = self.pick();
                (!ids.is_empty()).then_some(Step { ids, padding: 0 })
            }
            CellBatching::Padded => {
                let running: Vec<u64> = self
                    .group
                    .iter()
                    .copied()
                    .filter(|id| self.items.iter().any(|w| w.item.id == *id && !w.ended))
                    .collect();
                if running.is_empty() {
                    // The group is over: its padding rows go, a new group starts.
                    let group = std::mem::take(&mut self.group);
                    self.items
                        .retain(|w| !(w.ended && group.contains(&w.item.id)));
                    self.group = self.pick();
                    return (!self.group.is_empty()).then(|| Step {
                        ids: self.group.clone(),
                        padding: 0,
                    });
                }
                Some(Step {
                    padding: self.group.len() - running.len(),
                    ids: running,
                })
            }
        }
    }

    /// Records that item `id` ran a step; `ended`: its end condition was met. Returns whether
    /// it has ended (at its end condition or its step limit).
    pub fn stepped(&mut self, id: u64, ended: bool) -> bool {
        let Some(w) = self.items.iter_mut().find(|w| w.item.id == id) else {
            return false;
        };
        w.done += 1;
        let over = ended || w.done >= w.item.limit;
        if over {
            w.ended = true;
            let done = w.done;
            self.lengths.record(done);
            if self.batching == CellBatching::Cellular || !self.group.contains(&id) {
                self.items.retain(|w| w.item.id != id);
            }
        }
        over
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn item(id: u64, deadline: Nanos, limit: u32) -> CellItem {
        CellItem {
            id,
            group: None,
            deadline,
            limit,
        }
    }

    /// Runs the scheduler to the end; each item ends after its `len` steps. Returns the step
    /// (1-based) at which each item ended, and the rows of every step.
    fn run(
        s: &mut CellScheduler,
        lens: &[(u64, u32)],
        arrive: &[(u64, usize)],
    ) -> (Vec<(u64, usize)>, Vec<usize>) {
        let mut ended = Vec::new();
        let mut rows = Vec::new();
        let mut t = 0;
        loop {
            for (id, at) in arrive {
                if *at == t {
                    s.push(item(*id, u64::MAX, 100));
                }
            }
            t += 1;
            let Some(step) = s.next_step() else {
                if arrive.iter().all(|(_, at)| *at < t) {
                    break;
                }
                continue;
            };
            rows.push(step.rows());
            for id in step.ids {
                let len = lens.iter().find(|(i, _)| *i == id).unwrap().1;
                let done = s.done(id).unwrap() + 1;
                if s.stepped(id, done == len) {
                    ended.push((id, t));
                }
            }
        }
        (ended, rows)
    }

    #[test]
    fn cellular_lets_items_join_and_leave_at_every_step() {
        let mut s = CellScheduler::new(CellBatching::Cellular, 4, false, 0);
        // 1 runs 5 steps, 2 runs 1, 3 arrives at step 2 and runs 2.
        let (ended, rows) = run(&mut s, &[(1, 5), (2, 1), (3, 2)], &[(1, 0), (2, 0), (3, 1)]);
        assert_eq!(ended, vec![(2, 1), (3, 3), (1, 5)]);
        assert_eq!(rows, vec![2, 2, 2, 1, 1]);
    }

    #[test]
    fn padded_runs_a_group_to_its_longest_item_and_newcomers_wait() {
        let mut s = CellScheduler::new(CellBatching::Padded, 4, false, 0);
        let (ended, rows) = run(&mut s, &[(1, 5), (2, 1), (3, 2)], &[(1, 0), (2, 0), (3, 1)]);
        // 3 waits for the group {1, 2} to finish at step 5; 2's row is padding from step 2.
        assert_eq!(ended, vec![(2, 1), (1, 5), (3, 7)]);
        assert_eq!(rows, vec![2, 2, 2, 2, 2, 1, 1]);
    }

    #[test]
    fn a_group_runs_one_item_per_step_in_order() {
        let mut s = CellScheduler::new(CellBatching::Cellular, 8, false, 0);
        for id in 0..3 {
            s.push(CellItem {
                id,
                group: Some(7),
                deadline: 100 - id,
                limit: 1,
            });
        }
        s.push(item(9, 50, 1));
        let first = s.next_step().unwrap();
        assert_eq!(
            first.ids,
            vec![9, 0],
            "one item of group 7, its oldest, despite deadlines"
        );
        for id in first.ids {
            assert!(s.stepped(id, false), "limit 1: one step");
        }
        assert_eq!(s.next_step().unwrap().ids, vec![1]);
    }

    #[test]
    fn batches_stop_at_max_batch_and_go_by_earliest_deadline() {
        let mut s = CellScheduler::new(CellBatching::Cellular, 2, false, 0);
        s.push(item(1, 30, 5));
        s.push(item(2, 10, 5));
        s.push(item(3, 20, 5));
        assert_eq!(s.next_step().unwrap().ids, vec![2, 3]);
    }

    #[test]
    fn the_remaining_steps_follow_the_history_of_lengths() {
        let mut l = Lengths::default();
        assert_eq!(l.remaining(0, 100), 1, "no history: one step");
        for len in [10, 10, 10, 70] {
            l.record(len);
        }
        assert_eq!(l.remaining(0, 100), 25, "mean of 10, 10, 10, 70");
        assert_eq!(
            l.remaining(20, 100),
            50,
            "past 10, only the long one is left"
        );
        assert_eq!(l.remaining(20, 30), 10, "never past the limit");
        assert_eq!(l.remaining(80, 100), 1, "longer than all seen: one more");
    }

    #[test]
    fn step_latency_is_measured_and_scaled_to_unmeasured_sizes() {
        let mut c = StepCost::default();
        assert_eq!(c.latency(4), 0);
        c.observe(2, 100);
        c.observe(2, 300);
        assert_eq!(c.latency(2), 200);
        assert_eq!(c.latency(1), 200, "a smaller batch: the next measured size");
        assert_eq!(c.latency(4), 400, "a larger one: proportionally more");
    }

    #[test]
    fn the_deadline_policy_drops_items_that_cannot_end_in_time() {
        let mut s = CellScheduler::new(CellBatching::Cellular, 4, true, 0);
        s.observe(1, 10);
        s.observe(2, 10);
        for len in [5, 5, 5] {
            s.lengths.record(len);
        }
        s.push(item(1, 100, 10)); // 5 steps x 10 = 50: in time
        s.push(item(2, 40, 10)); // needs 50, has 40
        assert_eq!(s.take_late(0), vec![2]);
        assert_eq!(s.len(), 1);
        assert_eq!(s.take_late(60), vec![1], "at 60, 50 more is past 100");
        let mut keep = CellScheduler::new(CellBatching::Cellular, 4, false, 0);
        keep.push(item(1, 0, 10));
        assert!(
            keep.take_late(1_000).is_empty(),
            "fixed: nothing dropped here"
        );
    }
}
