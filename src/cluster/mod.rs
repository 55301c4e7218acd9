//! A pipeline across machines: the front node and the nodes that run some of its workers.
//!
//! A pipeline file with a `[cluster]` section names its nodes, and a stage's `nodes` key says
//! where each of its workers runs:
//!
//! ```toml
//! [cluster]
//! front = "n1"                                    # runs `poolpipe run`: sources, batchers, sinks
//! nodes = { n2 = "10.0.0.2:7070", n3 = "10.0.0.3:7070" }
//!
//! [[stage]]
//! name = "tail"
//! workers = 2
//! nodes = ["n2", "n3"]                            # worker 0 on n2, worker 1 on n3
//! ```
//!
//! Every node loads the same file. `poolpipe node FILE --name n2` builds the engines of the
//! workers placed on n2 and serves them over gRPC ([`link::serve`]); `poolpipe run FILE` on the
//! front builds everything else and reaches each remote worker through a
//! [`link::RemoteRunner`]. Reservations, counters and results stay on the front: a remote worker
//! is one more worker of its pool that happens to be behind a link. Its batch's bytes (the
//! activation of a cut, the image, or filler as large as an emulated cut) cross the link, and
//! the time they take is charged to the remote stage's reservations, not emulated a second time
//! by the stage before it ([`charge_transfers_to_remote_stages`]).
//!
//! With `[cluster] nats`, `poolpipe controller` owns the plan: heartbeats, the controller lease
//! and plan epochs go over NATS ([`bus`]); an epoch is a placed plan with its stages' names
//! ([`epoch`]), re-planned on the servers that are up when one is lost or comes back, and
//! applied by the nodes and the front while they run. A node the file does not name joins by
//! offering its GPUs in its heartbeats; the controller takes it in at its next re-plan and the
//! epoch carries its address ([`members`]). `poolpipe deploy` writes Kubernetes manifests or
//! bare-metal files ([`deploy`]).
//!
//! The cameras run on the front, and move with it: several `poolpipe run` of the same file may
//! run (on different machines); the one holding the front lease ([`bus::Lease::Front`]) opens
//! the sources, the others stand by, and when its lease ends (the process died, or stopped and
//! let it go) one of them takes it, reconnects to the cameras and runs them in the current
//! epoch. A front that runs workers itself can only be replaced on its own machine; the file
//! `poolpipe deploy` writes has a front that runs none.
//!
//! With `[cluster] fronts = N` several fronts run at once: the controller splits each epoch's
//! cameras and routes into N shards ([`epoch::shard`]), there are N front leases, and each
//! front runs the shard whose lease it holds (one more stands by).
//!
//! A stage's output goes from its node straight to the node of the next stage where that
//! stage's reserved worker is on a node ([`handoff`]): the front sends the batch on with keys,
//! and the next node takes the activations from the node that holds them.

pub mod bus;
pub mod deploy;
pub mod epoch;
pub mod handoff;
pub mod link;
pub mod members;
pub mod netns;
pub mod wire;

use crate::config::Pipeline;

/// Bytes a message on the links of `p` may hold: the largest batch of the largest cut (or image)
/// any stage sends, with room for headers, and at least 64 MiB.
pub fn message_limit(p: &Pipeline) -> usize {
    let image = p.ingest_format();
    let image_bytes = image.width as usize * image.height as usize * 3;
    let largest = p
        .stages
        .iter()
        .map(|s| {
            let per_frame = s
                .profile
                .as_ref()
                .and_then(|pr| pr.cut_bytes)
                .map_or(image_bytes, |b| (b as usize).max(image_bytes));
            per_frame * s.max_batch.max(1)
        })
        .max()
        .unwrap_or(0);
    (largest + (1 << 20)).max(64 << 20)
}

