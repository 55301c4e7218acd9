//! Placement: which server runs each process of a plan.
//!
//! The planner counts devices per class; a cluster is servers of a few GPUs each, joined by a
//! network. Placement puts every process of a plan on a GPU of a server of its class, packing the
//! processes of one GPU share as the runtime does, and keeping consecutive stages of a pipeline
//! on the same server where it can (their cuts then stay on the server's own links). It then
//! reports what crosses the network: for each server, the cut bytes per second it sends to and
//! receives from other servers, against its link. Frames of a stage are spread evenly over its
//! processes, so the share of stage j's output that moves from server A to server B is
//! `procs_j(A) / P_j x procs_j+1(B) / P_j+1`.
//!
//! Servers are declared in a TOML file (`configs/servers-*.toml`):
//!
//! ```toml
//! [[servers]]
//! name = "l4"          # servers l4-0, l4-1, ... (just `l4` when count = 1)
//! class = "L4"         # device class, as in the profiles and the plan
//! count = 7            # servers of this kind
//! gpus = 4             # GPUs per server
//! link_gbps = 25       # the server's network link, Gbit/s each way
//! ```

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

use super::Plan;

/// One server.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Server {
    /// Name (unique).
    pub name: String,
    /// Device class of its GPUs.
    pub class: String,
    /// GPUs.
    pub gpus: u32,
    /// Network link, Gbit/s each way.
    pub link_gbps: f64,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ServersFile {
    servers: Vec<ServerKind>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ServerKind {
    name: String,
    class: String,
    #[serde(default = "one")]
    count: u32,
    gpus: u32,
    link_gbps: f64,
}

fn one() -> u32 {
    1
}

/// Why a placement is impossible (or a servers file is wrong).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum PlacementError {
    /// The servers file.
    #[error("{path}: {message}")]
    File {
        /// The file.
        path: String,
        /// What is wrong, with its line where known.
        message: String,
    },
    /// The plan uses a class no server has.
    #[error("the plan runs processes on {class}, which no server has (servers have: {have})")]
    NoServerOfClass {
        /// The class.
        class: String,
        /// Classes the servers have.
        have: String,
    },
    /// Not enough GPUs of a class.
    #[error(
        "the plan needs more {class} GPUs than the servers have: {placed} of {processes} processes at share {share} placed when every {class} GPU was taken ({gpus} GPUs)"
    )]
    NotEnough {
        /// The class.
        class: String,
        /// Processes of the stage that could not all be placed.
        processes: u32,
        /// How many were placed.
        placed: u32,
        /// The stage's share.
        share: u32,
        /// GPUs of the class.
        gpus: u32,
    },
}

/// Reads a servers file and expands each kind into its servers.
pub fn load_servers(path: &Path) -> Result<Vec<Server>, PlacementError> {
    let err = |message: String| PlacementError::File {
        path: path.display().to_string(),
        message,
    };
    let text = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
    let file: ServersFile = toml::from_str(&text).map_err(|e| err(e.to_string()))?;
    let mut out: Vec<Server> = Vec::new();
    for (i, k) in file.servers.iter().enumerate() {
        let at = |key: &str, m: String| err(format!("`servers[{i}].{key}`: {m}"));
        if k.gpus == 0 {
            return Err(at("gpus", "a server needs at least one GPU".into()));
        }
        if k.count == 0 {
            return Err(at("count", "at least 1".into()));
        }
        if !(k.link_gbps > 0.0 && k.link_gbps.is_finite()) {
            return Err(at(
                "link_gbps",
                format!("{}: expected a positive number", k.link_gbps),
            ));
        }
        for n in 0..k.count {
            let name = if k.count == 1 {
                k.name.clone()
            } else {
                format!("{}-{n}", k.name)
            };
            if out.iter().any(|s| s.name == name) {
                return Err(at("name", format!("server `{name}` is declared twice")));
            }
            out.push(Server {
                name,
                class: k.class.clone(),
                gpus: k.gpus,
                link_gbps: k.link_gbps,
            });
        }
    }
    if out.is_empty() {
        return Err(err("`servers` declares no server".into()));
    }
    Ok(out)
}

