//! BIRD 2 under test: config generation, start/kill/restart, `birdc` queries.
//!
//! Config choices (see `render`):
//! - `strict bind on` + `local ADDR port PORT`: listen only on the test's loopback address.
//! - `multihop` on every session: BIRD refuses a "direct" eBGP neighbour on `lo`
//!   ("Invalid remote address"), so sessions are multihop, which makes next hops recursive;
//!   they resolve through private IGP tables `igp4`/`igp6` that hold only
//!   `0.0.0.0/0 via "lo"` / `::/0 via "lo"`, so every learned route is `unicast dev lo`
//!   instead of `unreachable`. No kernel protocol: nothing is written to the host's routes.
//! - `next hop address` on both channels: IPv4 = `nh_v4` (GoBGP rejects loopback next hops),
//!   IPv6 = `nh_v6` (an IPv6 channel on an IPv4 session has no IPv6 source address: without
//!   it BIRD logs "Missing next hop address" and withdraws every IPv6 route it would send).
//! - `import all; export all;` on both channels: BIRD 2 has no default for eBGP and rejects
//!   everything without explicit filters (RFC 8212 style); iBGP would default to import all,
//!   export none.
//! - Short timers for tests: `connect delay time 1`, `connect retry time 2`,
//!   `error wait time 1, 5` (default 60..300 s after an error, e.g. a bad peer AS).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use super::proc::Daemon;
use super::{Endpoint, HarnessError, IpNet, Result, Route, WorkDir, err, tail_file, tool};

/// One BGP neighbour of BIRD (`protocol bgp NAME`).
#[derive(Clone, Debug)]
pub struct PeerCfg {
    /// BIRD protocol name: letters, digits, underscore; must start with a letter and must
    /// not be a BIRD keyword (`rr`, `bgp`, `static`, `ipv4`, `peer`, ... are rejected by
    /// `bird -p` with "syntax error, unexpected RR").
    pub name: String,
    pub addr: Ipv4Addr,
    pub port: u16,
    pub remote_as: u32,
    /// `passive on`: never connect, only accept.
    pub passive: bool,
    /// Hold time in seconds (BIRD: 0 or >= 3); keepalive = hold/3 (BIRD default).
    pub hold: u16,
    /// `graceful restart on` (time `gr_time`) or `graceful restart off`.
    pub graceful_restart: bool,
    pub gr_time: u16,
    /// `rr client` (iBGP only) with `rr cluster id` = BIRD's router id.
    pub rr_client: bool,
    /// `next hop self` on the channels (iBGP: rewrite next hop of reflected/learned routes).
    pub next_hop_self: bool,
    pub ipv4: bool,
    pub ipv6: bool,
    /// Extra lines pasted verbatim inside the `protocol bgp` block.
    pub extra: String,
}

impl PeerCfg {
    /// Defaults: active, hold 30, GR on (120 s), IPv4 and IPv6, no RR client.
    pub fn new(name: &str, peer: &Endpoint, remote_as: u32) -> PeerCfg {
        PeerCfg {
            name: name.to_string(),
            addr: peer.addr,
            port: peer.port,
            remote_as,
            passive: false,
            hold: 30,
            graceful_restart: true,
            gr_time: 120,
            rr_client: false,
            next_hop_self: false,
            ipv4: true,
            ipv6: true,
            extra: String::new(),
        }
    }
}

#[derive(Clone, Debug)]
pub struct BirdConfig {
    pub endpoint: Endpoint,
    pub router_id: Ipv4Addr,
    pub local_as: u32,
    pub peers: Vec<PeerCfg>,
    /// Announced as `route P blackhole;` from static protocols `s4`/`s6`.
    pub static_v4: Vec<IpNet>,
    pub static_v6: Vec<IpNet>,
    /// Extra lines pasted verbatim at the top level (e.g. `graceful restart wait 10;`).
    pub global_extra: String,
}

