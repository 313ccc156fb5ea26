//! Pods as network namespaces, processes with Drop guards, and small helpers around them.
//!
//! A [`Mesh`] is two pods, A (198.18.0.1, 2001:db8::1) and B (198.18.0.2, 2001:db8::2), joined by
//! a veth pair, each with `tern init` applied and `tern proxy` running as UID 2102. Namespace names
//! are unique per test (`tern-<pid>-<n>-a`), so tests run in parallel. Everything is undone on
//! drop: processes are killed, then the namespaces deleted.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

pub const A_V4: &str = "198.18.0.1";
pub const B_V4: &str = "198.18.0.2";
pub const A_V6: &str = "2001:db8::1";
pub const B_V6: &str = "2001:db8::2";
pub const PROXY_UID: &str = "2102";

/// Polling interval of every bounded wait.
const POLL: Duration = Duration::from_millis(50);
/// Upper bound of every wait (in polls): 30 s.
const MAX_POLLS: usize = 600;

/// Checks root and the system tools. Outside CI a missing piece skips the test loudly;
/// with `CI=true` it fails the test.
pub fn ready() -> bool {
    let mut missing = Vec::new();
    if !is_root() {
        missing.push("root (run the tests as root: they create network namespaces)".to_string());
    }
    for tool in [
        "ip",
        "iptables-nft-save",
        "iptables-legacy-save",
        "ip6tables-nft-save",
        "curl",
        "python3",
        "setpriv",
        "promtool",
        "sha256sum",
        "bash",
        "sysctl",
    ] {
        if which(tool).is_none() {
            missing.push(format!("`{tool}`"));
        }
    }
    if missing.is_empty() {
        return true;
    }
    let msg = format!(
        "\n!!!!! e2e test SKIPPED: missing {} (apt-get install -y iproute2 iptables curl python3 \
         util-linux procps prometheus coreutils) !!!!!\n",
        missing.join(", ")
    );
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("{msg} CI=true: e2e tests must run, not skip");
    }
    // Straight to stderr, past the test harness's output capture: a skip must be seen.
    let _ = std::io::Write::write_all(&mut std::io::stderr(), msg.as_bytes());
    false
}

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Uid:"))
                .and_then(|v| v.split_whitespace().nth(1).map(|e| e == "0"))
        })
        .unwrap_or(false)
}

fn which(tool: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .chain(["/usr/sbin".into(), "/sbin".into()])
        .map(|d| d.join(tool))
        .find(|p| p.is_file())
}

/// The `tern` binary, at a path UID 2102 can execute (copied out of the build tree when that
/// tree is not readable by others, e.g. under /root).
pub fn tern() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let built = PathBuf::from(env!("CARGO_BIN_EXE_tern"));
        let ok = Command::new("setpriv")
            .args(["--reuid", PROXY_UID, "--regid", PROXY_UID, "--clear-groups"])
            .arg(&built)
            .arg("--version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if ok {
            return built;
        }
        let dir = std::env::temp_dir().join(format!("tern-e2e-bin-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("create binary dir");
        let copy = dir.join("tern");
        std::fs::copy(&built, &copy).expect("copy tern binary");
        run_ok(Command::new("chmod").arg("0755").arg(&dir).arg(&copy));
        copy
    })
}

