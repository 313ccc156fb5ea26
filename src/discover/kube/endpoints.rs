//! One Service's endpoints, watched while the app uses the Service: its EndpointSlices (label
//! `kubernetes.io/service-name`) and the Pods its selector picks (for identities), folded into
//! one [`Resolved`] per destination (Service port, address family), each a `watch` channel.
//!
//! Pods are watched with the Service's selector, in its namespace, rather than fetched by name
//! per endpoint: a rollout then costs one stream of events instead of one GET per new pod, the
//! identities stay consistent with what the API server has, and the watch dies with the
//! EndpointSlice watch when the destination goes idle. A Service without a selector has no pod
//! watch: its endpoints are plain.
//!
//! Conditions, as kube-proxy applies them: the ready endpoints; when none is ready, the ones
//! that are serving and terminating (a draining pod that still answers). An unset `ready` or
//! `serving` counts as true, an unset `terminating` as false. The port is the EndpointSlice port
//! named like the Service port (that is how a named `targetPort` resolves per pod). Only slices
//! of the destination's address family count (dual stack).
//!
//! Identity: an endpoint whose `targetRef` Pod carries the injected label `tern.io/proxy` is
//! meshed, with identity `spiffe://<trust-domain>/ns/<namespace>/sa/<serviceAccountName>` and
//! the mesh port of its `tern-proxy` container's `tern-inbound` port (4143 by default).

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Instant;

use futures_util::StreamExt;
use futures_util::stream::BoxStream;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::runtime::watcher::{self, Event};
use tokio::sync::watch;
use tokio::task::AbortHandle;

use super::{Family, ServiceKey, Shared, WatchResource};
use crate::discover::{DEFAULT_MESH_PORT, Endpoint, Resolved};
use crate::inject::patch::{PROXY_CONTAINER, PROXY_LABEL};
use crate::tls::SpiffeId;

/// The name of the injected proxy's mesh port (see `crate::inject::patch`).
const MESH_PORT_NAME: &str = "tern-inbound";

/// A destination of a watched Service: its port and the address family of the dialed VIP.
pub type DestKey = (u16, Family);

/// The watches of one Service in use.
#[derive(Debug)]
pub struct ServiceWatch {
    pub key: ServiceKey,
    dests: Mutex<HashMap<DestKey, watch::Sender<Option<Resolved>>>>,
    state: Mutex<State>,
    /// True once both the EndpointSlices and the Pods were listed.
    synced: watch::Sender<bool>,
    last_used: Mutex<Instant>,
    /// When the watch started (bounds how long lookups wait for its first list).
    pub created: tokio::time::Instant,
    pub(super) task: OnceLock<AbortHandle>,
}

/// What the watches saw.
#[derive(Debug, Default)]
struct State {
    slices: BTreeMap<String, EndpointSlice>,
    pods: HashMap<String, PodInfo>,
    /// Buffers of a (re)list in progress; swapped in when complete.
    listing_slices: Option<BTreeMap<String, EndpointSlice>>,
    listing_pods: Option<HashMap<String, PodInfo>>,
    slices_synced: bool,
    pods_synced: bool,
    /// Endpoints counted in `tern_discovery_endpoints` for this Service.
    counted: i64,
}

/// What identity a pod's endpoints have.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodInfo {
    /// Present when the pod carries the injected proxy: its identity and mesh port.
    pub meshed: Option<(SpiffeId, u16)>,
}

impl ServiceWatch {
    pub fn new(key: ServiceKey) -> Arc<Self> {
        Arc::new(ServiceWatch {
            key,
            dests: Mutex::new(HashMap::new()),
            state: Mutex::new(State::default()),
            synced: watch::Sender::new(false),
            last_used: Mutex::new(Instant::now()),
            created: tokio::time::Instant::now(),
            task: OnceLock::new(),
        })
    }

    /// A receiver for one destination of this Service (made on first use).
    pub fn subscribe(&self, dest: DestKey, shared: &Shared) -> watch::Receiver<Option<Resolved>> {
        self.touch();
        let mut dests = self.dests.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(tx) = dests.get(&dest) {
            return tx.subscribe();
        }
        let tx = watch::Sender::new(self.compute(dest, shared));
        let rx = tx.subscribe();
        dests.insert(dest, tx);
        rx
    }

    /// The current resolution of a destination already subscribed to.
    pub fn current(&self, dest: DestKey) -> Option<Resolved> {
        self.touch();
        let dests = self.dests.lock().unwrap_or_else(|p| p.into_inner());
        dests.get(&dest).and_then(|tx| tx.borrow().clone())
    }

    pub async fn wait_synced(&self, deadline: tokio::time::Instant) -> bool {
        let mut rx = self.synced.subscribe();
        tokio::time::timeout_at(deadline, rx.wait_for(|s| *s))
            .await
            .is_ok_and(|r| r.is_ok())
    }

    fn touch(&self) {
        *self.last_used.lock().unwrap_or_else(|p| p.into_inner()) = Instant::now();
    }

