//! The client commands: each sends one request to the daemon and prints the answer.

use std::io::IsTerminal;

use berth_control::protocol::{DeployProgress, ServiceList, StatusReport, TargetStatus};
use berth_control::{
    paths, ClientError, ControlClient, DeployRequest, PauseRequest, RolloutDeployRequest,
    RolloutSetRequest, StopRequest,
};
use berth_proxy::config::{BufferConfig, HealthCheckConfig, ServiceConfig, TlsConfig};

use crate::cli::{Command, DeployArgs, OutputArgs, RolloutCommand};

pub async fn run(command: Command) -> anyhow::Result<()> {
    let client = ControlClient::new(paths::socket_path());
    match command {
        Command::Run(_) => unreachable!("`run` is handled by main"),
        Command::Deploy(args) => {
            let service = args.service.clone();
            let request = deploy_request(*args);
            if std::io::stderr().is_terminal() {
                let started = std::time::Instant::now();
                with_progress(&client, &service, client.deploy(&service, &request)).await?;
                eprintln!(
                    "Deployed {service} in {:.1}s",
                    started.elapsed().as_secs_f64()
                );
            } else {
                client.deploy(&service, &request).await?;
            }
        }
        Command::Remove(args) => client.remove(&args.service).await?,
        Command::Stop(args) => {
            let request = StopRequest {
                drain_timeout: args.drain_timeout,
                message: args.message,
            };
            client.stop(&args.service, &request).await?;
        }
        Command::Pause(args) => {
            let request = PauseRequest {
                drain_timeout: args.drain_timeout,
                max_pause: args.max_pause,
            };
            client.pause(&args.service, &request).await?;
        }
        Command::Resume(args) => client.resume(&args.service).await?,
        Command::Rollout(RolloutCommand::Deploy(args)) => {
            let request = RolloutDeployRequest {
                targets: args.targets,
                read_targets: args.read_targets,
                deploy_timeout: args.deploy_timeout,
                drain_timeout: args.drain_timeout,
            };
            client.rollout_deploy(&args.service, &request).await?;
        }
        Command::Rollout(RolloutCommand::Set(args)) => {
            let request = RolloutSetRequest {
                percent: args.percent.unwrap_or(0),
                allowlist: args.allowlist,
                assign_cookies: args.assign_cookies,
            };
            client.rollout_set(&args.service, &request).await?;
        }
        Command::Rollout(RolloutCommand::Stop(args)) => client.rollout_stop(&args.service).await?,
        Command::List(output) => print_list(&client.list().await?, &output)?,
        Command::Status(output) => print_status(&client.status().await?, &output)?,
    }
    Ok(())
}

/// Runs `deploy`, showing on one rewritten stderr line what it waits for. Only called on a
/// terminal: piped output stays quiet and parseable.
async fn with_progress(
    client: &ControlClient,
    service: &str,
    deploy: impl std::future::Future<Output = Result<(), ClientError>>,
) -> Result<(), ClientError> {
    tokio::pin!(deploy);
    let mut ticker = tokio::time::interval(PROGRESS_INTERVAL);
    let mut shown = false;
    let result = loop {
        tokio::select! {
            result = &mut deploy => break result,
            _ = ticker.tick() => {
                if let Ok(progress) = client.deploy_progress(service).await {
                    eprint!("\r\x1b[2K{}", describe_progress(&progress));
                    shown = true;
                }
            }
        }
    };
    if shown {
        eprint!("\r\x1b[2K");
    }
    result
}

const PROGRESS_INTERVAL: std::time::Duration = std::time::Duration::from_millis(250);

fn describe_progress(progress: &DeployProgress) -> String {
    let time_left = format!("{:.0}s left", progress.time_left_ms as f64 / 1000.0);
    if progress.phase == "draining" {
        let in_flight: usize = progress.targets.iter().map(|t| t.in_flight).sum();
        let requests = if in_flight == 1 {
            "request"
        } else {
            "requests"
        };
        return format!("Draining old targets: {in_flight} {requests} in flight ({time_left})");
    }
    let healthy = progress.targets.iter().filter(|t| t.healthy).count();
    let waiting: Vec<String> = progress
        .targets
        .iter()
        .filter(|t| !t.healthy)
        .map(|t| {
            let checks = if t.checks == 1 { "check" } else { "checks" };
            match &t.last_failure {
                Some(failure) => format!("{}: {} {checks}, last {failure}", t.address, t.checks),
                None => format!("{}: {} {checks}", t.address, t.checks),
            }
        })
        .collect();
    format!(
        "Health checks: {healthy}/{} healthy; {} ({time_left})",
        progress.targets.len(),
        waiting.join("; ")
    )
}

