//! # suanwang-topology
//!
//! Reads topology files (TOML, the format of
//! [`suanwang_core::topology::TopologySpec`]) and reports every validation
//! problem as `file: item: problem`. Ships the bundled `shandong` network
//! and builds synthetic networks of any size for scale tests. Also scales a
//! network's capacity for load experiments.
//!
//! ```
//! let topology = suanwang_topology::load("shandong").unwrap();
//! assert_eq!(topology.name, "shandong");
//! assert!(topology.site_id("jinan-scc").is_some());
//! ```

use std::fmt;
use std::path::{Path, PathBuf};

use suanwang_core::seeded::SplitMix64;
use suanwang_core::topology::{LinkSpec, PoolSpec, SiteLevel, SiteSpec, Topology, TopologyError, TopologySpec};

/// Topologies compiled into the binary, by name.
pub const BUNDLED: &[(&str, &str)] = &[("shandong", include_str!("../topologies/shandong.toml"))];

/// Why a topology could not be loaded. Every variant names the file.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("{file}: cannot read: {source}")]
    Io {
        file: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{file}: {message}")]
    Syntax { file: PathBuf, message: String },
    #[error("{}", Invalid(.file, .errors))]
    Invalid { file: PathBuf, errors: Vec<TopologyError> },
}

struct Invalid<'a>(&'a Path, &'a [TopologyError]);

impl fmt::Display for Invalid<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.1.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{}: {e}", self.0.display())?;
        }
        Ok(())
    }
}

/// Loads a bundled topology by name, or a TOML file by path.
pub fn load(name_or_path: &str) -> Result<Topology, LoadError> {
    let spec = load_spec(name_or_path)?;
    build(&spec, Path::new(name_or_path))
}

/// Reads and parses a topology description without validating it.
pub fn load_spec(name_or_path: &str) -> Result<TopologySpec, LoadError> {
    if let Some((_, text)) = BUNDLED.iter().find(|(name, _)| *name == name_or_path) {
        return parse(text, Path::new(name_or_path));
    }
    let file = PathBuf::from(name_or_path);
    let text = std::fs::read_to_string(&file).map_err(|source| LoadError::Io { file: file.clone(), source })?;
    parse(&text, &file)
}

/// Parses TOML text; syntax and type errors carry the line and column.
pub fn parse(text: &str, file: &Path) -> Result<TopologySpec, LoadError> {
    toml::from_str(text).map_err(|e| {
        let message = match e.span() {
            Some(span) => {
                let line = text[..span.start].matches('\n').count() + 1;
                format!("line {line}: {}", e.message())
            }
            None => e.message().to_string(),
        };
        LoadError::Syntax { file: file.to_path_buf(), message }
    })
}

/// Validates a description, naming `file` in every error.
pub fn build(spec: &TopologySpec, file: &Path) -> Result<Topology, LoadError> {
    spec.build().map_err(|errors| LoadError::Invalid { file: file.to_path_buf(), errors })
}

/// A copy of the network with every pool's count multiplied by `factor`,
/// rounded to the nearest integer and never below one accelerator.
pub fn scale_capacity(spec: &TopologySpec, factor: f64) -> TopologySpec {
    let mut scaled = spec.clone();
    for site in &mut scaled.sites {
        for pool in &mut site.pools {
            pool.count = ((pool.count as f64 * factor).round() as i64).max(1);
        }
    }
    scaled
}

