//! The Prometheus endpoint: the engines' live counters (`<cluster dir>/counters`, see
//! [`understudy_control::counters`]) in the Prometheus text exposition format, read on each
//! scrape by a [`prometheus_client`] collector and served over HTTP by one small thread.
//!
//! Off by default; on with
//!
//! ```toml
//! [metrics]
//! listen = "127.0.0.1:9464"
//! ```
//!
//! The thread answers `GET /metrics` (anything else: 404), one connection at a time, each
//! bounded by read and write timeouts, so a stuck scraper delays the next scrape but never the
//! supervisor. Nothing it reads is trusted: the counters file is validated by its reader, and
//! every value is reported as found (a histogram's cumulative counts saturate).
//!
//! Metric names follow the Prometheus conventions: `understudy_` prefix, the unit in the
//! name (`_seconds`, `_bytes`), `_total` on counters; every engine series has the labels
//! `cluster` and `slot`, the stream series `active` and `standby`. [`METRICS`] lists them.

use std::borrow::Cow;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric, NoLabelSet};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;
use serde::{Deserialize, Serialize};
use tracing::{info, warn};
use understudy_control::control::{monotonic_ns, Role};
use understudy_control::counters::{self, ClientView, SlotCounters, Snapshot};

/// `[metrics]`: the Prometheus endpoint (off unless `listen` is set).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MetricsConfig {
    /// Address to serve `GET /metrics` on, e.g. `"127.0.0.1:9464"` (port 0: any free port,
    /// named in the log).
    pub listen: Option<String>,
}

impl MetricsConfig {
    /// The listen address, if the endpoint is on: `Err((expected, found))` if it does not
    /// parse.
    pub fn listen_addr(&self) -> Result<Option<SocketAddr>, (String, String)> {
        match &self.listen {
            None => Ok(None),
            Some(text) => text.parse::<SocketAddr>().map(Some).map_err(|_| {
                (
                    "an IP address and port such as \"127.0.0.1:9464\"".to_owned(),
                    format!("{text:?}"),
                )
            }),
        }
    }
}

/// Every metric served: (name as exposed, type, help).
pub const METRICS: &[(&str, &str, &str)] = &[
    ("understudy_counters_up", "gauge", "1 if the cluster's counters file was read and validated, 0 if it is missing or not believed"),
    ("understudy_engine_up", "gauge", "1 while the engine process that last wrote the slot's counters runs"),
    ("understudy_engine_role", "gauge", "1 for the slot's current role (label role: active, standby, out-of-service, none)"),
    ("understudy_epoch", "gauge", "the epoch the engine is in"),
    ("understudy_heartbeat_age_seconds", "gauge", "age of the engine's last heartbeat"),
    ("understudy_transaction_index", "gauge", "transactions in the engine's store (the active's minus a standby's is its lag)"),
    ("understudy_requests_total", "counter", "requests served as active, over every engine the slot ran"),
    ("understudy_refusals_total", "counter", "requests the application refused"),
    ("understudy_transactions_committed_total", "counter", "transactions committed as active"),
    ("understudy_transactions_applied_total", "counter", "transactions applied from the stream as standby"),
    ("understudy_backpressure_waits_total", "counter", "times a full standby stream made the active wait"),
    ("understudy_untethers_total", "counter", "standbys the engine untethered because they could not keep up"),
    ("understudy_catchups_total", "counter", "catch-ups from a snapshot completed as standby"),
    ("understudy_step_ups_total", "counter", "times the engine stepped up to active (failover or planned)"),
    ("understudy_switchovers_total", "counter", "planned switchovers the engine handed over as active"),
    ("understudy_engine_starts_total", "counter", "engine processes started in the slot"),
    ("understudy_last_step_up_seconds", "gauge", "duration of the engine's last step-up"),
    ("understudy_last_switchover_seconds", "gauge", "duration of the engine's last planned switchover, as the old active"),
    ("understudy_stream_position_bytes", "gauge", "bytes the active wrote into the standby's current stream"),
    ("understudy_stream_lag_bytes", "gauge", "bytes of the standby's stream written and not yet consumed"),
    ("understudy_stream_lag_transactions", "gauge", "transactions the standby is behind the active"),
    ("understudy_client_position_bytes", "gauge", "bytes of the client's request ring the active consumed (label client: its id)"),
    ("understudy_client_lag_bytes", "gauge", "bytes the client published into its request ring and the active has not consumed yet"),
    ("understudy_client_responses_total", "counter", "responses the active engines wrote to the client"),
    ("understudy_service_time_seconds", "histogram", "request service time on the active, one request in four sampled, power-of-two buckets; _sum estimated from bucket midpoints"),
];

