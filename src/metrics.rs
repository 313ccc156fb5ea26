//! The metrics registry, label enums, and the subsystem metric structs.
//!
//! Everything is exported on the admin port (`/metrics`) in Prometheus text format. Owned here:
//!
//! | metric | type | labels |
//! |---|---|---|
//! | `tern_tcp_connections_total` | counter | `direction`, `tls`, `client_id`, `server_id` |
//! | `tern_tcp_connections_closed_total` | counter | `direction`, `reason` |
//! | `tern_tcp_connections_open` | gauge | `direction` |
//! | `tern_tcp_read_bytes_total` | counter | `direction` (bytes read from the accepted peer) |
//! | `tern_tcp_write_bytes_total` | counter | `direction` (bytes written to the accepted peer) |
//! | `tern_tcp_connection_duration_seconds` | histogram | `direction` |
//! | `tern_build_info` | gauge (1) | `version`, `rustc`-free: `version`, `profile` |
//! | `process_*` | see [`ProcessCollector`] | |

use std::time::Duration;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{
    DescriptorEncoder, EncodeLabelSet, EncodeLabelValue, EncodeMetric,
};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::metrics::info::Info;
use prometheus_client::registry::{Registry, Unit};

use crate::error::CloseReason;

/// Which listener a connection came through.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum Direction {
    inbound,
    outbound,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct DirectionLabels {
    pub direction: Direction,
}

/// Whether a connection crossed the mesh over mTLS (label values `true` / `false`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Tls {
    Yes,
    No,
}

impl EncodeLabelValue for Tls {
    fn encode(
        &self,
        encoder: &mut prometheus_client::encoding::LabelValueEncoder,
    ) -> Result<(), std::fmt::Error> {
        let v = match self {
            Tls::Yes => "true",
            Tls::No => "false",
        };
        EncodeLabelValue::encode(&v, encoder)
    }
}

/// Labels of a proxied TCP connection. `client_id` is the verified SPIFFE ID of an inbound mesh
/// client, `server_id` the one an outbound mesh peer proved; empty when not meshed.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct TcpLabels {
    pub direction: Direction,
    pub tls: Tls,
    pub client_id: String,
    pub server_id: String,
}

