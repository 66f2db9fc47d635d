//! `--metrics-port`: kamal-proxy's request metrics and Berth's own, scraped over HTTP while
//! requests and deploys happen.

mod common;

use common::certs::certificate_files;
use common::pebble::free_port;
use common::{get, ProxyProcess, Upstream};

/// The value of the sample whose line starts with `series` (name and labels), if any.
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find(|line| line.starts_with(series) && line[series.len()..].starts_with(' '))
        .and_then(|line| line.rsplit(' ').next())
        .and_then(|value| value.parse().ok())
}

async fn scrape(port: u16) -> String {
    let reply = get(
        std::net::SocketAddr::from(([127, 0, 0, 1], port)),
        "localhost",
        "/metrics",
    )
    .await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    reply.body
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_requests_and_deploys_and_show_certificate_expiry() {
    let metrics_port = free_port();
    let proxy = ProxyProcess::start_with(&[&format!("--metrics-port={metrics_port}")]);
    let app = Upstream::start("app").await;
    let certificate = certificate_files("shop.test");
    proxy.deploy(
        "shop",
        &app.target(),
        &[
            "--host=shop.test",
            "--tls",
            "--tls-redirect=false",
            &certificate.flags[0],
            &certificate.flags[1],
            "--exclude-metrics-path=/up",
        ],
    );

    for _ in 0..3 {
        assert_eq!(get(proxy.address(), "shop.test", "/").await.status, 200);
    }
    assert_eq!(get(proxy.address(), "shop.test", "/up").await.status, 200);
    let text = scrape(metrics_port).await;
    let requests = r#"kamal_proxy_http_requests_total{service="shop",method="GET",status="200"}"#;
    assert_eq!(sample(&text, requests), Some(3.0), "{text}");
    assert_eq!(
        sample(
            &text,
            r#"kamal_proxy_http_request_duration_seconds_count{service="shop",method="GET",status="200"}"#
        ),
        Some(3.0),
        "the excluded /up is counted nowhere"
    );
    assert!(text.contains(r#"kamal_proxy_http_in_flight_requests{service="shop"} 0"#));
    let target = app.target();
    let healthy = format!(r#"berth_target_healthy{{service="shop",target="{target}"}}"#);
    assert_eq!(sample(&text, &healthy), Some(1.0), "{text}");
    assert_eq!(
        sample(
            &text,
            &format!(
                r#"berth_upstream_response_duration_seconds_count{{service="shop",target="{target}"}}"#
            )
        ),
        Some(3.0),
        "every forwarded request but the excluded /up has an upstream time"
    );
    assert_eq!(
        sample(
            &text,
            r#"berth_deploys_total{service="shop",result="success"}"#
        ),
        Some(1.0)
    );
    let expiry = sample(
        &text,
        r#"berth_certificate_expiry_timestamp_seconds{host="shop.test"}"#,
    )
    .expect("certificate expiry is reported");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    assert!(
        (now + 3000.0..now + 3700.0).contains(&expiry),
        "the test certificate has about an hour left: {expiry} vs now {now}"
    );

    // A failed deploy and a second successful one move the deploy counts.
    let failed = proxy.cli(&[
        "deploy",
        "shop",
        "--target=127.0.0.1:1",
        "--host=shop.test",
        "--deploy-timeout=300ms",
    ]);
    assert_eq!(failed.status.code(), Some(1));
    let second = Upstream::start("second").await;
    proxy.deploy("shop", &second.target(), &["--host=shop.test"]);
    assert_eq!(get(proxy.address(), "shop.test", "/").await.status, 200);

    let text = scrape(metrics_port).await;
    assert_eq!(sample(&text, requests), Some(4.0), "{text}");
    assert_eq!(
        sample(
            &text,
            r#"berth_deploys_total{service="shop",result="success"}"#
        ),
        Some(2.0)
    );
    assert_eq!(
        sample(
            &text,
            r#"berth_deploys_total{service="shop",result="failure"}"#
        ),
        Some(1.0)
    );
    assert!(
        !text.contains(&format!(
            r#"berth_target_healthy{{service="shop",target="{target}"}}"#
        )),
        "the replaced target is gone from the state gauges"
    );
    assert!(
        !text.contains("berth_certificate_expiry_timestamp_seconds{"),
        "the service no longer uses TLS"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_metrics_port_moves_to_the_new_process_in_a_handover() {
    let metrics_port = free_port();
    let mut old = ProxyProcess::start_with(&[
        &format!("--metrics-port={metrics_port}"),
        "--upgrade-drain-timeout=1s",
    ]);
    let app = Upstream::start("app").await;
    old.deploy("web", &app.target(), &[]);
    assert_eq!(get(old.address(), "app.test", "/").await.status, 200);
    let series = r#"kamal_proxy_http_requests_total{service="web",method="GET",status="200"}"#;
    assert_eq!(sample(&scrape(metrics_port).await, series), Some(1.0));

    // The successor binds the metrics port while the old process still holds it.
    let new = tokio::task::block_in_place(|| old.upgrade());
    let status =
        tokio::task::block_in_place(|| old.wait_for_exit(std::time::Duration::from_secs(15)));
    assert!(status.success());
    assert!(new.log().contains("Serving metrics at /metrics"));
    assert_eq!(get(new.address(), "app.test", "/").await.status, 200);
    let text = scrape(metrics_port).await;
    assert_eq!(
        sample(&text, series),
        Some(1.0),
        "the new process counts its own requests: {text}"
    );
}
