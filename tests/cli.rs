//! The command line as Kamal and people use it: Kamal's exact command lines, exit codes,
//! and clear errors for bad input.

mod common;

use std::process::Command;

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
fn run_rejects_a_bad_port_from_the_environment_by_name() {
    let home = tempfile::tempdir().unwrap();
    let output = Command::new(env!("CARGO_BIN_EXE_proxy"))
        .arg("run")
        .env("HOME", home.path())
        .env("KAMAL_PROXY_SOCKET", home.path().join("p.sock"))
        .env("HTTP_PORT", "eighty")
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(1));
    assert!(stderr(&output).contains("HTTP_PORT"), "{}", stderr(&output));
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