    /// Idle: nobody holds a receiver and nobody looked it up for `idle`.
    pub fn is_idle(&self, idle: std::time::Duration) -> bool {
        let dests = self.dests.lock().unwrap_or_else(|p| p.into_inner());
        let held = dests.values().any(|tx| tx.receiver_count() > 0);
        !held
            && self
                .last_used
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .elapsed()
                >= idle
    }

    fn compute(&self, (port, family): DestKey, shared: &Shared) -> Option<Resolved> {
        let state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if !(state.slices_synced && state.pods_synced) {
            return None;
        }
        let info = shared.services.get(&self.key)?;
        let svc_port = info.port(port)?;
        let endpoints = endpoints(state.slices.values(), &svc_port.name, family, &state.pods);
        Some(Resolved {
            service: Some(self.key.to_string()),
            endpoints: Arc::from(endpoints),
            policy: Some(info.policy.clone()),
        })
    }

    /// Recomputes every destination and notifies the ones that changed.
    fn publish(&self, shared: &Shared) {
        let synced = {
            let state = self.state.lock().unwrap_or_else(|p| p.into_inner());
            state.slices_synced && state.pods_synced
        };
        let dests = self.dests.lock().unwrap_or_else(|p| p.into_inner());
        for (dest, tx) in dests.iter() {
            let new = self.compute(*dest, shared);
            tx.send_if_modified(|cur| {
                if *cur == new {
                    false
                } else {
                    *cur = new;
                    true
                }
            });
        }
        drop(dests);
        if synced {
            self.synced.send_replace(true);
        }
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let count: i64 = state
            .slices
            .values()
            .map(|s| {
                s.endpoints
                    .iter()
                    .map(|e| e.addresses.len() as i64)
                    .sum::<i64>()
            })
            .sum();
        shared.metrics.endpoints.inc_by(count - state.counted);
        state.counted = count;
    }

    fn uncount(&self, shared: &Shared) {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        shared.metrics.endpoints.dec_by(state.counted);
        state.counted = 0;
    }

    fn on_slice(&self, event: Event<EndpointSlice>) -> bool {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let name = |s: &EndpointSlice| s.metadata.name.clone().unwrap_or_default();
        match event {
            Event::Init => {
                state.listing_slices = Some(BTreeMap::new());
                false
            }
            Event::InitApply(s) => {
                let n = name(&s);
                state
                    .listing_slices
                    .get_or_insert_with(BTreeMap::new)
                    .insert(n, s);
                false
            }
            Event::InitDone => {
                state.slices = state.listing_slices.take().unwrap_or_default();
                state.slices_synced = true;
                true
            }
            Event::Apply(s) => {
                let n = name(&s);
                state.slices.insert(n, s);
                true
            }
            Event::Delete(s) => state.slices.remove(&name(&s)).is_some(),
        }
    }

    fn on_pod(&self, event: Event<Pod>, trust_domain: Option<&str>) -> bool {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let info = |p: &Pod| {
            (
                p.metadata.name.clone().unwrap_or_default(),
                pod_info(p, trust_domain),
            )
        };
        match event {
            Event::Init => {
                state.listing_pods = Some(HashMap::new());
                false
            }
            Event::InitApply(p) => {
                let (n, i) = info(&p);
                state
                    .listing_pods
                    .get_or_insert_with(HashMap::new)
                    .insert(n, i);
                false
            }
            Event::InitDone => {
                state.pods = state.listing_pods.take().unwrap_or_default();
                state.pods_synced = true;
                true
            }
            Event::Apply(p) => {
                let (n, i) = info(&p);
                state.pods.insert(n, i.clone()) != Some(i)
            }
            Event::Delete(p) => state.pods.remove(&info(&p).0).is_some(),
        }
    }

    /// Starts over with no pods (the selector changed, or the Service has none).
    fn reset_pods(&self, synced: bool) {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        state.pods.clear();
        state.listing_pods = None;
        state.pods_synced = synced;
    }
}