/// A unique prefix for this test's namespaces: `tern-<pid>-<n>`.
pub fn unique() -> String {
    static N: AtomicUsize = AtomicUsize::new(0);
    format!(
        "tern-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// A network namespace, deleted on drop.
#[derive(Debug)]
pub struct Netns {
    pub name: String,
    /// Where this pod's process logs go.
    pub logs: tempfile::TempDir,
}

impl Netns {
    pub fn new(name: String) -> Netns {
        run_ok(Command::new("ip").args(["netns", "add", &name]));
        let ns = Netns {
            name,
            logs: tempfile::tempdir().expect("log dir"),
        };
        ns.run_ok(&["ip", "link", "set", "lo", "up"]);
        ns
    }

    /// `ip netns exec <ns> argv...`
    pub fn cmd(&self, argv: &[&str]) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name]).args(argv);
        c
    }

    pub fn run(&self, argv: &[&str]) -> Output {
        self.cmd(argv)
            .stdin(Stdio::null())
            .output()
            .expect("spawn ip netns exec")
    }

    /// Runs `argv` in the namespace and returns its stdout; panics with stderr on failure.
    pub fn run_ok(&self, argv: &[&str]) -> String {
        let out = self.run(argv);
        assert!(
            out.status.success(),
            "`{}` in {} failed ({}): {}{}",
            argv.join(" "),
            self.name,
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Starts a long-running process in the namespace; its output goes to a log file.
    pub fn spawn(&self, label: &str, argv: &[&str]) -> Proc {
        let log = self.logs.path().join(format!("{label}.log"));
        let file = File::create(&log).expect("create log file");
        let child = self
            .cmd(argv)
            .stdin(Stdio::null())
            .stdout(file.try_clone().expect("dup log"))
            .stderr(file)
            .spawn()
            .expect("spawn process in namespace");
        Proc {
            child,
            label: format!("{label} in {}", self.name),
            log,
        }
    }

    /// `tern init <args>` in this namespace.
    pub fn tern_init(&self, args: &[&str]) -> Output {
        let bin = tern().to_str().expect("utf-8 path");
        let mut argv = vec![bin, "init"];
        argv.extend_from_slice(args);
        self.run(&argv)
    }

    /// `iptables-save -t nat` (or ip6tables) without the timestamp comments.
    pub fn nat_rules(&self, save: &str) -> String {
        self.run_ok(&[save, "-t", "nat"])
            .lines()
            .filter(|l| !l.starts_with('#'))
            .map(|l| format!("{l}\n"))
            .collect()
    }

    /// Starts `tern proxy` as UID 2102 and waits until `/ready` is 200.
    pub fn start_proxy(&self, extra: &[&str]) -> Proc {
        let bin = tern().to_str().expect("utf-8 path");
        let mut argv = vec![
            "setpriv",
            "--reuid",
            PROXY_UID,
            "--regid",
            PROXY_UID,
            "--clear-groups",
            bin,
            "proxy",
        ];
        argv.extend_from_slice(extra);
        let mut p = self.spawn("proxy", &argv);
        for _ in 0..MAX_POLLS {
            if self.admin_status("/ready") == Some(200) {
                return p;
            }
            if let Ok(Some(status)) = p.child.try_wait() {
                panic!(
                    "proxy in {} exited early ({status}):\n{}",
                    self.name,
                    p.log()
                );
            }
            std::thread::sleep(POLL);
        }
        panic!("proxy in {} never became ready:\n{}", self.name, p.log());
    }

    /// Status of a GET on the admin port, as seen from inside the pod.
    pub fn admin_status(&self, path: &str) -> Option<u16> {
        let url = format!("http://127.0.0.1:4191{path}");
        let out = self.run(&[
            "curl",
            "-s",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "--max-time",
            "5",
            &url,
        ]);
        String::from_utf8_lossy(&out.stdout)
            .trim()
            .parse()
            .ok()
            .filter(|c| *c != 0)
    }

    /// The proxy's `/metrics` text.
    pub fn metrics(&self) -> String {
        self.run_ok(&[
            "curl",
            "-sSf",
            "--max-time",
            "5",
            "http://127.0.0.1:4191/metrics",
        ])
    }

    /// Polls `/metrics` until the sum of `name{labels..}` is `want`; returns the last text.
    pub fn wait_metric(&self, name: &str, labels: &[(&str, &str)], want: f64) -> String {
        let mut text = String::new();
        for _ in 0..MAX_POLLS {
            text = self.metrics();
            if metric(&text, name, labels) == Some(want) {
                return text;
            }
            std::thread::sleep(POLL);
        }
        panic!(
            "{name}{labels:?} never reached {want} in {}; last value {:?}:\n{text}",
            self.name,
            metric(&text, name, labels)
        );
    }

    /// Waits until a TCP server listens on `host:port` inside this namespace.
    pub fn wait_listening(&self, host: &str, port: u16) {
        let probe = format!("exec 3<>/dev/tcp/{host}/{port}");
        for _ in 0..MAX_POLLS {
            if self.run(&["bash", "-c", &probe]).status.success() {
                return;
            }
            std::thread::sleep(POLL);
        }
        panic!("nothing listens on {host}:{port} in {}", self.name);
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// A child process, killed on drop; its log is printed when the test fails.
#[derive(Debug)]
pub struct Proc {
    pub child: Child,
    pub label: String,
    pub log: PathBuf,
}

impl Proc {
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn pid(&self) -> String {
        self.child.id().to_string()
    }

    /// Waits (bounded) for the process to exit.
    pub fn wait_exit(&mut self) -> ExitStatus {
        for _ in 0..MAX_POLLS * 2 {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status;
            }
            std::thread::sleep(POLL);
        }
        panic!("{} did not exit:\n{}", self.label, self.log());
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("----- log of {} -----\n{}", self.label, self.log());
        }
    }
}

/// Two pods joined by a veth pair, with tern's rules and proxies in both.
/// Field order is drop order: processes go before the namespaces.
#[derive(Debug)]
pub struct Mesh {
    pub proxy_a: Proc,
    #[allow(dead_code)] // kept for its Drop guard; no test signals B yet
    pub proxy_b: Proc,
    pub a: Netns,
    pub b: Netns,
}

/// Two bare pods (no rules, no proxies) joined by a veth pair, IPv4 and IPv6 addressed.
pub fn pods() -> (Netns, Netns) {
    let prefix = unique();
    let a = Netns::new(format!("{prefix}-a"));
    let b = Netns::new(format!("{prefix}-b"));
    a.run_ok(&[
        "ip", "link", "add", "eth0", "type", "veth", "peer", "name", "eth0", "netns", &b.name,
    ]);
    for (ns, v4, v6) in [(&a, A_V4, A_V6), (&b, B_V4, B_V6)] {
        ns.run_ok(&["ip", "addr", "add", &format!("{v4}/24"), "dev", "eth0"]);
        ns.run_ok(&[
            "ip",
            "addr",
            "add",
            &format!("{v6}/64"),
            "dev",
            "eth0",
            "nodad",
        ]);
        // No duplicate address detection on the link-local address either: until it ends, the
        // first IPv6 packets can be lost, and the tests would race it.
        ns.run_ok(&["sysctl", "-qw", "net.ipv6.conf.eth0.accept_dad=0"]);
        ns.run_ok(&["ip", "link", "set", "eth0", "up"]);
    }
    // Static neighbour entries: no test traffic ever waits on (or races) ARP and NDP.
    let mac = |ns: &Netns| {
        ns.run_ok(&["cat", "/sys/class/net/eth0/address"])
            .trim()
            .to_string()
    };
    let (mac_a, mac_b) = (mac(&a), mac(&b));
    for (ns, peer, lladdr) in [
        (&a, B_V4, &mac_b),
        (&a, B_V6, &mac_b),
        (&b, A_V4, &mac_a),
        (&b, A_V6, &mac_a),
    ] {
        ns.run_ok(&[
            "ip",
            "neigh",
            "replace",
            peer,
            "lladdr",
            lladdr,
            "dev",
            "eth0",
            "nud",
            "permanent",
        ]);
    }
    (a, b)
}

impl Mesh {
    /// Pods A and B with `tern init` applied and proxies running (`proxy_args` go to both).
    pub fn start(proxy_args: &[&str]) -> Mesh {
        Mesh::start_each(proxy_args, proxy_args)
    }

    /// Like [`Mesh::start`], with each pod's own proxy arguments (e.g. its own `--identity-dir`).
    pub fn start_each(args_a: &[&str], args_b: &[&str]) -> Mesh {
        let (a, b) = pods();
        for ns in [&a, &b] {
            let out = ns.tern_init(&[]);
            assert!(
                out.status.success(),
                "tern init failed in {}: {}",
                ns.name,
                String::from_utf8_lossy(&out.stderr)
            );
            let said = String::from_utf8_lossy(&out.stdout);
            assert!(
                said.contains("using the nft iptables backend")
                    || said.contains("using the legacy iptables backend"),
                "tern init names the backend it used: {said}"
            );
        }
        let proxy_a = a.start_proxy(args_a);
        let proxy_b = b.start_proxy(args_b);
        Mesh {
            proxy_a,
            proxy_b,
            a,
            b,
        }
    }
}

/// The sum of every series of `name` whose labels include all of `labels` (so labels added to a
/// metric later do not break the tests); `None` when no series matches.
pub fn metric(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let mut sum = None;
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let Some((series, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let (series_name, series_labels) = match series.split_once('{') {
            Some((n, rest)) => (n, rest.trim_end_matches('}')),
            None => (series, ""),
        };
        if series_name != name {
            continue;
        }
        let have: Vec<&str> = series_labels.split(',').collect();
        if labels
            .iter()
            .all(|(k, v)| have.contains(&format!("{k}=\"{v}\"").as_str()))
        {
            let v: f64 = value.parse().ok()?;
            sum = Some(sum.unwrap_or(0.0) + v);
        }
    }
    sum
}

/// Runs `promtool check metrics` on `text`.
pub fn promtool_check(text: &str) {
    use std::io::Write;
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn promtool");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(text.as_bytes())
        .expect("feed promtool");
    let out = child.wait_with_output().expect("promtool");
    assert!(
        out.status.success(),
        "promtool check metrics failed: {}{}\n{text}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn run_ok(cmd: &mut Command) {
    let out = cmd.output().expect("spawn");
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A TCP server for the tests, run with `python3 -c SERVER <host> <port> <mode>`:
/// - `echo`: echoes bytes as they arrive; after the client's EOF it sends `after-eof\n` and closes.
/// - `drip`: sends 64 KiB, waits for one byte from the client, sends 160 × 64 KiB, closes.
pub const SERVER: &str = r#"
import socket, sys, threading
host, port, mode = sys.argv[1], int(sys.argv[2]), sys.argv[3]
fam = socket.AF_INET6 if ":" in host else socket.AF_INET
s = socket.socket(fam, socket.SOCK_STREAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((host, port))
s.listen(64)
def echo(c):
    while True:
        d = c.recv(65536)
        if not d:
            break
        c.sendall(d)
    c.sendall(b"after-eof\n")
def drip(c):
    c.sendall(b"x" * 65536)
    if not c.recv(1):
        return
    for i in range(160):
        c.sendall(bytes([i % 251]) * 65536)
def handle(c):
    try:
        echo(c) if mode == "echo" else drip(c)
    except OSError:
        pass
    finally:
        c.close()
while True:
    c, _ = s.accept()
    threading.Thread(target=handle, args=(c,), daemon=True).start()
"#;

/// A TCP client for the tests, run with `python3 -c CLIENT <host> <port> <mode> [size]`:
/// - `echo <size>`: sends `size` random bytes while reading, shuts down its write side, reads
///   to EOF; prints `<expected len> <expected sha256> <got len> <got sha256>`.
/// - `drip`: reads the first 64 KiB, prints `connected`, waits for a line on stdin, sends one
///   byte, reads to EOF; prints `<total> intact|corrupt`.
/// - `probe`: sends `hello`, shuts down its write side, reads to EOF or reset; prints the count.
pub const CLIENT: &str = r#"
import hashlib, os, socket, sys, threading
host, port, mode = sys.argv[1], int(sys.argv[2]), sys.argv[3]
c = socket.create_connection((host, port), timeout=60)
def read_all(n=None):
    got = bytearray()
    while n is None or len(got) < n:
        try:
            d = c.recv(65536 if n is None else min(65536, n - len(got)))
        except ConnectionResetError:
            break
        if not d:
            break
        got += d
    return bytes(got)
if mode == "echo":
    data = os.urandom(int(sys.argv[4]))
    def send():
        c.sendall(data)
        c.shutdown(socket.SHUT_WR)
    t = threading.Thread(target=send)
    t.start()
    got = read_all()
    t.join()
    want = data + b"after-eof\n"
    print(len(want), hashlib.sha256(want).hexdigest(), len(got), hashlib.sha256(got).hexdigest())
elif mode == "drip":
    first = read_all(65536)
    print("connected", flush=True)
    sys.stdin.readline()
    c.sendall(b"g")
    rest = read_all()
    want = b"x" * 65536 + b"".join(bytes([i % 251]) * 65536 for i in range(160))
    got = first + rest
    print(len(got), "intact" if got == want else "corrupt", flush=True)
else:
    c.sendall(b"hello")
    try:
        c.shutdown(socket.SHUT_WR)
    except OSError:
        pass
    print(len(read_all()))
"#;

/// The trust domain of the e2e identities.
pub const TRUST_DOMAIN: &str = "cluster.local";
/// The pods' network: unknown destinations in it are probed for a proxy on port 4143.
pub const CLUSTER_NETWORKS: &str = "198.18.0.0/15";

/// The SPIFFE ID of service account `sa` in namespace `e2e`.
pub fn spiffe(sa: &str) -> String {
    format!("spiffe://{TRUST_DOMAIN}/ns/e2e/sa/{sa}")
}

/// A leaf for service account `sa`, valid for `validity`.
pub fn mint(ca: &tern::tls::mint::TestCa, sa: &str, validity: Duration) -> Issued {
    let id: tern::tls::SpiffeId = spiffe(sa).parse().expect("a valid SPIFFE ID");
    ca.issue(&id, validity).expect("mint a leaf")
}

pub use tern::tls::mint::{Issued, TestCa};

/// An identity directory laid out as Kubernetes writes a projected or CSI volume: the files live
/// in `..<generation>/`, `..data` points at the current generation, and `tls.crt`, `tls.key`,
/// `ca.crt` are symlinks through `..data`. Readable by the proxy's UID; deleted on drop.
#[derive(Debug)]
pub struct IdentityDir {
    dir: tempfile::TempDir,
    generation: AtomicUsize,
}

impl IdentityDir {
    pub fn new(issued: &Issued) -> IdentityDir {
        use std::os::unix::fs::{PermissionsExt, symlink};
        let dir = tempfile::tempdir().expect("identity dir");
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))
            .expect("chmod identity dir");
        let id = IdentityDir {
            dir,
            generation: AtomicUsize::new(0),
        };
        let first = id.write_generation(issued);
        symlink(&first, id.dir.path().join("..data")).expect("..data symlink");
        for f in ["tls.crt", "tls.key", "ca.crt"] {
            symlink(format!("..data/{f}"), id.dir.path().join(f)).expect("file symlink");
        }
        id
    }

    pub fn path(&self) -> &str {
        self.dir.path().to_str().expect("utf-8 temp path")
    }

    /// The proxy arguments that give a pod this identity and mesh it with the other pod.
    pub fn mesh_args(&self) -> Vec<String> {
        vec![
            "--identity-dir".into(),
            self.path().into(),
            "--cluster-networks".into(),
            CLUSTER_NETWORKS.into(),
        ]
    }

    /// Swaps in `issued` atomically, as the kubelet does: a new generation directory, a temporary
    /// symlink to it, renamed over `..data` (one `rename(2)`: readers see the old set or the new).
    pub fn rotate(&self, issued: &Issued) {
        let next = self.write_generation(issued);
        let tmp = self.dir.path().join("..data_tmp");
        std::os::unix::fs::symlink(&next, &tmp).expect("temporary ..data symlink");
        std::fs::rename(&tmp, self.dir.path().join("..data")).expect("swap ..data");
    }

    /// Writes `issued` into a new `..<n>` directory; returns its name (relative).
    fn write_generation(&self, issued: &Issued) -> String {
        use std::os::unix::fs::PermissionsExt;
        let n = self.generation.fetch_add(1, Ordering::Relaxed);
        let name = format!("..2026_11_22_00_00_{n:02}.{}", std::process::id());
        let gen_dir = self.dir.path().join(&name);
        std::fs::create_dir(&gen_dir).expect("generation dir");
        issued.write_dir(&gen_dir).expect("write identity files");
        std::fs::set_permissions(&gen_dir, std::fs::Permissions::from_mode(0o755))
            .expect("chmod generation dir");
        for f in ["tls.crt", "tls.key", "ca.crt"] {
            std::fs::set_permissions(gen_dir.join(f), std::fs::Permissions::from_mode(0o644))
                .expect("chmod identity file");
        }
        name
    }
}

/// `&[String]` as `Vec<&str>`, for the `&[&str]` argument lists.
pub fn strs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

/// Checks that `tools` are installed (like [`ready`]: skip loudly, or fail under `CI=true`), and
/// Python `modules` importable by `python3`.
pub fn have(tools: &[&str], modules: &[&str]) -> bool {
    let mut missing: Vec<String> = tools
        .iter()
        .filter(|t| which(t).is_none())
        .map(|t| format!("`{t}`"))
        .collect();
    for m in modules {
        let ok = Command::new("python3")
            .args(["-c", &format!("import {m}")])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            missing.push(format!("python module `{m}`"));
        }
    }
    if missing.is_empty() {
        return true;
    }
    let msg = format!(
        "\n!!!!! e2e test SKIPPED: missing {} (apt-get install -y tcpdump nghttp2-client \
         nghttp2-server openssl; pip install -r .ci/requirements.txt) !!!!!\n",
        missing.join(", ")
    );
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("{msg} CI=true: e2e tests must run, not skip");
    }
    let _ = std::io::Write::write_all(&mut std::io::stderr(), msg.as_bytes());
    false
}

impl Mesh {
    /// Replaces A's proxy with one started with `args` (the old one is killed first: same ports).
    pub fn restart_proxy_a(&mut self, args: &[&str]) {
        let _ = self.proxy_a.child.kill();
        let _ = self.proxy_a.child.wait();
        let old_log = self.proxy_a.log.with_extension("old.log");
        let _ = std::fs::rename(&self.proxy_a.log, old_log);
        self.proxy_a = self.a.start_proxy(args);
    }
}

/// Polls `/metrics` of `ns` until `name{labels}` is at least `min`; returns the last text.
pub fn wait_metric_at_least(ns: &Netns, name: &str, labels: &[(&str, &str)], min: f64) -> String {
    let mut text = String::new();
    for _ in 0..MAX_POLLS {
        text = ns.metrics();
        if metric(&text, name, labels).is_some_and(|v| v >= min) {
            return text;
        }
        std::thread::sleep(POLL);
    }
    panic!(
        "{name}{labels:?} never reached {min} in {}; last value {:?}:\n{text}",
        ns.name,
        metric(&text, name, labels)
    );
}