fn deploy_request(args: DeployArgs) -> DeployRequest {
    // Resolved here, as kamal-proxy's client does, so the state file holds the path.
    let acme_cache_path = Some(
        args.tls_acme_cache_path
            .clone()
            .unwrap_or_else(|| paths::certificates_dir().display().to_string()),
    );
    let config = ServiceConfig {
        hosts: args.hosts,
        path_prefixes: args.path_prefixes,
        strip_path_prefix: args.strip_path_prefix,
        tls: TlsConfig {
            enabled: args.tls,
            redirect: args.tls_redirect,
            acme_directory: args
                .tls_staging
                .then(|| berth_acme::LETS_ENCRYPT_STAGING.to_string()),
            on_demand_url: args.tls_on_demand_url,
            certificate_path: args.tls_certificate_path,
            private_key_path: args.tls_private_key_path,
            acme_cache_path,
            canonical_host: args.canonical_host,
        },
        health_check: HealthCheckConfig {
            path: args.health_check_path,
            port: args.health_check_port,
            host: args.health_check_host,
            interval: args.health_check_interval,
            timeout: args.health_check_timeout,
        },
        target_timeout: args.target_timeout,
        buffering: BufferConfig {
            requests: args.buffer_requests,
            responses: args.buffer_responses,
            memory: args.buffer_memory,
            max_request_body: args.max_request_body.unwrap_or(0),
            max_response_body: args.max_response_body.unwrap_or(0),
        },
        forward_headers: args.forward_headers.unwrap_or(!args.tls),
        client_ip_header: args.client_ip_header,
        log_request_headers: args.log_request_headers,
        log_response_headers: args.log_response_headers,
        error_pages: args.error_pages,
        read_targets: args.read_targets,
        writer_affinity_timeout: args.writer_affinity_timeout,
        read_target_websockets: args.read_target_websockets,
        exclude_metrics_path: args.exclude_metrics_paths,
        scope_cookie_paths: args.scope_cookie_paths,
    };
    DeployRequest {
        targets: args.targets,
        config,
        deploy_timeout: args.deploy_timeout,
        drain_timeout: args.drain_timeout,
        force: args.force,
    }
}

/// Prints `value` as JSON when asked; returns whether it did.
fn printed_as_json<T: serde::Serialize>(value: &T, output: &OutputArgs) -> anyhow::Result<bool> {
    if output.json {
        println!("{}", serde_json::to_string_pretty(value)?);
    }
    Ok(output.json)
}

fn print_list(list: &ServiceList, output: &OutputArgs) -> anyhow::Result<()> {
    if printed_as_json(list, output)? {
        return Ok(());
    }
    let rows = list
        .services
        .iter()
        .map(|s| {
            vec![
                s.name.clone(),
                join_or(&s.hosts, "*"),
                join_or(&s.path_prefixes, "/"),
                s.targets.join(","),
                s.state.clone(),
                yes_no(s.tls),
            ]
        })
        .collect();
    print_table(&["Service", "Host", "Path", "Target", "State", "TLS"], rows);
    Ok(())
}

