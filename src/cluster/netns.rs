//! Nodes on one machine, each in its own network namespace on a shared bridge, with links shaped
//! by `tc ... tbf`: what the cluster tests and `bench cluster` run on. Needs root and iproute2;
//! [`Lab::check`] says why not where they are missing. Everything it makes lives in namespaces
//! of its own (the bridge too), removed when the lab is dropped.

use std::process::Command;

/// Why a lab cannot be set up.
#[derive(Debug, thiserror::Error)]
#[error("network namespaces: {0}")]
pub struct LabError(pub String);

/// Namespaces `{prefix}-n1..` (the nodes) and `{prefix}-sw` (the bridge).
pub struct Lab {
    prefix: String,
    nodes: usize,
    subnet: u8,
}

fn run(args: &[&str]) -> Result<(), LabError> {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .map_err(|e| LabError(format!("{}: {e}", args[0])))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(LabError(format!(
            "`{}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        )))
    }
}

impl Lab {
    /// Whether labs can be made here (root, `ip`, `tc`, namespaces).
    pub fn check() -> Result<(), LabError> {
        let uid = Command::new("id").arg("-u").output().ok();
        if uid.is_none_or(|o| String::from_utf8_lossy(&o.stdout).trim() != "0") {
            return Err(LabError("needs root (ip netns)".into()));
        }
        for tool in ["ip", "tc"] {
            if Command::new(tool).arg("-V").output().is_err() {
                return Err(LabError(format!("`{tool}` is not installed (iproute2)")));
            }
        }
        static PROBES: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let k = PROBES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let probe = format!("pp-probe-{}-{k}", std::process::id());
        run(&["ip", "netns", "add", &probe])?;
        let _ = run(&["ip", "netns", "del", &probe]);
        Ok(())
    }

    /// `nodes` namespaces on a bridge, node i at [`Lab::addr`]`(i)`; links unshaped.
    pub fn new(nodes: usize) -> Result<Self, LabError> {
        Self::check()?;
        // Unique per lab: several may be made by one process (tests run side by side).
        static MADE: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let k = MADE.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let pid = std::process::id();
        let lab = Lab {
            prefix: format!("pp{}x{}", pid % 10_000, k % 100),
            nodes,
            subnet: ((pid % 46) * 5 + k % 5 + 20) as u8,
        };
        let sw = lab.switch();
        run(&["ip", "netns", "add", &sw])?;
        run(&["ip", "-n", &sw, "link", "add", "br0", "type", "bridge"])?;
        run(&["ip", "-n", &sw, "link", "set", "br0", "up"])?;
        for i in 0..nodes {
            let ns = lab.ns(i);
            let (inner, outer) = (format!("{}a{i}", lab.prefix), format!("{}b{i}", lab.prefix));
            run(&["ip", "netns", "add", &ns])?;
            run(&[
                "ip", "link", "add", &inner, "type", "veth", "peer", "name", &outer,
            ])?;
            run(&["ip", "link", "set", &inner, "netns", &ns])?;
            run(&["ip", "link", "set", &outer, "netns", &sw])?;
            run(&["ip", "-n", &sw, "link", "set", &outer, "master", "br0"])?;
            run(&["ip", "-n", &sw, "link", "set", &outer, "up"])?;
            let cidr = format!("{}/24", lab.addr(i));
            run(&["ip", "-n", &ns, "addr", "add", &cidr, "dev", &inner])?;
            run(&["ip", "-n", &ns, "link", "set", &inner, "up"])?;
            run(&["ip", "-n", &ns, "link", "set", "lo", "up"])?;
            // A batch after a pause starts at full speed, as on a tuned cluster network.
            let _ = run(&[
                "ip",
                "netns",
                "exec",
                &ns,
                "sh",
                "-c",
                "echo 0 > /proc/sys/net/ipv4/tcp_slow_start_after_idle",
            ]);
        }
        Ok(lab)
    }

    fn switch(&self) -> String {
        format!("{}-sw", self.prefix)
    }

    /// The namespace of node `i`.
    pub fn ns(&self, i: usize) -> String {
        format!("{}-n{}", self.prefix, i + 1)
    }

    /// The address of node `i`.
    pub fn addr(&self, i: usize) -> String {
        format!("10.{}.0.{}", self.subnet, i + 1)
    }

    /// Shapes the link into node `i` (what every other node sends it) to `mbit` Mbit/s with a
    /// token bucket; `None` removes the shaping.
    pub fn shape(&self, i: usize, mbit: Option<u64>) -> Result<(), LabError> {
        let sw = self.switch();
        let dev = format!("{}b{i}", self.prefix);
        let _ = run(&[
            "ip", "netns", "exec", &sw, "tc", "qdisc", "del", "dev", &dev, "root",
        ]);
        if let Some(m) = mbit {
            let rate = format!("{m}mbit");
            // A bucket of ~1 ms at the rate (at least 32 KiB): small next to a cut of megabytes.
            let burst = format!("{}kb", (m / 8).max(32));
            run(&[
                "ip", "netns", "exec", &sw, "tc", "qdisc", "add", "dev", &dev, "root", "tbf",
                "rate", &rate, "burst", &burst, "latency", "200ms",
            ])?;
        }
        Ok(())
    }

    /// Takes the link of node `i` down (`false`: its cable pulled, without a word to its peers)
    /// or up again.
    pub fn set_link(&self, i: usize, up: bool) -> Result<(), LabError> {
        let dev = format!("{}b{i}", self.prefix);
        let state = if up { "up" } else { "down" };
        run(&["ip", "-n", &self.switch(), "link", "set", &dev, state])
    }

    /// A second address of node `i`, once [`Lab::add_alias`] gave it: a service reached there
    /// can be cut off alone ([`Lab::reach`]).
    pub fn alias(&self, i: usize) -> String {
        format!("10.{}.0.{}", self.subnet, 101 + i)
    }

    /// Gives node `i` its second address.
    pub fn add_alias(&self, i: usize) -> Result<(), LabError> {
        let cidr = format!("{}/24", self.alias(i));
        let dev = format!("{}a{i}", self.prefix);
        run(&["ip", "-n", &self.ns(i), "addr", "add", &cidr, "dev", &dev])
    }

    /// Cuts node `i` off from `addr` alone (`false`: a blackhole route; its other links stay),
    /// or lets it reach it again.
    pub fn reach(&self, i: usize, addr: &str, on: bool) -> Result<(), LabError> {
        let to = format!("{addr}/32");
        let verb = if on { "del" } else { "add" };
        run(&["ip", "-n", &self.ns(i), "route", verb, "blackhole", &to])
    }

    /// A command that runs `program` in node `i`'s namespace.
    pub fn command(&self, i: usize, program: &std::path::Path) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.ns(i)]).arg(program);
        c
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for i in 0..self.nodes {
            let _ = run(&["ip", "netns", "del", &self.ns(i)]);
        }
        let _ = run(&["ip", "netns", "del", &self.switch()]);
    }
}