fn help(name: &str) -> &'static str {
    METRICS
        .iter()
        .find(|(n, _, _)| *n == name)
        .map_or("", |(_, _, h)| h)
}

/// Reads the counters on each scrape.
#[derive(Debug)]
struct CountersCollector {
    dir: PathBuf,
}

type Labels = Vec<(&'static str, String)>;
/// One standby stream: (labels, position, lag in bytes, lag in transactions).
type StreamRow = (Labels, u64, u64, Option<u64>);

fn slot_labels(s: &SlotCounters) -> Labels {
    vec![("slot", s.name().to_string())]
}

/// Encode one metric family: a descriptor, then one sample per label set. `name` is the
/// exposed name; a counter's is given without `_total`, which the encoder appends.
fn family<M: EncodeMetric>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    samples: Vec<(Labels, M)>,
) -> Result<(), std::fmt::Error> {
    let Some(first) = samples.first() else {
        return Ok(());
    };
    let kind = first.1.metric_type();
    let exposed = match kind {
        MetricType::Counter => format!("{name}_total"),
        _ => name.to_owned(),
    };
    let mut m = encoder.encode_descriptor(name, help(&exposed), None, kind)?;
    for (labels, metric) in &samples {
        metric.encode(m.encode_family(labels)?)?;
    }
    Ok(())
}

fn counter_family(
    encoder: &mut DescriptorEncoder,
    name: &str,
    used: &[&SlotCounters],
    value: impl Fn(&SlotCounters) -> u64,
) -> Result<(), std::fmt::Error> {
    let samples = used
        .iter()
        .map(|s| (slot_labels(s), ConstCounter::new(value(s))))
        .collect();
    family(encoder, name, samples)
}

fn gauge_family(
    encoder: &mut DescriptorEncoder,
    name: &str,
    used: &[&SlotCounters],
    value: impl Fn(&SlotCounters) -> f64,
) -> Result<(), std::fmt::Error> {
    let samples = used
        .iter()
        .map(|s| (slot_labels(s), ConstGauge::new(value(s))))
        .collect();
    family(encoder, name, samples)
}

fn ns_to_s(ns: u64) -> f64 {
    ns as f64 / 1e9
}

fn encode_snapshot(
    encoder: &mut DescriptorEncoder,
    snap: &Snapshot,
) -> Result<(), std::fmt::Error> {
    let used: Vec<&SlotCounters> = snap.slots.iter().filter(|s| s.used()).collect();
    encode_engines(encoder, &used)?;
    encode_streams(encoder, snap, &used)?;
    encode_clients(encoder, snap, &used)?;
    encode_service_times(encoder, &used)
}

/// Per engine: up, role, epoch, heartbeat age, transaction index, the event counters and the
/// times of the last step-up and switchover.
fn encode_engines(
    encoder: &mut DescriptorEncoder,
    used: &[&SlotCounters],
) -> Result<(), std::fmt::Error> {
    let now = monotonic_ns();
    gauge_family(encoder, "understudy_engine_up", used, |s| {
        f64::from(u8::from(s.alive()))
    })?;
    let roles = used
        .iter()
        .flat_map(|s| {
            [Role::Active, Role::Standby, Role::OutOfService, Role::None].map(|r| {
                let mut l = slot_labels(s);
                l.push(("role", Role::name(r).to_owned()));
                (l, ConstGauge::new(i64::from(s.alive() && s.role() == r)))
            })
        })
        .collect();
    family(encoder, "understudy_engine_role", roles)?;
    gauge_family(encoder, "understudy_epoch", used, |s| s.epoch as f64)?;
    gauge_family(encoder, "understudy_heartbeat_age_seconds", used, |s| {
        ns_to_s(s.heartbeat_age_ns(now))
    })?;
    gauge_family(encoder, "understudy_transaction_index", used, |s| {
        s.tx_index as f64
    })?;
    counter_family(encoder, "understudy_requests", used, |s| s.requests_total)?;
    counter_family(encoder, "understudy_refusals", used, |s| s.refusals_total)?;
    counter_family(encoder, "understudy_transactions_committed", used, |s| {
        s.commits_total
    })?;
    counter_family(encoder, "understudy_transactions_applied", used, |s| {
        s.applied_total
    })?;
    counter_family(encoder, "understudy_backpressure_waits", used, |s| {
        s.backpressure_waits_total
    })?;
    counter_family(encoder, "understudy_untethers", used, |s| s.untethers_total)?;
    counter_family(encoder, "understudy_catchups", used, |s| s.catchups_total)?;
    counter_family(encoder, "understudy_step_ups", used, |s| s.step_ups_total)?;
    counter_family(encoder, "understudy_switchovers", used, |s| {
        s.switchovers_total
    })?;
    counter_family(encoder, "understudy_engine_starts", used, |s| {
        s.starts_total
    })?;
    gauge_family(encoder, "understudy_last_step_up_seconds", used, |s| {
        ns_to_s(s.last_step_up_ns)
    })?;
    gauge_family(encoder, "understudy_last_switchover_seconds", used, |s| {
        ns_to_s(s.last_switchover_ns)
    })
}