/// One process of a plan, placed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PlacedProcess {
    /// Model (index into the plan's models).
    pub model: usize,
    /// Pipeline of the model.
    pub pipeline: usize,
    /// Stage of the pipeline.
    pub stage: usize,
    /// Process of the stage.
    pub process: u32,
    /// Server (index into [`Placement::servers`]).
    pub server: usize,
    /// GPU of the server.
    pub gpu: u32,
}

/// A server's network traffic under the plan.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LinkLoad {
    /// Server (index into [`Placement::servers`]).
    pub server: usize,
    /// Cut bytes it sends to other servers, Gbit/s.
    pub out_gbps: f64,
    /// Cut bytes it receives from other servers, Gbit/s.
    pub in_gbps: f64,
}

/// Where every process of a plan runs, and what crosses the network.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Placement {
    /// The servers.
    pub servers: Vec<Server>,
    /// Every process.
    pub processes: Vec<PlacedProcess>,
    /// Per server with traffic.
    pub links: Vec<LinkLoad>,
    /// Planned frames per second whose cut crosses servers, over all planned frames that have a
    /// cut (0 when nothing is cut).
    pub crossing_share: f64,
}

impl Placement {
    /// Servers whose link carries more than it can, as (server, load / capacity).
    pub fn overloaded(&self) -> Vec<(&str, f64)> {
        self.links
            .iter()
            .filter_map(|l| {
                let s = &self.servers[l.server];
                let r = l.out_gbps.max(l.in_gbps) / s.link_gbps;
                (r > 1.0).then_some((s.name.as_str(), r))
            })
            .collect()
    }

    /// GPUs taken on each server.
    pub fn gpus_used(&self) -> Vec<u32> {
        let mut used: Vec<std::collections::BTreeSet<u32>> =
            vec![Default::default(); self.servers.len()];
        for p in &self.processes {
            used[p.server].insert(p.gpu);
        }
        used.iter().map(|g| g.len() as u32).collect()
    }
}

/// The GPUs of one server: each free, or holding processes of one share.
struct Slots {
    /// Per GPU: `(share, processes on it)`, or `None` while free.
    gpus: Vec<Option<(u32, u32)>>,
}

impl Slots {
    /// Takes up to `n` process slots at `share`: part-filled GPUs of that share first, then free
    /// GPUs. Returns the GPU of each slot taken.
    fn take(&mut self, share: u32, n: u32) -> Vec<u32> {
        let mut got = Vec::new();
        for pass in 0..2 {
            for (g, slot) in self.gpus.iter_mut().enumerate() {
                while (got.len() as u32) < n {
                    match slot {
                        Some((s, used)) if *s == share && *used < share => {
                            *used += 1;
                            got.push(g as u32);
                        }
                        None if pass == 1 => *slot = Some((share, 0)),
                        _ => break,
                    }
                }
            }
        }
        got
    }

    fn free(&self, share: u32) -> u32 {
        self.gpus
            .iter()
            .map(|s| match s {
                None => share,
                Some((s2, used)) if *s2 == share => share - used,
                _ => 0,
            })
            .sum()
    }
}

