//! The compute network: accelerator catalogue, sites with their accelerator
//! pools, backbone links, and the routes between every pair of sites.
//!
//! A [`TopologySpec`] is the plain, serialisable description (the TOML file
//! format of `suanwang-topology` is exactly this struct). [`TopologySpec::build`]
//! validates it and produces a [`Topology`]: dense integer ids, fixed-point
//! units, and precomputed all-pairs routes, so the scheduler's hot path does
//! no lookups by name and no floating-point arithmetic.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap};
use std::fmt;

use serde::{Deserialize, Serialize};

/// Index of an accelerator type in [`Topology::accelerators`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct AccelId(pub u16);

/// Index of a site in [`Topology::sites`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct SiteId(pub u32);

/// Index of an accelerator pool (one type at one site) in [`Topology::pools`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct PoolId(pub u32);

/// Relative speed 1.0, in the fixed-point unit used everywhere in the core.
pub const SPEED_MILLI_REFERENCE: u32 = 1000;

/// Level of a site in the provincial compute network.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SiteLevel {
    /// A national hub cluster of "East Data, West Compute", outside the province.
    Hub,
    /// The provincial supercomputing or intelligent-computing centres.
    Provincial,
    /// A city intelligent-computing centre.
    City,
    /// A small edge node.
    Edge,
    /// A public-cloud region whose capacity is opened to the network.
    Cloud,
}

impl SiteLevel {
    pub const ALL: [SiteLevel; 5] =
        [SiteLevel::Hub, SiteLevel::Provincial, SiteLevel::City, SiteLevel::Edge, SiteLevel::Cloud];

    pub fn as_str(self) -> &'static str {
        match self {
            SiteLevel::Hub => "hub",
            SiteLevel::Provincial => "provincial",
            SiteLevel::City => "city",
            SiteLevel::Edge => "edge",
            SiteLevel::Cloud => "cloud",
        }
    }
}

impl fmt::Display for SiteLevel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One accelerator type of the catalogue, as written in a topology file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AcceleratorSpec {
    #[serde(rename = "type")]
    pub kind: String,
    /// Job speed relative to the reference accelerator (A100 = 1.0).
    pub speed: f64,
    pub memory_gb: i64,
    pub power_w: i64,
    pub domestic: bool,
}

impl AcceleratorSpec {
    pub fn new(kind: &str, speed: f64, memory_gb: i64, power_w: i64, domestic: bool) -> Self {
        AcceleratorSpec { kind: kind.to_string(), speed, memory_gb, power_w, domestic }
    }
}

/// A pool of identical accelerators at a site, as written in a topology file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PoolSpec {
    #[serde(rename = "type")]
    pub kind: String,
    pub count: i64,
    pub price_fen_per_hour: i64,
    /// Overrides the catalogue speed of this type at this site.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub speed: Option<f64>,
}

impl PoolSpec {
    pub fn new(kind: &str, count: i64, price_fen_per_hour: i64) -> Self {
        PoolSpec { kind: kind.to_string(), count, price_fen_per_hour, speed: None }
    }
}

/// A compute site, as written in a topology file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SiteSpec {
    pub id: String,
    pub name: String,
    pub city: String,
    pub level: SiteLevel,
    pub lat: f64,
    pub lon: f64,
    pub pue: f64,
    /// Share of the site's power that is green (0.0 to 1.0).
    pub green_share: f64,
    /// The organisation that runs the site (used for related-party rules).
    pub provider: String,
    /// An elastic cloud site: large capacity at a higher price.
    #[serde(default)]
    pub elastic: bool,
    #[serde(rename = "pool", default)]
    pub pools: Vec<PoolSpec>,
}

impl SiteSpec {
    /// A site with neutral defaults, for tests and examples.
    pub fn new(id: &str, city: &str, level: SiteLevel, pools: Vec<PoolSpec>) -> Self {
        SiteSpec {
            id: id.to_string(),
            name: id.to_string(),
            city: city.to_string(),
            level,
            lat: 36.0,
            lon: 117.0,
            pue: 1.3,
            green_share: 0.3,
            provider: format!("{id}-operator"),
            elastic: false,
            pools,
        }
    }
}

/// A backbone link between two sites, as written in a topology file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LinkSpec {
    pub a: String,
    pub b: String,
    pub bandwidth_gbps: f64,
    pub latency_ms: f64,
    pub price_fen_per_gb: i64,
}

