//! Smooth weighted round robin (as in nginx): each pick adds every eligible entry's weight to
//! its credit and takes the entry with the most, which then gives back the eligible total. Over
//! any window, entry `i` is picked `w_i / sum(w)` of the time, evenly spread rather than in runs.
//! The runtime spreads a flow's frames over its routes and admits streams with it; the
//! simulator spreads a model's arrivals over its pipelines the same way.

/// Weights and the credit each has built up.
#[derive(Debug, Clone)]
pub struct SmoothWrr {
    weights: Vec<f64>,
    credit: Vec<f64>,
}

impl SmoothWrr {
    /// Entries with these weights (non-positive weights are never picked while others are).
    pub fn new(weights: Vec<f64>) -> Self {
        let credit = vec![0.0; weights.len()];
        Self { weights, credit }
    }

    /// Adds an entry of weight `w`; returns its index.
    pub fn push(&mut self, w: f64) -> usize {
        self.weights.push(w);
        self.credit.push(0.0);
        self.weights.len() - 1
    }

    /// The next entry among all of them.
    pub fn pick(&mut self) -> usize {
        self.next_among(|_| true).unwrap_or(0)
    }

    /// The next entry among those `ready` says yes to, with credit for every entry `active`
    /// says yes to (a ready entry must be active): an active entry that is not ready right now
    /// (a stream between two frames) keeps earning its share and is picked once it is ready,
    /// its credit capped at one round so that it cannot burst after a long wait. `None` when no
    /// entry is ready.
    pub fn pick_ready(
        &mut self,
        active: impl Fn(usize) -> bool,
        ready: impl Fn(usize) -> bool,
    ) -> Option<usize> {
        let mut best: Option<usize> = None;
        let mut total = 0.0;
        for i in 0..self.weights.len() {
            if !active(i) && !ready(i) {
                continue;
            }
            let w = self.weights[i].max(0.0);
            total += w;
            self.credit[i] += w;
            if ready(i) && best.is_none_or(|b| self.credit[i] > self.credit[b]) {
                best = Some(i);
            }
        }
        let b = best?;
        self.credit[b] -= total;
        for (i, c) in self.credit.iter_mut().enumerate() {
            if i != b && *c > total {
                *c = total;
            }
        }
        Some(b)
    }

    /// The next entry among those `eligible` says yes to; `None` when there is none.
    pub fn next_among(&mut self, eligible: impl Fn(usize) -> bool) -> Option<usize> {
        // With every candidate ready, credits stay within one round: the cap never binds.
        self.pick_ready(&eligible, &eligible)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn picks_in_proportion_and_spread_out() {
        let mut w = SmoothWrr::new(vec![5.0, 1.0, 1.0]);
        let picks: Vec<usize> = (0..7).map(|_| w.pick()).collect();
        assert_eq!(picks, [0, 0, 1, 0, 2, 0, 0]);
        let mut counts = [0; 3];
        for _ in 0..700 {
            counts[w.pick()] += 1;
        }
        assert_eq!(counts, [500, 100, 100]);
    }

    #[test]
    fn an_active_entry_between_items_keeps_its_share() {
        // Entry 0 (weight 2) is ready only every other round; it still gets two picks for each
        // of entry 1's once it is ready, rather than losing its turns.
        let mut w = SmoothWrr::new(vec![2.0, 1.0]);
        let mut counts = [0; 2];
        for round in 0..300 {
            let zero_ready = round % 2 == 0 || counts[0] < 2 * counts[1];
            if let Some(i) = w.pick_ready(|_| true, |i| i == 1 || zero_ready) {
                counts[i] += 1;
            }
        }
        assert!(
            (counts[0] as f64 / counts[1] as f64 - 2.0).abs() < 0.1,
            "{counts:?}"
        );
    }

    #[test]
    fn only_eligible_entries_are_picked_and_gain_credit() {
        let mut w = SmoothWrr::new(vec![1.0, 1.0]);
        for _ in 0..10 {
            assert_eq!(w.next_among(|i| i == 1), Some(1));
        }
        // Entry 0 did not bank credit while it was not eligible: strict alternation resumes.
        let picks: Vec<usize> = (0..4).map(|_| w.pick()).collect();
        assert_eq!(picks.iter().filter(|&&i| i == 0).count(), 2);
        assert_eq!(w.next_among(|_| false), None);
    }
}