impl TcpLabels {
    /// A connection that is not (or not yet known to be) meshed.
    pub fn plain(direction: Direction) -> Self {
        TcpLabels {
            direction,
            tls: Tls::No,
            client_id: String::new(),
            server_id: String::new(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct CloseLabels {
    #[prometheus(flatten)]
    pub conn: TcpLabels,
    pub reason: CloseReason,
}

/// Latency buckets in seconds, fine enough for sub-millisecond work and long enough for
/// long-lived connections.
pub fn duration_buckets() -> impl Iterator<Item = f64> {
    [
        0.0001, 0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0,
        3600.0,
    ]
    .into_iter()
}

/// TCP golden metrics, by direction.
#[derive(Debug, Clone)]
pub struct TcpMetrics {
    opened: Family<TcpLabels, Counter>,
    closed: Family<CloseLabels, Counter>,
    open: Family<TcpLabels, Gauge>,
    read_bytes: Family<TcpLabels, Counter>,
    write_bytes: Family<TcpLabels, Counter>,
    duration: Family<TcpLabels, Histogram>,
}

impl TcpMetrics {
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self {
            opened: Family::default(),
            closed: Family::default(),
            open: Family::default(),
            read_bytes: Family::default(),
            write_bytes: Family::default(),
            duration: Family::new_with_constructor(|| Histogram::new(duration_buckets())),
        };
        registry.register(
            "tcp_connections",
            "TCP connections accepted by the proxy",
            m.opened.clone(),
        );
        registry.register(
            "tcp_connections_closed",
            "TCP connections closed, by the reason they closed",
            m.closed.clone(),
        );
        registry.register(
            "tcp_connections_open",
            "TCP connections currently open",
            m.open.clone(),
        );
        registry.register(
            "tcp_read_bytes",
            "Bytes read from accepted (client-side) connections",
            m.read_bytes.clone(),
        );
        registry.register(
            "tcp_write_bytes",
            "Bytes written to accepted (client-side) connections",
            m.write_bytes.clone(),
        );
        registry.register_with_unit(
            "tcp_connection_duration",
            "How long TCP connections stayed open",
            Unit::Seconds,
            m.duration.clone(),
        );
        m
    }

    /// Counts a connection (once its labels are known); the handle is the connection's view.
    pub fn conn(&self, labels: TcpLabels) -> ConnMetrics {
        self.opened.get_or_create(&labels).inc();
        self.open.get_or_create(&labels).inc();
        ConnMetrics {
            read: self.read_bytes.get_or_create(&labels).clone(),
            write: self.write_bytes.get_or_create(&labels).clone(),
            labels,
            tcp: self.clone(),
        }
    }

    /// Counts a connection refused before it was forwarded (opened and closed at once).
    pub fn refused(&self, direction: Direction, reason: CloseReason) {
        self.conn(TcpLabels::plain(direction))
            .closed(reason, Duration::ZERO);
    }

    fn close(&self, conn: TcpLabels, reason: CloseReason, lifetime: Duration) {
        self.open.get_or_create(&conn).dec();
        self.duration
            .get_or_create(&conn)
            .observe(lifetime.as_secs_f64());
        self.closed
            .get_or_create(&CloseLabels { conn, reason })
            .inc();
    }
}

/// One connection's counters; byte counts update as bytes move, not at close.
#[derive(Debug)]
pub struct ConnMetrics {
    /// Bytes read from the accepted peer.
    pub read: Counter,
    /// Bytes written to the accepted peer.
    pub write: Counter,
    labels: TcpLabels,
    tcp: TcpMetrics,
}

impl ConnMetrics {
    /// Records the close. Consumes the handle so a connection closes once.
    pub fn closed(self, reason: CloseReason, lifetime: Duration) {
        self.tcp.close(self.labels, reason, lifetime);
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct BuildLabels {
    version: &'static str,
    profile: &'static str,
}

/// Registers `tern_build_info` and the process collector.
pub fn register_build_and_process(root: &mut Registry) {
    let profile = if cfg!(debug_assertions) {
        "debug"
    } else {
        "release"
    };
    root.sub_registry_with_prefix("tern").register(
        "build",
        "tern build information",
        Info::new(BuildLabels {
            version: env!("CARGO_PKG_VERSION"),
            profile,
        }),
    );
    root.register_collector(Box::new(ProcessCollector));
}

/// Process metrics read from `/proc/self` at scrape time: `process_resident_memory_bytes`,
/// `process_virtual_memory_bytes`, `process_cpu_seconds_total`, `process_open_fds`,
/// `process_max_fds`, `process_start_time_seconds`, `process_threads`.
#[derive(Debug)]
pub struct ProcessCollector;

/// One reading of `/proc/self`.
#[derive(Debug, Default, Clone, Copy)]
pub struct ProcessStats {
    pub rss_bytes: u64,
    pub vsize_bytes: u64,
    pub cpu_seconds: f64,
    pub start_time_seconds: f64,
    pub threads: u64,
    pub open_fds: u64,
    pub max_fds: u64,
}

impl ProcessStats {
    /// Reads `/proc/self`. Fields that cannot be read stay 0.
    pub fn read() -> Self {
        let mut s = ProcessStats::default();
        // Clock ticks and page size are fixed by the Linux ABI on the platforms we ship.
        let ticks = 100.0;
        let page = 4096u64;
        if let Ok(stat) = std::fs::read_to_string("/proc/self/stat") {
            // Fields after the `(comm)`, which may contain spaces.
            if let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) {
                let f: Vec<&str> = rest.split_whitespace().collect();
                // rest[0] is field 3 (state); field N is f[N - 3].
                let num = |n: usize| {
                    f.get(n - 3)
                        .and_then(|v| v.parse::<u64>().ok())
                        .unwrap_or(0)
                };
                s.cpu_seconds = (num(14) + num(15)) as f64 / ticks;
                s.threads = num(20);
                s.vsize_bytes = num(23);
                s.rss_bytes = num(24) * page;
                let boot = boot_time().unwrap_or(0) as f64;
                s.start_time_seconds = boot + num(22) as f64 / ticks;
            }
        }
        s.open_fds = std::fs::read_dir("/proc/self/fd")
            .map(|d| d.count() as u64)
            .unwrap_or(0);
        if let Ok(limits) = std::fs::read_to_string("/proc/self/limits") {
            s.max_fds = limits
                .lines()
                .find(|l| l.starts_with("Max open files"))
                .and_then(|l| l.split_whitespace().nth(3))
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
        }
        s
    }
}

fn boot_time() -> Option<u64> {
    std::fs::read_to_string("/proc/stat")
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("btime "))
        .and_then(|v| v.trim().parse().ok())
}

impl Collector for ProcessCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let s = ProcessStats::read();
        let gauges: [(&str, &str, Option<&Unit>, f64); 6] = [
            (
                "process_resident_memory",
                "Resident memory size",
                Some(&Unit::Bytes),
                s.rss_bytes as f64,
            ),
            (
                "process_virtual_memory",
                "Virtual memory size",
                Some(&Unit::Bytes),
                s.vsize_bytes as f64,
            ),
            (
                "process_open_fds",
                "Open file descriptors",
                None,
                s.open_fds as f64,
            ),
            (
                "process_max_fds",
                "Maximum open file descriptors",
                None,
                s.max_fds as f64,
            ),
            (
                "process_start_time",
                "Start time of the process since the Unix epoch",
                Some(&Unit::Seconds),
                s.start_time_seconds,
            ),
            (
                "process_threads",
                "OS threads in the process",
                None,
                s.threads as f64,
            ),
        ];
        for (name, help, unit, value) in gauges {
            let g = ConstGauge::new(value);
            g.encode(encoder.encode_descriptor(name, help, unit, g.metric_type())?)?;
        }
        let cpu = ConstCounter::new(s.cpu_seconds);
        cpu.encode(encoder.encode_descriptor(
            "process_cpu",
            "Total user and system CPU time spent",
            Some(&Unit::Seconds),
            cpu.metric_type(),
        )?)?;
        Ok(())
    }
}

/// Encodes a registry in Prometheus text format.
pub fn encode(registry: &Registry) -> String {
    let mut out = String::with_capacity(8 * 1024);
    // Writing into a String cannot fail; an error here would be a bug in an encoder.
    prometheus_client::encoding::text::encode(&mut out, registry)
        .expect("encoding metrics into a String cannot fail");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tcp_metrics_count_and_close() {
        let mut registry = Registry::default();
        register_build_and_process(&mut registry);
        let tcp = TcpMetrics::register(registry.sub_registry_with_prefix("tern"));
        let c = tcp.conn(TcpLabels::plain(Direction::inbound));
        c.read.inc_by(10);
        c.write.inc_by(7);
        c.closed(CloseReason::Eof, Duration::from_millis(3));
        let text = encode(&registry);
        let l = "direction=\"inbound\",tls=\"false\",client_id=\"\",server_id=\"\"";
        for (name, value) in [
            ("tern_tcp_connections_total", 1),
            ("tern_tcp_read_bytes_total", 10),
            ("tern_tcp_write_bytes_total", 7),
            ("tern_tcp_connections_open", 0),
        ] {
            assert!(
                text.contains(&format!("{name}{{{l}}} {value}")),
                "{name}: {text}"
            );
        }
        let closed = format!("tern_tcp_connections_closed_total{{{l},reason=\"eof\"}} 1");
        assert!(text.contains(&closed), "{text}");
        assert!(text.contains("process_resident_memory_bytes"), "{text}");
        assert!(text.contains("process_cpu_seconds_total"), "{text}");
        assert!(text.contains("tern_build_info{"), "{text}");
    }

    #[test]
    fn process_stats_are_plausible() {
        let s = ProcessStats::read();
        assert!(s.rss_bytes > 0);
        assert!(s.open_fds > 0);
        assert!(s.threads >= 1);
    }
}
