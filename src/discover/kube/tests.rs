//! The Kubernetes source against [`super::fake_api`]: the real kube-rs watch code, a real
//! HTTP API server on 127.0.0.1, no cluster.

use std::net::SocketAddr;
use std::time::Duration;

use serde_json::json;
use tokio::sync::watch;

use super::fake_api::{Ep, FakeApi, Kind, pod, ready, service, slice};
use super::*;
use crate::discover::{Resolved, RetryOn, RetryPolicy, ServicePolicy};

/// A bound on every wait, never an assertion about time.
const WAIT: Duration = Duration::from_secs(20);

fn settings() -> KubeSettings {
    KubeSettings {
        cluster_domain: "cluster.local".into(),
        namespace: "shop".into(),
        trust_domain: Some("cluster.local".into()),
        idle_timeout: Duration::from_secs(300),
        timeout: Duration::from_secs(10),
        backoff: Duration::from_millis(20),
    }
}

fn start(api: &FakeApi, settings: KubeSettings) -> KubeDiscovery {
    let client = client(&ApiServer::Url(api.url())).expect("client");
    KubeDiscovery::start(client, settings, KubeMetrics::default())
}

fn addr(s: &str) -> SocketAddr {
    s.parse().expect("addr")
}

/// Waits until the destination's resolution satisfies `pred`, and returns it.
async fn until(
    rx: &mut watch::Receiver<Option<Resolved>>,
    pred: impl Fn(&Resolved) -> bool,
) -> Resolved {
    let r = tokio::time::timeout(WAIT, rx.wait_for(|r| r.as_ref().is_some_and(&pred)))
        .await
        .expect("resolution in time")
        .expect("source alive");
    r.clone().expect("resolved")
}

fn addrs(r: &Resolved) -> Vec<SocketAddr> {
    r.endpoints.iter().map(|e| e.addr).collect()
}

/// The shop/web Service (VIP 198.18.10.1:80 → named targetPort `http`), its pods and slice.
fn web(api: &FakeApi) {
    api.apply(service(
        "shop",
        "web",
        &["198.18.10.1"],
        &[("http", 80, json!("http")), ("admin", 9090, json!(9091))],
        &[],
    ));
    api.apply(pod("shop", "web-1", "web", "web-sa", Some(4143)));
    api.apply(pod("shop", "web-2", "web", "web-sa", None));
    api.apply(pod("shop", "web-3", "web", "web-sa", Some(4143)));
    api.apply(slice(
        "shop",
        "web-abc",
        "web",
        "IPv4",
        &[("http", 8080), ("admin", 9091)],
        &[
            ready("198.18.1.1", "web-1"),
            ready("198.18.1.2", "web-2"),
            Ep {
                ip: "198.18.1.3",
                pod: "web-3",
                ready: false,
                serving: false,
                terminating: false,
            },
        ],
    ));
}

