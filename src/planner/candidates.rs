//! Enumerates the pipeline configurations that can meet their SLO at all, with their
//! per-process rates and minimum rates, and drops the dominated ones (see the module docs of
//! [`super`] for the definitions).

use std::ops::Range;

use super::{Cluster, Mode, ModelSpec, Options, PlanError};
use crate::profile::Profiles;

/// One stage of a candidate.
#[derive(Debug, Clone, PartialEq)]
pub struct StageCand {
    /// Blocks `[start, end)`.
    pub blocks: Range<usize>,
    /// Index into `Cluster::classes`.
    pub class: usize,
    /// GPU share.
    pub share: u32,
    /// Latency of one batch, seconds.
    pub latency: f64,
    /// Transfer of one batch to the next stage, seconds (0 for the last stage).
    pub transfer: f64,
    /// Frames per second of one process (links included).
    pub rate: f64,
}

/// One pipeline configuration of one model.
#[derive(Debug, Clone, PartialEq)]
pub struct Candidate {
    /// Index into the model list.
    pub model: usize,
    /// Batch size.
    pub batch: usize,
    /// Stages in order.
    pub stages: Vec<StageCand>,
    /// Stage latencies (with the queueing allowance of the tier) plus transfers, seconds.
    pub fixed: f64,
    /// Sum of the stage latencies alone, seconds.
    pub run: f64,
    /// Pool tier: every stage has at least this many processes, and a batch may wait
    /// `queueing / tier` times a stage's run time for a worker.
    pub tier: u32,
    /// Lowest arrival rate at which batches of `batch` form in time (0 for batch 1).
    pub min_rate: f64,
}

/// Frames per second of one process that holds each batch for `hold` seconds (its run time plus
/// sending the batch on), capped by its share of its GPU's link in and out.
pub(crate) fn stage_rate(
    batch: usize,
    latency: f64,
    share: u32,
    bytes_in: Option<u64>,
    bytes_out: Option<u64>,
    link_bytes_per_sec: f64,
) -> f64 {
    let mut rate = batch as f64 / latency;
    for bytes in [bytes_in, bytes_out].into_iter().flatten() {
        if bytes > 0 {
            rate = rate.min(link_bytes_per_sec / share as f64 / bytes as f64);
        }
    }
    rate
}

/// All block partitions of `0..blocks` into exactly `k` contiguous non-empty ranges.
fn partitions(blocks: usize, k: usize) -> Vec<Vec<Range<usize>>> {
    fn go(
        start: usize,
        blocks: usize,
        k: usize,
        acc: &mut Vec<Range<usize>>,
        out: &mut Vec<Vec<Range<usize>>>,
    ) {
        if k == 1 {
            acc.push(start..blocks);
            out.push(acc.clone());
            acc.pop();
            return;
        }
        for end in start + 1..=blocks - (k - 1) {
            acc.push(start..end);
            go(end, blocks, k - 1, acc, out);
            acc.pop();
        }
    }
    let mut out = Vec::new();
    if k >= 1 && k <= blocks {
        go(0, blocks, k, &mut Vec::new(), &mut out);
    }
    out
}

