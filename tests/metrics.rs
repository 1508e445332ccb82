//! The monitoring endpoint against the real relay on loopback (`--metrics-listen`): counters
//! move by exactly what flowed, gauges follow sessions and attachments, `/status` totals the
//! shards, `/healthz` says ready, and a shard's counts reach the endpoint whichever shard the
//! sessions landed on.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use apex_proto::apex::client::DataBuilder;
use common::{http_get, metric_sum, Client, Relay};

fn scrape(relay: &Relay) -> String {
    let (status, body) = http_get(relay.metrics.unwrap(), "/metrics");
    assert_eq!(status, 200, "{body}");
    body
}

fn status(relay: &Relay, path: &str) -> serde_json::Value {
    let (code, body) = http_get(relay.metrics.unwrap(), path);
    assert_eq!(code, 200, "{body}");
    serde_json::from_str(&body).unwrap()
}

#[test]
fn a_hundred_messages_move_the_counters_by_a_hundred() {
    for shards in ["1", "2"] {
        let relay = Relay::start_with(&[
            "--domain",
            "example.com",
            "--shards",
            shards,
            "--metrics-listen",
            "127.0.0.1:0",
        ]);
        let (code, body) = http_get(relay.metrics.unwrap(), "/healthz");
        assert_eq!((code, body.as_str()), (200, "ready\n"));
        let before = scrape(&relay);
        assert_eq!(metric_sum(&before, "apexd_data_accepted_total"), 0.0);

        let mut fred = Client::connect(relay.edge);
        let (_, ok) = fred.attach("fred@example.com");
        assert_eq!(ok, "<ok />");
        let mut barney = Client::connect(relay.edge);
        let (channel, ok) = barney.attach("barney@example.com");
        assert_eq!(ok, "<ok />");
        let middle = scrape(&relay);
        assert_eq!(metric_sum(&middle, "apexd_endpoints_attached"), 2.0);
        assert_eq!(metric_sum(&middle, "apexd_sessions_accepted_total"), 2.0);
        let octets_before = metric_sum(&middle, "apexd_octets_received_total");
        assert!(octets_before > 0.0);

        for i in 0..100 {
            let payload = DataBuilder::new("barney@example.com")
                .to("fred@example.com")
                .text(&format!("message {i}"));
            let (positive, reply) = barney.request(channel, payload);
            assert!(positive, "{reply:?}");
            fred.receive();
        }
        // Data refused (in another's name) is counted by its code, not as accepted.
        let spoofed = DataBuilder::new("fred@example.com")
            .to("barney@example.com")
            .text("not mine");
        let (positive, _) = barney.request(channel, spoofed);
        assert!(!positive);

        let after = scrape(&relay);
        let moved = |family: &str| metric_sum(&after, family) - metric_sum(&before, family);
        assert_eq!(moved("apexd_data_accepted_total"), 100.0, "{after}");
        assert_eq!(moved("apexd_data_delivered_total"), 100.0);
        assert_eq!(moved("apexd_delivery_latency_seconds_count"), 100.0);
        assert_eq!(moved("apexd_apex_errors_total"), 1.0);
        // Since both attached: 101 data MSGs from barney and 100 oks from fred in; 101 replies
        // to barney and 100 deliveries to fred out.
        let since_attached =
            |family: &str| metric_sum(&after, family) - metric_sum(&middle, family);
        assert_eq!(since_attached("apexd_messages_received_total"), 201.0);
        assert_eq!(since_attached("apexd_messages_sent_total"), 201.0);
        // Every message is at least its 100-odd octets of XML each way.
        assert!(
            metric_sum(&after, "apexd_octets_received_total") - octets_before > 100.0 * 100.0,
            "{after}"
        );
        assert!(moved("apexd_octets_sent_total") > 100.0 * 100.0);
        assert_eq!(
            metric_sum(&after, "apexd_sessions"),
            2.0,
            "both sessions open"
        );
        assert_eq!(
            metric_sum(&after, "apexd_shard_up"),
            shards.parse::<f64>().unwrap()
        );

        let doc = status(&relay, "/status");
        assert_eq!(doc["domain"], "example.com");
        assert_eq!(doc["ready"], true);
        assert_eq!(doc["total"]["data_accepted"], 100, "{doc}");
        assert_eq!(doc["total"]["endpoints"], 2);
        assert_eq!(doc["total"]["sessions"]["edge"], 2);
        assert_eq!(doc["shards"].as_array().unwrap().len().to_string(), shards);
        assert!(doc["config_digest"]
            .as_str()
            .unwrap()
            .starts_with("sha256:"));
        let endpoints = status(&relay, "/status/endpoints?limit=1");
        assert_eq!(endpoints["total"], 2);
        assert_eq!(endpoints["endpoints"].as_array().unwrap().len(), 1);
        let all = status(&relay, "/status/endpoints");
        let mut names: Vec<&str> = all["endpoints"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["endpoint"].as_str().unwrap())
            .collect();
        names.sort_unstable();
        assert_eq!(names, ["barney@example.com", "fred@example.com"]);

        // Once barney's session is gone, the gauges follow.
        barney.release();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        loop {
            let now = scrape(&relay);
            if metric_sum(&now, "apexd_endpoints_attached") == 1.0 {
                break;
            }
            assert!(std::time::Instant::now() < deadline, "{now}");
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }
}

#[test]
fn the_endpoint_answers_unknown_paths_and_methods_without_harm() {
    let relay = Relay::start_with(&["--metrics-listen", "127.0.0.1:0"]);
    let addr = relay.metrics.unwrap();
    let (code, _) = http_get(addr, "/nothing-here");
    assert_eq!(code, 404);
    // A request that is no HTTP at all gets a 400 from hyper, and the endpoint stays up.
    use std::io::{Read, Write};
    let mut junk = std::net::TcpStream::connect(addr).unwrap();
    junk.set_read_timeout(Some(std::time::Duration::from_secs(5)))
        .unwrap();
    junk.write_all(b"\x00\x01garbage\r\n\r\n").unwrap();
    let mut answer = String::new();
    let _ = junk.read_to_string(&mut answer);
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer:?}");
    let (code, _) = http_get(addr, "/healthz");
    assert_eq!(code, 200);
}
