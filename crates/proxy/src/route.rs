//! The routing snapshot: which service answers a (host, path) pair.
//!
//! A `RouteTable` is built once by the control plane and never changed; requests read the
//! current one through a `RouteTableHandle` without taking a lock. Lookup is one or two hash
//! probes plus a scan of the few path prefixes under one host, so its cost does not grow with
//! the number of services.

use std::sync::Arc;

use arc_swap::ArcSwap;
use rustc_hash::FxHashMap;

/// One service's claim on a host and path prefix.
#[derive(Debug, Clone)]
struct Route<S> {
    prefix: Box<str>,
    service: Arc<S>,
}

/// The routes under one host pattern, longest prefix first.
#[derive(Debug)]
struct PathRoutes<S>(Vec<Route<S>>);

impl<S> Default for PathRoutes<S> {
    fn default() -> Self {
        Self(Vec::new())
    }
}

impl<S> PathRoutes<S> {
    fn insert(&mut self, prefix: &str, service: Arc<S>) {
        self.0.push(Route {
            prefix: prefix.into(),
            service,
        });
        self.0
            .sort_by_key(|route| std::cmp::Reverse(route.prefix.len()));
    }

    fn lookup(&self, path: &str) -> Option<&Route<S>> {
        self.0
            .iter()
            .find(|route| prefix_matches(&route.prefix, path))
    }
}

/// A prefix matches on a segment boundary: `/api` matches `/api` and `/api/x`, not `/apix`.
fn prefix_matches(prefix: &str, path: &str) -> bool {
    if prefix == "/" {
        return true;
    }
    match path.strip_prefix(prefix) {
        Some(rest) => rest.is_empty() || rest.starts_with('/'),
        None => false,
    }
}

/// The result of a lookup: the service and the prefix that matched (for stripping).
#[derive(Debug)]
pub struct RouteMatch<'a, S> {
    pub service: &'a Arc<S>,
    pub prefix: &'a str,
}

/// An immutable map from host and path to service.
#[derive(Debug)]
pub struct RouteTable<S> {
    exact: FxHashMap<Box<str>, PathRoutes<S>>,
    /// Keyed by the domain after `*.`: `*.example.com` is stored as `example.com`.
    wildcard: FxHashMap<Box<str>, PathRoutes<S>>,
    any_host: PathRoutes<S>,
}

impl<S> Default for RouteTable<S> {
    fn default() -> Self {
        Self {
            exact: FxHashMap::default(),
            wildcard: FxHashMap::default(),
            any_host: PathRoutes::default(),
        }
    }
}

impl<S> RouteTable<S> {
    /// Adds a service under each of its hosts (none = every host) and path prefixes.
    /// Hosts and prefixes must already be normalised; conflicts are the caller's to refuse.
    pub fn insert(&mut self, hosts: &[String], prefixes: &[String], service: &Arc<S>) {
        let add = |routes: &mut PathRoutes<S>| {
            for prefix in prefixes {
                routes.insert(prefix, Arc::clone(service));
            }
        };
        if hosts.is_empty() {
            add(&mut self.any_host);
        }
        for host in hosts {
            match host.strip_prefix("*.") {
                Some(domain) => add(self.wildcard.entry(domain.into()).or_default()),
                None => add(self.exact.entry(host.as_str().into()).or_default()),
            }
        }
    }

    /// Finds the service for a request. `host` may carry a port and upper case.
    pub fn lookup(&self, host: &str, path: &str) -> Option<RouteMatch<'_, S>> {
        let host = strip_port(host);
        let lowered;
        let host = if host.bytes().any(|b| b.is_ascii_uppercase()) || host.ends_with('.') {
            lowered = host.trim_end_matches('.').to_ascii_lowercase();
            lowered.as_str()
        } else {
            host
        };
        // The most specific host pattern that exists decides, even when none of its paths
        // match (then 404): a request for a known host never reaches another app.
        let routes = self
            .exact
            .get(host)
            .or_else(|| {
                let (_, domain) = host.split_once('.')?;
                self.wildcard.get(domain)
            })
            .unwrap_or(&self.any_host);
        let found = routes.lookup(path)?;
        Some(RouteMatch {
            service: &found.service,
            prefix: &found.prefix,
        })
    }
}

/// `example.com:8080` → `example.com`; `[::1]:80` → `[::1]`.
pub fn strip_port(host: &str) -> &str {
    if host.starts_with('[') {
        return match host.find(']') {
            Some(end) => &host[..=end],
            None => host,
        };
    }
    // On bytes: a `str` search for a char walks UTF-8 machinery, and this runs twice a
    // request. `:` is ASCII, so the split falls on a char boundary.
    match host.bytes().rposition(|b| b == b':') {
        Some(colon) if host.as_bytes()[colon + 1..].iter().all(u8::is_ascii_digit) => {
            &host[..colon]
        }
        _ => host,
    }
}

