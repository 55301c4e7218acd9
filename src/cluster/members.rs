//! Who is in a cluster, as the controller sees it: the nodes the file names, and nodes that
//! joined by offering their GPUs over NATS.
//!
//! A node the file names is a server of the file's placement (or a node without GPUs of its
//! own). A node the file does not name joins by saying, in each heartbeat, what server it is
//! (its GPUs' class and count, its link) and where the front reaches it ([`Offer`]); the
//! controller takes it in at the next re-plan, and the epoch carries its address
//! ([`super::epoch::Epoch::addresses`]) so that every process can reach it. An offer of a class
//! that no model of the plan has latencies for is refused (the planner could place nothing on
//! it), once, with the reason kept for the controller's summary.
//!
//! A node is up while it was heard within [`NODE_SILENT`]. A named node never heard from counts
//! as up until the start-up grace ends (nodes start beside the controller); a node that joined
//! was heard by definition.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Instant;

use serde_json::json;

use super::bus::{Heartbeat, NODE_SILENT, Offer};
use crate::planner::placement::Server;

/// What hearing a heartbeat changed, for the log.
#[derive(Debug, Clone, PartialEq)]
pub enum Heard {
    /// A node the file does not name offered itself and was taken in (or changed its offer).
    Joined(String),
    /// A node's offer was refused: why.
    Refused(String),
}

/// The members of a cluster and when each was last heard.
#[derive(Debug, Clone)]
pub struct Members {
    /// The file's nodes, the front first.
    named: Vec<String>,
    /// The servers of the file's placement that are among them.
    placed: Vec<Server>,
    /// Nodes that joined by an offer, in the order they first offered: server and address.
    joined: Vec<(Server, String)>,
    /// Offers refused, by node: why.
    refused: BTreeMap<String, String>,
    /// By node: when last heard, and the epoch it said it applied.
    seen: BTreeMap<String, (Instant, Option<u64>)>,
    /// Device classes the plan's models have latencies for.
    classes: BTreeSet<String>,
}

impl Members {
    /// The file's nodes (`named`, the front first), the servers of its placement, and the
    /// classes an offer may bring.
    pub fn new(named: Vec<String>, placement: &[Server], classes: BTreeSet<String>) -> Self {
        let placed = placement
            .iter()
            .filter(|s| named.contains(&s.name))
            .cloned()
            .collect();
        Members {
            named,
            placed,
            joined: Vec::new(),
            refused: BTreeMap::new(),
            seen: BTreeMap::new(),
            classes,
        }
    }

    /// Records a heartbeat heard at `now`; says when it made a node join or was refused.
    pub fn hear(&mut self, hb: &Heartbeat, now: Instant) -> Option<Heard> {
        let heard = match &hb.offer {
            // A named node is the file's server, whatever it offers.
            Some(offer) if !self.named.contains(&hb.node) => self.offered(&hb.node, offer),
            _ => None,
        };
        if !self.refused.contains_key(&hb.node) {
            self.seen.insert(hb.node.clone(), (now, hb.applied));
        }
        heard
    }

    fn offered(&mut self, node: &str, offer: &Offer) -> Option<Heard> {
        let server = Server {
            name: node.to_string(),
            class: offer.class.clone(),
            gpus: offer.gpus,
            link_gbps: offer.link_gbps,
        };
        let why = if offer.gpus == 0 {
            Some("it offers 0 GPUs".to_string())
        } else if !self.classes.contains(&offer.class) {
            Some(format!(
                "no model of the plan has latencies for class `{}` (the profiles have: {})",
                offer.class,
                self.classes.iter().cloned().collect::<Vec<_>>().join(", ")
            ))
        } else if !offer.address.contains(':') {
            Some(format!("its address `{}` is not HOST:PORT", offer.address))
        } else {
            None
        };
        if let Some(why) = why {
            // Said once; a node that comes back with a good offer is taken in.
            let again = self.refused.get(node) == Some(&why);
            self.refused.insert(node.to_string(), why.clone());
            self.joined.retain(|(s, _)| s.name != node);
            self.seen.remove(node);
            return (!again).then(|| Heard::Refused(format!("{node}: {why}")));
        }
        self.refused.remove(node);
        let entry = (server, offer.address.clone());
        match self.joined.iter_mut().find(|(s, _)| s.name == node) {
            Some(known) if *known == entry => None,
            Some(known) => {
                *known = entry;
                Some(Heard::Joined(format!(
                    "{node} changed its offer to {}:{} at {} (counts from the next re-plan)",
                    offer.class, offer.gpus, offer.address
                )))
            }
            None => {
                self.joined.push(entry);
                Some(Heard::Joined(format!(
                    "{node} offers {}:{} at {}",
                    offer.class, offer.gpus, offer.address
                )))
            }
        }
    }