impl BirdConfig {
    pub fn new(endpoint: Endpoint, local_as: u32) -> BirdConfig {
        BirdConfig {
            endpoint,
            router_id: endpoint.router_id(),
            local_as,
            peers: Vec::new(),
            static_v4: Vec::new(),
            static_v6: Vec::new(),
            global_extra: String::new(),
        }
    }

    pub fn peer(mut self, p: PeerCfg) -> BirdConfig {
        self.peers.push(p);
        self
    }

    /// The full bird.conf text for this config (log file path given).
    pub fn render(&self, log: &std::path::Path) -> String {
        let ep = &self.endpoint;
        let mut s = String::new();
        s += &format!("log \"{}\" all;\n", log.display());
        s += &format!("router id {};\n", self.router_id);
        s += "debug protocols { states, events };\n";
        s += &self.global_extra;
        s += "protocol device { scan time 10; }\n";
        s += "ipv4 table igp4;\nipv6 table igp6;\n";
        s += "protocol static igp4s { ipv4 { table igp4; }; route 0.0.0.0/0 via \"lo\"; }\n";
        s += "protocol static igp6s { ipv6 { table igp6; }; route ::/0 via \"lo\"; }\n";
        s += "protocol static s4 {\n  ipv4;\n";
        for p in &self.static_v4 {
            s += &format!("  route {p} blackhole;\n");
        }
        s += "}\nprotocol static s6 {\n  ipv6;\n";
        for p in &self.static_v6 {
            s += &format!("  route {p} blackhole;\n");
        }
        s += "}\n";
        for p in &self.peers {
            s += &format!("protocol bgp {} {{\n", p.name);
            s += &format!(
                "  local {} port {} as {};\n",
                ep.addr, ep.port, self.local_as
            );
            s += &format!(
                "  neighbor {} port {} as {};\n",
                p.addr, p.port, p.remote_as
            );
            s += "  strict bind on;\n  multihop;\n";
            s += &format!("  passive {};\n", if p.passive { "on" } else { "off" });
            s += &format!("  hold time {};\n", p.hold);
            if p.hold == 0 {
                s += "  keepalive time 0;\n";
            }
            s += "  connect delay time 1;\n  connect retry time 2;\n  error wait time 1, 5;\n";
            if p.graceful_restart {
                s += &format!(
                    "  graceful restart on;\n  graceful restart time {};\n",
                    p.gr_time
                );
            } else {
                s += "  graceful restart off;\n";
            }
            if p.rr_client {
                s += &format!("  rr client;\n  rr cluster id {};\n", self.router_id);
            }
            let nhs = if p.next_hop_self {
                " next hop self;"
            } else {
                ""
            };
            if p.ipv4 {
                s += &format!(
                    "  ipv4 {{ import all; export all; next hop address {};{nhs} igp table igp4; }};\n",
                    ep.nh_v4
                );
            }
            if p.ipv6 {
                s += &format!(
                    "  ipv6 {{ import all; export all; next hop address {};{nhs} igp table igp6; }};\n",
                    ep.nh_v6
                );
            }
            s += &p.extra;
            s += "}\n";
        }
        s
    }
}

/// A running BIRD. Killed on drop.
pub struct Bird {
    pub cfg: BirdConfig,
    dir: WorkDir,
    daemon: Option<Daemon>,
    /// Start with `-R` (graceful restart recovery: BIRD restarted and kept forwarding state).
    recovery: bool,
}

impl Bird {
    /// Write the config, check it (`bird -p`), start `bird -f`, wait for the control socket.
    pub fn start(cfg: BirdConfig) -> Result<Bird> {
        let dir = WorkDir::new("podroute-bird-");
        let mut b = Bird {
            cfg,
            dir,
            daemon: None,
            recovery: false,
        };
        b.write_config()?;
        b.spawn()?;
        Ok(b)
    }