/// Candidates of every model (outer index = model), dominated ones removed. A model without
/// any candidate is an error that says why.
pub fn enumerate(
    profiles: &Profiles,
    cluster: &Cluster,
    models: &[ModelSpec],
    opts: &Options,
) -> Result<Vec<Vec<Candidate>>, PlanError> {
    let link = cluster.link_bytes_per_sec();
    let mut all = Vec::with_capacity(models.len());
    for (mi, spec) in models.iter().enumerate() {
        let prof = profiles.model(&spec.name)?;
        let blocks = prof.blocks();
        // (class index, share) pairs with a profile and at least one device.
        let mut kinds: Vec<(usize, u32)> = Vec::new();
        for (ci, c) in cluster.classes.iter().enumerate() {
            if c.count == 0 {
                continue;
            }
            for share in 1..=opts.max_share {
                if opts.mode == Mode::Paired && share != 1 {
                    continue;
                }
                if prof.timing.contains_key(&(c.name.clone(), share)) {
                    kinds.push((ci, share));
                }
            }
        }
        if kinds.is_empty() {
            return Err(PlanError::Infeasible {
                model: spec.name.clone(),
                reason: format!(
                    "no profile for any device class of the cluster ({}); profiled: {}",
                    cluster.describe(),
                    prof.timing
                        .keys()
                        .map(|(c, s)| format!("{c}/{s}"))
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            });
        }
        let stage_counts: Vec<usize> = match opts.mode {
            Mode::Np => vec![1],
            Mode::Paired => vec![2],
            Mode::Poolpipe => (1..=opts.max_stages.min(blocks)).collect(),
        };
        let budget = spec.slo.as_secs_f64() * (1.0 - opts.margin);
        let mut fastest = f64::INFINITY;
        let mut cands = Vec::new();
        for &k in &stage_counts {
            for parts in partitions(blocks, k) {
                let mut assign = vec![0usize; k];
                loop {
                    let chosen: Vec<(usize, u32)> = assign.iter().map(|&a| kinds[a]).collect();
                    let paired_ok = opts.mode != Mode::Paired || chosen[0].0 != chosen[1].0;
                    if paired_ok {
                        for c in build(profiles, cluster, spec, mi, &parts, &chosen, opts, link)? {
                            for &tier in &opts.pool_tiers {
                                let fixed = c.fixed + opts.queueing * c.run / f64::from(tier);
                                fastest = fastest.min(fixed);
                                if c.batch == 1 && fixed <= budget || c.batch > 1 && fixed < budget
                                {
                                    let min_rate = if c.batch > 1 {
                                        (c.batch - 1) as f64 / (budget - fixed)
                                    } else {
                                        0.0
                                    };
                                    cands.push(Candidate {
                                        min_rate,
                                        fixed,
                                        tier,
                                        ..c.clone()
                                    });
                                }
                            }
                        }
                    }
                    // Next assignment of kinds to stages (odometer).
                    let mut i = 0;
                    while i < k {
                        assign[i] += 1;
                        if assign[i] < kinds.len() {
                            break;
                        }
                        assign[i] = 0;
                        i += 1;
                    }
                    if i == k {
                        break;
                    }
                }
            }
        }
        if cands.is_empty() {
            return Err(PlanError::Infeasible {
                model: spec.name.clone(),
                reason: format!(
                    "the SLO of {:.2} ms (with a {:.0}% margin: {:.2} ms) is below the fastest possible latency {:.2} ms on {}",
                    spec.slo.as_secs_f64() * 1e3,
                    opts.margin * 100.0,
                    budget * 1e3,
                    fastest * 1e3,
                    cluster.describe()
                ),
            });
        }
        all.push(prune(cands));
    }
    Ok(all)
}

/// The candidates for one partition and one assignment of (class, share) to its stages, one per
/// batch size.
#[allow(clippy::too_many_arguments)]
fn build(
    profiles: &Profiles,
    cluster: &Cluster,
    spec: &ModelSpec,
    model: usize,
    parts: &[Range<usize>],
    chosen: &[(usize, u32)],
    opts: &Options,
    link: f64,
) -> Result<Vec<Candidate>, PlanError> {
    let prof = profiles.model(&spec.name)?;
    let max_batch = chosen
        .iter()
        .map(|&(c, s)| prof.timing[&(cluster.classes[c].name.clone(), s)].max_batch())
        .min()
        .unwrap_or(0)
        .min(opts.max_batch);
    let cut = |after: usize| prof.cut_bytes.get(after).copied();
    let mut out = Vec::with_capacity(max_batch);
    for batch in 1..=max_batch {
        let mut stages = Vec::with_capacity(parts.len());
        let mut fixed = 0.0;
        let mut run = 0.0;
        for (k, (range, &(ci, share))) in parts.iter().zip(chosen).enumerate() {
            let latency = profiles
                .latency(
                    &spec.name,
                    &cluster.classes[ci].name,
                    share,
                    range.clone(),
                    batch,
                )?
                .as_secs_f64();
            let bytes_in = (k > 0).then(|| cut(range.start - 1)).flatten();
            let bytes_out = (k + 1 < parts.len()).then(|| cut(range.end - 1)).flatten();
            let transfer = match bytes_out {
                Some(b) => b as f64 * batch as f64 / link,
                None => 0.0,
            };
            fixed += latency + transfer;
            run += latency;
            stages.push(StageCand {
                blocks: range.clone(),
                class: ci,
                share,
                latency,
                transfer,
                rate: stage_rate(
                    batch,
                    if opts.send_while_computing {
                        latency
                    } else {
                        latency + transfer
                    },
                    share,
                    bytes_in,
                    bytes_out,
                    link,
                ),
            });
        }
        out.push(Candidate {
            model,
            batch,
            stages,
            fixed,
            run,
            tier: 1,
            min_rate: 0.0,
        });
    }
    Ok(out)
}

/// Drops candidates dominated by another of the same model and multiset of (class, share)
/// stages: sorted rates all at least as high, a minimum rate and a pool tier no higher.
fn prune(cands: Vec<Candidate>) -> Vec<Candidate> {
    type Key = Vec<(usize, u32)>;
    let sig = |c: &Candidate| -> (Key, Vec<f64>) {
        let mut v: Vec<(usize, u32, f64)> = c
            .stages
            .iter()
            .map(|s| (s.class, s.share, s.rate))
            .collect();
        v.sort_by(|a, b| (a.0, a.1).cmp(&(b.0, b.1)).then(a.2.total_cmp(&b.2)));
        (
            v.iter().map(|&(c, s, _)| (c, s)).collect(),
            v.iter().map(|&(_, _, r)| r).collect(),
        )
    };
    let sigs: Vec<(Key, Vec<f64>)> = cands.iter().map(sig).collect();
    let mut groups: std::collections::HashMap<&Key, Vec<usize>> = Default::default();
    for (i, (key, _)) in sigs.iter().enumerate() {
        groups.entry(key).or_default().push(i);
    }
    let mut keep = vec![true; cands.len()];
    for members in groups.values() {
        for &i in members {
            for &j in members {
                if i == j || !keep[j] {
                    continue;
                }
                let (ri, rj) = (&sigs[i].1, &sigs[j].1);
                let ge = rj.iter().zip(ri).all(|(a, b)| a >= b)
                    && cands[j].min_rate <= cands[i].min_rate
                    && cands[j].tier <= cands[i].tier;
                let strictly = rj.iter().zip(ri).any(|(a, b)| a > b)
                    || cands[j].min_rate < cands[i].min_rate
                    || cands[j].tier < cands[i].tier;
                // Of equal ones, keep the first.
                if ge && (strictly || j < i) {
                    keep[i] = false;
                    break;
                }
            }
        }
    }
    cands
        .into_iter()
        .zip(keep)
        .filter_map(|(c, k)| k.then_some(c))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partitions_cover_in_order() {
        assert_eq!(partitions(3, 1), vec![vec![0..3]]);
        assert_eq!(partitions(3, 2), vec![vec![0..1, 1..3], vec![0..2, 2..3]]);
        assert_eq!(partitions(10, 2).len(), 9);
        assert_eq!(partitions(10, 3).len(), 36);
        assert!(partitions(2, 3).is_empty());
    }

    #[test]
    fn link_limits_the_rate() {
        // 1 ms per batch of 4 = 4000 fps; 1 MB per frame on a 1 GB/s link at share 2 = 500 fps.
        let r = stage_rate(4, 0.001, 2, Some(1_000_000), None, 1e9);
        assert!((r - 500.0).abs() < 1e-9, "{r}");
        assert!((stage_rate(4, 0.001, 1, None, None, 1e9) - 4000.0).abs() < 1e-9);
    }
}