impl LinkSpec {
    pub fn new(a: &str, b: &str, bandwidth_gbps: f64, latency_ms: f64, price_fen_per_gb: i64) -> Self {
        LinkSpec { a: a.to_string(), b: b.to_string(), bandwidth_gbps, latency_ms, price_fen_per_gb }
    }
}

/// The whole network as written in a topology file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TopologySpec {
    pub name: String,
    /// Free text; the bundled topology says here that its figures are illustrative.
    #[serde(default)]
    pub note: String,
    #[serde(rename = "accelerator", default)]
    pub accelerators: Vec<AcceleratorSpec>,
    #[serde(rename = "site", default)]
    pub sites: Vec<SiteSpec>,
    #[serde(rename = "link", default)]
    pub links: Vec<LinkSpec>,
}

/// What is wrong with one item of a topology.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Problem {
    #[error("duplicate id '{0}'")]
    DuplicateId(String),
    #[error("unknown site '{0}'")]
    UnknownSite(String),
    #[error("unknown accelerator type '{0}' (not in the [[accelerator]] catalogue)")]
    UnknownAccelerator(String),
    #[error("{field} must be positive, got {value}")]
    NotPositive { field: &'static str, value: String },
    #[error("{field} must be {range}, got {value}")]
    OutOfRange { field: &'static str, value: String, range: &'static str },
    #[error("is disconnected: no route over the links to site '{reachable_from}'")]
    Disconnected { reachable_from: String },
    #[error("links a site to itself")]
    SelfLink,
    #[error("has no {0}")]
    Empty(&'static str),
    #[error("is empty: {0}")]
    Blank(&'static str),
    #[error("{field} '{value}' is not an id (1 to 64 of a-z 0-9 . _ -, starting with a letter or digit)")]
    NotAnId { field: &'static str, value: String },
}

/// Site ids and providers name ledger accounts and cgroups: one safe alphabet.
fn is_id(text: &str) -> bool {
    !text.is_empty()
        && text.len() <= 64
        && text.as_bytes()[0].is_ascii_alphanumeric()
        && text.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'_' | b'-'))
}

/// One validation error: the item (e.g. `site 'jinan-scc' pool 1 (A100)`) and its problem.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{item}: {problem}")]
pub struct TopologyError {
    pub item: String,
    pub problem: Problem,
}

/// An accelerator type of the validated catalogue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Accelerator {
    pub name: String,
    pub speed_milli: u32,
    pub memory_gb: u32,
    pub power_w: u32,
    pub domestic: bool,
}

/// A validated site.
#[derive(Debug, Clone, PartialEq)]
pub struct Site {
    pub key: String,
    pub name: String,
    pub city: String,
    pub level: SiteLevel,
    pub lat: f64,
    pub lon: f64,
    /// Power usage effectiveness, times 1000.
    pub pue_milli: u32,
    /// Green-power share in basis points (10,000 = all green).
    pub green_bp: u32,
    pub provider: String,
    pub elastic: bool,
    pub pools: Vec<PoolId>,
}

/// A validated accelerator pool: one type at one site.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pool {
    pub site: SiteId,
    pub accel: AccelId,
    pub count: u32,
    pub price_fen_per_hour: i64,
    pub speed_milli: u32,
}

/// A validated backbone link.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Link {
    pub a: SiteId,
    pub b: SiteId,
    pub bandwidth_mbps: u64,
    pub latency_us: u64,
    pub price_fen_per_gb: i64,
}

/// The routed path between two sites: lowest total latency over the links.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Route {
    pub latency_us: u64,
    /// Bottleneck bandwidth along the path (`u64::MAX` for a site to itself).
    pub bandwidth_mbps: u64,
    /// Sum of the per-GB prices of the links on the path.
    pub price_fen_per_gb: i64,
    pub hops: u32,
}

impl Route {
    const LOCAL: Route = Route { latency_us: 0, bandwidth_mbps: u64::MAX, price_fen_per_gb: 0, hops: 0 };

    /// Seconds to move `size_mb` megabytes over this route, rounded up.
    pub fn transfer_s(&self, size_mb: u64) -> u64 {
        if self.hops == 0 || size_mb == 0 {
            return 0;
        }
        // bits / (Mbit/s) = microseconds * 1e-6; keep it in u128 to avoid overflow.
        let serialise_us = (size_mb as u128 * 8 * 1_000_000).div_ceil(self.bandwidth_mbps as u128);
        let total_us = serialise_us + self.latency_us as u128;
        total_us.div_ceil(1_000_000) as u64
    }

