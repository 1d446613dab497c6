//! [`RouteWatch`]: follows the kernel route tables of lab nodes while a test disturbs the
//! cluster. One thread per node enters the node's namespace, dumps podroute's routes (its
//! route protocol only) every `interval`, and reads the kernel's route notifications in
//! between, so that a route deleted and re-added faster than the sampling is still seen.
//!
//! Routes are written as `ip route` prints them with `proto`, `metric` and `linkdown` left
//! out, exactly as [`super::Lab::kernel_routes`] does, so the two compare directly.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::LabError;
use super::netns::spawn_in_namespace;
use crate::dataplane::kernel::{KernelRoute, dump_request};
use crate::dataplane::monitor::{Event, MonitorSocket};
use crate::dataplane::socket::RequestSocket;
use netlink_packet_route::RouteNetlinkMessage;

/// What was seen of one node's table.
#[derive(Debug, Clone, Default)]
pub struct RouteRecord {
    pub node: String,
    /// Table dumps taken.
    pub samples: usize,
    /// The table at the first dump and after every change seen by a dump: (time since the
    /// watch started, routes).
    pub tables: Vec<(Duration, BTreeSet<String>)>,
    /// Routes of ours the kernel announced as removed (`RTM_DELROUTE` notifications).
    pub removed: Vec<(Duration, String)>,
    /// Routes of ours the kernel announced as added or replaced.
    pub added: Vec<(Duration, String)>,
    /// The longest time between two dumps: how fine the sampling really was.
    pub max_interval: Duration,
    /// What went wrong in the watching thread (the watch goes on where it can).
    pub errors: Vec<String>,
}

impl RouteRecord {
    /// The table as last sampled.
    pub fn last(&self) -> BTreeSet<String> {
        self.tables
            .last()
            .map(|(_, t)| t.clone())
            .unwrap_or_default()
    }

    /// Every moment one of `must` was missing: a dump without it, or a removal notification
    /// for it. Empty when every one of them stayed all along.
    pub fn missing(&self, must: &[String]) -> Vec<String> {
        let mut out = Vec::new();
        for (at, table) in &self.tables {
            for want in must.iter().filter(|w| !table.contains(*w)) {
                out.push(format!(
                    "{}: at {at:.3?} the table lacks \"{want}\"",
                    self.node
                ));
            }
        }
        for (at, route) in &self.removed {
            if must.contains(route) {
                out.push(format!(
                    "{}: at {at:.3?} \"{route}\" was deleted",
                    self.node
                ));
            }
        }
        out
    }

    /// When (since the watch started) the first dump for which `holds` is true was taken.
    pub fn first_table(&self, holds: impl Fn(&BTreeSet<String>) -> bool) -> Option<Duration> {
        self.tables
            .iter()
            .find(|(_, table)| holds(table))
            .map(|(at, _)| *at)
    }

    /// When the kernel first announced the removal of a route starting with `prefix`
    /// (`"172.16.196.128/26 "`), at or after `after`.
    pub fn first_removal(&self, prefix: &str, after: Duration) -> Option<Duration> {
        self.removed
            .iter()
            .find(|(at, route)| *at >= after && route.starts_with(prefix))
            .map(|(at, _)| *at)
    }
}

/// Watches the tables of some nodes until [`RouteWatch::stop`] (or drop).
pub struct RouteWatch {
    started: Instant,
    stop: Arc<AtomicBool>,
    records: Vec<Arc<Mutex<RouteRecord>>>,
    threads: Vec<JoinHandle<Result<(), LabError>>>,
}

