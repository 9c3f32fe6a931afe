//! OpenTelemetry metrics under a real host: the host enables metrics and names an OTLP/HTTP
//! endpoint, which is a collector in this test process; known traffic must show up in the
//! provider's exported counts.

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{ensure, Context as _, Result};
use common::ws::{connect, upgrade_status};
use common::Env;
use opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceRequest;
use opentelemetry_proto::tonic::common::v1::{any_value, KeyValue};
use opentelemetry_proto::tonic::metrics::v1::{metric, number_data_point};
use prost::Message as _;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpListener;

/// A minimal OTLP/HTTP (protobuf) metrics collector: keeps every export it receives.
struct Collector {
    endpoint: String,
    exports: Arc<Mutex<Vec<ExportMetricsServiceRequest>>>,
}

impl Collector {
    async fn start() -> Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let endpoint = format!("http://{}/v1/metrics", listener.local_addr()?);
        let exports: Arc<Mutex<Vec<ExportMetricsServiceRequest>>> = Arc::default();
        let store = Arc::clone(&exports);
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let store = Arc::clone(&store);
                tokio::spawn(async move {
                    let mut stream = BufReader::new(stream);
                    // One HTTP/1.1 request after another on the connection.
                    loop {
                        let mut length = 0usize;
                        let mut line = String::new();
                        loop {
                            line.clear();
                            if stream.read_line(&mut line).await.unwrap_or(0) == 0 {
                                return;
                            }
                            let trimmed = line.trim_end();
                            if trimmed.is_empty() {
                                break;
                            }
                            if let Some((k, v)) = trimmed.split_once(':') {
                                if k.eq_ignore_ascii_case("content-length") {
                                    length = v.trim().parse().unwrap_or(0);
                                }
                            }
                        }
                        let mut body = vec![0; length];
                        if stream.read_exact(&mut body).await.is_err() {
                            return;
                        }
                        if let Ok(export) = ExportMetricsServiceRequest::decode(body.as_slice()) {
                            store.lock().unwrap().push(export);
                        }
                        let ok = "HTTP/1.1 200 OK\r\ncontent-type: application/x-protobuf\r\ncontent-length: 0\r\n\r\n";
                        if stream.get_mut().write_all(ok.as_bytes()).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        Ok(Self { endpoint, exports })
    }

    /// The latest exported value of the sum (counter or up-down counter) `name` whose data
    /// point has the attribute `attr` (if given), as an integer.
    fn sum(&self, name: &str, attr: Option<(&str, &str)>) -> Option<i64> {
        let exports = self.exports.lock().unwrap();
        exports.iter().rev().find_map(|export| {
            metrics(export, name).find_map(|data| match data {
                metric::Data::Sum(sum) => sum
                    .data_points
                    .iter()
                    .find(|p| has(&p.attributes, attr))
                    .and_then(|p| match p.value {
                        Some(number_data_point::Value::AsInt(v)) => Some(v),
                        Some(number_data_point::Value::AsDouble(v)) => Some(v as i64),
                        None => None,
                    }),
                _ => None,
            })
        })
    }

    /// The latest exported value of the gauge `name`.
    fn gauge(&self, name: &str) -> Option<i64> {
        let exports = self.exports.lock().unwrap();
        exports.iter().rev().find_map(|export| {
            metrics(export, name).find_map(|data| match data {
                metric::Data::Gauge(gauge) => {
                    gauge.data_points.last().and_then(|p| match p.value {
                        Some(number_data_point::Value::AsInt(v)) => Some(v),
                        Some(number_data_point::Value::AsDouble(v)) => Some(v as i64),
                        None => None,
                    })
                }
                _ => None,
            })
        })
    }

    /// How many exports have arrived so far.
    fn exports_seen(&self) -> usize {
        self.exports.lock().unwrap().len()
    }

    /// The value of gauge `name` once two readings three exports apart agree.
    async fn settled(&self, name: &str) -> Result<i64> {
        common::eventually(Duration::from_secs(60), || async {
            let first = self.gauge(name).context("not exported yet")?;
            let seen = self.exports_seen();
            common::eventually(Duration::from_secs(10), || async {
                ensure!(self.exports_seen() >= seen + 3, "waiting for exports");
                Ok(())
            })
            .await?;
            let second = self.gauge(name).context("not exported")?;
            ensure!(first == second, "{name} moved from {first} to {second}");
            Ok(first)
        })
        .await
    }

    /// The latest exported count of the histogram `name` for data points with `attr`.
    fn histogram_count(&self, name: &str, attr: (&str, &str)) -> Option<u64> {
        let exports = self.exports.lock().unwrap();
        exports.iter().rev().find_map(|export| {
            metrics(export, name).find_map(|data| match data {
                metric::Data::Histogram(h) => h
                    .data_points
                    .iter()
                    .find(|p| has(&p.attributes, Some(attr)))
                    .map(|p| p.count),
                _ => None,
            })
        })
    }
}

fn metrics<'a>(
    export: &'a ExportMetricsServiceRequest,
    name: &'a str,
) -> impl Iterator<Item = &'a metric::Data> + 'a {
    export
        .resource_metrics
        .iter()
        .flat_map(|r| &r.scope_metrics)
        .flat_map(|s| &s.metrics)
        .filter(move |m| m.name == name)
        .filter_map(|m| m.data.as_ref())
}

fn has(attributes: &[KeyValue], attr: Option<(&str, &str)>) -> bool {
    let Some((key, want)) = attr else {
        return true;
    };
    attributes.iter().any(|kv| {
        kv.key == key
            && match kv.value.as_ref().and_then(|v| v.value.as_ref()) {
                Some(any_value::Value::StringValue(s)) => s == want,
                Some(any_value::Value::IntValue(i)) => i.to_string() == want,
                _ => false,
            }
    })
}

/// A host that enables metrics, exported to `collector` every 300 ms.
async fn metered_env(collector: &Collector) -> Result<Env> {
    let otel = wasmcloud_core::OtelConfig {
        enable_metrics: Some(true),
        metrics_endpoint: Some(collector.endpoint.clone()),
        protocol: wasmcloud_core::OtelProtocol::Http,
        ..Default::default()
    };
    Env::start_with(otel, &[("OTEL_METRIC_EXPORT_INTERVAL", "300")]).await
}

#[tokio::test(flavor = "multi_thread")]
async fn exported_metrics_count_known_traffic() -> Result<()> {
    let collector = Collector::start().await?;
    let env = metered_env(&collector).await?;
    let url = env.serve("metered", "metered-server", &[]).await?;

    // Known traffic: two clients, three echoes each (12 frames of 5 bytes, 6 in and 6 out),
    // one refused upgrade (wrong path), then one client leaves.
    let mut alice = connect(&url, &[]).await?;
    let mut bob = connect(&url, &[]).await?;
    for i in 0..3 {
        assert_eq!(
            alice.round_trip(&format!("ali-{i}")).await?,
            format!("ali-{i}")
        );
        assert_eq!(
            bob.round_trip(&format!("bob-{i}")).await?,
            format!("bob-{i}")
        );
    }
    assert_eq!(upgrade_status(&format!("{url}/nowhere"), &[]).await?, 404);
    drop(bob);

    let server = Some(("mode", "server"));
    common::eventually(Duration::from_secs(30), || async {
        let got = (
            collector.sum("websocket.messages.in", server),
            collector.sum("websocket.bytes.in", server),
            collector.sum("websocket.messages.out", server),
            collector.sum("websocket.bytes.out", server),
            collector.sum("websocket.sessions.open", server),
            collector.sum("websocket.connections.rejected", Some(("status", "404"))),
            collector.histogram_count("websocket.handle_message.duration", ("outcome", "ok")),
        );
        ensure!(
            got == (Some(6), Some(30), Some(6), Some(30), Some(1), Some(1), Some(6)),
            "exported (messages in, bytes in, messages out, bytes out, open sessions, rejected, handled): {got:?}"
        );
        Ok(())
    })
    .await
    .context("the exported metrics never matched the traffic")?;

    // The component's publishes were all written: nothing refused.
    ensure!(
        collector
            .sum("websocket.publishes.refused", None)
            .unwrap_or(0)
            == 0,
        "publishes were refused"
    );
    drop(alice);
    env.stop().await
}

/// Whether what a peer read is the end of its socket: a close frame, or the stream ending (not
/// a data frame, not a timeout).
fn closed(next: Result<tokio_tungstenite::tungstenite::Message>) -> bool {
    match next {
        Ok(message) => message.is_close(),
        Err(e) => !format!("{e:#}").contains("no message within the wait"),
    }
}

/// Puts a server-mode and a client-mode handler link on component `counted`, has three clients
/// and the client link's server peer exchange frames with it, then deletes both links and
/// waits until every socket saw its close. Returns the tasks gauge while the links were up.
async fn links_up_and_down(
    env: &Env,
    collector: &Collector,
    server: &mut common::ws::Server,
    address: &str,
) -> Result<i64> {
    env.link_handler("counted", "counted-server", &["counted-server-cfg"])
        .await?;
    env.link_handler("counted", "counted-client", &["counted-client-cfg"])
        .await?;
    let url = format!("ws://{address}");
    common::wait_listening(&url).await?;
    let mut peer = server.accept().await?;
    let mut clients = Vec::new();
    for i in 0..3 {
        let mut client = connect(&url, &[]).await?;
        assert_eq!(client.round_trip(&format!("c{i}")).await?, format!("c{i}"));
        clients.push(client);
    }
    assert_eq!(peer.round_trip("from the server").await?, "from the server");
    let seen = collector.exports_seen();
    common::eventually(Duration::from_secs(10), || async {
        ensure!(
            collector.exports_seen() >= seen + 2,
            "waiting for an export"
        );
        Ok(())
    })
    .await?;
    let during = collector
        .gauge("websocket.tasks")
        .context("no tasks gauge")?;
    env.unlink_handler("counted-server").await?;
    env.unlink_handler("counted-client").await?;
    for client in &mut clients {
        ensure!(
            closed(client.next_message(Duration::from_secs(15)).await),
            "client not closed"
        );
    }
    ensure!(
        closed(peer.next_message(Duration::from_secs(15)).await),
        "server peer not closed"
    );
    Ok(during)
}

#[tokio::test(flavor = "multi_thread")]
async fn deleting_links_ends_every_task_they_started() -> Result<()> {
    let collector = Collector::start().await?;
    let env = metered_env(&collector).await?;
    let mut server = common::ws::Server::start().await?;
    env.component_scaled("test_echo", "counted", 4).await?;
    env.link_consumer("counted", "default", &[]).await?;
    let address = format!("127.0.0.1:{}", common::free_port()?);
    env.config(
        "counted-server-cfg",
        &[("MODE", "server"), ("LISTEN_ADDRESS", address.as_str())],
    )
    .await?;
    env.config("counted-client-cfg", &[("URI", server.uri().as_str())])
        .await?;

    // A first round creates what outlives links (the client for calls into components).
    links_up_and_down(&env, &collector, &mut server, &address).await?;
    let before = collector.settled("websocket.tasks").await?;
    // The second round must leave the provider with exactly the tasks it had before it.
    let during = links_up_and_down(&env, &collector, &mut server, &address).await?;
    ensure!(
        during >= before + 4,
        "with 4 sockets open the provider ran {during} tasks, against {before} without links"
    );
    common::eventually(Duration::from_secs(60), || async {
        let after = collector
            .gauge("websocket.tasks")
            .context("no tasks gauge")?;
        ensure!(
            after == before,
            "{after} tasks alive after the links were deleted, {before} before they were put"
        );
        Ok(())
    })
    .await?;
    common::figure(&format!(
        "tasks alive in the provider: {before} without links, {during} with 2 links and 4 sockets, {before} again after deleting them"
    ));
    env.stop().await
}