#[tokio::test]
async fn vip_resolves_to_ready_endpoints_with_identities_and_follows_events() {
    let api = FakeApi::start().await;
    web(&api);
    let kube = start(&api, settings());
    let mut rx = kube
        .lookup(addr("198.18.10.1:80"))
        .await
        .expect("a Service VIP");
    let r = until(&mut rx, |_| true).await;
    assert_eq!(r.service.as_deref(), Some("web.shop"));
    assert_eq!(
        addrs(&r),
        vec![addr("198.18.1.1:8080"), addr("198.18.1.2:8080")],
        "not-ready endpoint left out, named targetPort mapped"
    );
    assert_eq!(
        r.endpoints[0].identity.as_ref().map(|i| i.to_string()),
        Some("spiffe://cluster.local/ns/shop/sa/web-sa".into()),
        "injected pod: meshed with its service account's identity"
    );
    assert_eq!(
        r.endpoints[1].identity, None,
        "pod without the proxy: plain"
    );
    assert_eq!(
        kube.resolve(addr("198.18.10.1:80")),
        Some(r.clone()),
        "the sync path sees the same"
    );
    assert!(
        kube.lookup(addr("198.18.10.1:81")).await.is_none(),
        "not a Service port"
    );
    assert!(
        kube.lookup(addr("198.18.99.1:80")).await.is_none(),
        "not a VIP"
    );

    // The third pod becomes ready: modified slice.
    api.apply(slice(
        "shop",
        "web-abc",
        "web",
        "IPv4",
        &[("http", 8080)],
        &[
            ready("198.18.1.1", "web-1"),
            ready("198.18.1.2", "web-2"),
            ready("198.18.1.3", "web-3"),
        ],
    ));
    let r = until(&mut rx, |r| r.endpoints.len() == 3).await;
    assert!(r.endpoints[2].identity.is_some());
    // A second slice adds one, then goes away.
    api.apply(slice(
        "shop",
        "web-def",
        "web",
        "IPv4",
        &[("http", 8080)],
        &[ready("198.18.1.4", "web-4")],
    ));
    until(&mut rx, |r| r.endpoints.len() == 4).await;
    api.delete(Kind::EndpointSlice, "shop", "web-def");
    until(&mut rx, |r| r.endpoints.len() == 3).await;
    // Rollout end state: every pod terminating, two still serving → those (kube-proxy's fallback).
    let draining = |ip, pod, serving| Ep {
        ip,
        pod,
        ready: false,
        serving,
        terminating: true,
    };
    api.apply(slice(
        "shop",
        "web-abc",
        "web",
        "IPv4",
        &[("http", 8080)],
        &[
            draining("198.18.1.1", "web-1", true),
            draining("198.18.1.2", "web-2", false),
            draining("198.18.1.3", "web-3", true),
        ],
    ));
    let r = until(&mut rx, |r| r.endpoints.len() == 2).await;
    assert_eq!(
        addrs(&r),
        vec![addr("198.18.1.1:8080"), addr("198.18.1.3:8080")]
    );
    // A ready one comes back: only it.
    api.apply(slice(
        "shop",
        "web-abc",
        "web",
        "IPv4",
        &[("http", 8080)],
        &[
            draining("198.18.1.1", "web-1", true),
            ready("198.18.1.5", "web-5"),
        ],
    ));
    let r = until(&mut rx, |r| r.endpoints.len() == 1).await;
    assert_eq!(addrs(&r), vec![addr("198.18.1.5:8080")]);
    assert_eq!(r.endpoints[0].identity, None, "unknown pod: plain");
    // The pod appears, injected: the endpoint becomes meshed.
    api.apply(pod("shop", "web-5", "web", "other", Some(4143)));
    let r = until(&mut rx, |r| r.endpoints[0].identity.is_some()).await;
    assert_eq!(
        r.endpoints[0]
            .identity
            .as_ref()
            .map(|i| i.service_account().to_string()),
        Some("other".into())
    );
    // The Service goes away: the destination is unknown.
    api.delete(Kind::Service, "shop", "web");
    tokio::time::timeout(WAIT, rx.wait_for(Option::is_none))
        .await
        .expect("deleted in time")
        .expect("alive");
}

#[tokio::test]
async fn ports_map_by_name_per_slice_and_per_service_port() {
    let api = FakeApi::start().await;
    web(&api);
    // Pods of another version listen on another port for `http`: their own slice says so.
    api.apply(slice(
        "shop",
        "web-v2",
        "web",
        "IPv4",
        &[("http", 8081), ("admin", 9092)],
        &[ready("198.18.2.1", "web-v2-1")],
    ));
    let kube = start(&api, settings());
    let mut http = kube.lookup(addr("198.18.10.1:80")).await.expect("http");
    let r = until(&mut http, |r| r.endpoints.len() == 3).await;
    assert_eq!(
        addrs(&r),
        vec![
            addr("198.18.1.1:8080"),
            addr("198.18.1.2:8080"),
            addr("198.18.2.1:8081")
        ]
    );
    let mut admin = kube.lookup(addr("198.18.10.1:9090")).await.expect("admin");
    let r = until(&mut admin, |r| r.endpoints.len() == 3).await;
    assert_eq!(
        addrs(&r),
        vec![
            addr("198.18.1.1:9091"),
            addr("198.18.1.2:9091"),
            addr("198.18.2.1:9092")
        ]
    );
    let lists = api
        .requests()
        .iter()
        .filter(|r| r.contains("endpointslices") && !r.contains("watch=true"))
        .count();
    assert_eq!(lists, 1, "one watch for both ports: {:?}", api.requests());
}