/// Per replication stream of a live active: position, lag in bytes and in transactions.
fn encode_streams(
    encoder: &mut DescriptorEncoder,
    snap: &Snapshot,
    used: &[&SlotCounters],
) -> Result<(), std::fmt::Error> {
    // Streams: only a live active's view is current.
    let streams: Vec<StreamRow> = used
        .iter()
        .filter(|s| s.alive() && s.role() == Role::Active)
        .flat_map(|s| {
            s.streams.iter().map(|v| {
                let labels = vec![
                    ("active", s.name().to_string()),
                    ("standby", v.slot_name().to_string()),
                ];
                (
                    labels,
                    v.position_bytes,
                    v.lag_bytes(),
                    snap.lag_transactions(s.slot, v.slot),
                )
            })
        })
        .collect();
    let pick = |f: fn(&StreamRow) -> Option<u64>| {
        streams
            .iter()
            .filter_map(|x| f(x).map(|v| (x.0.clone(), ConstGauge::new(v as f64))))
            .collect::<Vec<_>>()
    };
    family(
        encoder,
        "understudy_stream_position_bytes",
        pick(|x| Some(x.1)),
    )?;
    family(encoder, "understudy_stream_lag_bytes", pick(|x| Some(x.2)))?;
    family(encoder, "understudy_stream_lag_transactions", pick(|x| x.3))
}

/// Per client: position, lag and responses.
fn encode_clients(
    encoder: &mut DescriptorEncoder,
    snap: &Snapshot,
    used: &[&SlotCounters],
) -> Result<(), std::fmt::Error> {
    // Clients: the area a live active writes (a dead one's entries are stale).
    let clients: Vec<&ClientView> = if used.iter().any(|s| s.alive() && s.role() == Role::Active) {
        snap.clients.iter().collect()
    } else {
        Vec::new()
    };
    let client_labels = |c: &ClientView| -> Labels { vec![("client", c.id_hex())] };
    family(
        encoder,
        "understudy_client_position_bytes",
        clients
            .iter()
            .map(|c| (client_labels(c), ConstGauge::new(c.consumed_bytes as f64)))
            .collect(),
    )?;
    family(
        encoder,
        "understudy_client_lag_bytes",
        clients
            .iter()
            .map(|c| (client_labels(c), ConstGauge::new(c.lag_bytes() as f64)))
            .collect(),
    )?;
    family(
        encoder,
        "understudy_client_responses",
        clients
            .iter()
            .map(|c| (client_labels(c), ConstCounter::new(c.responses_total)))
            .collect(),
    )
}

/// The sampled service-time histogram of each engine that has samples.
fn encode_service_times(
    encoder: &mut DescriptorEncoder,
    used: &[&SlotCounters],
) -> Result<(), std::fmt::Error> {
    // The sampled service-time histogram of each engine that has samples.
    let with_samples: Vec<&&SlotCounters> =
        used.iter().filter(|s| s.service_samples() > 0).collect();
    if !with_samples.is_empty() {
        let name = "understudy_service_time_seconds";
        let mut m = encoder.encode_descriptor(name, help(name), None, MetricType::Histogram)?;
        for s in with_samples {
            let labels = slot_labels(s);
            let (sum, count, buckets) = histogram(&s.service_hist);
            m.encode_family(&labels)?
                .encode_histogram::<NoLabelSet>(sum, count, &buckets, None)?;
        }
    }
    Ok(())
}