impl RouteWatch {
    /// Starts one watching thread per `(node, namespace)`; returns once each has taken its
    /// first dump.
    pub(super) fn start(
        nodes: &[(String, String)],
        protocol: u8,
        interval: Duration,
    ) -> Result<RouteWatch, LabError> {
        let started = Instant::now();
        let stop = Arc::new(AtomicBool::new(false));
        let mut watch = RouteWatch {
            started,
            stop: stop.clone(),
            records: Vec::new(),
            threads: Vec::new(),
        };
        for (node, ns) in nodes {
            let record = Arc::new(Mutex::new(RouteRecord {
                node: node.clone(),
                ..RouteRecord::default()
            }));
            watch.records.push(record.clone());
            let stop = stop.clone();
            let thread = spawn_in_namespace(ns, &format!("watch-{node}"), move || {
                follow(&record, &stop, started, protocol, interval)
            })?;
            watch.threads.push(thread);
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while watch.records.iter().any(|r| lock(r).samples == 0) {
            if Instant::now() > deadline {
                let errors: Vec<String> = watch
                    .records
                    .iter()
                    .flat_map(|r| lock(r).errors.clone())
                    .collect();
                return Err(LabError::Spec(format!(
                    "the route watch took no first sample within 10 s: {}",
                    errors.join("; ")
                )));
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        Ok(watch)
    }

    /// When the watch started: the zero of every time in the records.
    pub fn started(&self) -> Instant {
        self.started
    }

    /// Time since the watch started.
    pub fn now(&self) -> Duration {
        self.started.elapsed()
    }

    /// What was seen of `node` so far.
    pub fn record(&self, node: &str) -> Option<RouteRecord> {
        self.records
            .iter()
            .map(|r| lock(r).clone())
            .find(|r| r.node == node)
    }

    /// Stops the threads and returns every node's record.
    pub fn stop(mut self) -> Vec<RouteRecord> {
        self.halt();
        self.records.iter().map(|r| lock(r).clone()).collect()
    }

    fn halt(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        for thread in self.threads.drain(..) {
            match thread.join() {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    if let Some(r) = self.records.first() {
                        lock(r).errors.push(e.to_string());
                    }
                }
                Err(_) => {
                    if let Some(r) = self.records.first() {
                        lock(r).errors.push("a watching thread panicked".into());
                    }
                }
            }
        }
    }
}

impl Drop for RouteWatch {
    fn drop(&mut self) {
        self.halt();
    }
}

fn lock(r: &Mutex<RouteRecord>) -> std::sync::MutexGuard<'_, RouteRecord> {
    r.lock().unwrap_or_else(|e| e.into_inner())
}

/// The watching loop of one node (runs inside its namespace).
fn follow(
    record: &Mutex<RouteRecord>,
    stop: &AtomicBool,
    started: Instant,
    protocol: u8,
    interval: Duration,
) {
    // The monitor first: nothing between it and the first dump goes unseen.
    let mut monitor = match MonitorSocket::open() {
        Ok(m) => Some(m),
        Err(e) => {
            lock(record).errors.push(format!("route monitor: {e}"));
            None
        }
    };
    let mut socket = match RequestSocket::open(1) {
        Ok(s) => s,
        Err(e) => {
            lock(record).errors.push(format!("netlink socket: {e}"));
            return;
        }
    };
    let mut names: BTreeMap<u32, String> = BTreeMap::new();
    let mut events = Vec::new();
    let mut last_dump: Option<Instant> = None;
    let mut next = Instant::now();
    while !stop.load(Ordering::SeqCst) {
        if let Some(m) = monitor.as_mut() {
            events.clear();
            let result = m.drain(&mut events);
            let at = started.elapsed();
            let mut r = lock(record);
            if let Err(e) = result {
                r.errors.push(format!("route monitor: {e}"));
            }
            for event in &events {
                match event {
                    Event::RouteRemoved(route) if route.protocol == protocol => {
                        r.removed.push((at, route_line(route, &mut names)));
                    }
                    Event::RouteAdded { route, .. } if route.protocol == protocol => {
                        r.added.push((at, route_line(route, &mut names)));
                    }
                    Event::Overrun => r
                        .errors
                        .push(format!("route notifications lost at {at:.3?}")),
                    _ => {}
                }
            }
        }
        match socket.dump(dump_request(protocol)) {
            Ok(messages) => {
                let now = Instant::now();
                let at = now.duration_since(started);
                let table: BTreeSet<String> = messages
                    .iter()
                    .filter_map(|m| match m {
                        RouteNetlinkMessage::NewRoute(msg) => KernelRoute::from_message(msg),
                        _ => None,
                    })
                    .filter(|route| route.protocol == protocol)
                    .map(|route| route_line(&route, &mut names))
                    .collect();
                let mut r = lock(record);
                r.samples += 1;
                if let Some(prev) = last_dump {
                    r.max_interval = r.max_interval.max(now.duration_since(prev));
                }
                last_dump = Some(now);
                if r.tables.last().is_none_or(|(_, t)| *t != table) {
                    r.tables.push((at, table));
                }
            }
            Err(e) => {
                let at = started.elapsed();
                lock(record).errors.push(format!("dump at {at:.3?}: {e}"));
            }
        }
        next += interval;
        let now = Instant::now();
        if next > now {
            std::thread::sleep(next - now);
        } else {
            next = now;
        }
    }
}

/// A route as `ip route` prints it, without `proto`, `metric` and `linkdown`.
fn route_line(route: &KernelRoute, names: &mut BTreeMap<u32, String>) -> String {
    let mut s = String::new();
    match route.kind {
        6 => s.push_str("blackhole "),
        7 => s.push_str("unreachable "),
        8 => s.push_str("prohibit "),
        _ => {}
    }
    let dst = route.key.dst;
    if dst.prefix_len() == dst.max_prefix_len() {
        s.push_str(&dst.addr().to_string());
    } else {
        s.push_str(&dst.to_string());
    }
    if let Some(gw) = route.gateway {
        s.push_str(&format!(" via {gw}"));
    }
    if let Some(oif) = route.oif {
        s.push_str(&format!(" dev {}", interface_name(oif, names)));
    }
    if route.scope == 253 && route.kind != 6 {
        s.push_str(" scope link");
    }
    if route.onlink {
        s.push_str(" onlink");
    }
    if route.key.priority != 0 && route.key.priority != 1024 {
        s.push_str(&format!(" metric {}", route.key.priority));
    }
    s
}

/// The name of interface `index` in the calling thread's namespace (cached).
fn interface_name(index: u32, names: &mut BTreeMap<u32, String>) -> String {
    if let Some(name) = names.get(&index) {
        return name.clone();
    }
    let mut buf = [0u8; libc::IF_NAMESIZE];
    // SAFETY: the buffer holds IF_NAMESIZE bytes, as if_indextoname requires.
    let p = unsafe { libc::if_indextoname(index, buf.as_mut_ptr().cast()) };
    if p.is_null() {
        return format!("if{index}");
    }
    let end = buf.iter().position(|b| *b == 0).unwrap_or(buf.len());
    let name = String::from_utf8_lossy(&buf[..end]).into_owned();
    names.insert(index, name.clone());
    name
}
