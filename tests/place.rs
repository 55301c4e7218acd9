//! `poolpipe place`: a planned 100-GPU cluster placed on servers of 4 GPUs; every process gets a
//! GPU of its class, no GPU holds more processes than its share, the placed plan still
//! simulates, and a class no server has is refused by name.

mod common;

use std::collections::HashMap;

use common::*;
use serde_json::Value;

#[test]
fn a_plan_is_placed_on_servers_and_still_simulates() {
    let Some(profiles) = shared_profiles() else {
        return;
    };
    let profiles = profiles.to_str().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let plan = dir.path().join("plan.json");
    let o = poolpipe(&[
        "plan",
        "--cluster",
        "L4:25,T4:75",
        "--models",
        "apcnet,atss,gcnet",
        "--weights",
        "0.3,0.33,0.37",
        "--time-limit",
        "5",
        "--profiles",
        profiles,
        "--out",
        plan.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let placed = dir.path().join("placed.json");
    let servers = root().join("configs/servers-l4-t4.toml");
    let o = poolpipe(&[
        "place",
        "--plan",
        plan.to_str().unwrap(),
        "--servers",
        servers.to_str().unwrap(),
        "--profiles",
        profiles,
        "--out",
        placed.to_str().unwrap(),
        "--json",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let p: Value = serde_json::from_str(&std::fs::read_to_string(&placed).unwrap()).unwrap();
    let placement = &p["placement"];
    let servers = placement["servers"].as_array().unwrap();
    assert_eq!(servers.len(), 26);
    // Every planned process is placed once, on a server of its stage's class.
    let mut planned = 0;
    let mut stage_of: HashMap<(u64, u64, u64), (String, u64)> = HashMap::new();
    for (mi, m) in p["models"].as_array().unwrap().iter().enumerate() {
        for (pi, pl) in m["pipelines"].as_array().unwrap().iter().enumerate() {
            for (si, st) in pl["stages"].as_array().unwrap().iter().enumerate() {
                planned += st["processes"].as_u64().unwrap();
                stage_of.insert(
                    (mi as u64, pi as u64, si as u64),
                    (
                        st["class"].as_str().unwrap().to_string(),
                        st["share"].as_u64().unwrap(),
                    ),
                );
            }
        }
    }
    let procs = placement["processes"].as_array().unwrap();
    assert_eq!(procs.len() as u64, planned);
    let mut on_gpu: HashMap<(u64, u64), (u64, u64)> = HashMap::new();
    for x in procs {
        let key = (
            x["model"].as_u64().unwrap(),
            x["pipeline"].as_u64().unwrap(),
            x["stage"].as_u64().unwrap(),
        );
        let (class, share) = &stage_of[&key];
        let server = &servers[x["server"].as_u64().unwrap() as usize];
        assert_eq!(server["class"].as_str().unwrap(), class, "{x}");
        assert!(x["gpu"].as_u64().unwrap() < server["gpus"].as_u64().unwrap());
        // Processes of one GPU share it at one share, at most `share` of them.
        let e = on_gpu
            .entry((x["server"].as_u64().unwrap(), x["gpu"].as_u64().unwrap()))
            .or_insert((*share, 0));
        assert_eq!(e.0, *share, "a GPU holds processes of two shares: {x}");
        e.1 += 1;
        assert!(
            e.1 <= *share,
            "more processes than the share on one GPU: {x}"
        );
    }
    let o = poolpipe(&[
        "simulate",
        "--plan",
        placed.to_str().unwrap(),
        "--profiles",
        profiles,
        "--duration",
        "2",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));

    // Servers without T4: refused, naming the class.
    let only_l4 = write(
        dir.path(),
        "l4.toml",
        "[[servers]]\nname = \"l4\"\nclass = \"L4\"\ncount = 30\ngpus = 4\nlink_gbps = 25\n",
    );
    let o = poolpipe(&[
        "place",
        "--plan",
        plan.to_str().unwrap(),
        "--servers",
        only_l4.to_str().unwrap(),
        "--profiles",
        profiles,
    ]);
    assert_eq!(o.status.code(), Some(2));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("runs processes on T4, which no server has (servers have: L4)"),
        "{err}"
    );
}
