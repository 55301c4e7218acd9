//! CTC greedy decoding of a text recogniser's output.

/// Decodes one line from per-step class probabilities (`steps` x `classes`, row-major).
/// Class 0 is the CTC blank; class `i` (1-based) is `charset[i - 1]`; one class past the charset
/// is a space (PP-OCR's `use_space_char`). Repeats are merged unless a blank separates them.
/// Returns the text and the mean probability of the kept characters (0 for an empty line).
pub fn greedy_decode(probs: &[f32], classes: usize, charset: &[String]) -> (String, f32) {
    let mut text = String::new();
    let mut scores = Vec::new();
    let mut prev = usize::MAX;
    for step in probs.chunks_exact(classes) {
        let (best, p) = step
            .iter()
            .enumerate()
            .fold(
                (0, f32::NEG_INFINITY),
                |acc, (i, &p)| if p > acc.1 { (i, p) } else { acc },
            );
        if best != 0 && best != prev {
            match charset.get(best - 1) {
                Some(c) => text.push_str(c),
                None => text.push(' '),
            }
            scores.push(p);
        }
        prev = best;
    }
    let score = if scores.is_empty() {
        0.0
    } else {
        scores.iter().sum::<f32>() / scores.len() as f32
    };
    (text, score)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn one_hot(seq: &[usize], classes: usize) -> Vec<f32> {
        let mut v = vec![0.0; seq.len() * classes];
        for (t, &c) in seq.iter().enumerate() {
            v[t * classes + c] = 0.9;
        }
        v
    }

    #[test]
    fn merges_repeats_and_drops_blanks() {
        let charset: Vec<String> = ["A", "B"].iter().map(|s| s.to_string()).collect();
        // A A _ A B B _ <space> B
        let (text, score) = greedy_decode(&one_hot(&[1, 1, 0, 1, 2, 2, 0, 3, 2], 4), 4, &charset);
        assert_eq!(text, "AAB B");
        assert!((score - 0.9).abs() < 1e-6);
        assert_eq!(
            greedy_decode(&one_hot(&[0, 0], 4), 4, &charset),
            (String::new(), 0.0)
        );
    }
}
