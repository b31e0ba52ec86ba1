//! Any bytes as a node's TOML configuration and as a dev cluster file (what `ringctl --cluster`,
//! `ringkv dev` and the benchmark harness read). Neither may panic; whatever parses must pass
//! its own validation again after a round trip through its serialized form.
#![no_main]

use libfuzzer_sys::fuzz_target;
use ringkv_config::cluster::ClusterFile;
use ringkv_config::NodeConfig;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let dir = std::path::Path::new("/nonexistent/ringkv-fuzz");
    if let Ok(cfg) = NodeConfig::from_toml(dir, text) {
        let again = toml::to_string(&cfg).expect("a valid configuration serializes");
        let back = NodeConfig::from_toml(dir, &again).expect("a serialized configuration parses");
        assert_eq!(back, cfg);
    }
    if let Ok(file) = ClusterFile::parse(text) {
        let again = serde_json::to_string(&file).expect("a cluster file serializes");
        ClusterFile::parse(&again).expect("a serialized cluster file parses");
    }
});
