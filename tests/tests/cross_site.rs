//! The operator's browser as the attacker's tool (issue 29, item 8), in headless Chromium:
//! a page of another site, opened while the token-less loopback API is reachable, tries to
//! stop an instance, drain a node and upload an image (form posts, `no-cors` fetches, a
//! JSON fetch that needs a preflight); and a name that resolves to loopback (DNS rebinding)
//! tries to read and change the fleet. Nothing changes, and the API says why.
#![allow(clippy::unwrap_used)]

use std::io::{Read as _, Write as _};
use std::time::Duration;

use outpost_tests::*;

/// Serves `html` to every request on a free loopback port (another origin than the API's).
fn serve_page(html: String) -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for mut s in l.incoming().flatten() {
            let mut buf = [0u8; 4096];
            let _ = s.read(&mut buf);
            let _ = write!(
                s,
                "HTTP/1.1 200 OK\r\nContent-Type: text/html\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{html}",
                html.len()
            );
        }
    });
    port
}

/// A raw request with the given `Host` header: its status.
fn with_host(api: &str, method: &str, path: &str, host: &str) -> (u16, String) {
    let addr = api.trim_start_matches("http://");
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{{}}"
    )
    .unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    let code = text.split_whitespace().nth(1).unwrap().parse().unwrap();
    (code, text)
}

#[test]
fn another_site_in_the_operators_browser_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let mut ctl = Controller::embedded(dir.path());
    ctl.start();
    let mut a = Agent::fake(dir.path(), "edge-x", ctl.mqtt_port, 4096, "z");
    a.start();
    ctl.wait_nodes_up(1);
    ctl.create("victim", &["--memory", "128"]).unwrap();
    ctl.wait_phase("victim", "running", Duration::from_secs(60));
    let api = ctl.api.clone();

    let page = format!(
        r#"<html><body><iframe name="sink"></iframe>
<form id="f1" method="POST" target="sink" action="{api}/v1/instances/victim/stop"><input name="force" value="true"></form>
<form id="f2" method="POST" target="sink" enctype="text/plain" action="{api}/v1/nodes/edge-x/drain"><input name='{{"a":"' value='"}}'></form>
<form id="f3" method="POST" target="sink" enctype="multipart/form-data" action="{api}/v1/images?name=evil&version=1&format=raw"><input name="x" value="y"></form>
<script>
window.done = 0;
const tries = [
  fetch("{api}/v1/instances/victim/stop", {{method: "POST", mode: "no-cors", body: '{{"force":true}}', headers: {{"Content-Type": "text/plain"}}}}),
  fetch("{api}/v1/nodes/edge-x/drain", {{method: "POST", mode: "no-cors"}}),
  fetch("{api}/v1/images?name=evil2&version=1&format=raw", {{method: "POST", mode: "no-cors", body: "x"}}),
  fetch("{api}/v1/instances/victim/stop", {{method: "POST", body: "{{}}", headers: {{"Content-Type": "application/json"}}}}),
  fetch("{api}/v1/instances/victim", {{method: "DELETE"}}),
];
for (const t of tries) t.then(() => window.done++, () => window.done++);
document.getElementById("f1").submit();
setTimeout(() => document.getElementById("f2").submit(), 300);
setTimeout(() => document.getElementById("f3").submit(), 600);
</script></body></html>"#
    );
    let port = serve_page(page);
    let browser = Browser::start();
    let mut tab = browser.page();
    tab.navigate(&format!("http://127.0.0.1:{port}/"));
    tab.wait(
        Duration::from_secs(20),
        "window.done === 5",
        "document.body ? document.body.innerText : ''",
    );
    std::thread::sleep(Duration::from_secs(2));

    let v = ctl.cli(&["instances", "show", "victim"]).unwrap();
    assert_eq!(
        v["phase"], "running",
        "a page of another site stopped it: {v}"
    );
    assert_eq!(v["power"], "running", "{v}");
    let n = ctl.cli(&["nodes", "show", "edge-x"]).unwrap();
    assert_eq!(n["state"], "up", "a page of another site drained it: {n}");
    let images = ctl.cli(&["images", "list"]).unwrap().to_string();
    assert!(
        !images.contains("evil"),
        "a page of another site uploaded: {images}"
    );

    // DNS rebinding: rebound.test resolves to loopback in this browser; its page is of its
    // own origin, so its fetches are "same origin", and still nothing answers it.
    let browser = Browser::start_with(&["--host-resolver-rules=MAP rebound.test 127.0.0.1"]);
    let mut tab = browser.page();
    let api_port = api.rsplit(':').next().unwrap();
    tab.navigate(&format!("http://rebound.test:{api_port}/"));
    let got = tab.wait(
        Duration::from_secs(20),
        "fetch('/v1/instances').then(r => r.status).catch(() => -1)",
        "location.href",
    );
    assert_eq!(got, 403, "a rebound page read the fleet");
    let got = tab.wait(
        Duration::from_secs(20),
        "fetch('/v1/instances/victim/stop', {method: 'POST', headers: {'Content-Type': 'application/json', 'X-Outpost-Client': 'x'}, body: '{}'}).then(r => r.status).catch(() => -1)",
        "location.href",
    );
    assert_eq!(got, 403, "a rebound page made a change");
    assert_eq!(ctl.phase("victim").as_deref(), Some("running"));

    // Said plainly, to a client that is not a browser too.
    let (code, text) = with_host(&api, "GET", "/v1/instances", "rebound.test");
    assert_eq!(code, 403);
    assert!(text.contains("loopback names"), "{text}");
    let (code, text) = with_host(
        &api,
        "GET",
        "/v1/instances",
        &format!("localhost:{api_port}"),
    );
    assert_eq!(code, 200, "{text}");
    // A change without a JSON body, from a script (curl -X POST): refused with the fix named.
    let (code, body) = curl("POST", &format!("{api}/v1/instances/victim/stop"), None, "");
    assert_eq!(code, 403, "{body}");
    assert!(body.contains("Content-Type: application/json"), "{body}");
    // Outpost's own page and CLI still work.
    ctl.cli(&["instances", "stop", "victim", "--force"])
        .unwrap();
}
