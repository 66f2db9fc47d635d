//! How long a route lookup takes as the number of deployed hosts grows: it should not grow.
//!
//!   cargo bench -p berth-proxy --bench route_lookup

use std::hint::black_box;
use std::sync::Arc;

use berth_proxy::RouteTable;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};

/// A table with `hosts` hosts, each with a root service and an `/api` service.
fn table(hosts: usize) -> RouteTable<String> {
    let mut table = RouteTable::default();
    let root = vec!["/".to_string()];
    let api = vec!["/api".to_string()];
    for i in 0..hosts {
        let host = vec![format!("app{i}.example.com")];
        table.insert(&host, &root, &Arc::new(format!("web{i}")));
        table.insert(&host, &api, &Arc::new(format!("api{i}")));
    }
    table.insert(
        &["*.tenants.example.com".to_string()],
        &root,
        &Arc::new("tenants".to_string()),
    );
    table
}

fn lookups(c: &mut Criterion) {
    let mut group = c.benchmark_group("route_lookup");
    for hosts in [10, 100, 1_000, 10_000] {
        let table = table(hosts);
        let exact = format!("app{}.example.com", hosts / 2);
        group.bench_with_input(
            BenchmarkId::new("exact_host_api_path", hosts),
            &hosts,
            |b, _| {
                b.iter(|| {
                    black_box(table.lookup(black_box(&exact), black_box("/api/users/42"))).is_some()
                })
            },
        );
        group.bench_with_input(BenchmarkId::new("wildcard_host", hosts), &hosts, |b, _| {
            b.iter(|| {
                black_box(table.lookup(black_box("shop.tenants.example.com"), black_box("/")))
                    .is_some()
            })
        });
    }
    group.finish();
}

criterion_group!(benches, lookups);
criterion_main!(benches);