/// Removes a matched prefix from a path: (`/api`, `/api/users`) → `/users`.
pub fn strip_prefix<'a>(prefix: &str, path: &'a str) -> &'a str {
    if prefix == "/" {
        return path;
    }
    match path.strip_prefix(prefix) {
        Some("") | None => "/",
        Some(rest) => rest,
    }
}

/// Where requests find the current routing snapshot. Cloning shares the same slot.
pub struct RouteTableHandle<S>(Arc<ArcSwap<RouteTable<S>>>);

impl<S> Clone for RouteTableHandle<S> {
    fn clone(&self) -> Self {
        Self(Arc::clone(&self.0))
    }
}

impl<S> Default for RouteTableHandle<S> {
    fn default() -> Self {
        Self(Arc::new(ArcSwap::from_pointee(RouteTable::default())))
    }
}

impl<S> RouteTableHandle<S> {
    /// The snapshot in force now; holding it does not block a publish.
    pub fn current(&self) -> arc_swap::Guard<Arc<RouteTable<S>>> {
        self.0.load()
    }

    pub fn publish(&self, table: RouteTable<S>) {
        self.0.store(Arc::new(table));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(entries: &[(&str, &[&str], &[&str])]) -> RouteTable<String> {
        let mut table = RouteTable::default();
        for (name, hosts, prefixes) in entries {
            let hosts: Vec<String> = hosts.iter().map(|h| h.to_string()).collect();
            let prefixes: Vec<String> = prefixes.iter().map(|p| p.to_string()).collect();
            table.insert(&hosts, &prefixes, &Arc::new(name.to_string()));
        }
        table
    }

    fn lookup(table: &RouteTable<String>, host: &str, path: &str) -> Option<String> {
        table.lookup(host, path).map(|m| {
            format!(
                "{}{}",
                m.service,
                if m.prefix == "/" { "" } else { m.prefix }
            )
        })
    }

    #[test]
    fn exact_host_beats_wildcard_beats_any_host() {
        let t = table(&[
            ("exact", &["app.example.com"], &["/"]),
            ("wild", &["*.example.com"], &["/"]),
            ("default", &[], &["/"]),
        ]);
        assert_eq!(lookup(&t, "app.example.com", "/").unwrap(), "exact");
        assert_eq!(lookup(&t, "APP.Example.com:443", "/").unwrap(), "exact");
        assert_eq!(lookup(&t, "other.example.com", "/").unwrap(), "wild");
        assert_eq!(lookup(&t, "a.b.example.com", "/").unwrap(), "default");
        assert_eq!(lookup(&t, "example.com", "/").unwrap(), "default");
    }

    #[test]
    fn longest_prefix_on_a_segment_boundary_wins() {
        let t = table(&[
            ("root", &["h"], &["/"]),
            ("api", &["h"], &["/api"]),
            ("v2", &["h"], &["/api/v2"]),
        ]);
        assert_eq!(lookup(&t, "h", "/api").unwrap(), "api/api");
        assert_eq!(lookup(&t, "h", "/api/users").unwrap(), "api/api");
        assert_eq!(lookup(&t, "h", "/api/v2/users").unwrap(), "v2/api/v2");
        assert_eq!(lookup(&t, "h", "/apix").unwrap(), "root");
        assert_eq!(lookup(&t, "h", "/").unwrap(), "root");
    }

    #[test]
    fn a_known_host_without_a_matching_prefix_is_not_found_as_in_kamal_proxy() {
        let t = table(&[
            ("api", &["h"], &["/api"]),
            ("wild-api", &["*.w"], &["/api"]),
            ("default", &[], &["/"]),
        ]);
        assert!(lookup(&t, "h", "/other").is_none());
        assert!(lookup(&t, "a.w", "/other").is_none());
        assert_eq!(lookup(&t, "other", "/other").unwrap(), "default");
    }

    #[test]
    fn no_match_is_none() {
        let t = table(&[("a", &["a.test"], &["/"])]);
        assert!(lookup(&t, "b.test", "/").is_none());
    }

    #[test]
    fn stripping_keeps_a_leading_slash() {
        assert_eq!(strip_prefix("/api", "/api/users"), "/users");
        assert_eq!(strip_prefix("/api", "/api"), "/");
        assert_eq!(strip_prefix("/", "/x"), "/x");
    }

    #[test]
    fn ports_are_stripped_from_names_and_ipv6_literals() {
        assert_eq!(strip_port("a.test:8080"), "a.test");
        assert_eq!(strip_port("a.test"), "a.test");
        assert_eq!(strip_port("[::1]:80"), "[::1]");
        assert_eq!(strip_port("a.test:"), "a.test");
        assert_eq!(strip_port("a.test:8o"), "a.test:8o");
        assert_eq!(strip_port("é.test:1"), "é.test");
    }
}