    /// Fen to move `size_mb` megabytes over this route (1 GB = 1,000 MB), rounded up.
    pub fn transfer_cost_fen(&self, size_mb: u64) -> i64 {
        (size_mb as u128 * self.price_fen_per_gb.max(0) as u128).div_ceil(1000) as i64
    }
}

/// The validated network, with dense ids and all-pairs routes.
#[derive(Debug, Clone)]
pub struct Topology {
    pub name: String,
    pub note: String,
    pub accelerators: Vec<Accelerator>,
    pub sites: Vec<Site>,
    pub pools: Vec<Pool>,
    pub links: Vec<Link>,
    routes: Vec<Route>,
    sites_by_distance: Vec<Vec<SiteId>>,
    site_index: BTreeMap<String, SiteId>,
    accel_index: BTreeMap<String, AccelId>,
    reference_price_fen_per_hour: i64,
    spec: TopologySpec,
}

fn to_milli(value: f64) -> u32 {
    (value * 1000.0).round() as u32
}

impl TopologySpec {
    /// Validates the description and builds the routed network. Every problem
    /// found is reported, not just the first.
    pub fn build(&self) -> Result<Topology, Vec<TopologyError>> {
        let mut errors = Vec::new();
        let mut err = |item: String, problem: Problem| errors.push(TopologyError { item, problem });

        if self.name.trim().is_empty() {
            err("topology".into(), Problem::Blank("name"));
        }
        let mut accel_index = BTreeMap::new();
        let mut accelerators = Vec::new();
        if self.accelerators.is_empty() {
            err("topology".into(), Problem::Empty("[[accelerator]] entries"));
        }
        for a in &self.accelerators {
            let item = format!("accelerator '{}'", a.kind);
            if a.kind.trim().is_empty() {
                err(item.clone(), Problem::Blank("type"));
            }
            if accel_index.contains_key(&a.kind) {
                err(item.clone(), Problem::DuplicateId(a.kind.clone()));
                continue;
            }
            if !(a.speed.is_finite() && a.speed > 0.0) || to_milli(a.speed) == 0 {
                err(item.clone(), not_positive("speed", a.speed));
            }
            if a.memory_gb <= 0 {
                err(item.clone(), not_positive("memory_gb", a.memory_gb));
            }
            if a.power_w <= 0 {
                err(item.clone(), not_positive("power_w", a.power_w));
            }
            accel_index.insert(a.kind.clone(), AccelId(accelerators.len() as u16));
            accelerators.push(Accelerator {
                name: a.kind.clone(),
                speed_milli: to_milli(a.speed.max(0.0)),
                memory_gb: a.memory_gb.max(0) as u32,
                power_w: a.power_w.max(0) as u32,
                domestic: a.domestic,
            });
        }

        let mut site_index = BTreeMap::new();
        let mut sites = Vec::new();
        let mut pools = Vec::new();
        if self.sites.is_empty() {
            err("topology".into(), Problem::Empty("[[site]] entries"));
        }
        for s in &self.sites {
            let item = format!("site '{}'", s.id);
            if s.id.trim().is_empty() {
                err(item.clone(), Problem::Blank("id"));
            } else if !is_id(&s.id) {
                err(item.clone(), Problem::NotAnId { field: "id", value: s.id.clone() });
            }
            if !is_id(&s.provider) {
                err(item.clone(), Problem::NotAnId { field: "provider", value: s.provider.clone() });
            }
            if site_index.contains_key(&s.id) {
                err(item.clone(), Problem::DuplicateId(s.id.clone()));
                continue;
            }
            if s.city.trim().is_empty() {
                err(item.clone(), Problem::Blank("city"));
            }
            if !(-90.0..=90.0).contains(&s.lat) {
                err(item.clone(), out_of_range("lat", s.lat, "between -90 and 90"));
            }
            if !(-180.0..=180.0).contains(&s.lon) {
                err(item.clone(), out_of_range("lon", s.lon, "between -180 and 180"));
            }
            if !(s.pue.is_finite() && (1.0..=3.0).contains(&s.pue)) {
                err(item.clone(), out_of_range("pue", s.pue, "between 1.0 and 3.0"));
            }
            if !(s.green_share.is_finite() && (0.0..=1.0).contains(&s.green_share)) {
                err(item.clone(), out_of_range("green_share", s.green_share, "between 0.0 and 1.0"));
            }
            if s.pools.is_empty() {
                err(item.clone(), Problem::Empty("[[site.pool]] of accelerators"));
            }
            let site_id = SiteId(sites.len() as u32);
            let mut pool_ids = Vec::new();
            let mut seen_types = BTreeMap::new();
            for (i, p) in s.pools.iter().enumerate() {
                let pool_item = format!("site '{}' pool {} ({})", s.id, i + 1, p.kind);
                let Some(&accel) = accel_index.get(&p.kind) else {
                    err(pool_item, Problem::UnknownAccelerator(p.kind.clone()));
                    continue;
                };
                if seen_types.insert(p.kind.clone(), ()).is_some() {
                    err(pool_item.clone(), Problem::DuplicateId(p.kind.clone()));
                }
                if p.count <= 0 {
                    err(pool_item.clone(), not_positive("count", p.count));
                } else if p.count > 10_000_000 {
                    err(pool_item.clone(), out_of_range("count", p.count, "at most 10,000,000"));
                }
                if p.price_fen_per_hour <= 0 {
                    err(pool_item.clone(), not_positive("price_fen_per_hour", p.price_fen_per_hour));
                }
                let speed_milli = match p.speed {
                    Some(speed) if !(speed.is_finite() && speed > 0.0) || to_milli(speed) == 0 => {
                        err(pool_item.clone(), not_positive("speed", speed));
                        1
                    }
                    Some(speed) => to_milli(speed),
                    None => accelerators[accel.0 as usize].speed_milli.max(1),
                };
                pool_ids.push(PoolId(pools.len() as u32));
                pools.push(Pool {
                    site: site_id,
                    accel,
                    count: p.count.clamp(0, 10_000_000) as u32,
                    price_fen_per_hour: p.price_fen_per_hour.max(1),
                    speed_milli,
                });
            }
            site_index.insert(s.id.clone(), site_id);
            sites.push(Site {
                key: s.id.clone(),
                name: s.name.clone(),
                city: s.city.clone(),
                level: s.level,
                lat: s.lat,
                lon: s.lon,
                pue_milli: to_milli(s.pue.clamp(1.0, 3.0)),
                green_bp: (s.green_share.clamp(0.0, 1.0) * 10_000.0).round() as u32,
                provider: s.provider.clone(),
                elastic: s.elastic,
                pools: pool_ids,
            });
        }

        let mut links = Vec::new();
        for (i, l) in self.links.iter().enumerate() {
            let item = format!("link {} ({} -- {})", i + 1, l.a, l.b);
            let a = site_index.get(&l.a).copied();
            let b = site_index.get(&l.b).copied();
            if a.is_none() {
                err(item.clone(), Problem::UnknownSite(l.a.clone()));
            }
            if b.is_none() {
                err(item.clone(), Problem::UnknownSite(l.b.clone()));
            }
            if l.a == l.b {
                err(item.clone(), Problem::SelfLink);
            }
            if !(l.bandwidth_gbps.is_finite() && l.bandwidth_gbps > 0.0) || (l.bandwidth_gbps * 1000.0).round() < 1.0 {
                err(item.clone(), not_positive("bandwidth_gbps", l.bandwidth_gbps));
            }
            if !(l.latency_ms.is_finite() && l.latency_ms >= 0.0) {
                err(item.clone(), out_of_range("latency_ms", l.latency_ms, "zero or more"));
            }
            if l.price_fen_per_gb < 0 {
                err(item.clone(), out_of_range("price_fen_per_gb", l.price_fen_per_gb, "zero or more"));
            }
            if let (Some(a), Some(b)) = (a, b) {
                links.push(Link {
                    a,
                    b,
                    bandwidth_mbps: ((l.bandwidth_gbps.max(0.0) * 1000.0).round() as u64).max(1),
                    latency_us: (l.latency_ms.max(0.0) * 1000.0).round() as u64,
                    price_fen_per_gb: l.price_fen_per_gb.max(0),
                });
            }
        }

        let n = sites.len();
        let routes = all_pairs_routes(n, &links);
        if n > 1 {
            for (i, site) in sites.iter().enumerate().skip(1) {
                if routes[i].hops == u32::MAX {
                    err(format!("site '{}'", site.key), Problem::Disconnected { reachable_from: sites[0].key.clone() });
                }
            }
        }
        if !errors.is_empty() {
            return Err(errors);
        }

        let sites_by_distance = (0..n)
            .map(|from| {
                let mut order: Vec<SiteId> = (0..n as u32).map(SiteId).collect();
                order.sort_by_key(|to| (routes[from * n + to.0 as usize].latency_us, to.0));
                order
            })
            .collect();
        let reference_price_fen_per_hour = reference_price(&pools);
        Ok(Topology {
            name: self.name.clone(),
            note: self.note.clone(),
            accelerators,
            sites,
            pools,
            links,
            routes,
            sites_by_distance,
            site_index,
            accel_index,
            reference_price_fen_per_hour,
            spec: self.clone(),
        })
    }
}