    /// Takes in the nodes that joined before, as epoch `e` (the current one, found when this
    /// controller took the lease) has them: their servers from its placement, their addresses
    /// from the epoch. Like the file's nodes, they count as up until the start-up grace ends
    /// unless heard, so that one that died with the last controller is re-planned away.
    pub fn recall(&mut self, e: &super::epoch::Epoch) {
        let Some(placed) = &e.plan.placement else {
            return;
        };
        for (node, addr) in &e.addresses {
            if let Some(server) = placed.servers.iter().find(|s| &s.name == node)
                && !self.is_member(node)
            {
                self.joined.push((server.clone(), addr.clone()));
            }
        }
    }

    /// Every member, up or not: the file's nodes, then those that joined.
    pub fn names(&self) -> Vec<String> {
        let mut out = self.named.clone();
        out.extend(self.joined.iter().map(|(s, _)| s.name.clone()));
        out
    }

    /// Whether `node` is up at `now`; a member never heard counts as up until `grace_until`.
    pub fn up(&self, node: &str, now: Instant, grace_until: Instant) -> bool {
        match self.seen.get(node) {
            Some((at, _)) => now.saturating_duration_since(*at) <= NODE_SILENT,
            None => self.is_member(node) && now < grace_until,
        }
    }

    /// Whether `node` is named by the file or joined (up or not).
    fn is_member(&self, node: &str) -> bool {
        self.named.iter().any(|n| n == node) || self.joined.iter().any(|(s, _)| s.name == node)
    }

    /// The members up at `now`, in [`Members::names`] order.
    pub fn live(&self, now: Instant, grace_until: Instant) -> Vec<String> {
        self.names()
            .into_iter()
            .filter(|n| self.up(n, now, grace_until))
            .collect()
    }

    /// Whether `node` is a server (can hold processes).
    pub fn is_server(&self, node: &str) -> bool {
        self.placed
            .iter()
            .chain(self.joined.iter().map(|(s, _)| s))
            .any(|s| s.name == node)
    }

    /// Every server: the file's placement's, then those that joined.
    pub fn servers(&self) -> Vec<Server> {
        let mut out = self.placed.clone();
        out.extend(self.joined.iter().map(|(s, _)| s.clone()));
        out
    }

    /// The addresses of the nodes among `members` that joined (the file has the others').
    pub fn addresses(&self, members: &[String]) -> BTreeMap<String, String> {
        self.joined
            .iter()
            .filter(|(s, _)| members.contains(&s.name))
            .map(|(s, a)| (s.name.clone(), a.clone()))
            .collect()
    }

    /// The offers refused, by node: why.
    pub fn refused(&self) -> &BTreeMap<String, String> {
        &self.refused
    }

