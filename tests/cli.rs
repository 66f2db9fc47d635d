//! The command line as Kamal and people use it: Kamal's exact command lines, exit codes,
//! and clear errors for bad input.

mod common;

use std::process::Command;
use std::time::Duration;

use common::{get, ProxyProcess, Upstream};

fn stderr(output: &std::process::Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kamal_command_lines_are_accepted() {
    let proxy = ProxyProcess::start();
    let app = Upstream::start("app").await;
    let target = format!("--target={}", app.target());
    // As Kamal 2 sends them through `docker exec kamal-proxy kamal-proxy ...`.
    proxy.ok(&[
        "deploy",
        "myapp-web",
        &target,
        "--host=myapp.example.com",
        "--host=www.myapp.example.com",
        "--deploy-timeout=30s",
        "--drain-timeout=30s",
        "--buffer-requests",
        "--buffer-responses",
        "--log-request-header=Cache-Control",
        "--log-request-header=Last-Modified",
        "--log-request-header=User-Agent",
        "--health-check-interval=1s",
        "--health-check-timeout=5s",
        "--health-check-path=/up",
        "--target-timeout=30s",
        "--max-request-body=0",
        "--forward-headers=true",
        "--path-prefix=/",
        "--strip-path-prefix=true",
    ]);
    assert_eq!(
        get(proxy.address(), "www.myapp.example.com", "/")
            .await
            .status,
        200
    );
    proxy.ok(&[
        "stop",
        "myapp-web",
        "--drain-timeout=30s",
        "--message=Down for maintenance",
    ]);
    proxy.ok(&["resume", "myapp-web"]);
    proxy.ok(&[
        "pause",
        "myapp-web",
        "--drain-timeout=5s",
        "--max-pause=30s",
    ]);
    proxy.ok(&["resume", "myapp-web"]);
    assert!(proxy.ok(&["list"]).contains("myapp-web"));
    proxy.ok(&["remove", "myapp-web"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_exits_1_and_names_the_flag() {
    let proxy = ProxyProcess::start();
    let cases: &[(&[&str], &str)] = &[
        (
            &["deploy", "web", "--target=127.0.0.1:1", "--bogus"],
            "--bogus",
        ),
        (
            &[
                "deploy",
                "web",
                "--target=127.0.0.1:1",
                "--deploy-timeout=soon",
            ],
            "--deploy-timeout",
        ),
        (
            &[
                "deploy",
                "web",
                "--target=127.0.0.1:1",
                "--drain-timeout=30",
            ],
            "--drain-timeout",
        ),
        (&["deploy", "web"], "--target"),
        (
            &["deploy", "web", "--target=127.0.0.1:1", "--tls=maybe"],
            "--tls",
        ),
        (
            &[
                "deploy",
                "web",
                "--target=127.0.0.1:1",
                "--max-request-body=10",
            ],
            "--buffer-requests",
        ),
        (
            &[
                "deploy",
                "web",
                "--target=127.0.0.1:1",
                "--health-check-port=http",
            ],
            "--health-check-port",
        ),
        (
            &["deploy", "web", "--target=not-an-address"],
            "not-an-address",
        ),
        (
            &["deploy", "web", "--target=127.0.0.1:1", "--tls"],
            "host must be set when using TLS",
        ),
        (&["stop", "nothing"], "service not found"),
        (&["frobnicate"], "frobnicate"),
    ];
    for (args, named) in cases {
        let output = proxy.cli(args);
        assert_eq!(
            output.status.code(),
            Some(1),
            "`proxy {}` should exit 1",
            args.join(" ")
        );
        let message = stderr(&output);
        assert!(
            message.starts_with("Error: "),
            "`proxy {}`: {message}",
            args.join(" ")
        );
        assert!(
            message.contains(named),
            "`proxy {}` should name {named}: {message}",
            args.join(" ")
        );
    }
    assert!(
        proxy.ok(&["list"]).lines().count() == 1,
        "nothing was deployed by bad input"
    );
}

#[test]
fn help_exits_0_and_commands_without_a_daemon_explain_why_they_failed() {
    let help = Command::new(env!("CARGO_BIN_EXE_proxy"))
        .args(["deploy", "--help"])
        .output()
        .unwrap();
    assert!(help.status.success());
    let text = String::from_utf8_lossy(&help.stdout);
    assert!(
        text.contains("--deploy-timeout") && text.contains("[default: 30s]"),
        "{text}"
    );

    let home = tempfile::tempdir().unwrap();
    let output = Command::new(env!("CARGO_BIN_EXE_proxy"))
        .arg("list")
        .env("KAMAL_PROXY_SOCKET", home.path().join("none.sock"))
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(1));
    assert!(
        stderr(&output).contains("cannot reach the proxy"),
        "{}",
        stderr(&output)
    );
}

#[test]
fn run_rejects_a_bad_value_of_its_own_prefixed_variables_by_name() {
    let home = tempfile::tempdir().unwrap();
    let output = Command::new(env!("CARGO_BIN_EXE_proxy"))
        .args(["run", "--bind=127.0.0.1", "--http-port=0", "--https-port=0"])
        .env("HOME", home.path())
        .env("KAMAL_PROXY_SOCKET", home.path().join("p.sock"))
        .env("KAMAL_PROXY_MAX_CONNECTIONS", "many")
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(1));
    assert!(
        stderr(&output).contains("KAMAL_PROXY_MAX_CONNECTIONS"),
        "{}",
        stderr(&output)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kamal_proxys_variables_fall_back_to_defaults_and_unprefixed_berth_ones_are_ignored() {
    // As kamal-proxy: an unparsable METRICS_PORT or DEBUG means the default, with a warning.
    // An unrelated PROXY_PROTOCOL=true on the host must not make the proxy expect PROXY
    // headers: Berth's own variables need the KAMAL_PROXY_ prefix.
    let home = tempfile::tempdir().unwrap();
    let log = std::fs::File::create(home.path().join("log")).unwrap();
    let mut daemon = Command::new(env!("CARGO_BIN_EXE_proxy"))
        .args(["run", "--bind=127.0.0.1", "--http-port=0", "--https-port=0"])
        .env("HOME", home.path())
        .env("KAMAL_PROXY_SOCKET", home.path().join("p.sock"))
        .env("METRICS_PORT", "nine")
        .env("DEBUG", "perhaps")
        .env("PROXY_PROTOCOL", "true")
        .env_remove("HTTP_PORT")
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let started = loop {
        let text = std::fs::read_to_string(home.path().join("log")).unwrap();
        if let Some(line) = text.lines().find(|l| l.contains("Proxy started")) {
            break serde_json::from_str::<serde_json::Value>(line).unwrap();
        }
        assert!(
            daemon.try_wait().unwrap().is_none(),
            "the daemon exited:\n{text}"
        );
        assert!(std::time::Instant::now() < deadline, "no start:\n{text}");
        std::thread::sleep(Duration::from_millis(20));
    };
    let text = std::fs::read_to_string(home.path().join("log")).unwrap();
    assert!(
        text.contains("METRICS_PORT") && text.contains("DEBUG"),
        "{text}"
    );
    let address: std::net::SocketAddr = started["http"].as_str().unwrap().parse().unwrap();
    let reply = get(address, "nothing.test", "/").await;
    assert_eq!(reply.status, 404, "a plain request is answered");
    let _ = daemon.kill();
    let _ = daemon.wait();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_daemon_on_the_same_socket_refuses_to_start() {
    let proxy = ProxyProcess::start();
    let output = Command::new(env!("CARGO_BIN_EXE_proxy"))
        .args(["run", "--bind=127.0.0.1", "--http-port=0", "--https-port=0"])
        .env("HOME", proxy.home())
        .env("KAMAL_PROXY_SOCKET", proxy.socket())
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(1));
    assert!(
        stderr(&output).contains("already running"),
        "{}",
        stderr(&output)
    );
    assert!(
        proxy.ok(&["list"]).starts_with("Service"),
        "the first daemon still answers"
    );
    use std::os::unix::fs::PermissionsExt;
    for socket in [proxy.socket(), proxy.home().join("proxy.sock.upgrade")] {
        let mode = std::fs::metadata(&socket).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{} is not owner-only", socket.display());
    }
}

/// The container image ships the binary also as `kamal-proxy`, which Kamal calls through
/// `docker exec kamal-proxy kamal-proxy ...`: the same binary must answer to that name.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_works_when_called_as_kamal_proxy() {
    let proxy = ProxyProcess::start();
    let app = Upstream::start("app").await;
    let bin = tempfile::tempdir().unwrap();
    let kamal_proxy = bin.path().join("kamal-proxy");
    std::os::unix::fs::symlink(env!("CARGO_BIN_EXE_proxy"), &kamal_proxy).unwrap();
    let run = |args: &[&str]| {
        tokio::task::block_in_place(|| {
            Command::new(&kamal_proxy)
                .args(args)
                .env("HOME", proxy.home())
                .env("KAMAL_PROXY_SOCKET", proxy.socket())
                .output()
                .unwrap()
        })
    };
    let target = format!("--target={}", app.target());
    let deployed = run(&[
        "deploy",
        "myapp-web",
        &target,
        "--host=myapp.test",
        "--deploy-timeout=30s",
        "--drain-timeout=30s",
        "--buffer-requests",
        "--buffer-responses",
        "--log-request-header=Cache-Control",
        "--health-check-interval=100ms",
    ]);
    assert!(deployed.status.success(), "{}", stderr(&deployed));
    assert_eq!(get(proxy.address(), "myapp.test", "/").await.status, 200);
    let listed = run(&["list"]);
    assert!(String::from_utf8_lossy(&listed.stdout).contains("myapp-web"));
    let dockerfile =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/Dockerfile")).unwrap();
    for line in [
        "ln -s proxy /usr/local/bin/kamal-proxy",
        "USER kamal-proxy",
        "ENV HOME=/home/kamal-proxy",
        "VOLUME /home/kamal-proxy/.config/kamal-proxy",
        "setcap cap_net_bind_service=+ep",
    ] {
        assert!(dockerfile.contains(line), "Dockerfile lacks {line}");
    }
}

/// Starts `proxy run` with `args` and `env`, returns the HTTP port it reports, and stops it.
fn started_http_port(
    home: &std::path::Path,
    args: &[&str],
    env: &[(&str, &str)],
) -> Result<u16, String> {
    let log = home.join(format!("run-{}.log", args.len() + env.len()));
    let mut child = Command::new(env!("CARGO_BIN_EXE_proxy"))
        .arg("run")
        .args(args)
        .env("HOME", home)
        .env("KAMAL_PROXY_SOCKET", home.join("p.sock"))
        .env_remove("HTTP_PORT")
        .env_remove("KAMAL_PROXY_HTTP_PORT")
        .envs(env.iter().copied())
        .stdout(std::fs::File::create(&log).unwrap())
        .stderr(std::fs::File::create(home.join("run.err")).unwrap())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let outcome = loop {
        if let Ok(Some(_)) = child.try_wait() {
            break Err(std::fs::read_to_string(home.join("run.err")).unwrap_or_default());
        }
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        let started = text
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .find(|l| l["msg"] == "Proxy started");
        if let Some(line) = started {
            break Ok(line["http"]
                .as_str()
                .unwrap()
                .parse::<std::net::SocketAddr>()
                .unwrap()
                .port());
        }
        if std::time::Instant::now() > deadline {
            break Err("did not start".into());
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    let _ = child.kill();
    let _ = child.wait();
    outcome
}

#[test]
fn run_options_come_from_flags_then_environment_then_the_config_file() {
    let home = tempfile::tempdir().unwrap();
    let free = || {
        std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    };
    let (from_file, from_env, from_flag) = (free(), free(), free());
    let config = home.path().join("proxy.toml");
    std::fs::write(
        &config,
        format!("bind = \"127.0.0.1\"\nhttp_port = {from_file}\nhttps_port = 0\n"),
    )
    .unwrap();
    let config_flag = format!("--config={}", config.display());
    let env_port = from_env.to_string();
    let flag_port = format!("--http-port={from_flag}");

    assert_eq!(
        started_http_port(home.path(), &[&config_flag], &[]),
        Ok(from_file)
    );
    assert_eq!(
        started_http_port(home.path(), &[&config_flag], &[("HTTP_PORT", &env_port)]),
        Ok(from_env)
    );
    assert_eq!(
        started_http_port(
            home.path(),
            &[&config_flag, &flag_port],
            &[("KAMAL_PROXY_HTTP_PORT", &env_port)]
        ),
        Ok(from_flag)
    );

    std::fs::write(
        &config,
        "bind = \"127.0.0.1\"\nhttps_port = 0\nhttp_prot = 80\n",
    )
    .unwrap();
    let error = started_http_port(home.path(), &[&config_flag], &[]).unwrap_err();
    assert!(
        error.starts_with("Error: ") && error.contains("http_prot") && error.contains("line 3"),
        "{error}"
    );
}

/// Runs `proxy <args>` under a pseudo-terminal (util-linux `script`), as an operator would,
/// on a thread of its own; returns whether it succeeded and everything it wrote.
fn on_a_terminal(proxy: &ProxyProcess, args: &[&str]) -> std::thread::JoinHandle<(bool, String)> {
    let command = std::iter::once(env!("CARGO_BIN_EXE_proxy"))
        .chain(args.iter().copied())
        .map(|arg| format!("'{arg}'"))
        .collect::<Vec<_>>()
        .join(" ");
    let (home, socket) = (proxy.home().to_path_buf(), proxy.socket());
    std::thread::spawn(move || {
        let output = Command::new("script")
            .args(["--quiet", "--return", "--command", &command, "/dev/null"])
            .env("HOME", home)
            .env("KAMAL_PROXY_SOCKET", socket)
            .output()
            .expect("util-linux `script` runs the CLI under a terminal");
        (
            output.status.success(),
            String::from_utf8_lossy(&output.stdout).into_owned(),
        )
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deploy_shows_progress_on_a_terminal_and_nothing_when_piped() {
    let proxy = ProxyProcess::start();
    let old = Upstream::start("old").await;
    proxy.deploy("web", &old.target(), &[]);

    let new = Upstream::start("new").await;
    new.set_health(503);
    let target = format!("--target={}", new.target());
    let deploy = on_a_terminal(
        &proxy,
        &["deploy", "web", &target, "--health-check-interval=100ms"],
    );
    tokio::time::sleep(Duration::from_millis(1200)).await;
    new.set_health(200);
    let (succeeded, shown) = tokio::task::spawn_blocking(move || deploy.join().unwrap())
        .await
        .unwrap();
    assert!(succeeded, "{shown}");
    assert!(
        shown.contains("Health checks: 0/1 healthy")
            && shown.contains(&format!("{}: ", new.target()))
            && shown.contains("503"),
        "the health checks and their last failure are shown: {shown:?}"
    );
    assert!(shown.contains("s left"), "{shown:?}");
    assert!(shown.contains("Deployed web in"), "{shown:?}");

    // Piped (as Kamal runs it): nothing on stdout or stderr.
    let newer = Upstream::start("newer").await;
    let output = proxy.cli(&[
        "deploy",
        "web",
        &format!("--target={}", newer.target()),
        "--health-check-interval=100ms",
    ]);
    assert!(output.status.success());
    assert!(output.stdout.is_empty() && output.stderr.is_empty());
}