fn not_positive(field: &'static str, value: impl fmt::Display) -> Problem {
    Problem::NotPositive { field, value: value.to_string() }
}

fn out_of_range(field: &'static str, value: impl fmt::Display, range: &'static str) -> Problem {
    Problem::OutOfRange { field, value: value.to_string(), range }
}

/// Median price of one reference-speed accelerator-hour over all pools: the
/// yardstick that makes cost comparable with time in the placement objective.
fn reference_price(pools: &[Pool]) -> i64 {
    let mut per_reference_hour: Vec<i64> = pools
        .iter()
        .map(|p| p.price_fen_per_hour * SPEED_MILLI_REFERENCE as i64 / p.speed_milli.max(1) as i64)
        .collect();
    if per_reference_hour.is_empty() {
        return 1;
    }
    per_reference_hour.sort_unstable();
    per_reference_hour[per_reference_hour.len() / 2].max(1)
}

/// Dijkstra from every site by total latency; ties broken by hop count, then
/// by site index, so routes are deterministic. Unreachable pairs get `hops = u32::MAX`.
fn all_pairs_routes(n: usize, links: &[Link]) -> Vec<Route> {
    let mut adjacency: Vec<Vec<(usize, &Link)>> = vec![Vec::new(); n];
    for link in links {
        adjacency[link.a.0 as usize].push((link.b.0 as usize, link));
        adjacency[link.b.0 as usize].push((link.a.0 as usize, link));
    }
    let unreachable = Route { latency_us: u64::MAX, bandwidth_mbps: 0, price_fen_per_gb: 0, hops: u32::MAX };
    let mut routes = vec![unreachable; n * n];
    for from in 0..n {
        let row = &mut routes[from * n..(from + 1) * n];
        row[from] = Route::LOCAL;
        let mut heap = BinaryHeap::new();
        heap.push(Reverse((0u64, 0u32, from)));
        while let Some(Reverse((latency, hops, at))) = heap.pop() {
            if (latency, hops) > (row[at].latency_us, row[at].hops) {
                continue;
            }
            let here = row[at];
            for &(next, link) in &adjacency[at] {
                let candidate = Route {
                    latency_us: latency + link.latency_us,
                    bandwidth_mbps: here.bandwidth_mbps.min(link.bandwidth_mbps),
                    price_fen_per_gb: here.price_fen_per_gb + link.price_fen_per_gb,
                    hops: hops + 1,
                };
                if (candidate.latency_us, candidate.hops) < (row[next].latency_us, row[next].hops) {
                    row[next] = candidate;
                    heap.push(Reverse((candidate.latency_us, candidate.hops, next)));
                }
            }
        }
    }
    routes
}