    /// The controller's view at `now`, by node: up, how it joined, its applied epoch and when
    /// it was last heard.
    pub fn view(
        &self,
        now: Instant,
        grace_until: Instant,
    ) -> serde_json::Map<String, serde_json::Value> {
        let mut out: serde_json::Map<String, serde_json::Value> = self
            .names()
            .into_iter()
            .map(|n| {
                let s = self.seen.get(&n);
                let joined = self.joined.iter().find(|(s, _)| s.name == n);
                let v = json!({
                    "up": self.up(&n, now, grace_until),
                    "joined": joined.map(|(s, a)| json!({
                        "class": s.class, "gpus": s.gpus, "link_gbps": s.link_gbps, "address": a,
                    })),
                    "applied": s.and_then(|x| x.1),
                    "last_heard_ms": s.map(|x| now.saturating_duration_since(x.0).as_millis() as u64),
                });
                (n, v)
            })
            .collect();
        for (n, why) in &self.refused {
            out.insert(n.clone(), json!({"up": false, "refused": why}));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn server(name: &str, class: &str) -> Server {
        Server {
            name: name.into(),
            class: class.into(),
            gpus: 1,
            link_gbps: 10.0,
        }
    }

    fn beat(node: &str, offer: Option<(&str, u32, &str)>) -> Heartbeat {
        Heartbeat {
            node: node.into(),
            applied: Some(1),
            front: None,
            offer: offer.map(|(class, gpus, address)| Offer {
                address: address.into(),
                class: class.into(),
                gpus,
                link_gbps: 10.0,
            }),
        }
    }

    fn members() -> Members {
        Members::new(
            vec!["front".into(), "l4-0".into(), "t4-0".into()],
            &[
                server("l4-0", "L4"),
                server("t4-0", "T4"),
                server("gone", "T4"),
            ],
            ["L4".to_string(), "T4".to_string()].into(),
        )
    }

    #[test]
    fn a_node_the_file_does_not_name_joins_with_its_offer_and_is_down_when_silent() {
        let mut m = members();
        let t0 = Instant::now();
        let grace = t0 + Duration::from_secs(5);
        // Servers of the placement that the file does not name are not members.
        assert_eq!(
            m.servers()
                .iter()
                .map(|s| s.name.as_str())
                .collect::<Vec<_>>(),
            ["l4-0", "t4-0"]
        );
        // Within the grace, named nodes never heard count as up; an unknown node does not.
        assert!(m.up("t4-0", t0, grace));
        assert!(!m.up("t4-9", t0, grace));
        assert!(!m.up("t4-0", grace, grace));
        let heard = m.hear(&beat("t4-9", Some(("T4", 2, "10.0.0.9:7070"))), t0);
        assert_eq!(
            heard,
            Some(Heard::Joined("t4-9 offers T4:2 at 10.0.0.9:7070".into()))
        );
        // The same offer again changes nothing and says nothing.
        assert_eq!(
            m.hear(&beat("t4-9", Some(("T4", 2, "10.0.0.9:7070"))), t0),
            None
        );
        assert_eq!(m.names(), ["front", "l4-0", "t4-0", "t4-9"]);
        assert!(m.is_server("t4-9"));
        assert!(!m.is_server("front"));
        let joined = m.servers().into_iter().find(|s| s.name == "t4-9").unwrap();
        assert_eq!((joined.class.as_str(), joined.gpus), ("T4", 2));
        let later = t0 + Duration::from_millis(900);
        assert_eq!(m.live(later, grace), ["front", "l4-0", "t4-0", "t4-9"]);
        assert_eq!(
            m.addresses(&m.live(later, grace)),
            BTreeMap::from([("t4-9".to_string(), "10.0.0.9:7070".to_string())])
        );
        // Silent past NODE_SILENT: down, and its address leaves the epoch's.
        let silent = t0 + NODE_SILENT + Duration::from_millis(1);
        assert!(!m.up("t4-9", silent, grace));
        assert!(m.addresses(&m.live(silent, grace)).is_empty());
        assert_eq!(m.view(silent, grace)["t4-9"]["up"], false);
        assert_eq!(m.view(silent, grace)["t4-9"]["joined"]["gpus"], 2);
        // Back with more GPUs: the new offer counts.
        let heard = m.hear(&beat("t4-9", Some(("T4", 4, "10.0.0.9:7070"))), silent);
        assert!(matches!(heard, Some(Heard::Joined(s)) if s.contains("changed its offer")));
        assert!(m.up("t4-9", silent, grace));
        assert_eq!(m.servers().last().unwrap().gpus, 4);
    }

    #[test]
    fn an_offer_the_plan_cannot_use_is_refused_once_with_its_reason() {
        let mut m = members();
        let t0 = Instant::now();
        let grace = t0 + Duration::from_secs(5);
        let heard = m.hear(&beat("a100-0", Some(("A100", 1, "10.0.0.5:7070"))), t0);
        let Some(Heard::Refused(why)) = heard else {
            panic!("{heard:?}")
        };
        assert!(
            why.contains("class `A100`") && why.contains("L4, T4"),
            "{why}"
        );
        assert_eq!(
            m.hear(&beat("a100-0", Some(("A100", 1, "10.0.0.5:7070"))), t0),
            None
        );
        assert!(!m.names().contains(&"a100-0".to_string()));
        assert!(!m.up("a100-0", t0, grace));
        assert_eq!(
            m.view(t0, grace)["a100-0"]["refused"],
            why.split_once(": ").unwrap().1
        );
        for (offer, says) in [
            (("T4", 0, "10.0.0.6:7070"), "0 GPUs"),
            (("T4", 1, "10.0.0.6"), "not HOST:PORT"),
        ] {
            let heard = m.hear(&beat("t4-6", Some(offer)), t0);
            assert!(
                matches!(&heard, Some(Heard::Refused(w)) if w.contains(says)),
                "{heard:?}"
            );
        }
        // Mended, it joins.
        assert!(matches!(
            m.hear(&beat("t4-6", Some(("T4", 1, "10.0.0.6:7070"))), t0),
            Some(Heard::Joined(_))
        ));
        assert!(m.refused().get("t4-6").is_none());
        // A named node's offer is ignored: the file's placement says what it is.
        assert_eq!(m.hear(&beat("t4-0", Some(("T4", 8, "x:1"))), t0), None);
        assert_eq!(
            m.servers().iter().find(|s| s.name == "t4-0").unwrap().gpus,
            1
        );
    }

    #[test]
    fn a_controller_that_takes_over_recalls_the_nodes_that_joined_and_loses_a_silent_one() {
        let plan: crate::planner::Plan = serde_json::from_value(json!({
            "mode": "poolpipe", "objective": 0.0, "solve_seconds": 0.0, "gap": 0.0,
            "status": "optimal", "candidates": 0, "bandwidth_gbps": 10.0, "margin": 0.0,
            "queueing": 0.0, "pool_tiers": [], "max_stages": 2, "classes": [], "models": [],
            "placement": {
                "servers": [server("l4-0", "L4"), server("t4-9", "T4")],
                "processes": [], "links": [], "crossing_share": 0.0,
            },
        }))
        .unwrap();
        let e = super::super::epoch::Epoch {
            epoch: 4,
            members: vec!["front".into(), "l4-0".into(), "t4-9".into()],
            reason: String::new(),
            plan,
            routes: Vec::new(),
            addresses: BTreeMap::from([("t4-9".to_string(), "10.0.0.9:7070".to_string())]),
            shards: Vec::new(),
            plan_s: 0.0,
            at_unix_ms: 0,
        };
        let mut m = members();
        m.recall(&e);
        m.recall(&e);
        assert_eq!(m.names(), ["front", "l4-0", "t4-0", "t4-9"]);
        assert!(m.is_server("t4-9"));
        let t0 = Instant::now();
        let grace = t0 + Duration::from_secs(1);
        // Up through the grace without a heartbeat, then down: the next re-plan leaves it out.
        assert!(m.up("t4-9", t0, grace));
        assert!(!m.up("t4-9", grace, grace));
        assert_eq!(m.addresses(&["t4-9".into()])["t4-9"], "10.0.0.9:7070");
    }
}
