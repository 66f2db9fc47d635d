//! Host and path-prefix patterns: normalising and routing arbitrary hosts and prefixes never
//! panics, and a service is found at any host and prefix the registry would accept.
#![no_main]

use std::sync::Arc;

use berth_proxy::config::{is_valid_host_pattern, normalize_host, normalize_path_prefix};
use berth_proxy::RouteTable;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|input: (Vec<(String, String)>, String, String)| {
    let (routes, host, path) = input;
    let mut table = RouteTable::<String>::default();
    for (index, (route_host, prefix)) in routes.iter().enumerate() {
        let hosts = if route_host.is_empty() {
            Vec::new()
        } else {
            vec![normalize_host(route_host)]
        };
        let prefixes = vec![normalize_path_prefix(prefix)];
        table.insert(&hosts, &prefixes, &Arc::new(index.to_string()));
    }
    let _ = table.lookup(&host, &path);

    // A host the registry accepts, at its own prefix, is found there (a wildcard by any
    // one-label subdomain).
    if let Some((route_host, prefix)) = routes.last() {
        let normal = normalize_host(route_host);
        let prefix = normalize_path_prefix(prefix);
        if is_valid_host_pattern(&normal) {
            let mut alone = RouteTable::<String>::default();
            alone.insert(&[normal.clone()], &[prefix.clone()], &Arc::new("it".into()));
            let request_host = match normal.strip_prefix("*.") {
                Some(domain) => format!("sub.{domain}"),
                None => normal.clone(),
            };
            assert!(
                alone.lookup(&request_host, &prefix).is_some(),
                "{normal:?} {prefix:?} not found"
            );
        }
    }
});