/// A random connected network of `sites` sites with the bundled accelerator
/// catalogue, for scale tests and property tests. The same seed gives the
/// same network.
pub fn synthetic(sites: usize, seed: u64) -> TopologySpec {
    let bundled = load_spec("shandong").expect("bundled topology parses");
    let mut rng = SplitMix64::new(seed);
    let levels =
        [SiteLevel::Provincial, SiteLevel::City, SiteLevel::City, SiteLevel::Edge, SiteLevel::Hub, SiteLevel::Cloud];
    let catalogue = &bundled.accelerators;
    let mut spec = TopologySpec {
        name: format!("synthetic-{sites}-{seed}"),
        note: "Synthetic network for scale and property tests; all figures random.".into(),
        accelerators: catalogue.clone(),
        sites: Vec::new(),
        links: Vec::new(),
    };
    for i in 0..sites.max(1) {
        let level = if i == 0 { SiteLevel::Provincial } else { levels[rng.below(levels.len() as u64) as usize] };
        let pool_count = 1 + rng.below(3) as usize;
        let first = rng.below(catalogue.len() as u64) as usize;
        let pools = (0..pool_count)
            .map(|k| {
                let accel = &catalogue[(first + k * 3) % catalogue.len()];
                let count = 8 << rng.below(7); // 8 .. 512
                let price = (200.0 + 700.0 * accel.speed * (0.7 + 0.6 * rng.unit())) as i64;
                PoolSpec::new(&accel.kind, count, price)
            })
            .collect();
        let mut site = SiteSpec::new(&format!("site-{i:04}"), &format!("city-{:03}", i / 3), level, pools);
        site.lat = 25.0 + 15.0 * rng.unit();
        site.lon = 105.0 + 17.0 * rng.unit();
        site.pue = 1.1 + 0.4 * rng.unit();
        site.green_share = rng.unit() * 0.7;
        spec.sites.push(site);
    }
    let id = |i: usize| format!("site-{i:04}");
    for i in 1..spec.sites.len() {
        let j = rng.below(i as u64) as usize;
        spec.links.push(random_link(&mut rng, &id(i), &id(j)));
    }
    for _ in 0..spec.sites.len() / 2 {
        let i = rng.below(spec.sites.len() as u64) as usize;
        let j = rng.below(spec.sites.len() as u64) as usize;
        if i != j {
            spec.links.push(random_link(&mut rng, &id(i), &id(j)));
        }
    }
    spec
}

fn random_link(rng: &mut SplitMix64, a: &str, b: &str) -> LinkSpec {
    let bandwidth = [10.0, 40.0, 100.0, 400.0][rng.below(4) as usize];
    LinkSpec::new(a, b, bandwidth, 1.0 + 20.0 * rng.unit(), rng.below(10) as i64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bundled_shandong_has_every_city_and_level() {
        let t = load("shandong").unwrap();
        let cities: std::collections::BTreeSet<&str> = t.sites.iter().map(|s| s.city.as_str()).collect();
        for city in [
            "Jinan",
            "Qingdao",
            "Zibo",
            "Zaozhuang",
            "Dongying",
            "Yantai",
            "Weifang",
            "Jining",
            "Tai'an",
            "Weihai",
            "Rizhao",
            "Linyi",
            "Dezhou",
            "Liaocheng",
            "Binzhou",
            "Heze",
        ] {
            assert!(cities.contains(city), "{city} missing");
        }
        for level in SiteLevel::ALL {
            assert!(t.sites.iter().any(|s| s.level == level), "no {level} site");
        }
        assert!(t.note.contains("Illustrative"));
        assert!(t.sites.iter().any(|s| s.elastic));
    }

    #[test]
    fn synthetic_networks_are_valid_and_reproducible() {
        for seed in 0..5 {
            let spec = synthetic(200, seed);
            assert_eq!(spec, synthetic(200, seed));
            let t = spec.build().unwrap();
            assert_eq!(t.sites.len(), 200);
        }
    }

    #[test]
    fn scaling_never_drops_a_pool() {
        let spec = scale_capacity(&load_spec("shandong").unwrap(), 0.0001);
        assert!(spec.sites.iter().flat_map(|s| &s.pools).all(|p| p.count == 1));
        let doubled = scale_capacity(&load_spec("shandong").unwrap(), 2.0);
        assert_eq!(doubled.build().unwrap().total_accelerators(), 2 * load("shandong").unwrap().total_accelerators());
    }
}