fn print_status(status: &StatusReport, output: &OutputArgs) -> anyhow::Result<()> {
    if printed_as_json(status, output)? {
        return Ok(());
    }
    let mut rows = Vec::new();
    for route in &status.routes {
        let route_cells = [
            route.host.clone(),
            route.path.clone(),
            route.service.clone(),
            route.state.clone(),
            yes_no(route.tls),
        ];
        let target_row = |target: &TargetStatus, label: &str| {
            let health = serde_json::to_value(target.health)
                .ok()
                .and_then(|v| v.as_str().map(str::to_string))
                .unwrap_or_else(|| "unknown".into());
            [
                format!("{}{label}", target.address),
                health,
                target.in_flight.to_string(),
                target.last_failure.clone().unwrap_or_default(),
            ]
        };
        let mut target_cells: Vec<[String; 4]> = if route.targets.is_empty() {
            vec![["-".into(), "-".into(), "0".into(), String::new()]]
        } else {
            route.targets.iter().map(|t| target_row(t, "")).collect()
        };
        target_cells.extend(
            route
                .read_targets
                .iter()
                .map(|t| target_row(t, " (reader)")),
        );
        if let Some(rollout) = &route.rollout {
            let label = match &rollout.split {
                Some(split) if split.allowlist.is_empty() => {
                    format!(" (rollout {}%)", split.percent)
                }
                Some(split) => format!(
                    " (rollout {}% + {})",
                    split.percent,
                    split.allowlist.join(",")
                ),
                None => " (rollout, no traffic)".to_string(),
            };
            target_cells.extend(rollout.targets.iter().map(|t| target_row(t, &label)));
            let reader_label = format!("{label} (reader)");
            target_cells.extend(
                rollout
                    .read_targets
                    .iter()
                    .map(|t| target_row(t, &reader_label)),
            );
        }
        for cells in target_cells {
            rows.push(route_cells.iter().cloned().chain(cells).collect());
        }
    }
    print_table(
        &[
            "Host",
            "Path",
            "Service",
            "State",
            "TLS",
            "Target",
            "Health",
            "In-flight",
            "Last failure",
        ],
        rows,
    );
    // One row per host, though a host may have routes on several paths.
    let mut seen_hosts = std::collections::HashSet::new();
    let certificates: Vec<Vec<String>> = status
        .routes
        .iter()
        .filter(|route| seen_hosts.insert(route.host.as_str()))
        .filter_map(|route| {
            let certificate = route.certificate.as_ref()?;
            let mut row = vec![
                route.host.clone(),
                certificate.state.clone(),
                certificate.expires.clone().unwrap_or_else(|| "-".into()),
                certificate.issuer.clone().unwrap_or_else(|| "-".into()),
            ];
            if status.cert_store.is_some() {
                row.push(match (&certificate.ordered_by, &certificate.ordered_at) {
                    (Some(by), Some(at)) => format!("{by} at {at}"),
                    _ => "-".into(),
                });
            }
            Some(row)
        })
        .collect();
    if !certificates.is_empty() {
        println!();
        let mut headers = vec!["Host", "Certificate", "Expires", "Issuer"];
        if status.cert_store.is_some() {
            headers.push("Ordered by");
        }
        print_table(&headers, certificates);
    }
    if let Some(store) = &status.cert_store {
        println!();
        let reachable = if store.reachable {
            "reachable".to_string()
        } else {
            format!(
                "UNREACHABLE ({})",
                store.last_error.as_deref().unwrap_or("not yet reached")
            )
        };
        println!(
            "Certificate store: {} ({reachable}); this instance: {}; errors: {}; lock waits: {}",
            store.location, store.instance, store.errors, store.lock_waits
        );
        if store.reachable {
            if let Some(error) = &store.last_error {
                println!("Last store error: {error}");
            }
        }
    }
    Ok(())
}

fn yes_no(flag: bool) -> String {
    if flag { "yes" } else { "no" }.to_string()
}

fn join_or(items: &[String], empty: &str) -> String {
    if items.is_empty() {
        empty.to_string()
    } else {
        items.join(",")
    }
}

/// Left-aligned columns; the header is styled only on a terminal.
fn print_table(header: &[&str], rows: Vec<Vec<String>>) {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in &rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let styled = std::io::stdout().is_terminal();
    let line = |cells: Vec<String>| {
        cells
            .iter()
            .zip(&widths)
            .map(|(cell, width)| format!("{cell:<width$}"))
            .collect::<Vec<_>>()
            .join("  ")
            .trim_end()
            .to_string()
    };
    let head = line(header.iter().map(|h| h.to_string()).collect());
    if styled {
        println!("\x1b[1m{head}\x1b[0m");
    } else {
        println!("{head}");
    }
    for row in rows {
        println!("{}", line(row));
    }
}
