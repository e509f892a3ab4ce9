//! The README's onboarding section, run as written: its shell block is read from README.md and
//! each command runs through `bash`, in order, on this machine. What differs from a real
//! deployment is only where things live (a scratch directory for the registry, the device's
//! root and the controller's data, a free port for 1883, `127.0.0.1` for the controller's
//! name, the native agent for the aarch64 one) and how services start: `systemctl restart
//! mosquitto` starts mosquitto with the generated configuration as Debian does (as root,
//! dropping to the `mosquitto` user), `reload` sends it SIGHUP, and `systemctl start
//! outpost-agent` runs the installed unit's `ExecStart` with its paths taken inside the
//! installed root. A real guest boots on the real libvirtd.
#![allow(clippy::unwrap_used)]

use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use outpost_tests::*;

const MARKER: &str = "<!-- onboarding: tests/tests/onboarding.rs runs this block as written -->";

/// The commands of the README's onboarding block: comments dropped, continuation lines joined.
fn readme_commands() -> Vec<String> {
    let readme =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../README.md"))
            .unwrap();
    let after = readme
        .split_once(MARKER)
        .expect("README.md has the onboarding block")
        .1;
    let block = after
        .split_once("```sh\n")
        .unwrap()
        .1
        .split_once("```")
        .unwrap()
        .0;
    let mut out = Vec::new();
    let mut cur = String::new();
    for line in block.lines() {
        let line = line.split_once("  #").map_or(line, |(c, _)| c).trim_end();
        if line.trim_start().starts_with('#') || line.trim().is_empty() {
            continue;
        }
        match line.strip_suffix('\\') {
            Some(part) => cur.push_str(part),
            None => {
                cur.push_str(line);
                out.push(cur.split_whitespace().collect::<Vec<_>>().join(" "));
                cur.clear();
            }
        }
    }
    out
}

/// Removes domains an earlier, killed run of this test left for its node.
fn remove_leftovers(node: &str) {
    for d in virsh(&["list", "--all", "--name"]).lines() {
        if d.starts_with("outpost-") && virsh(&["dumpxml", d]).contains(&format!("node=\"{node}\""))
        {
            virsh(&["destroy", d]);
            virsh(&["undefine", d]);
        }
    }
}

