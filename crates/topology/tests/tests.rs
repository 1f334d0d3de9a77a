//! Topology files: one test per validation error, each naming the file, the
//! item and the problem, and the bundled network's facts.

use std::path::PathBuf;

use suanwang_core::topology::SiteLevel;

const VALID: &str = r#"
name = "mini"
[[accelerator]]
type = "A100"
speed = 1.0
memory_gb = 80
power_w = 400
domestic = false

[[site]]
id = "a"
name = "Site A"
city = "Jinan"
level = "city"
lat = 36.6
lon = 117.1
pue = 1.3
green_share = 0.2
provider = "a-co"
  [[site.pool]]
  type = "A100"
  count = 8
  price_fen_per_hour = 900

[[site]]
id = "b"
name = "Site B"
city = "Qingdao"
level = "hub"
lat = 36.0
lon = 120.3
pue = 1.2
green_share = 0.5
provider = "b-co"
  [[site.pool]]
  type = "A100"
  count = 16
  price_fen_per_hour = 600

[[link]]
a = "a"
b = "b"
bandwidth_gbps = 100
latency_ms = 4.5
price_fen_per_gb = 2
"#;

fn write(name: &str, text: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("suanwang-topology-tests-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

/// Loads `text` (the valid file with one edit) and returns the error lines
/// with the file name stripped, checking each line names the file.
fn errors(name: &str, text: &str) -> Vec<String> {
    let path = write(name, text);
    let message = suanwang_topology::load(path.to_str().unwrap()).unwrap_err().to_string();
    let prefix = format!("{}: ", path.display());
    message
        .lines()
        .map(|line| {
            assert!(line.starts_with(&prefix), "{line} does not name the file");
            line[prefix.len()..].to_string()
        })
        .collect()
}

#[test]
fn the_valid_file_loads() {
    let t = suanwang_topology::load(write("valid.toml", VALID).to_str().unwrap()).unwrap();
    assert_eq!((t.sites.len(), t.pools.len(), t.links.len()), (2, 2, 1));
    assert_eq!(t.route(t.site_id("a").unwrap(), t.site_id("b").unwrap()).latency_us, 4500);
}

#[test]
fn duplicate_site_id() {
    let text = VALID.replace("id = \"b\"", "id = \"a\"");
    assert!(errors("dup.toml", &text).contains(&"site 'a': duplicate id 'a'".to_string()));
}

#[test]
fn link_to_an_unknown_site() {
    let text = VALID.replace("b = \"b\"", "b = \"zz\"");
    let e = errors("link.toml", &text);
    assert!(e.contains(&"link 1 (a -- zz): unknown site 'zz'".to_string()), "{e:?}");
    // With the only link gone, b is also cut off.
    assert!(e.contains(&"site 'b': is disconnected: no route over the links to site 'a'".to_string()), "{e:?}");
}

#[test]
fn negative_or_zero_capacity() {
    assert_eq!(
        errors("neg.toml", &VALID.replace("count = 16", "count = -4")),
        vec!["site 'b' pool 1 (A100): count must be positive, got -4"]
    );
    assert_eq!(
        errors("zero.toml", &VALID.replace("count = 8", "count = 0")),
        vec!["site 'a' pool 1 (A100): count must be positive, got 0"]
    );
    assert_eq!(
        errors("price.toml", &VALID.replace("price_fen_per_hour = 900", "price_fen_per_hour = 0")),
        vec!["site 'a' pool 1 (A100): price_fen_per_hour must be positive, got 0"]
    );
}

#[test]
fn disconnected_site() {
    let text = VALID.split("[[link]]").next().unwrap().to_string();
    assert_eq!(errors("island.toml", &text), vec!["site 'b': is disconnected: no route over the links to site 'a'"]);
}

#[test]
fn unknown_accelerator_type() {
    let text = VALID.replace("  type = \"A100\"\n  count = 16", "  type = \"H999\"\n  count = 16");
    assert_eq!(
        errors("type.toml", &text),
        vec!["site 'b' pool 1 (H999): unknown accelerator type 'H999' (not in the [[accelerator]] catalogue)"]
    );
}

#[test]
fn out_of_range_figures() {
    assert_eq!(
        errors("pue.toml", &VALID.replace("pue = 1.2", "pue = 0.9")),
        vec!["site 'b': pue must be between 1.0 and 3.0, got 0.9"]
    );
    assert_eq!(
        errors("green.toml", &VALID.replace("green_share = 0.5", "green_share = 1.5")),
        vec!["site 'b': green_share must be between 0.0 and 1.0, got 1.5"]
    );
    assert_eq!(
        errors("lat.toml", &VALID.replace("lat = 36.0", "lat = 136.0")),
        vec!["site 'b': lat must be between -90 and 90, got 136"]
    );
    assert_eq!(
        errors("bw.toml", &VALID.replace("bandwidth_gbps = 100", "bandwidth_gbps = 0")),
        vec!["link 1 (a -- b): bandwidth_gbps must be positive, got 0"]
    );
    assert_eq!(
        errors("speed.toml", &VALID.replace("speed = 1.0", "speed = -1.0")),
        vec!["accelerator 'A100': speed must be positive, got -1"]
    );
}

#[test]
fn syntax_and_type_errors_give_the_line() {
    let e = errors("syntax.toml", &VALID.replace("count = 8", "count = eight"));
    assert_eq!(e.len(), 1);
    assert!(e[0].starts_with("line 22: ") && e[0].contains("must be quoted"), "{e:?}");
    let e = errors("unknown-field.toml", &VALID.replace("pue = 1.3", "pue = 1.3\ncolour = \"red\""));
    assert!(e[0].starts_with("line 18: ") && e[0].contains("unknown field `colour`"), "{e:?}");
    let e = errors("level.toml", &VALID.replace("level = \"city\"", "level = \"village\""));
    assert!(e[0].contains("unknown variant `village`"), "{e:?}");
}

#[test]
fn a_missing_file_is_named() {
    let message = suanwang_topology::load("/nonexistent/net.toml").unwrap_err().to_string();
    assert!(message.starts_with("/nonexistent/net.toml: cannot read:"), "{message}");
}

#[test]
fn the_bundled_network_routes_every_city_to_every_hub() {
    let t = suanwang_topology::load("shandong").unwrap();
    let hubs: Vec<_> = (0..t.sites.len() as u32)
        .map(suanwang_core::topology::SiteId)
        .filter(|&s| t.site(s).level == SiteLevel::Hub)
        .collect();
    assert!(hubs.len() >= 5);
    for from in 0..t.sites.len() as u32 {
        for &hub in hubs.iter().filter(|h| h.0 != from) {
            let route = t.route(suanwang_core::topology::SiteId(from), hub);
            assert!(
                route.hops >= 1 && route.latency_us < 40_000,
                "{} to {}",
                t.sites[from as usize].key,
                t.site(hub).key
            );
        }
    }
}
