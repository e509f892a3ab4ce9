//! The status page in a real browser (headless Chromium over the DevTools protocol): the
//! controller with two agents, the page shows the nodes, the instances and a refusal's
//! "why no host", follows a change without a reload, fits a phone's width, and leaves
//! screenshots (desktop and phone) in `target/artifacts/`.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use outpost_tests::*;

const T: Duration = Duration::from_secs(30);

#[test]
fn the_status_page_shows_the_fleet_and_follows_it() {
    let dir = tempfile::tempdir().unwrap();
    let mut ctl = Controller::embedded(dir.path());
    ctl.start();
    let mut north = Agent::fake(dir.path(), "edge-north", ctl.mqtt_port, 4096, "north");
    let mut south = Agent::fake(dir.path(), "edge-south", ctl.mqtt_port, 2048, "south");
    north.start();
    south.start();
    ctl.wait_nodes_up(2);
    for (name, zone, mem) in [
        ("web-1", "north", "512"),
        ("web-2", "north", "1024"),
        ("db-1", "south", "1536"),
    ] {
        ctl.cli(&[
            "instances",
            "create",
            name,
            "--kernel",
            "vmlinuz",
            "--memory",
            mem,
            "--selector",
            &format!("zone={zone}"),
            "--wait",
        ])
        .unwrap();
    }
    let e = ctl
        .cli(&[
            "instances",
            "create",
            "too-big",
            "--kernel",
            "vmlinuz",
            "--memory",
            "8192",
        ])
        .unwrap_err();
    assert!(e.contains("no host fits"), "{e}");

    // The page's files need no token and carry a content security policy.
    let (status, body) = ctl.http("GET", "/", "");
    assert_eq!(status, 200);
    assert!(body.contains("<title>Outpost fleet</title>"), "{body}");

    let browser = Browser::start();
    let mut page = browser.page();
    page.viewport(1280, 900, false);
    page.navigate(&format!("{}/", ctl.api));
    let context = "document.body.innerText.slice(0, 2000)";
    page.wait(T, "document.body.dataset.loaded === 'true'", context);
    page.wait(
        T,
        "document.querySelectorAll('.node').length === 2",
        context,
    );
    let nodes = page.eval("[...document.querySelectorAll('.node')].map(n => n.dataset.node + ':' + n.dataset.state).join(',')");
    assert_eq!(nodes, "edge-north:up,edge-south:up");
    let rows = page.eval(
        "[...document.querySelectorAll('#instances tbody tr')].map(r => r.dataset.instance + ':' + r.dataset.phase).sort().join(',')",
    );
    assert_eq!(rows, "db-1:running,web-1:running,web-2:running");
    let why = page.eval("document.getElementById('why').innerText");
    assert!(
        why.as_str().unwrap().contains("no host fits (2 hosts)")
            && why.as_str().unwrap().contains("memory"),
        "{why}"
    );
    let health = page.eval("document.getElementById('health').innerText");
    assert!(
        health.as_str().unwrap().contains("broker connected"),
        "{health}"
    );
    // The bars show what is claimed: web-1 and web-2 on edge-north (1.5 of 4 GiB).
    let bar = page.eval("document.querySelector('.node[data-node=\"edge-north\"]').innerText");
    assert!(bar.as_str().unwrap().contains("1.5/4 GiB"), "{bar}");
    page.screenshot(&artifacts_dir().join("status-desktop.png"));

    // A change shows without a reload: the event stream brings it.
    page.eval("window.__marker = 'same page'");
    ctl.cli(&["instances", "stop", "web-2", "--force", "--wait"])
        .unwrap();
    page.wait(
        T,
        "document.querySelector('#instances tr[data-instance=\"web-2\"]')?.dataset.phase === 'stopped'",
        "document.querySelector('#instances').innerText",
    );
    page.wait(
        T,
        "[...document.querySelectorAll('#events li')].some(li => li.dataset.kind === 'stop-requested')",
        "document.getElementById('events').innerText",
    );
    assert_eq!(page.eval("window.__marker"), "same page", "no reload");
    // So does a node going away.
    south.proc().kill();
    page.wait(
        Duration::from_secs(60),
        "document.querySelector('.node[data-node=\"edge-south\"]').dataset.state === 'down'",
        "document.getElementById('nodes').innerText",
    );

    // A phone: nothing wider than the screen, the rows stacked.
    page.viewport(390, 844, true);
    page.navigate(&format!("{}/", ctl.api));
    page.wait(T, "document.body.dataset.loaded === 'true'", context);
    let overflow = page.eval("document.documentElement.scrollWidth - window.innerWidth");
    assert!(
        overflow.as_i64().unwrap() <= 0,
        "wider than the phone by {overflow} px"
    );
    let head = page.eval("getComputedStyle(document.querySelector('#instances thead')).display");
    assert_eq!(head, "none", "rows are stacked on a phone");
    page.screenshot(&artifacts_dir().join("status-phone.png"));
    for f in ["status-desktop.png", "status-phone.png"] {
        let png = std::fs::read(artifacts_dir().join(f)).unwrap();
        assert!(png.starts_with(b"\x89PNG") && png.len() > 10_000, "{f}");
    }
}

#[test]
fn with_a_token_the_page_loads_but_the_data_needs_it() {
    let dir = tempfile::tempdir().unwrap();
    let mut ctl = Controller::embedded(dir.path());
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, "page-token\n").unwrap();
    ctl.args
        .extend(["--api-token-file".into(), token_file.display().to_string()]);
    ctl.token = Some("page-token".into());
    ctl.start();
    let (status, _) = ctl.http("GET", "/", "");
    assert_eq!(status, 200);
    let (status, _) = ctl.http("GET", "/v1/overview", "");
    assert_eq!(status, 401);
    let browser = Browser::start();
    let mut page = browser.page();
    page.navigate(&format!("{}/", ctl.api));
    let msg = page.wait(
        T,
        "!document.getElementById('error').hidden && document.getElementById('error').innerText",
        "document.body.innerText",
    );
    assert!(msg.as_str().unwrap().contains("API token"), "{msg}");
    // With the token typed in, it loads.
    page.eval("document.getElementById('token').value = 'page-token'; document.getElementById('tokenform').requestSubmit(); true");
    page.wait(
        T,
        "document.body.dataset.loaded === 'true'",
        "document.body.innerText",
    );
    let health = page.eval("document.getElementById('health').innerText");
    assert!(health.as_str().unwrap().contains("actions on"), "{health}");
}