/// Places `plan` on `servers`. `cut_bytes(model, after_block)` gives the bytes per frame of the
/// cut after a block (from the profiles), for the traffic figures.
pub fn place(
    plan: &Plan,
    servers: &[Server],
    cut_bytes: &dyn Fn(&str, usize) -> Option<u64>,
) -> Result<Placement, PlacementError> {
    let mut slots: Vec<Slots> = servers
        .iter()
        .map(|s| Slots {
            gpus: vec![None; s.gpus as usize],
        })
        .collect();
    let mut processes = Vec::new();
    for (mi, m) in plan.models.iter().enumerate() {
        for (pi, p) in m.pipelines.iter().enumerate() {
            let mut previous: Vec<(usize, u32)> = Vec::new();
            for (si, st) in p.stages.iter().enumerate() {
                let of_class: Vec<usize> = (0..servers.len())
                    .filter(|&i| servers[i].class == st.class)
                    .collect();
                if of_class.is_empty() {
                    let mut have: Vec<&str> = servers.iter().map(|s| s.class.as_str()).collect();
                    have.sort_unstable();
                    have.dedup();
                    return Err(PlacementError::NoServerOfClass {
                        class: st.class.clone(),
                        have: have.join(", "),
                    });
                }
                // The previous stage's servers first (most of its processes first), then the
                // servers with the most room at this share.
                let mut order: Vec<usize> = previous
                    .iter()
                    .map(|&(s, _)| s)
                    .filter(|s| of_class.contains(s))
                    .collect();
                let mut rest: Vec<usize> = of_class
                    .iter()
                    .copied()
                    .filter(|s| !order.contains(s))
                    .collect();
                rest.sort_by_key(|&s| std::cmp::Reverse(slots[s].free(st.share)));
                order.extend(rest);
                let share = st.share.max(1);
                let mut placed = 0u32;
                let mut here: BTreeMap<usize, u32> = BTreeMap::new();
                for s in order {
                    if placed == st.processes {
                        break;
                    }
                    for gpu in slots[s].take(share, st.processes - placed) {
                        processes.push(PlacedProcess {
                            model: mi,
                            pipeline: pi,
                            stage: si,
                            process: placed,
                            server: s,
                            gpu,
                        });
                        placed += 1;
                        *here.entry(s).or_default() += 1;
                    }
                }
                if placed < st.processes {
                    return Err(PlacementError::NotEnough {
                        class: st.class.clone(),
                        processes: st.processes,
                        placed,
                        share,
                        gpus: of_class.iter().map(|&s| servers[s].gpus).sum(),
                    });
                }
                previous = here.into_iter().collect();
                previous.sort_by_key(|&(_, n)| std::cmp::Reverse(n));
            }
        }
    }
    let (links, crossing_share) = traffic(plan, servers, &processes, cut_bytes);
    Ok(Placement {
        servers: servers.to_vec(),
        processes,
        links,
        crossing_share,
    })
}