    pub fn dir(&self) -> PathBuf {
        self.dir.path.clone()
    }
    pub fn conf_path(&self) -> PathBuf {
        self.dir.file("bird.conf")
    }
    pub fn socket_path(&self) -> PathBuf {
        self.dir.file("bird.ctl")
    }
    pub fn log_path(&self) -> PathBuf {
        self.dir.file("bird.log")
    }
    fn out_path(&self) -> PathBuf {
        self.dir.file("bird.out")
    }
    pub fn endpoint(&self) -> Endpoint {
        self.cfg.endpoint
    }

    fn write_config(&self) -> Result<()> {
        let text = self.cfg.render(&self.log_path());
        std::fs::write(self.conf_path(), &text)
            .map_err(|e| HarnessError(format!("write bird.conf: {e}")))?;
        let out = Command::new(tool("bird"))
            .arg("-p")
            .arg("-c")
            .arg(self.conf_path())
            .output()
            .map_err(|e| HarnessError(format!("bird -p: {e}")))?;
        if !out.status.success() {
            return err(format!(
                "bird rejected its config: {}{}\n--- bird.conf ---\n{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr),
                numbered(&text)
            ));
        }
        Ok(())
    }

    fn spawn(&mut self) -> Result<()> {
        let _ = std::fs::remove_file(self.socket_path());
        let mut args: Vec<String> = vec![
            "-f".into(),
            "-c".into(),
            self.conf_path().display().to_string(),
            "-s".into(),
            self.socket_path().display().to_string(),
            "-P".into(),
            self.dir.file("bird.pid").display().to_string(),
        ];
        if self.recovery {
            args.push("-R".into());
        }
        self.daemon = Some(Daemon::spawn(
            "bird",
            &tool("bird"),
            &args,
            &self.out_path(),
        )?);
        super::wait_for(
            Duration::from_secs(10),
            "BIRD control socket",
            || {
                self.birdc(&["show", "status"])
                    .map(|s| s.contains("Daemon is up"))
                    .unwrap_or(false)
            },
            || self.diag(),
        )
    }

    pub fn is_running(&self) -> bool {
        self.daemon.as_ref().is_some_and(|d| d.is_running())
    }

    /// SIGKILL (a crash: no NOTIFICATION is sent, the peer sees the TCP close).
    pub fn kill(&mut self) {
        if let Some(mut d) = self.daemon.take() {
            d.kill();
        }
    }

    /// Graceful shutdown (SIGTERM): BIRD sends Cease/Administrative Shutdown to its peers.
    pub fn stop(&mut self) {
        if let Some(mut d) = self.daemon.take() {
            d.stop(Duration::from_secs(5));
        }
    }

    /// Kill (if running) and start again with the same config and addresses.
    pub fn restart(&mut self) -> Result<()> {
        self.kill();
        self.write_config()?;
        self.spawn()
    }

    /// `birdc graceful restart`: BIRD exits without a NOTIFICATION to its peers (they see
    /// the TCP session close and, as graceful restart helpers, keep its routes). Waits until
    /// the process is gone.
    pub fn graceful_restart_exit(&mut self) -> Result<()> {
        let out = self.birdc(&["graceful", "restart"])?;
        if !out.contains("Graceful restart requested") {
            return err(format!("birdc graceful restart: {out}"));
        }
        super::wait_for(
            Duration::from_secs(10),
            "BIRD to exit after graceful restart",
            || !self.is_running(),
            || self.diag(),
        )?;
        self.kill();
        Ok(())
    }

    /// Start again (after [`Bird::graceful_restart_exit`] or [`Bird::kill`]) with the current
    /// `cfg`, in graceful restart recovery (`bird -R`): BIRD sets the Restart State bit and
    /// the Forwarding State bits, and defers its route selection (bounded by the global
    /// `graceful restart wait`).
    pub fn start_recovering(&mut self) -> Result<()> {
        self.kill();
        self.write_config()?;
        self.recovery = true;
        let r = self.spawn();
        self.recovery = false;
        r
    }