#[tokio::test]
async fn dual_stack_vips_get_their_own_family() {
    let api = FakeApi::start().await;
    api.apply(service(
        "shop",
        "db",
        &["198.18.10.2", "2001:db8::2"],
        &[("", 5432, json!(5432))],
        &[],
    ));
    api.apply(slice(
        "shop",
        "db-v4",
        "db",
        "IPv4",
        &[("", 5432)],
        &[ready("198.18.3.1", "db-0")],
    ));
    api.apply(slice(
        "shop",
        "db-v6",
        "db",
        "IPv6",
        &[("", 5432)],
        &[ready("2001:db8::3:1", "db-0")],
    ));
    let kube = start(&api, settings());
    let mut v4 = kube.lookup(addr("198.18.10.2:5432")).await.expect("v4 VIP");
    let mut v6 = kube
        .lookup(addr("[2001:db8::2]:5432"))
        .await
        .expect("v6 VIP");
    let r4 = until(&mut v4, |r| !r.endpoints.is_empty()).await;
    let r6 = until(&mut v6, |r| !r.endpoints.is_empty()).await;
    assert_eq!(addrs(&r4), vec![addr("198.18.3.1:5432")]);
    assert_eq!(addrs(&r6), vec![addr("[2001:db8::3:1]:5432")]);
}

fn config_errors(kube: &KubeDiscovery, field: &str) -> u64 {
    kube.metrics()
        .config_errors
        .get_or_create(&ConfigErrorLabels {
            kind: "Service".into(),
            namespace: "shop".into(),
            name: "web".into(),
            field: field.into(),
        })
        .get()
}

