//! Scraping a `/metrics` endpoint and parsing it with the official Prometheus client's
//! OpenMetrics parser (Debian's `python3-prometheus-client`), which rejects malformed text.
#![allow(clippy::unwrap_used, clippy::missing_panics_doc)]

use std::io::Write as _;
use std::process::{Command, Stdio};

/// One sample: its name (with `_total`, `_bucket`... suffixes), labels and value.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    /// The sample's name.
    pub name: String,
    /// Its labels.
    pub labels: serde_json::Map<String, serde_json::Value>,
    /// Its value.
    pub value: f64,
}

/// What a scrape gave.
#[derive(Debug, Clone)]
pub struct Scrape {
    /// Every sample.
    pub samples: Vec<Sample>,
    /// The text as served.
    pub text: String,
}

impl Scrape {
    /// The value of the sample `name` whose labels include every `(key, value)` of `labels`;
    /// 0 when there is none.
    pub fn value(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.samples
            .iter()
            .filter(|s| s.name == name)
            .filter(|s| {
                labels
                    .iter()
                    .all(|(k, v)| s.labels.get(*k).and_then(|x| x.as_str()) == Some(*v))
            })
            .map(|s| s.value)
            .sum()
    }

    /// Whether a sample named `name` exists.
    pub fn has(&self, name: &str) -> bool {
        self.samples.iter().any(|s| s.name == name)
    }
}

const PARSER: &str = r"import sys, json
from prometheus_client.openmetrics.parser import text_string_to_metric_families
for f in text_string_to_metric_families(sys.stdin.read()):
    for s in f.samples:
        print(json.dumps([s.name, s.labels, s.value]))
";

/// GETs `url` (with `token` as a bearer token) and parses it; Err(status and body) when the
/// answer is not a 200, panics when the text does not parse.
pub fn scrape(url: &str, token: Option<&str>) -> Result<Scrape, String> {
    let (code, text) = crate::process::curl("GET", url, token, "");
    if code != 200 {
        return Err(format!("HTTP {code}: {text}"));
    }
    Ok(Scrape {
        samples: parse(&text),
        text,
    })
}

/// Parses OpenMetrics text; panics with the parser's complaint when it is malformed.
pub fn parse(text: &str) -> Vec<Sample> {
    let mut p = Command::new("/usr/bin/python3")
        .args(["-c", PARSER])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("python3 (scripts/setup installs python3-prometheus-client)");
    p.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
    let out = p.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "the OpenMetrics parser refused the text: {}\n{text}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            Sample {
                name: v[0].as_str().unwrap().to_owned(),
                labels: v[1].as_object().cloned().unwrap_or_default(),
                value: v[2].as_f64().unwrap_or(f64::NAN),
            }
        })
        .collect()
}