/// Runs one Service's watches until the destination is idle (or the Service is gone and idle).
pub async fn run(watch: Arc<ServiceWatch>, shared: Arc<Shared>) {
    let key = watch.key.clone();
    let trust_domain = shared.settings.trust_domain.clone();
    let slices_api: kube::Api<EndpointSlice> =
        kube::Api::namespaced(shared.client.clone(), &key.namespace);
    let slices_cfg =
        watcher::Config::default().labels(&format!("kubernetes.io/service-name={}", key.name));
    let mut slices = shared.watch_stream(slices_api, slices_cfg, WatchResource::endpointslices);
    let mut info = shared.services.get(&key);
    let mut selector = info.as_ref().and_then(|i| i.selector.clone());
    let mut pods = pod_stream(&shared, &key, selector.as_deref());
    watch.reset_pods(selector.is_none());
    let mut generation = shared.services.subscribe();
    let idle = shared.settings.idle_timeout;
    let mut tick = tokio::time::interval((idle / 4).max(std::time::Duration::from_millis(10)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tracing::debug!(service = %key, "watching endpoints");
    loop {
        // Cancellation safe: `StreamExt::next`, `watch::Receiver::changed` and
        // `Interval::tick` lose nothing when another branch wins.
        let changed = tokio::select! {
            Some(event) = slices.next() => watch.on_slice(event),
            Some(event) = pods.next() => watch.on_pod(event, trust_domain.as_deref()),
            Ok(()) = generation.changed() => {
                // Some Service changed; this one only matters if it is this Service.
                let now = shared.services.get(&key);
                let changed = now != info;
                if changed {
                    let now_selector = now.as_ref().and_then(|i| i.selector.clone());
                    if now_selector != selector {
                        selector = now_selector;
                        pods = pod_stream(&shared, &key, selector.as_deref());
                        watch.reset_pods(selector.is_none());
                    }
                    info = now;
                }
                changed
            }
            _ = tick.tick() => {
                if shared.retire(&watch) {
                    break;
                }
                false
            }
        };
        if changed {
            watch.publish(&shared);
        }
    }
    watch.uncount(&shared);
    tracing::debug!(service = %key, "endpoints watch stopped (idle)");
}

fn pod_stream(
    shared: &Shared,
    key: &ServiceKey,
    selector: Option<&str>,
) -> BoxStream<'static, Event<Pod>> {
    match selector {
        Some(selector) => {
            let api: kube::Api<Pod> = kube::Api::namespaced(shared.client.clone(), &key.namespace);
            shared.watch_stream(
                api,
                watcher::Config::default().labels(selector),
                WatchResource::pods,
            )
        }
        None => futures_util::stream::pending().boxed(),
    }
}

/// A pod's identity as discovery sees it.
pub fn pod_info(pod: &Pod, trust_domain: Option<&str>) -> PodInfo {
    let injected = pod
        .metadata
        .labels
        .as_ref()
        .is_some_and(|l| l.contains_key(PROXY_LABEL));
    let meshed = match (injected, trust_domain, &pod.metadata.namespace) {
        (true, Some(td), Some(ns)) => {
            let spec = pod.spec.as_ref();
            let sa = spec
                .and_then(|s| s.service_account_name.as_deref())
                .unwrap_or("default");
            let mesh_port = spec
                .into_iter()
                .flat_map(|s| s.init_containers.iter().flatten().chain(&s.containers))
                .filter(|c| c.name == PROXY_CONTAINER)
                .flat_map(|c| c.ports.iter().flatten())
                .find(|p| p.name.as_deref() == Some(MESH_PORT_NAME))
                .and_then(|p| u16::try_from(p.container_port).ok())
                .unwrap_or(DEFAULT_MESH_PORT);
            format!("spiffe://{td}/ns/{ns}/sa/{sa}")
                .parse::<SpiffeId>()
                .ok()
                .map(|id| (id, mesh_port))
        }
        _ => None,
    };
    PodInfo { meshed }
}

/// The endpoints of one Service port (by name) and address family, from its EndpointSlices:
/// ready ones, else serving-and-terminating ones; deduplicated and sorted by address.
pub fn endpoints<'a>(
    slices: impl Iterator<Item = &'a EndpointSlice>,
    port_name: &str,
    family: Family,
    pods: &HashMap<String, PodInfo>,
) -> Vec<Endpoint> {
    let mut ready = BTreeMap::new();
    let mut draining = BTreeMap::new();
    for slice in slices {
        if slice.address_type != family.address_type() {
            continue;
        }
        let port = slice
            .ports
            .iter()
            .flatten()
            .filter(|p| p.protocol.as_deref().is_none_or(|p| p == "TCP"))
            .find(|p| p.name.as_deref().unwrap_or("") == port_name)
            .and_then(|p| p.port)
            .and_then(|p| u16::try_from(p).ok());
        let Some(port) = port else {
            continue;
        };
        for ep in &slice.endpoints {
            let c = ep.conditions.as_ref();
            let is_ready = c.and_then(|c| c.ready).unwrap_or(true);
            let serving = c.and_then(|c| c.serving).unwrap_or(is_ready);
            let terminating = c.and_then(|c| c.terminating).unwrap_or(false);
            let pod = ep
                .target_ref
                .as_ref()
                .filter(|r| r.kind.as_deref() == Some("Pod"))
                .and_then(|r| r.name.as_ref())
                .and_then(|n| pods.get(n));
            let (identity, mesh_port) = match pod.and_then(|p| p.meshed.clone()) {
                Some((id, port)) => (Some(id), port),
                None => (None, DEFAULT_MESH_PORT),
            };
            for addr in &ep.addresses {
                let Ok(ip) = addr.parse::<IpAddr>() else {
                    continue;
                };
                let endpoint = Endpoint {
                    addr: SocketAddr::new(ip, port),
                    identity: identity.clone(),
                    weight: 1,
                    mesh_port,
                };
                if is_ready {
                    ready.insert(endpoint.addr, endpoint);
                } else if serving && terminating {
                    draining.insert(endpoint.addr, endpoint);
                }
            }
        }
    }
    let chosen = if ready.is_empty() { draining } else { ready };
    chosen.into_values().collect()
}