/// Cut traffic between servers, and the share of cut frames that cross servers.
fn traffic(
    plan: &Plan,
    servers: &[Server],
    processes: &[PlacedProcess],
    cut_bytes: &dyn Fn(&str, usize) -> Option<u64>,
) -> (Vec<LinkLoad>, f64) {
    let mut out = vec![0.0f64; servers.len()];
    let mut inn = vec![0.0f64; servers.len()];
    let (mut cut_fps, mut crossing_fps) = (0.0, 0.0);
    // Processes per server of each (model, pipeline, stage).
    let mut count: BTreeMap<(usize, usize, usize), BTreeMap<usize, f64>> = BTreeMap::new();
    for p in processes {
        *count
            .entry((p.model, p.pipeline, p.stage))
            .or_default()
            .entry(p.server)
            .or_default() += 1.0;
    }
    for (mi, m) in plan.models.iter().enumerate() {
        for (pi, p) in m.pipelines.iter().enumerate() {
            for j in 0..p.stages.len().saturating_sub(1) {
                let (Some(a), Some(b)) = (count.get(&(mi, pi, j)), count.get(&(mi, pi, j + 1)))
                else {
                    continue;
                };
                let (na, nb) = (a.values().sum::<f64>(), b.values().sum::<f64>());
                let bytes = cut_bytes(&m.name, p.stages[j].blocks[1] - 1).unwrap_or(0) as f64;
                cut_fps += p.throughput;
                for (&sa, &ca) in a {
                    for (&sb, &cb) in b {
                        if sa == sb {
                            continue;
                        }
                        let fps = p.throughput * ca / na * cb / nb;
                        crossing_fps += fps;
                        let gbps = fps * bytes * 8.0 / 1e9;
                        out[sa] += gbps;
                        inn[sb] += gbps;
                    }
                }
            }
        }
    }
    let links = (0..servers.len())
        .filter(|&s| out[s] > 0.0 || inn[s] > 0.0)
        .map(|s| LinkLoad {
            server: s,
            out_gbps: out[s],
            in_gbps: inn[s],
        })
        .collect();
    let share = if cut_fps > 0.0 {
        crossing_fps / cut_fps
    } else {
        0.0
    };
    (links, share)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::planner::{ClassPlan, Mode, ModelPlan, PipelinePlan, StagePlan};

    fn stage(blocks: [usize; 2], class: &str, share: u32, processes: u32) -> StagePlan {
        StagePlan {
            blocks,
            class: class.into(),
            share,
            processes,
            devices: f64::from(processes) / f64::from(share),
            latency_ms: 10.0,
            transfer_ms: 1.0,
            capacity: 100.0,
        }
    }

    fn plan(pipelines: Vec<PipelinePlan>) -> Plan {
        Plan {
            mode: Mode::Poolpipe,
            objective: 1.0,
            solve_seconds: 0.0,
            gap: 0.0,
            status: "optimal".into(),
            candidates: 1,
            bandwidth_gbps: 10.0,
            margin: 0.1,
            queueing: 1.0,
            pool_tiers: vec![1],
            max_stages: 2,
            send_while_computing: true,
            classes: vec![ClassPlan {
                class: "L4".into(),
                available: 8,
                used: 8.0,
            }],
            models: vec![ModelPlan {
                name: "m".into(),
                weight: 1.0,
                slo_ms: 100.0,
                slo_basis: "x".into(),
                throughput: 100.0,
                pipelines,
                accuracy: None,
            }],
            placement: None,
        }
    }

    fn servers(kinds: &[(&str, &str, u32, u32)]) -> Vec<Server> {
        let mut out = Vec::new();
        for (name, class, count, gpus) in kinds {
            for n in 0..*count {
                out.push(Server {
                    name: format!("{name}-{n}"),
                    class: class.to_string(),
                    gpus: *gpus,
                    link_gbps: 10.0,
                });
            }
        }
        out
    }

    #[test]
    fn consecutive_stages_share_a_server_when_they_fit() {
        // Block 0 on 2 processes at share 2 (1 GPU), blocks 1-2 on 2 processes (2 GPUs): the
        // three GPUs fit on one server, so the cut never leaves it.
        let p = plan(vec![PipelinePlan {
            batch: 4,
            throughput: 100.0,
            latency_ms: 50.0,
            stages: vec![stage([0, 1], "L4", 2, 2), stage([1, 3], "L4", 1, 2)],
        }]);
        let s = servers(&[("a", "L4", 2, 4)]);
        let placed = place(&p, &s, &|_, after| (after == 0).then_some(1_000_000)).unwrap();
        // Both stages on a-0 (the one with room first), nothing on the network.
        assert!(placed.processes.iter().all(|x| x.server == 0), "{placed:?}");
        assert_eq!(placed.gpus_used(), vec![3, 0]);
        assert!(placed.links.is_empty());
        assert_eq!(placed.crossing_share, 0.0);
    }

    #[test]
    fn a_cut_across_servers_is_counted_on_both_links() {
        let p = plan(vec![PipelinePlan {
            batch: 4,
            throughput: 100.0,
            latency_ms: 50.0,
            stages: vec![stage([0, 1], "T4", 1, 2), stage([1, 3], "L4", 1, 2)],
        }]);
        let s = servers(&[("l4", "L4", 1, 4), ("t4", "T4", 1, 4)]);
        let placed = place(&p, &s, &|_, after| (after == 0).then_some(1_250_000)).unwrap();
        // 100 frames/s x 1.25 MB x 8 = 1 Gbit/s from t4-0 to l4-0.
        let t4 = placed.links.iter().find(|l| l.server == 1).unwrap();
        let l4 = placed.links.iter().find(|l| l.server == 0).unwrap();
        assert!(
            (t4.out_gbps - 1.0).abs() < 1e-9 && t4.in_gbps == 0.0,
            "{t4:?}"
        );
        assert!((l4.in_gbps - 1.0).abs() < 1e-9, "{l4:?}");
        assert_eq!(placed.crossing_share, 1.0);
        assert!(placed.overloaded().is_empty());
        // On 0.5 Gbit/s links both ends are overloaded twice over.
        let slow: Vec<Server> = s
            .into_iter()
            .map(|x| Server {
                link_gbps: 0.5,
                ..x
            })
            .collect();
        let placed = place(&p, &slow, &|_, _| Some(1_250_000)).unwrap();
        let over = placed.overloaded();
        assert_eq!(over.len(), 2);
        assert!(over.iter().all(|(_, r)| (r - 2.0).abs() < 1e-9), "{over:?}");
    }

    #[test]
    fn shares_pack_gpus_and_shortages_name_the_class() {
        // 5 processes at share 2 need 3 GPUs; 3 at share 4 need one more.
        let p = plan(vec![
            PipelinePlan {
                batch: 1,
                throughput: 10.0,
                latency_ms: 5.0,
                stages: vec![stage([0, 2], "L4", 2, 5)],
            },
            PipelinePlan {
                batch: 1,
                throughput: 10.0,
                latency_ms: 5.0,
                stages: vec![stage([0, 2], "L4", 4, 3)],
            },
        ]);
        let placed = place(&p, &servers(&[("a", "L4", 1, 4)]), &|_, _| None).unwrap();
        assert_eq!(placed.gpus_used(), vec![4]);
        let per_gpu = |g: u32| placed.processes.iter().filter(|x| x.gpu == g).count();
        assert_eq!(
            (per_gpu(0), per_gpu(1), per_gpu(2), per_gpu(3)),
            (2, 2, 1, 3)
        );
        let e = place(&p, &servers(&[("a", "L4", 1, 3)]), &|_, _| None).unwrap_err();
        assert!(e.to_string().contains("needs more L4 GPUs"), "{e}");
        let e = place(&p, &servers(&[("a", "T4", 2, 8)]), &|_, _| None).unwrap_err();
        assert_eq!(
            e.to_string(),
            "the plan runs processes on L4, which no server has (servers have: T4)"
        );
    }

    #[test]
    fn servers_files_expand_and_refuse_bad_values() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("s.toml");
        std::fs::write(
            &f,
            "[[servers]]\nname = \"l4\"\nclass = \"L4\"\ncount = 2\ngpus = 4\nlink_gbps = 25\n\n[[servers]]\nname = \"big\"\nclass = \"T4\"\ngpus = 8\nlink_gbps = 100\n",
        )
        .unwrap();
        let s = load_servers(&f).unwrap();
        let names: Vec<&str> = s.iter().map(|x| x.name.as_str()).collect();
        assert_eq!(names, ["l4-0", "l4-1", "big"]);
        std::fs::write(
            &f,
            "[[servers]]\nname = \"x\"\nclass = \"L4\"\ngpus = 0\nlink_gbps = 1\n",
        )
        .unwrap();
        let e = load_servers(&f).unwrap_err().to_string();
        assert!(e.contains("`servers[0].gpus`"), "{e}");
        std::fs::write(&f, "[[servers]]\nname = \"x\"\nclas = \"L4\"\n").unwrap();
        let e = load_servers(&f).unwrap_err().to_string();
        assert!(e.contains("line 3") && e.contains("clas"), "{e}");
    }
}
