//! Classifier outputs -> top classes.

use crate::frame::Class;

/// Softmax over `logits` and the `k` most probable classes, best first.
pub fn top_k(logits: &[f32], k: usize, labels: &[String]) -> Vec<Class> {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let exps: Vec<f32> = logits.iter().map(|v| (v - max).exp()).collect();
    let sum: f32 = exps.iter().sum();
    let mut idx: Vec<usize> = (0..logits.len()).collect();
    idx.sort_by(|a, b| exps[*b].total_cmp(&exps[*a]).then(a.cmp(b)));
    idx.into_iter()
        .take(k)
        .map(|id| Class {
            id,
            label: labels
                .get(id)
                .cloned()
                .unwrap_or_else(|| format!("class_{id}")),
            score: exps[id] / sum,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn picks_the_largest_logits_in_order() {
        let labels = vec!["cat".to_string(), "dog".to_string()];
        let c = top_k(&[1.0, 3.0, 2.0], 2, &labels);
        assert_eq!(c.iter().map(|c| c.id).collect::<Vec<_>>(), vec![1, 2]);
        assert_eq!(c[0].label, "dog");
        assert_eq!(c[1].label, "class_2");
        let total: f32 = top_k(&[1.0, 3.0, 2.0], 3, &[])
            .iter()
            .map(|c| c.score)
            .sum();
        assert!((total - 1.0).abs() < 1e-5);
    }
}