    /// The "Neighbor capabilities" section of `show protocols all NAME` (what the peer
    /// announced in its OPEN: e.g. "Restart recovery", "AF preserved: ipv4 ipv6").
    pub fn neighbor_capabilities(&self, peer: &str) -> String {
        let Ok(info) = self.protocol_info(peer) else {
            return String::new();
        };
        let Some(i) = info.find("Neighbor capabilities") else {
            return String::new();
        };
        let rest = &info[i..];
        let end = rest.find("Session:").unwrap_or(rest.len());
        rest[..end].to_string()
    }

    /// BIRD is a graceful restart helper for `peer` right now ("Neighbor graceful restart
    /// active": it keeps the peer's routes as stale).
    pub fn helping(&self, peer: &str) -> bool {
        self.protocol_info(peer)
            .is_ok_and(|s| s.contains("Neighbor graceful restart active"))
    }

    /// Run `birdc -s SOCK args...`; returns stdout without the "BIRD x.y ready." banner.
    pub fn birdc(&self, args: &[&str]) -> Result<String> {
        let out = Command::new(tool("birdc"))
            .arg("-s")
            .arg(self.socket_path())
            .args(args)
            .output()
            .map_err(|e| HarnessError(format!("birdc: {e}")))?;
        let stdout = String::from_utf8_lossy(&out.stdout).to_string();
        if !out.status.success() || stdout.contains("Unable to connect to server") {
            return err(format!(
                "birdc {args:?} failed: {stdout}{}",
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        Ok(stdout
            .lines()
            .filter(|l| !l.starts_with("BIRD ") || !l.ends_with(" ready."))
            .collect::<Vec<_>>()
            .join("\n"))
    }

    /// Rewrite the config from `self.cfg` and `birdc configure`.
    pub fn reconfigure(&mut self) -> Result<()> {
        self.write_config()?;
        let out = self.birdc(&["configure"])?;
        if out.contains("Reconfigured") || out.contains("Reconfiguration in progress") {
            Ok(())
        } else {
            err(format!("birdc configure: {out}"))
        }
    }

    /// Announce `prefix` (v4 or v6) as a static blackhole route.
    pub fn add_static(&mut self, prefix: IpNet) -> Result<()> {
        let list = match prefix {
            IpNet::V4(_) => &mut self.cfg.static_v4,
            IpNet::V6(_) => &mut self.cfg.static_v6,
        };
        if !list.contains(&prefix) {
            list.push(prefix);
        }
        self.reconfigure()
    }

    pub fn remove_static(&mut self, prefix: IpNet) -> Result<()> {
        self.cfg.static_v4.retain(|p| *p != prefix);
        self.cfg.static_v6.retain(|p| *p != prefix);
        self.reconfigure()
    }

    /// `show protocols all NAME` verbatim.
    pub fn protocol_info(&self, peer: &str) -> Result<String> {
        self.birdc(&["show", "protocols", "all", peer])
    }

    /// BGP state of a peer: "Idle", "Connect", "Active", "OpenSent", "OpenConfirm",
    /// "Established", or "Down" (protocol down/disabled); "" if BIRD can't be asked.
    pub fn protocol_state(&self, peer: &str) -> String {
        self.protocol_info(peer)
            .ok()
            .and_then(|s| field(&s, "BGP state:"))
            .unwrap_or_default()
    }

    /// The "Last error" of a peer, e.g. "BGP Error: Bad peer AS" (sent by BIRD) or
    /// "Received: Bad peer AS" (NOTIFICATION received); None if there is none.
    pub fn last_error(&self, peer: &str) -> Option<String> {
        self.protocol_info(peer)
            .ok()
            .and_then(|s| field(&s, "Last error:"))
    }

    /// Negotiated hold time (from "Hold timer: 22.074/30"), while Established.
    pub fn negotiated_hold(&self, peer: &str) -> Option<u32> {
        let info = self.protocol_info(peer).ok()?;
        field(&info, "Hold timer:")?
            .rsplit('/')
            .next()?
            .trim()
            .parse()
            .ok()
    }

    /// Whether the neighbour advertised a capability, by BIRD's name in "Neighbor
    /// capabilities" (e.g. "Graceful restart", "4-octet AS numbers", "Route refresh").
    pub fn neighbor_has_capability(&self, peer: &str, cap: &str) -> bool {
        let Ok(info) = self.protocol_info(peer) else {
            return false;
        };
        let Some(i) = info.find("Neighbor capabilities") else {
            return false;
        };
        let rest = &info[i..];
        let end = rest.find("Session:").unwrap_or(rest.len());
        rest[..end]
            .lines()
            .any(|l| l.trim() == cap || l.trim().starts_with(&format!("{cap}:")))
    }

    pub fn wait_established(&self, peer: &str, timeout: Duration) -> Result<()> {
        self.wait_state(peer, "Established", timeout)
    }

    pub fn wait_state(&self, peer: &str, state: &str, timeout: Duration) -> Result<()> {
        super::wait_for(
            timeout,
            &format!("BIRD {peer} to be {state}"),
            || self.protocol_state(peer) == state,
            || self.diag_peer(peer),
        )
    }

    pub fn routes_v4(&self) -> Result<Vec<Route>> {
        self.routes("master4")
    }
    pub fn routes_v6(&self) -> Result<Vec<Route>> {
        self.routes("master6")
    }

    /// All routes (all paths, best and not) of a table, from `show route all table T`.
    pub fn routes(&self, table: &str) -> Result<Vec<Route>> {
        let out = self.birdc(&["show", "route", "all", "table", table])?;
        Ok(parse_show_route_all(&out))
    }

    /// Routes (v4 or v6 table by the prefix's family) whose prefix equals `prefix`.
    pub fn route(&self, prefix: IpNet) -> Result<Vec<Route>> {
        let all = match prefix {
            IpNet::V4(_) => self.routes_v4()?,
            IpNet::V6(_) => self.routes_v6()?,
        };
        Ok(all.into_iter().filter(|r| r.prefix == prefix).collect())
    }

    /// Wait until a route for `prefix` learned from protocol `from` is present and return it.
    pub fn wait_route(&self, prefix: IpNet, from: &str, timeout: Duration) -> Result<Route> {
        super::wait_until(
            timeout,
            &format!("BIRD to have {prefix} from {from}"),
            || {
                self.route(prefix)
                    .ok()?
                    .into_iter()
                    .find(|r| r.from_protocol == from)
            },
            || self.diag(),
        )
    }

    /// Wait until no route for `prefix` from protocol `from` is present.
    pub fn wait_no_route(&self, prefix: IpNet, from: &str, timeout: Duration) -> Result<()> {
        super::wait_for(
            timeout,
            &format!("BIRD to lose {prefix} from {from}"),
            || {
                self.route(prefix)
                    .is_ok_and(|rs| rs.iter().all(|r| r.from_protocol != from))
            },
            || self.diag(),
        )
    }

    pub fn log_tail(&self, n: usize) -> String {
        tail_file(&self.log_path(), n)
    }

    /// Everything useful for a failure message.
    pub fn diag(&self) -> String {
        format!(
            "--- BIRD {} (dir {}, running: {}) show protocols ---\n{}\n--- bird.log tail ---\n{}\n--- bird stdout/stderr ---\n{}",
            self.cfg.endpoint.addr,
            self.dir.path.display(),
            self.is_running(),
            self.birdc(&["show", "protocols"]).unwrap_or_else(|e| e.0),
            self.log_tail(30),
            tail_file(&self.out_path(), 10),
        )
    }

    fn diag_peer(&self, peer: &str) -> String {
        format!(
            "--- BIRD show protocols all {peer} ---\n{}\n{}",
            self.protocol_info(peer).unwrap_or_else(|e| e.0),
            self.diag()
        )
    }
}

impl Drop for Bird {
    fn drop(&mut self) {
        self.kill();
    }
}

fn numbered(text: &str) -> String {
    text.lines()
        .enumerate()
        .map(|(i, l)| format!("{:3} {l}\n", i + 1))
        .collect()
}

/// Value after `key` on the first line containing it (trimmed).
fn field(text: &str, key: &str) -> Option<String> {
    text.lines().find_map(|l| {
        let i = l.find(key)?;
        let v = l[i + key.len()..].trim();
        (!v.is_empty()).then(|| v.to_string())
    })
}

/// Parse `birdc show route all` output (BIRD 2.0.x). A route starts with a line
/// `PREFIX  DEST [PROTO TIME from ADDR] * (PREF) [ASx]`; further paths for the same prefix
/// start with whitespace then DEST; tab-indented lines that follow are attributes
/// (`BGP.next_hop: ...`, `BGP.as_path: ...`, `BGP.community: (a,b) ...`).
pub fn parse_show_route_all(out: &str) -> Vec<Route> {
    let mut routes: Vec<Route> = Vec::new();
    let mut cur_prefix: Option<IpNet> = None;
    for line in out.lines() {
        if line.trim().is_empty() || line.starts_with("Table ") {
            continue;
        }
        if line.starts_with('\t') {
            let Some(r) = routes.last_mut() else { continue };
            let l = line.trim();
            if let Some(v) = l.strip_prefix("BGP.next_hop:") {
                r.next_hop = v.split_whitespace().next().and_then(|a| a.parse().ok());
            } else if let Some(v) = l.strip_prefix("BGP.as_path:") {
                r.as_path = v
                    .split(|c: char| !c.is_ascii_digit())
                    .filter(|t| !t.is_empty())
                    .filter_map(|t| t.parse().ok())
                    .collect();
            } else if let Some(v) = l.strip_prefix("BGP.community:") {
                r.communities = v
                    .split(')')
                    .filter_map(|t| {
                        let t = t.trim().trim_start_matches('(');
                        let (a, b) = t.split_once(',')?;
                        Some((a.trim().parse().ok()?, b.trim().parse().ok()?))
                    })
                    .collect();
            } else if let Some(v) = l.strip_prefix("BGP.local_pref:") {
                r.local_pref = v.trim().parse().ok();
            } else if let Some(v) = l.strip_prefix("BGP.med:") {
                r.med = v.trim().parse().ok();
            }
            continue;
        }
        // Route line: either "PREFIX rest" or "   rest" (another path for the same prefix).
        let rest = if line.starts_with(' ') {
            line.trim_start()
        } else {
            let (p, rest) = line.split_once(char::is_whitespace).unwrap_or((line, ""));
            cur_prefix = super::prefix_of(p);
            rest.trim_start()
        };
        let Some(prefix) = cur_prefix else { continue };
        let Some(open) = rest.find('[') else { continue };
        let proto = rest[open + 1..]
            .split_whitespace()
            .next()
            .unwrap_or("")
            .to_string();
        let best = rest[open..].contains("] *") || rest.contains(" * (");
        routes.push(Route {
            prefix,
            next_hop: None,
            as_path: Vec::new(),
            communities: Vec::new(),
            local_pref: None,
            med: None,
            from_protocol: proto.trim_end_matches(']').to_string(),
            best,
        });
    }
    routes
}

/// Helper for tests: parse an address that must be valid.
pub fn ip(s: &str) -> IpAddr {
    s.parse().expect("ip address")
}

pub fn v6(s: &str) -> Ipv6Addr {
    s.parse().expect("ipv6 address")
}