/// Buckets `le = 2^b ns` (in seconds) from power-of-two counts, as per-bucket counts whose
/// running sum cannot overflow (untrusted words), the total, and a sum estimated from the
/// bucket midpoints. Buckets below 256 ns fold into the first, above ~17 s into `+Inf`.
fn histogram(hist: &[u64]) -> (f64, u64, Vec<(f64, u64)>) {
    const FIRST: usize = 8;
    const LAST: usize = 34;
    let mut buckets = Vec::with_capacity(LAST - FIRST + 2);
    let mut total = 0u64;
    let mut sum = 0f64;
    let mut pending = 0u64;
    for (b, n) in hist.iter().enumerate() {
        let n = (*n).min(u64::MAX - total);
        total += n;
        let upper_ns = if b >= 63 { u64::MAX } else { 1u64 << b };
        sum += n as f64 * upper_ns as f64 * 0.75 / 1e9;
        pending += n;
        if (FIRST..=LAST).contains(&b) {
            buckets.push((upper_ns as f64 / 1e9, pending));
            pending = 0;
        }
    }
    buckets.push((f64::INFINITY, pending));
    (sum, total, buckets)
}

impl Collector for CountersCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let snap = counters::read(&self.dir);
        let up = i64::from(snap.is_ok());
        let name = "understudy_counters_up";
        let gauge = ConstGauge::new(up);
        gauge.encode(encoder.encode_descriptor(name, help(name), None, gauge.metric_type())?)?;
        match snap {
            Ok(snap) => encode_snapshot(&mut encoder, &snap),
            Err(_) => Ok(()),
        }
    }
}

/// The whole exposition for the cluster at `dir` (named `cluster` in every series).
pub fn render(dir: &Path, cluster: &str) -> String {
    let mut registry = Registry::with_labels(
        [(Cow::Borrowed("cluster"), Cow::Owned(cluster.to_owned()))].into_iter(),
    );
    registry.register_collector(Box::new(CountersCollector {
        dir: dir.to_owned(),
    }));
    let mut out = String::new();
    if let Err(e) = prometheus_client::encoding::prometheus_text::encode(&mut out, &registry) {
        warn!("metrics: encoding failed: {e}");
    }
    out
}

/// The endpoint's thread; stopped (and joined) on drop.
pub struct MetricsServer {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

/// Bound on reading a request and writing an answer.
const IO_TIMEOUT: Duration = Duration::from_secs(2);
/// The longest request head read.
const REQUEST_BYTES_MAX: usize = 8192;

/// How long the endpoint pauses after a failed accept (out of descriptors and the like).
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(50);
/// How long the wake-up connect of a stopping endpoint may take.
const WAKE_CONNECT_TIMEOUT: Duration = Duration::from_millis(200);

impl MetricsServer {
    /// Bind `addr` and serve the counters of the cluster at `dir`.
    pub fn start(addr: SocketAddr, dir: PathBuf, cluster: String) -> std::io::Result<Self> {
        let listener = TcpListener::bind(addr)?;
        let addr = listener.local_addr()?;
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::Builder::new()
            .name("metrics".into())
            .spawn(move || {
                for conn in listener.incoming() {
                    if flag.load(Ordering::Relaxed) {
                        break;
                    }
                    match conn {
                        Ok(stream) => serve(stream, &dir, &cluster),
                        // Out of descriptors and the like: do not spin on it.
                        Err(_) => std::thread::sleep(ACCEPT_ERROR_PAUSE),
                    }
                }
            })?;
        Ok(MetricsServer {
            addr,
            stop,
            thread: Some(thread),
        })
    }

    /// The bound address (the real port when 0 was asked).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for MetricsServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        // Wake the accept; a failed connect means the thread is gone already.
        let _ = TcpStream::connect_timeout(&self.addr, WAKE_CONNECT_TIMEOUT);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn serve(mut stream: TcpStream, dir: &Path, cluster: &str) {
    let _ = stream.set_read_timeout(Some(IO_TIMEOUT));
    let _ = stream.set_write_timeout(Some(IO_TIMEOUT));
    let mut head = Vec::with_capacity(512);
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") && !head.windows(2).any(|w| w == b"\n\n") {
        match stream.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => head.extend_from_slice(&buf[..n]),
        }
        if head.len() > REQUEST_BYTES_MAX {
            break;
        }
    }
    let line = head.split(|b| *b == b'\n').next().unwrap_or(&[]);
    let line = String::from_utf8_lossy(line);
    let mut parts = line.split_whitespace();
    let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let path = target.split('?').next().unwrap_or("");
    let (status, content_type, body) = match (method, path) {
        ("GET", "/metrics") | ("HEAD", "/metrics") => (
            "200 OK",
            prometheus_client::encoding::prometheus_text::CONTENT_TYPE,
            render(dir, cluster),
        ),
        ("GET", _) | ("HEAD", _) => (
            "404 Not Found",
            "text/plain; charset=utf-8",
            "understudy serves its metrics at /metrics\n".to_owned(),
        ),
        _ => (
            "405 Method Not Allowed",
            "text/plain; charset=utf-8",
            "expected GET /metrics\n".to_owned(),
        ),
    };
    let mut answer = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    if method != "HEAD" {
        answer.push_str(&body);
    }
    let _ = stream.write_all(answer.as_bytes());
}