#[test]
fn the_readme_onboarding_runs_as_written() {
    assert!(ensure_libvirtd(), "libvirtd could not be started");
    remove_leftovers("edge-7");
    let dir = tempfile::tempdir().unwrap();
    // mosquitto (its own user) and QEMU's user must reach the registry and the images.
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let tmp = dir.path().display().to_string();
    let port = free_port();
    let api = format!("127.0.0.1:{}", free_port());
    let root = dir.path().join("sdcard");
    // The device's image directory holds the tiny test guest (delivering images is the
    // controller's job once it has an image catalogue).
    let images = root.join("var/lib/outpost/images");
    std::fs::create_dir_all(&images).unwrap();
    install_test_guest(&images);

    let subst = |c: &str| {
        c.replace("/var/lib/outpost-registry", &format!("{tmp}/registry"))
            .replace(
                "/etc/mosquitto/conf.d/outpost.conf",
                &format!("{tmp}/outpost-mosquitto.conf"),
            )
            .replace("/mnt/sdcard", &root.display().to_string())
            .replace(
                "--state-dir /var/lib/outpost",
                &format!("--state-dir {}/var/lib/outpost", root.display()),
            )
            .replace("controller.example", "127.0.0.1")
            .replace("1883", &port.to_string())
            .replace(
                "target/aarch64-unknown-linux-gnu/release/outpost-agent",
                &bin("outpost-agent").display().to_string(),
            )
    };
    let path = format!(
        "{}:{}",
        bin("outpost").parent().unwrap().display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let mut env: Vec<(String, String)> = vec![
        ("PATH".into(), path),
        ("OUTPOST_DATA_DIR".into(), format!("{tmp}/controller")),
        ("OUTPOST_API_LISTEN".into(), api.clone()),
        ("OUTPOST_API".into(), format!("http://{api}")),
    ];
    let bash = |cmd: &str, env: &[(String, String)]| {
        let mut c = Command::new("bash");
        c.arg("-c").arg(cmd).current_dir(dir.path());
        c.envs(env.iter().map(|(k, v)| (k, v)));
        c
    };

    let mut background: Vec<Proc> = Vec::new();
    let mut broker: Option<Mosquitto> = None;
    let commands = readme_commands();
    assert!(commands.len() >= 10, "{commands:?}");
    let mut ran_agent = false;
    let mut created = false;
    for (n, raw) in commands.iter().enumerate() {
        let cmd = subst(raw);
        eprintln!("$ {cmd}");
        let words: Vec<&str> = cmd.split_whitespace().collect();
        match words.as_slice() {
            ["apt-get", "install", "-y", pkgs @ ..] => {
                for p in pkgs {
                    let st = Command::new("dpkg").args(["-s", p]).output().unwrap();
                    assert!(
                        st.status.success(),
                        "{p} is not installed (scripts/setup installs it)"
                    );
                }
            }
            [assign] if assign.contains('=') && !assign.starts_with('-') => {
                let (k, v) = assign.split_once('=').unwrap();
                env.push((k.to_owned(), v.to_owned()));
            }
            ["systemctl", "restart", "mosquitto"] => {
                let conf =
                    std::fs::read_to_string(format!("{tmp}/outpost-mosquitto.conf")).unwrap();
                broker = Some(Mosquitto::start_as_debian(dir.path(), port, &conf));
            }
            ["systemctl", "reload", "mosquitto"] => {
                let pid = broker.as_ref().expect("mosquitto runs").proc.pid();
                assert!(
                    Command::new("kill")
                        .args(["-HUP", &pid.to_string()])
                        .status()
                        .unwrap()
                        .success()
                );
                std::thread::sleep(Duration::from_millis(500));
            }
            ["systemctl", "start", "outpost-agent"] => {
                // The installed unit's ExecStart, every absolute path inside the root.
                let unit =
                    std::fs::read_to_string(root.join("etc/systemd/system/outpost-agent.service"))
                        .unwrap();
                let exec = unit
                    .lines()
                    .find_map(|l| l.strip_prefix("ExecStart="))
                    .unwrap();
                let mut parts = exec.split_whitespace().map(|w| {
                    w.strip_prefix('/')
                        .map_or_else(|| w.into(), |rel| root.join(rel))
                });
                let mut c = Command::new(parts.next().unwrap());
                c.args(parts);
                background.push(Proc::spawn(c, dir.path().join("agent.log")));
                ran_agent = true;
            }
            [.., "&"] => {
                let line = cmd.trim_end_matches('&').trim();
                background.push(Proc::spawn(
                    bash(&format!("exec {line}"), &env),
                    dir.path().join(format!("background-{n}.log")),
                ));
                // The controller's API answers before the next command.
                if line.starts_with("outpost-controller") {
                    wait_for(Duration::from_secs(30), "the controller's API", || {
                        std::net::TcpStream::connect(&api).ok()
                    });
                }
            }
            _ => {
                let out = bash(&cmd, &env).output().unwrap();
                let text = format!(
                    "{}{}",
                    String::from_utf8_lossy(&out.stdout),
                    String::from_utf8_lossy(&out.stderr)
                );
                eprintln!("{text}");
                let logs: String = background.iter().map(|p| p.log_text()).collect();
                assert!(
                    out.status.success(),
                    "`{raw}` failed:\n{text}\nlogs:\n{logs}"
                );
                if cmd.starts_with("outpost nodes show edge-7") {
                    assert!(text.contains("state         up"), "{text}");
                    assert!(text.contains("zone=north"), "{text}");
                }
                created |= cmd.starts_with("outpost instances create web-1");
            }
        }
    }
    assert!(
        ran_agent && created,
        "the block starts the agent and creates an instance"
    );

    // The instance runs on the onboarded device, as a real domain.
    let show = |args: &[&str]| {
        let out = bash(&format!("outpost --json {}", args.join(" ")), &env)
            .output()
            .unwrap();
        serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap()
    };
    let v = show(&["instances", "show", "web-1"]);
    assert_eq!(v["phase"], "running", "{v}");
    assert_eq!(v["node"], "edge-7", "{v}");
    let domain = format!("outpost-{}", v["id"].as_str().unwrap());
    assert_eq!(virsh(&["domstate", &domain]), "running");
    // The device logged in to mosquitto with its own flashed identity.
    let broker = broker.expect("mosquitto runs");
    assert!(
        broker.proc.log_text().contains("as edge-7"),
        "{}",
        broker.proc.log_text()
    );

    let out = bash("outpost instances delete web-1 --wait --timeout 60", &env)
        .output()
        .unwrap();
    let logs: String = background.iter().map(|p| p.log_text()).collect();
    assert!(
        out.status.success(),
        "{}\nlogs:\n{logs}",
        String::from_utf8_lossy(&out.stderr)
    );
    for p in &mut background {
        p.kill();
    }
}