#[tokio::test]
async fn annotations_become_the_policy_and_bad_ones_keep_the_last_good() {
    let api = FakeApi::start().await;
    web(&api);
    let annotated = |ann: &[(&str, &str)]| {
        service(
            "shop",
            "web",
            &["198.18.10.1"],
            &[("http", 80, json!("http"))],
            ann,
        )
    };
    api.apply(annotated(&[
        ("tern.io/timeout", "2s"),
        ("tern.io/retry-http", "5xx,429"),
        ("tern.io/retry-grpc", "unavailable"),
        ("tern.io/retry-attempts", "2"),
    ]));
    let kube = start(&api, settings());
    let mut rx = kube.lookup(addr("198.18.10.1:80")).await.expect("web");
    let good = ServicePolicy {
        timeout: Some(Duration::from_secs(2)),
        retry: Some(RetryPolicy {
            on: vec![RetryOn::Server5xx, RetryOn::Status(429), RetryOn::Grpc(14)],
            attempts: 2,
        }),
    };
    let r = until(&mut rx, |_| true).await;
    assert_eq!(r.policy.as_deref(), Some(&good));
    // A bad timeout: logged, counted once, the last good policy stays.
    api.apply(annotated(&[
        ("tern.io/timeout", "soon"),
        ("tern.io/retry-http", "5xx"),
    ]));
    let field = "metadata.annotations[tern.io/timeout]";
    for _ in 0..2000 {
        if config_errors(&kube, field) > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(config_errors(&kube, field), 1);
    assert_eq!(
        kube.resolve(addr("198.18.10.1:80"))
            .and_then(|r| r.policy)
            .as_deref(),
        Some(&good)
    );
    // Fixed: the new policy applies.
    api.apply(annotated(&[("tern.io/timeout", "3s")]));
    let r = until(&mut rx, |r| {
        r.policy
            .as_ref()
            .is_some_and(|p| p.timeout == Some(Duration::from_secs(3)))
    })
    .await;
    assert_eq!(r.policy.and_then(|p| p.retry.clone()), None);
    assert_eq!(config_errors(&kube, field), 1, "counted once per change");
}

#[test]
fn authorities_name_services() {
    let r = |a: &str| resolve_authority(a, "shop", "cluster.local");
    let key = |ns: &str, name: &str| ServiceKey {
        namespace: ns.into(),
        name: name.into(),
    };
    assert_eq!(r("web"), Some((key("shop", "web"), None)));
    assert_eq!(r("web:8080"), Some((key("shop", "web"), Some(8080))));
    assert_eq!(r("web.other"), Some((key("other", "web"), None)));
    assert_eq!(r("web.other.svc"), Some((key("other", "web"), None)));
    assert_eq!(
        r("web.other.svc.cluster.local:80"),
        Some((key("other", "web"), Some(80)))
    );
    assert_eq!(
        r("Web.Other.svc.cluster.local."),
        Some((key("other", "web"), None))
    );
    assert_eq!(
        r("web.other.svc.example.org"),
        None,
        "another cluster domain"
    );
    assert_eq!(r("example.com.au.net"), None);
    assert_eq!(r("www.example.com"), None, "three labels, not .svc");
    assert_eq!(r("198.18.0.1:80"), None);
    assert_eq!(r("[2001:db8::1]:80"), None);
    assert_eq!(r("we_b"), None);
    assert_eq!(r(""), None);
}

#[tokio::test]
async fn authorities_resolve_through_the_source() {
    let api = FakeApi::start().await;
    web(&api);
    let kube = start(&api, settings());
    let mut rx = kube
        .lookup_authority("web.shop.svc.cluster.local", 80)
        .await
        .expect("by name");
    let r = until(&mut rx, |r| !r.endpoints.is_empty()).await;
    assert_eq!(r.service.as_deref(), Some("web.shop"));
    let mut admin = kube
        .lookup_authority("web:9090", 80)
        .await
        .expect("own namespace");
    let r = until(&mut admin, |r| !r.endpoints.is_empty()).await;
    assert_eq!(r.endpoints[0].addr.port(), 9091);
    assert!(kube.lookup_authority("web.other", 80).await.is_none());
    assert!(
        kube.lookup_authority("web", 81).await.is_none(),
        "no such port"
    );
}

#[tokio::test]
async fn endpoints_are_watched_only_once_used_and_stop_when_idle() {
    let api = FakeApi::start().await;
    web(&api);
    let mut s = settings();
    s.idle_timeout = Duration::from_millis(200);
    let kube = start(&api, s);
    // The Services list arrives; no EndpointSlice or Pod request yet.
    let mut synced = false;
    for _ in 0..2000 {
        if kube.shared().services.len() == 1 {
            synced = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert!(synced);
    assert_eq!(api.count("endpointslices"), 0, "{:?}", api.requests());
    assert_eq!(api.count("pods"), 0);
    let mut rx = kube.lookup(addr("198.18.10.1:80")).await.expect("web");
    until(&mut rx, |_| true).await;
    assert!(api.count("endpointslices") >= 1, "listed on first use");
    assert!(
        api.requests()
            .iter()
            .any(|r| r.contains("/namespaces/shop/pods") && r.contains("app%3Dweb")),
        "pods by the Service's selector: {:?}",
        api.requests()
    );
    let gauge = |r| kube.metrics().watch(r).get();
    assert_eq!(gauge(WatchResource::endpointslices), 1);
    // Held: stays up however long it is unused.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(gauge(WatchResource::endpointslices), 1, "a holder keeps it");
    drop(rx);
    let mut stopped = false;
    for _ in 0..2000 {
        if gauge(WatchResource::endpointslices) == 0 && gauge(WatchResource::pods) == 0 {
            stopped = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert!(stopped, "idle watches stop");
    assert_eq!(
        kube.resolve(addr("198.18.10.1:80")),
        None,
        "no longer watched"
    );
    assert_eq!(kube.metrics().endpoints.get(), 0);
    let before = api.count("endpointslices");
    let mut rx = kube.lookup(addr("198.18.10.1:80")).await.expect("again");
    until(&mut rx, |r| r.endpoints.len() == 2).await;
    assert!(api.count("endpointslices") > before, "watched again on use");
}

#[tokio::test]
async fn api_server_outages_keep_the_last_state_and_recover() {
    let api = FakeApi::start().await;
    web(&api);
    let kube = start(&api, settings());
    let mut rx = kube.lookup(addr("198.18.10.1:80")).await.expect("web");
    until(&mut rx, |r| r.endpoints.len() == 2).await;

    // Watches dropped by the server (a normal event): resumed from the last version.
    api.drop_watches();
    api.apply(slice(
        "shop",
        "web-def",
        "web",
        "IPv4",
        &[("http", 8080)],
        &[ready("198.18.1.4", "web-4")],
    ));
    until(&mut rx, |r| r.endpoints.len() == 3).await;

    // The API server goes down: errors, backoff, the last state keeps answering.
    api.stop();
    let errors = || {
        kube.metrics()
            .errors
            .get_or_create(&ResourceLabels {
                resource: WatchResource::endpointslices,
            })
            .get()
    };
    for _ in 0..2000 {
        if errors() > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert!(errors() > 0, "the outage is counted");
    assert_eq!(
        kube.resolve(addr("198.18.10.1:80"))
            .map(|r| r.endpoints.len()),
        Some(3),
        "last known state while the API server is down"
    );
    // Changes made meanwhile, and the history compacted: the resumed watch gets 410 Gone and
    // the client re-lists.
    api.delete(Kind::EndpointSlice, "shop", "web-def");
    api.apply(slice(
        "shop",
        "web-ghi",
        "web",
        "IPv4",
        &[("http", 8080)],
        &[ready("198.18.1.6", "web-6")],
    ));
    api.compact();
    api.restart().await;
    let r = until(&mut rx, |r| {
        r.endpoints.len() == 3
            && r.endpoints
                .iter()
                .any(|e| e.addr.ip().to_string() == "198.18.1.6")
    })
    .await;
    assert!(
        !addrs(&r).contains(&addr("198.18.1.4:8080")),
        "deleted during the outage"
    );
    // Services recovered too: a new Service resolves.
    api.apply(service(
        "shop",
        "new",
        &["198.18.10.9"],
        &[("http", 80, json!(8080))],
        &[],
    ));
    let mut found = false;
    for _ in 0..2000 {
        if kube
            .shared()
            .services
            .by_addr(addr("198.18.10.9:80"))
            .is_some()
        {
            found = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert!(found, "the Services watch recovered");
}

#[tokio::test]
async fn first_lookup_waits_for_the_list_and_gives_up_in_time() {
    // An API server that never answers: the lookup ends after --discovery-timeout as unknown.
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let url: http::Uri = format!("http://{}", silent.local_addr().expect("addr"))
        .parse()
        .expect("url");
    let mut s = settings();
    s.timeout = Duration::from_millis(100);
    let kube = KubeDiscovery::start(
        client(&ApiServer::Url(url)).expect("client"),
        s,
        KubeMetrics::default(),
    );
    assert!(kube.lookup(addr("198.18.10.1:80")).await.is_none());
    assert_eq!(kube.metrics().lookup_timeouts.get(), 1);
    // After the start-up window, lookups no longer wait: they answer "unknown" at once.
    let second = tokio::time::timeout(WAIT, kube.lookup(addr("198.18.10.1:80")))
        .await
        .expect("bounded");
    assert!(second.is_none());
    assert_eq!(kube.metrics().lookup_timeouts.get(), 2);
    drop(silent);
}

#[tokio::test]
async fn auto_mode_survives_a_missing_service_account_and_explicit_mode_does_not() {
    if std::env::var_os("KUBERNETES_SERVICE_HOST").is_some() {
        eprintln!("running inside a cluster: the in-cluster config may work here; not checked");
        return;
    }
    let mut c = crate::config::ProxyConfig::loopback();
    c.kubernetes = Some(ApiServer::InCluster);
    c.discovery = crate::cli::DiscoveryMode::Auto;
    crate::app::Proxy::bind(c.clone()).expect("auto: starts without Kubernetes discovery");
    c.discovery = crate::cli::DiscoveryMode::Kubernetes;
    let e = crate::app::Proxy::bind(c).expect_err("kubernetes: required");
    assert!(format!("{e:#}").contains("--discovery"), "{e:#}");
}

#[tokio::test]
async fn selector_changes_rewatch_pods_and_selectorless_services_stay_plain() {
    let api = FakeApi::start().await;
    let mut svc = service(
        "shop",
        "manual",
        &["198.18.10.3"],
        &[("http", 80, json!(8080))],
        &[],
    );
    svc["spec"]["selector"] = json!(null);
    api.apply(svc.clone());
    api.apply(pod("shop", "m-1", "m2", "msa", Some(4143)));
    api.apply(slice(
        "shop",
        "manual-1",
        "manual",
        "IPv4",
        &[("http", 8080)],
        &[ready("198.18.4.1", "m-1")],
    ));
    let kube = start(&api, settings());
    let mut rx = kube.lookup(addr("198.18.10.3:80")).await.expect("manual");
    let r = until(&mut rx, |r| !r.endpoints.is_empty()).await;
    assert_eq!(
        r.endpoints[0].identity, None,
        "no selector: no pod watch, plain"
    );
    assert_eq!(api.count("pods"), 0, "{:?}", api.requests());
    // The Service gets a selector that picks the injected pod: its endpoint becomes meshed.
    svc["spec"]["selector"] = json!({"app": "m2"});
    api.apply(svc);
    let r = until(&mut rx, |r| r.endpoints[0].identity.is_some()).await;
    assert_eq!(
        r.endpoints[0].identity.as_ref().map(|i| i.to_string()),
        Some("spiffe://cluster.local/ns/shop/sa/msa".into())
    );
}

/// A figure, not a check: memory and time for a proxy to learn 10,000 Services (the cost of the
/// cluster-wide Services watch). `cargo test --lib services_index_cost -- --ignored --nocapture`
#[tokio::test]
#[ignore = "a measurement; run by hand"]
async fn services_index_cost() {
    let api = FakeApi::start().await;
    for i in 0..10_000u32 {
        let ip = format!("198.18.{}.{}", 100 + i / 250, i % 250 + 1);
        api.apply(service(
            "shop",
            &format!("svc-{i}"),
            &[&ip],
            &[("http", 80, json!("http")), ("grpc", 9090, json!(9090))],
            &[("tern.io/timeout", "2s")],
        ));
    }
    let rss = || {
        std::fs::read_to_string("/proc/self/statm")
            .ok()
            .and_then(|s| s.split_whitespace().nth(1)?.parse::<u64>().ok())
            .unwrap_or(0)
            * 4096
    };
    crate::alloc::trim();
    let before = rss();
    let started = std::time::Instant::now();
    let kube = start(&api, settings());
    let mut synced = false;
    for _ in 0..20_000 {
        if kube.shared().services.len() == 10_000 {
            synced = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    assert!(synced);
    let took = started.elapsed();
    crate::alloc::trim();
    let after = rss();
    let index = kube.shared().clone();
    drop(kube);
    tokio::time::sleep(Duration::from_millis(100)).await;
    crate::alloc::trim();
    let without_client = rss();
    drop(index);
    crate::alloc::trim();
    let released = without_client.saturating_sub(rss());
    let mib = |b: u64| b as f64 / (1024.0 * 1024.0);
    eprintln!(
        "10000 Services: listed and indexed in {took:?}; RSS +{:.1} MiB (fake API server included); the index itself: {:.1} MiB",
        mib(after.saturating_sub(before)),
        mib(released)
    );
}