/// The running endpoint of this process (one supervisor per process).
static ENDPOINT: std::sync::Mutex<Option<MetricsServer>> = std::sync::Mutex::new(None);

/// Make the endpoint match `config`: started, moved to a new address, or stopped (at `up`
/// and at every `reload`). A failure is logged and returned, never fatal: the engines
/// matter more than their metrics.
pub fn configure(config: &MetricsConfig, dir: &Path, cluster: &str) -> Result<(), String> {
    let mut endpoint = ENDPOINT.lock().unwrap_or_else(|e| e.into_inner());
    let addr = match config.listen_addr() {
        Ok(a) => a,
        Err((expected, found)) => {
            let e = format!("metrics.listen: expected {expected}, found {found}");
            warn!("{e}; the metrics endpoint is unchanged");
            return Err(e);
        }
    };
    let running = endpoint.as_ref().map(MetricsServer::local_addr);
    if addr.is_some() && addr == running {
        return Ok(());
    }
    // Stop the old one first: the new address may be the same port.
    if let Some(old) = endpoint.take() {
        info!(listen = %old.local_addr(), "metrics endpoint stopped");
    }
    let Some(addr) = addr else {
        return Ok(());
    };
    match MetricsServer::start(addr, dir.to_owned(), cluster.to_owned()) {
        Ok(s) => {
            info!(listen = %s.local_addr(), "metrics endpoint ready (GET /metrics)");
            *endpoint = Some(s);
            Ok(())
        }
        Err(e) => {
            let e = format!("metrics endpoint: cannot listen on {addr}: {e}; running without it");
            tracing::error!("{e}");
            Err(e)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Untrusted bucket words cannot overflow the cumulative counts; the buckets add up to
    /// the total and end with +Inf.
    #[test]
    fn histogram_buckets_saturate_and_add_up() {
        let mut hist = vec![0u64; 64];
        hist[3] = 2; // folds into the first bucket (256 ns)
        hist[10] = 5;
        hist[40] = 1; // above the last finite bucket
        let (_, total, buckets) = histogram(&hist);
        assert_eq!(total, 8);
        assert_eq!(buckets.first(), Some(&(256e-9, 2)));
        assert_eq!(buckets.last(), Some(&(f64::INFINITY, 1)));
        assert_eq!(buckets.iter().map(|b| b.1).sum::<u64>(), 8);
        let (_, total, buckets) = histogram(&[u64::MAX; 64]);
        assert_eq!(total, u64::MAX);
        assert_eq!(
            buckets
                .iter()
                .fold(0u64, |a, b| a.checked_add(b.1).unwrap()),
            u64::MAX
        );
    }

    /// A cluster directory without counters still answers, with `understudy_counters_up 0`.
    #[test]
    fn missing_counters_file_is_reported_not_an_error() {
        let dir = std::env::temp_dir().join(format!("metrics-none-{}", std::process::id()));
        let text = render(&dir, "demo");
        assert!(
            text.contains("understudy_counters_up{cluster=\"demo\"} 0"),
            "{text}"
        );
    }

    /// Every metric has a help text and the conventional suffixes.
    #[test]
    fn metric_names_follow_the_conventions() {
        for (name, kind, help) in METRICS {
            assert!(name.starts_with("understudy_") && !help.is_empty());
            assert_eq!(*kind == "counter", name.ends_with("_total"), "{name}");
        }
    }

    /// The address is validated with what was expected and found.
    #[test]
    fn listen_must_be_an_address() {
        let c = MetricsConfig {
            listen: Some("localhost".into()),
        };
        let (expected, found) = c.listen_addr().unwrap_err();
        assert!(expected.contains("127.0.0.1:9464") && found == "\"localhost\"");
        assert_eq!(MetricsConfig::default().listen_addr(), Ok(None));
    }
}