/// On the front: a stage whose next stage has workers on other nodes no longer emulates the
/// transfer of its cut (the link carries the bytes for real); the next stage's reservations
/// take it instead, as the time a batch takes to reach one of its workers over the worker's own
/// link ([`crate::config::StageProfile::receive`]), which the worker spends receiving batch
/// k+1 while it computes batch k. Where a link was measured slower than the pipeline's
/// `bandwidth_gbps` (`measured`: Gbit/s by node), the slowest link into the stage sets its
/// transfer times. A stage on other nodes whose output comes back through the front (without
/// `direct_links`) keeps its transfer too: the cut crosses twice. Charging twice changes
/// nothing.
pub fn charge_transfers_to_remote_stages(
    p: &mut Pipeline,
    measured: &std::collections::BTreeMap<String, f64>,
) {
    let Some(cluster) = p.cluster.clone() else {
        return;
    };
    for r in 0..p.routes.len() {
        let stages = p.routes[r].stages.clone();
        for pair in stages.windows(2) {
            let (a, b) = (pair[0], pair[1]);
            let remote: Vec<&str> = (0..p.stages[b].workers)
                .filter_map(|w| p.stages[b].remote_node(w, Some(&cluster)))
                .collect();
            if remote.is_empty() {
                continue;
            }
            // The slowest of the links of `nodes`, as a factor on the file's rate.
            let bandwidth = p.bandwidth_gbps;
            let scale = |nodes: &[&str]| {
                let slowest = nodes
                    .iter()
                    .filter_map(|n| measured.get(*n).copied())
                    .fold(bandwidth, f64::min);
                if slowest > 0.0 {
                    bandwidth / slowest
                } else {
                    1.0
                }
            };
            let scale_b = scale(&remote);
            let from: Vec<&str> = (0..p.stages[a].workers)
                .filter_map(|w| p.stages[a].remote_node(w, Some(&cluster)))
                .collect();
            let back_through_front = !cluster.direct_links && !from.is_empty();
            let scale_a = scale(&from);
            // Charged already (a second pass): the next stage's receive is set.
            if p.stages[b]
                .profile
                .as_ref()
                .is_some_and(|pr| !pr.receive.is_empty())
            {
                continue;
            }
            let Some(pr) = p.stages[a].profile.as_mut() else {
                continue;
            };
            if pr.transfer.iter().all(|t| t.is_zero()) {
                continue;
            }
            let transfer = if back_through_front {
                let at_file_rate = pr.transfer.clone();
                pr.transfer = at_file_rate.iter().map(|t| t.mul_f64(scale_a)).collect();
                at_file_rate
            } else {
                let t = std::mem::take(&mut pr.transfer);
                pr.transfer = vec![std::time::Duration::ZERO; t.len()];
                t
            };
            if let Some(pr) = p.stages[b].profile.as_mut() {
                pr.receive = transfer.iter().map(|t| t.mul_f64(scale_b)).collect();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cut_into_remote_workers_is_their_links_and_charging_twice_changes_nothing() {
        let Some(profiles) = crate::profile::shared_profiles_dir() else {
            eprintln!("skipped: no shared profiles");
            return;
        };
        let nodes = [
            ("n2".to_string(), "10.0.0.2:7070".to_string()),
            ("n3".to_string(), "10.0.0.3:7070".to_string()),
        ];
        let out = std::path::Path::new("/tmp/unused.jsonl");
        let text = netns::cut_pipeline(&profiles, &nodes, 1.0, 5, out);
        let path = std::path::Path::new("cut.toml");
        let mut p = crate::config::load_pipeline_str(path, &text).unwrap();
        let (head, tail) = (
            p.stages[0].profile.clone().unwrap(),
            p.stages[1].profile.clone().unwrap(),
        );
        assert!(head.transfer.iter().all(|t| !t.is_zero()));
        assert!(tail.receive.is_empty());
        // n3's link measured at half the file's rate: the slowest link sets the transfer.
        let measured =
            std::collections::BTreeMap::from([("n2".to_string(), 1.0), ("n3".to_string(), 0.5)]);
        charge_transfers_to_remote_stages(&mut p, &measured);
        let (h, t) = (
            p.stages[0].profile.clone().unwrap(),
            p.stages[1].profile.clone().unwrap(),
        );
        assert!(h.transfer.iter().all(|t| t.is_zero()), "{h:?}");
        let doubled: Vec<_> = head.transfer.iter().map(|t| *t * 2).collect();
        assert_eq!(t.receive, doubled);
        // The tail's latency is its own: the link is booked apart from the device.
        assert_eq!(t.latency, tail.latency);
        charge_transfers_to_remote_stages(&mut p, &measured);
        assert_eq!(p.stages[1].profile.as_ref().unwrap().receive, doubled);
        assert!(
            p.stages[0]
                .profile
                .as_ref()
                .unwrap()
                .transfer
                .iter()
                .all(|t| t.is_zero())
        );
    }

    #[test]
    fn a_cut_from_node_to_node_crosses_once_and_through_the_front_twice() {
        let Some(profiles) = crate::profile::shared_profiles_dir() else {
            eprintln!("skipped: no shared profiles");
            return;
        };
        let out = std::path::Path::new("/tmp/unused.jsonl");
        for direct in [true, false] {
            let text = netns::node_to_node_pipeline(
                &profiles,
                ("10.0.0.2:7070", "10.0.0.3:7070"),
                1.0,
                5,
                out,
                direct,
            );
            let mut p =
                crate::config::load_pipeline_str(std::path::Path::new("d.toml"), &text).unwrap();
            let transfer = p.stages[0].profile.clone().unwrap().transfer;
            assert!(transfer.iter().all(|t| !t.is_zero()));
            for _ in 0..2 {
                charge_transfers_to_remote_stages(&mut p, &Default::default());
                let (h, t) = (
                    p.stages[0].profile.as_ref().unwrap(),
                    p.stages[1].profile.as_ref().unwrap(),
                );
                // n3 receives the cut either way (from n2, or from the front) ...
                assert_eq!(t.receive, transfer);
                // ... and through the front it also comes back from n2 first.
                if direct {
                    assert!(h.transfer.iter().all(|t| t.is_zero()));
                } else {
                    assert_eq!(h.transfer, transfer);
                }
            }
        }
    }
}