impl Topology {
    pub fn site(&self, id: SiteId) -> &Site {
        &self.sites[id.0 as usize]
    }

    pub fn pool(&self, id: PoolId) -> &Pool {
        &self.pools[id.0 as usize]
    }

    pub fn accelerator(&self, id: AccelId) -> &Accelerator {
        &self.accelerators[id.0 as usize]
    }

    pub fn site_id(&self, key: &str) -> Option<SiteId> {
        self.site_index.get(key).copied()
    }

    pub fn accelerator_id(&self, name: &str) -> Option<AccelId> {
        self.accel_index.get(name).copied()
    }

    /// The routed path from one site to another.
    pub fn route(&self, from: SiteId, to: SiteId) -> Route {
        self.routes[from.0 as usize * self.sites.len() + to.0 as usize]
    }

    /// All sites, nearest first (by route latency, then id) from `origin`.
    pub fn sites_by_distance(&self, origin: SiteId) -> &[SiteId] {
        &self.sites_by_distance[origin.0 as usize]
    }

    /// Median price of a reference-speed accelerator-hour (see the objective).
    pub fn reference_price_fen_per_hour(&self) -> i64 {
        self.reference_price_fen_per_hour
    }

    /// The description this topology was built from.
    pub fn spec(&self) -> &TopologySpec {
        &self.spec
    }