/// The pipeline the lab's tests and `bench nodes` run: WideResNet-101-2 cut after block 5, the
/// first half on an emulated L4 on the front (n1), the second on emulated T4s, one per worker
/// node (`nodes`: name and address; none: both T4 workers on the front, in one process), two
/// test sources at `fps` each, results to a JSON-lines file.
pub fn cut_pipeline(
    profiles: &std::path::Path,
    nodes: &[(String, String)],
    gbps: f64,
    fps: u32,
    out: &std::path::Path,
) -> String {
    let cluster = if nodes.is_empty() {
        String::new()
    } else {
        let table: Vec<String> = nodes
            .iter()
            .map(|(n, a)| format!("{n} = \"{a}\""))
            .collect();
        format!(
            "[cluster]\nfront = \"n1\"\nnodes = {{ {} }}\n",
            table.join(", ")
        )
    };
    let placed = if nodes.is_empty() {
        String::new()
    } else {
        let names: Vec<String> = nodes.iter().map(|(n, _)| format!("\"{n}\"")).collect();
        format!("nodes = [{}]\n", names.join(", "))
    };
    cut_text(
        profiles,
        (gbps, fps, out),
        Halves {
            name: "cut",
            slo_ms: 250,
            cluster,
            head: String::new(),
            tails: nodes.len().max(2),
            tail: placed,
        },
    )
}

/// The same model with both halves on worker nodes: the head (L4) on n2 at `n2`, two tail
/// workers (T4s) on n3 at `n3`; the front (n1) runs the two test sources alone. With `direct`
/// (`[cluster] direct_links`) the cut goes from n2 to n3; without, through the front. What
/// `tests/cluster.rs` and `bench nodes --direct` run.
pub fn node_to_node_pipeline(
    profiles: &std::path::Path,
    (n2, n3): (&str, &str),
    gbps: f64,
    fps: u32,
    out: &std::path::Path,
    direct: bool,
) -> String {
    cut_text(
        profiles,
        (gbps, fps, out),
        Halves {
            name: "direct",
            slo_ms: 400,
            cluster: format!(
                "[cluster]\nfront = \"n1\"\nnodes = {{ n2 = \"{n2}\", n3 = \"{n3}\" }}\ndirect_links = {direct}\n"
            ),
            head: "nodes = [\"n2\"]\n".into(),
            tails: 2,
            tail: "nodes = [\"n3\", \"n3\"]\n".into(),
        },
    )
}

/// What differs between the lab's pipelines: the name, SLO, `[cluster]` section, the head's
/// extra keys, the tail's workers and its extra keys.
struct Halves {
    name: &'static str,
    slo_ms: u32,
    cluster: String,
    head: String,
    tails: usize,
    tail: String,
}

/// WideResNet-101-2 cut after block 5 (head on an emulated L4, tails on emulated T4s), two test
/// sources at `fps` each, results to `out`, as `h` says.
fn cut_text(
    profiles: &std::path::Path,
    (gbps, fps, out): (f64, u32, &std::path::Path),
    h: Halves,
) -> String {
    let sources = test_sources(fps);
    format!(
        r#"[pipeline]
name = "{name}"
slo_ms = {slo}
bandwidth_gbps = {gbps}
profiles = "{profiles}"

{cluster}
{sources}[[stage]]
name = "head"
device = "emulated:L4"
profile = "wide_resnet101_2"
blocks = [0, 5]
max_batch = 4
policy = "deadline"
{head}
[[stage]]
name = "tail"
device = "emulated:T4"
profile = "wide_resnet101_2"
blocks = [5, 10]
workers = {tails}
max_batch = 4
{tail}
[[sink]]
type = "jsonl"
path = "{out}"
"#,
        name = h.name,
        slo = h.slo_ms,
        cluster = h.cluster,
        head = h.head,
        tails = h.tails,
        tail = h.tail,
        profiles = profiles.display(),
        out = out.display(),
    )
}

/// The two test sources of the lab's pipelines, at `fps` each.
fn test_sources(fps: u32) -> String {
    ["ball", "smpte"]
        .iter()
        .map(|p| {
            format!("[[source]]\nname = \"cam-{p}\"\nuri = \"test://{p}\"\nmax_fps = {fps}\n\n")
        })
        .collect()
}