    /// Total accelerators over all pools.
    pub fn total_accelerators(&self) -> u64 {
        self.pools.iter().map(|p| p.count as u64).sum()
    }

    /// Capacity in reference-speed accelerators (sum of count times speed), times 1000.
    pub fn reference_capacity_milli(&self) -> u64 {
        self.pools.iter().map(|p| p.count as u64 * p.speed_milli as u64).sum()
    }

    /// Largest pool count among pools of the given types at any site.
    pub fn largest_pool(&self, accepted: &[AccelId]) -> u32 {
        self.pools.iter().filter(|p| accepted.contains(&p.accel)).map(|p| p.count).max().unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> TopologySpec {
        TopologySpec {
            name: "t".into(),
            note: String::new(),
            accelerators: vec![AcceleratorSpec::new("A100", 1.0, 80, 400, false)],
            sites: vec![
                SiteSpec::new("a", "A", SiteLevel::City, vec![PoolSpec::new("A100", 8, 900)]),
                SiteSpec::new("b", "B", SiteLevel::City, vec![PoolSpec::new("A100", 8, 900)]),
                SiteSpec::new("c", "C", SiteLevel::Hub, vec![PoolSpec::new("A100", 8, 600)]),
            ],
            links: vec![
                LinkSpec::new("a", "b", 100.0, 5.0, 2),
                LinkSpec::new("b", "c", 10.0, 20.0, 5),
                LinkSpec::new("a", "c", 1.0, 40.0, 1),
            ],
        }
    }

    #[test]
    fn routes_take_lowest_latency_and_carry_bottleneck_and_price() {
        let t = spec().build().unwrap();
        let r = t.route(SiteId(0), SiteId(2));
        assert_eq!(r.latency_us, 25_000);
        assert_eq!(r.bandwidth_mbps, 10_000);
        assert_eq!(r.price_fen_per_gb, 7);
        assert_eq!(r.hops, 2);
        assert_eq!(t.route(SiteId(1), SiteId(1)), Route::LOCAL);
        assert_eq!(t.sites_by_distance(SiteId(2)), &[SiteId(2), SiteId(1), SiteId(0)]);
    }

    #[test]
    fn transfer_time_and_cost_round_up() {
        let r = Route { latency_us: 20_000, bandwidth_mbps: 10_000, price_fen_per_gb: 7, hops: 2 };
        // 100 GB at 10 Gbit/s = 80 s, plus 20 ms latency, rounded up.
        assert_eq!(r.transfer_s(100_000), 81);
        assert_eq!(r.transfer_cost_fen(100_000), 700);
        assert_eq!(r.transfer_cost_fen(1), 1);
        assert_eq!(Route::LOCAL.transfer_s(1_000_000), 0);
    }

    #[test]
    fn every_problem_is_reported_with_its_item() {
        let mut s = spec();
        s.sites.push(SiteSpec::new("a", "A", SiteLevel::City, vec![PoolSpec::new("A100", 8, 900)]));
        s.sites.push(SiteSpec::new("lonely", "L", SiteLevel::Edge, vec![PoolSpec::new("X", 8, 900)]));
        s.sites[1].pools[0].count = -3;
        s.links.push(LinkSpec::new("a", "nowhere", 1.0, 1.0, 1));
        let errors = s.build().unwrap_err();
        let text: Vec<String> = errors.iter().map(|e| e.to_string()).collect();
        assert!(text.contains(&"site 'a': duplicate id 'a'".to_string()), "{text:?}");
        assert!(text.contains(&"site 'b' pool 1 (A100): count must be positive, got -3".to_string()), "{text:?}");
        assert!(
            text.iter().any(|t| t.starts_with("site 'lonely' pool 1 (X): unknown accelerator type 'X'")),
            "{text:?}"
        );
        assert!(text.contains(&"link 4 (a -- nowhere): unknown site 'nowhere'".to_string()), "{text:?}");
        assert!(
            text.contains(&"site 'lonely': is disconnected: no route over the links to site 'a'".to_string()),
            "{text:?}"
        );
    }
}
