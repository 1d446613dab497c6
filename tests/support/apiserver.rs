//! A small in-process Kubernetes API server for tests: it speaks enough of the list/watch
//! protocol for the real `kube::Client` and kube-rs watchers.
//!
//! - `GET <collection>` lists with the current `resourceVersion` (ignores `limit`, never
//!   returns `continue`);
//! - `GET <collection>?watch=true&resourceVersion=N` streams chunked JSON watch events
//!   (`ADDED`, `MODIFIED`, `DELETED`, `BOOKMARK`), replaying the history after `N` first; a
//!   version older than the compacted history gets an `ERROR` event with code 410 (Gone),
//!   as a real API server sends it;
//! - `GET <collection>/<name>` returns one object;
//! - `PATCH <collection>/<name>` with `application/merge-patch+json` merges (RFC 7386) into
//!   the stored object, bumps its resourceVersion and tells watchers (`MODIFIED`);
//!   `application/strategic-merge-patch+json` does the same except that the lists Kubernetes
//!   merges by key (`conditions` and `addresses` by `type`) merge entry by entry;
//!   `PATCH <collection>/<name>/status` patches the same object (the status subresource);
//! - `PUT <collection>/<name>` replaces an object; a `metadata.resourceVersion` in the body
//!   other than the stored one is refused with 409 Conflict (compare-and-swap, as etcd does);
//! - `POST <collection>` creates (409 AlreadyExists when the name is taken);
//!   `DELETE <collection>/<name>` deletes;
//! - collections are any path; objects are stored per path as JSON.
//!
//! The test controls it: [`FakeApiServer::apply`] / [`FakeApiServer::delete`] change objects
//! and notify watchers, the `*_unseen` variants change them without telling watchers (missed
//! events), [`FakeApiServer::expire_watches`] compacts the history and sends 410 to every
//! watch, [`FakeApiServer::drop_connections`] cuts every connection, and
//! [`FakeApiServer::stop`] / [`FakeApiServer::restart`] take the server off and back on the
//! same port with its data kept. Traffic stays on 127.0.0.1.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use kube::Resource;
use serde::Serialize;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::broadcast;
use tokio::task::JoinHandle;

/// One change, as kept in the history and sent to watchers.
#[derive(Debug, Clone)]
struct Change {
    rv: u64,
    path: String,
    kind: &'static str,
    object: Value,
}

/// What live watchers are told.
#[derive(Debug, Clone)]
enum Signal {
    Change(Arc<Change>),
    Bookmark,
    Expire,
}

#[derive(Debug, Default)]
struct Data {
    rv: u64,
    collections: HashMap<String, BTreeMap<String, Value>>,
    history: Vec<Arc<Change>>,
    /// Watches from a version below this get 410 Gone.
    oldest_watchable: u64,
    lists: HashMap<String, usize>,
    watches: HashMap<String, usize>,
    /// Bodies of the `PATCH` requests received, per collection path.
    patches: HashMap<String, Vec<Value>>,
    /// Writes (`PUT`) refused with 409 Conflict, per collection path.
    conflicts: HashMap<String, usize>,
    /// Merge patches applied to an object (watchers told) just before the next `PUT` to it is
    /// handled: a concurrent writer that wins the race.
    interfere: HashMap<String, Vec<Value>>,
}

#[derive(Debug)]
struct Shared {
    data: Mutex<Data>,
    signals: broadcast::Sender<Signal>,
    connections: Mutex<Vec<JoinHandle<()>>>,
}

/// The fake API server. Dropping it stops it.
#[derive(Debug)]
pub struct FakeApiServer {
    addr: SocketAddr,
    shared: Arc<Shared>,
    acceptor: Option<JoinHandle<()>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The collection path of a resource type, e.g. `/apis/crd.projectcalico.org/v1/ippools`.
pub fn path_of<K: Resource<DynamicType = ()>>() -> String {
    K::url_path(&(), None)
}

impl FakeApiServer {
    /// Starts on a random port of 127.0.0.1.
    pub async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (signals, _) = broadcast::channel(1024);
        let shared = Arc::new(Shared {
            data: Mutex::new(Data {
                rv: 1,
                ..Data::default()
            }),
            signals,
            connections: Mutex::new(Vec::new()),
        });
        let acceptor = Some(tokio::spawn(accept(listener, shared.clone())));
        Self {
            addr,
            shared,
            acceptor,
        }
    }

    /// Starts on a listener the caller made, e.g. bound inside a network namespace by a
    /// thread that entered it (a socket stays in the namespace it was made in). Must be called
    /// inside a tokio runtime.
    pub fn start_with(listener: std::net::TcpListener) -> Self {
        listener.set_nonblocking(true).unwrap();
        let listener = TcpListener::from_std(listener).unwrap();
        let addr = listener.local_addr().unwrap();
        let (signals, _) = broadcast::channel(1024);
        let shared = Arc::new(Shared {
            data: Mutex::new(Data {
                rv: 1,
                ..Data::default()
            }),
            signals,
            connections: Mutex::new(Vec::new()),
        });
        let acceptor = Some(tokio::spawn(accept(listener, shared.clone())));
        Self {
            addr,
            shared,
            acceptor,
        }
    }

    /// Like [`restart`](Self::restart), on a listener the caller made (see
    /// [`start_with`](Self::start_with)); it should be bound to [`addr`](Self::addr).
    pub async fn restart_with(&mut self, listener: std::net::TcpListener) {
        self.stop().await;
        listener.set_nonblocking(true).unwrap();
        let listener = TcpListener::from_std(listener).unwrap();
        self.acceptor = Some(tokio::spawn(accept(listener, self.shared.clone())));
    }

    /// The address it listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// A real `kube::Client` for this server.
    pub fn client(&self) -> kube::Client {
        let config = kube::Config::new(self.url().parse().unwrap());
        kube::Client::try_from(config).unwrap()
    }

    /// Registers an (empty) collection so that it lists as empty instead of 404.
    pub fn serve<K: Resource<DynamicType = ()>>(&self) {
        lock(&self.shared.data)
            .collections
            .entry(path_of::<K>())
            .or_default();
    }

    /// Creates or replaces `obj` and tells watchers (`ADDED`/`MODIFIED`). Returns the new
    /// resourceVersion.
    pub fn apply<K: Resource<DynamicType = ()> + Serialize>(&self, obj: &K) -> u64 {
        self.change::<K>(obj, true)
    }

    /// Like [`apply`](Self::apply) but watchers are not told (a missed event).
    pub fn apply_unseen<K: Resource<DynamicType = ()> + Serialize>(&self, obj: &K) -> u64 {
        self.change::<K>(obj, false)
    }

    /// Deletes an object by name and tells watchers.
    pub fn delete<K: Resource<DynamicType = ()>>(&self, name: &str) -> bool {
        self.remove::<K>(name, true)
    }

    /// Deletes an object without telling watchers (a missed event).
    pub fn delete_unseen<K: Resource<DynamicType = ()>>(&self, name: &str) -> bool {
        self.remove::<K>(name, false)
    }

    fn change<K: Resource<DynamicType = ()> + Serialize>(&self, obj: &K, tell: bool) -> u64 {
        let mut object = serde_json::to_value(obj).unwrap();
        object["apiVersion"] = json!(K::api_version(&()));
        object["kind"] = json!(K::kind(&()));
        let name = object["metadata"]["name"].as_str().unwrap().to_string();
        let path = path_of::<K>();
        let mut data = lock(&self.shared.data);
        data.rv += 1;
        let rv = data.rv;
        object["metadata"]["resourceVersion"] = json!(rv.to_string());
        let collection = data.collections.entry(path.clone()).or_default();
        let kind = if collection.contains_key(&name) {
            "MODIFIED"
        } else {
            "ADDED"
        };
        collection.insert(name, object.clone());
        let change = Arc::new(Change {
            rv,
            path,
            kind,
            object,
        });
        data.history.push(change.clone());
        drop(data);
        if tell {
            let _ = self.shared.signals.send(Signal::Change(change));
        }
        rv
    }

    fn remove<K: Resource<DynamicType = ()>>(&self, name: &str, tell: bool) -> bool {
        let path = path_of::<K>();
        let mut data = lock(&self.shared.data);
        let Some(mut object) = data.collections.get_mut(&path).and_then(|c| c.remove(name)) else {
            return false;
        };
        data.rv += 1;
        let rv = data.rv;
        object["metadata"]["resourceVersion"] = json!(rv.to_string());
        let change = Arc::new(Change {
            rv,
            path,
            kind: "DELETED",
            object,
        });
        data.history.push(change.clone());
        drop(data);
        if tell {
            let _ = self.shared.signals.send(Signal::Change(change));
        }
        true
    }

    /// Forgets the history (as etcd compaction does) and sends `ERROR` 410 to every watch:
    /// watchers must relist.
    pub fn expire_watches(&self) {
        let mut data = lock(&self.shared.data);
        data.oldest_watchable = data.rv + 1;
        data.history.clear();
        drop(data);
        let _ = self.shared.signals.send(Signal::Expire);
    }

    /// Forgets the history without telling anyone: the next watch that resumes from an
    /// older version gets 410.
    pub fn compact(&self) {
        let mut data = lock(&self.shared.data);
        data.oldest_watchable = data.rv + 1;
        data.history.clear();
    }

    /// Sends a `BOOKMARK` with the current resourceVersion to every watch.
    pub fn bookmark(&self) {
        let _ = self.shared.signals.send(Signal::Bookmark);
    }

    /// Cuts every open connection (the listener keeps accepting).
    pub fn drop_connections(&self) {
        for conn in lock(&self.shared.connections).drain(..) {
            conn.abort();
        }
    }

    /// Stops listening and cuts every connection; the data stays for [`restart`].
    pub async fn stop(&mut self) {
        if let Some(acceptor) = self.acceptor.take() {
            acceptor.abort();
            let _ = acceptor.await;
        }
        self.drop_connections();
    }

    /// Listens again on the same port.
    pub async fn restart(&mut self) {
        self.stop().await;
        let mut last_error = None;
        for _ in 0..50 {
            match TcpListener::bind(self.addr).await {
                Ok(listener) => {
                    self.acceptor = Some(tokio::spawn(accept(listener, self.shared.clone())));
                    return;
                }
                Err(e) => {
                    last_error = Some(e);
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
        panic!("cannot listen on {} again: {last_error:?}", self.addr);
    }

    /// How many list requests a collection has served.
    pub fn list_count<K: Resource<DynamicType = ()>>(&self) -> usize {
        lock(&self.shared.data)
            .lists
            .get(&path_of::<K>())
            .copied()
            .unwrap_or(0)
    }

    /// How many watch requests a collection has served.
    pub fn watch_count<K: Resource<DynamicType = ()>>(&self) -> usize {
        lock(&self.shared.data)
            .watches
            .get(&path_of::<K>())
            .copied()
            .unwrap_or(0)
    }

    /// The bodies of the `PATCH` requests a collection has received (also refused ones).
    pub fn patches<K: Resource<DynamicType = ()>>(&self) -> Vec<Value> {
        lock(&self.shared.data)
            .patches
            .get(&path_of::<K>())
            .cloned()
            .unwrap_or_default()
    }

    /// How many `PUT`s to a collection were refused with 409 Conflict.
    pub fn conflicts<K: Resource<DynamicType = ()>>(&self) -> usize {
        lock(&self.shared.data)
            .conflicts
            .get(&path_of::<K>())
            .copied()
            .unwrap_or(0)
    }

    /// The stored object `name` of kind `K` as JSON, if any.
    pub fn get_json<K: Resource<DynamicType = ()>>(&self, name: &str) -> Option<Value> {
        lock(&self.shared.data)
            .collections
            .get(&path_of::<K>())?
            .get(name)
            .cloned()
    }

    /// Stores `object` (JSON, `metadata.name` set) as kind `K` and tells watchers.
    pub fn apply_json<K: Resource<DynamicType = ()>>(&self, mut object: Value) -> u64 {
        object["apiVersion"] = json!(K::api_version(&()));
        object["kind"] = json!(K::kind(&()));
        let name = object["metadata"]["name"]
            .as_str()
            .unwrap_or("")
            .to_string();
        let change = store(&self.shared, &path_of::<K>(), &name, object);
        let rv = change.rv;
        let _ = self.shared.signals.send(Signal::Change(change));
        rv
    }

    /// Stores `object` (JSON, `metadata.name` set) as a kind `K` object of `namespace`
    /// (`GET /api/v1/namespaces/NAMESPACE/...`) and tells watchers.
    pub fn apply_namespaced_json<K: Resource<DynamicType = ()>>(
        &self,
        namespace: &str,
        mut object: Value,
    ) -> u64 {
        object["apiVersion"] = json!(K::api_version(&()));
        object["kind"] = json!(K::kind(&()));
        object["metadata"]["namespace"] = json!(namespace);
        let name = object["metadata"]["name"]
            .as_str()
            .unwrap_or("")
            .to_string();
        let change = store(
            &self.shared,
            &K::url_path(&(), Some(namespace)),
            &name,
            object,
        );
        let rv = change.rv;
        let _ = self.shared.signals.send(Signal::Change(change));
        rv
    }

    /// Just before the next `PUT` to object `name` of kind `K` is handled, merges `patch` into
    /// the stored object (a new resourceVersion, watchers told): the `PUT`, made from the
    /// version read before, then gets 409 Conflict, as when another writer wins the race.
    pub fn interfere_before_next_put<K: Resource<DynamicType = ()>>(
        &self,
        name: &str,
        patch: Value,
    ) {
        lock(&self.shared.data)
            .interfere
            .entry(format!("{}/{name}", path_of::<K>()))
            .or_default()
            .push(patch);
    }

    /// The current resourceVersion.
    pub fn resource_version(&self) -> u64 {
        lock(&self.shared.data).rv
    }
}

impl Drop for FakeApiServer {
    fn drop(&mut self) {
        if let Some(acceptor) = self.acceptor.take() {
            acceptor.abort();
        }
        self.drop_connections();
    }
}

async fn accept(listener: TcpListener, shared: Arc<Shared>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let task = tokio::spawn(serve_connection(stream, shared.clone()));
        let mut conns = lock(&shared.connections);
        conns.retain(|c| !c.is_finished());
        conns.push(task);
    }
}

/// Reads one request head; `None` when the peer closed the connection.
async fn read_request(stream: &mut TcpStream, buf: &mut Vec<u8>) -> Option<String> {
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).to_string();
            buf.drain(..end + 4);
            return Some(head);
        }
        let mut chunk = [0u8; 4096];
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

/// Reads a request body of `length` bytes; `None` when the peer closed the connection.
async fn read_body(stream: &mut TcpStream, buf: &mut Vec<u8>, length: usize) -> Option<Vec<u8>> {
    while buf.len() < length {
        let mut chunk = [0u8; 4096];
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
    Some(buf.drain(..length).collect())
}

/// A request header's value (case-insensitive name).
fn header<'a>(head: &'a str, name: &str) -> Option<&'a str> {
    head.lines().skip(1).find_map(|line| {
        let (key, value) = line.split_once(':')?;
        key.trim().eq_ignore_ascii_case(name).then(|| value.trim())
    })
}

async fn serve_connection(mut stream: TcpStream, shared: Arc<Shared>) {
    let mut buf = Vec::new();
    while let Some(head) = read_request(&mut stream, &mut buf).await {
        let mut request_line = head.lines().next().unwrap_or("").split_whitespace();
        let method = request_line.next().unwrap_or("GET").to_string();
        let target = request_line.next().unwrap_or("/").to_string();
        let length = header(&head, "content-length")
            .and_then(|v| v.parse::<usize>().ok())
            .unwrap_or(0);
        let Some(body) = read_body(&mut stream, &mut buf, length).await else {
            return;
        };
        let (path, query) = target.split_once('?').unwrap_or((&target, ""));
        let params: HashMap<&str, &str> = query
            .split('&')
            .filter_map(|kv| kv.split_once('='))
            .collect();
        let watching = matches!(params.get("watch"), Some(&"true") | Some(&"1"));
        let result = if method == "PATCH" {
            let content_type = header(&head, "content-type").unwrap_or("");
            patch(&mut stream, &shared, path, content_type, &body).await
        } else if method == "PUT" {
            put(&mut stream, &shared, path, &body).await
        } else if method == "POST" {
            post(&mut stream, &shared, path, &body).await
        } else if method == "DELETE" {
            delete(&mut stream, &shared, path).await
        } else if watching {
            let since = params
                .get("resourceVersion")
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0);
            let timeout = params
                .get("timeoutSeconds")
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(290);
            watch(&mut stream, &shared, path, since, timeout).await
        } else if let Some(object) = get_object(&shared, path) {
            respond(&mut stream, "200 OK", &object).await
        } else {
            list(&mut stream, &shared, path).await
        };
        if result.is_err() {
            return;
        }
    }
}

async fn respond(stream: &mut TcpStream, status: &str, body: &Value) -> std::io::Result<()> {
    let body = serde_json::to_vec(body).unwrap_or_default();
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(&body).await?;
    stream.flush().await
}

fn not_found(path: &str) -> Value {
    json!({
        "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
        "message": format!("the server could not find the requested resource ({path})"),
        "reason": "NotFound", "code": 404,
    })
}

/// `IPPool` for `/apis/crd.projectcalico.org/v1/ippools`, from any stored object.
fn list_kind(objects: &BTreeMap<String, Value>) -> String {
    let kind = objects
        .values()
        .next()
        .and_then(|o| o["kind"].as_str())
        .unwrap_or("");
    format!("{kind}List")
}

async fn list(stream: &mut TcpStream, shared: &Shared, path: &str) -> std::io::Result<()> {
    let body = {
        let mut data = lock(&shared.data);
        *data.lists.entry(path.to_string()).or_default() += 1;
        let rv = data.rv;
        data.collections.get(path).map(|objects| {
            json!({
                "apiVersion": "v1",
                "kind": list_kind(objects),
                "metadata": { "resourceVersion": rv.to_string() },
                "items": objects.values().cloned().collect::<Vec<_>>(),
            })
        })
    };
    match body {
        Some(body) => respond(stream, "200 OK", &body).await,
        None => respond(stream, "404 Not Found", &not_found(path)).await,
    }
}

async fn write_chunk(stream: &mut TcpStream, event: &Value) -> std::io::Result<()> {
    let mut line = serde_json::to_vec(event).unwrap_or_default();
    line.push(b'\n');
    stream
        .write_all(format!("{:x}\r\n", line.len()).as_bytes())
        .await?;
    stream.write_all(&line).await?;
    stream.write_all(b"\r\n").await?;
    stream.flush().await
}

fn gone(since: u64, oldest: u64) -> Value {
    json!({
        "type": "ERROR",
        "object": {
            "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": format!("too old resource version: {since} ({oldest})"),
            "reason": "Expired", "code": 410,
        },
    })
}

async fn watch(
    stream: &mut TcpStream,
    shared: &Shared,
    path: &str,
    since: u64,
    timeout_secs: u64,
) -> std::io::Result<()> {
    // Subscribe before reading the history so no change falls in between.
    let mut signals = shared.signals.subscribe();
    let (exists, replay, expired, kind) = {
        let mut data = lock(&shared.data);
        *data.watches.entry(path.to_string()).or_default() += 1;
        let exists = data.collections.contains_key(path);
        let expired = since < data.oldest_watchable.saturating_sub(1);
        let replay: Vec<Arc<Change>> = data
            .history
            .iter()
            .filter(|c| c.path == path && c.rv > since)
            .cloned()
            .collect();
        let kind = data
            .collections
            .get(path)
            .map(list_kind)
            .unwrap_or_default()
            .trim_end_matches("List")
            .to_string();
        (
            exists,
            replay,
            expired.then_some(data.oldest_watchable),
            kind,
        )
    };
    if !exists {
        return respond(stream, "404 Not Found", &not_found(path)).await;
    }
    stream
        .write_all(
            b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n",
        )
        .await?;
    if let Some(oldest) = expired {
        write_chunk(stream, &gone(since, oldest)).await?;
        return stream.write_all(b"0\r\n\r\n").await;
    }
    let mut sent = since;
    for change in replay {
        write_chunk(
            stream,
            &json!({ "type": change.kind, "object": change.object }),
        )
        .await?;
        sent = change.rv;
    }
    let deadline = tokio::time::sleep(Duration::from_secs(timeout_secs));
    tokio::pin!(deadline);
    loop {
        tokio::select! {
            _ = &mut deadline => break,
            signal = signals.recv() => match signal {
                Ok(Signal::Change(change)) if change.path == path && change.rv > sent => {
                    write_chunk(stream, &json!({ "type": change.kind, "object": change.object })).await?;
                    sent = change.rv;
                }
                Ok(Signal::Change(_)) => {}
                Ok(Signal::Bookmark) => {
                    let rv = lock(&shared.data).rv;
                    let bookmark = json!({
                        "type": "BOOKMARK",
                        "object": {
                            "kind": kind.clone(),
                            "apiVersion": "v1",
                            "metadata": { "resourceVersion": rv.to_string() },
                        },
                    });
                    write_chunk(stream, &bookmark).await?;
                }
                Ok(Signal::Expire) => {
                    let oldest = lock(&shared.data).oldest_watchable;
                    write_chunk(stream, &gone(sent, oldest)).await?;
                    break;
                }
                // Lagged or closed: end the watch; the client resumes or relists.
                Err(_) => break,
            }
        }
    }
    stream.write_all(b"0\r\n\r\n").await?;
    stream.flush().await
}

/// The collection path and name of an object path: `/api/v1/nodes/n1` → (`/api/v1/nodes`, `n1`).
fn split_object_path(path: &str) -> Option<(&str, &str)> {
    path.rsplit_once('/').filter(|(_, name)| !name.is_empty())
}

/// The stored object at `<collection>/<name>`, if the collection and the object exist.
fn get_object(shared: &Shared, path: &str) -> Option<Value> {
    let (collection, name) = split_object_path(path)?;
    lock(&shared.data)
        .collections
        .get(collection)?
        .get(name)
        .cloned()
}

/// RFC 7386 JSON merge patch: objects merge key by key, `null` removes, anything else replaces.
fn merge_patch(target: &mut Value, patch: &Value) {
    let Value::Object(entries) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = json!({});
    }
    let Some(fields) = target.as_object_mut() else {
        return;
    };
    for (key, value) in entries {
        if value.is_null() {
            fields.remove(key);
        } else {
            merge_patch(fields.entry(key.clone()).or_insert(Value::Null), value);
        }
    }
}

fn status(code: u16, reason: &str, message: String) -> Value {
    json!({
        "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
        "message": message, "reason": reason, "code": code,
    })
}

/// `PATCH <collection>/<name>` with a JSON merge patch.
async fn patch(
    stream: &mut TcpStream,
    shared: &Shared,
    path: &str,
    content_type: &str,
    body: &[u8],
) -> std::io::Result<()> {
    // The status subresource patches the object itself.
    let path = path.strip_suffix("/status").unwrap_or(path);
    let Some((collection, name)) = split_object_path(path) else {
        return respond(stream, "404 Not Found", &not_found(path)).await;
    };
    let patch_body: Option<Value> = serde_json::from_slice(body).ok();
    lock(&shared.data)
        .patches
        .entry(collection.to_string())
        .or_default()
        .push(patch_body.clone().unwrap_or(Value::Null));
    let strategic = match content_type.split(';').next().map(str::trim) {
        Some("application/merge-patch+json") => false,
        Some("application/strategic-merge-patch+json") => true,
        _ => {
            let msg = format!(
                "the fake API server supports only merge and strategic merge patches, not {content_type:?}"
            );
            let body = status(415, "UnsupportedMediaType", msg);
            return respond(stream, "415 Unsupported Media Type", &body).await;
        }
    };
    let Some(patch_body) = patch_body else {
        let body = status(400, "BadRequest", "the patch body is not JSON".into());
        return respond(stream, "400 Bad Request", &body).await;
    };
    let change = {
        let mut data = lock(&shared.data);
        let rv = data.rv + 1;
        let object = data
            .collections
            .get_mut(collection)
            .and_then(|c| c.get_mut(name))
            .map(|object| {
                if strategic {
                    strategic_merge_patch(object, &patch_body);
                } else {
                    merge_patch(object, &patch_body);
                }
                object["metadata"]["name"] = json!(name);
                object["metadata"]["resourceVersion"] = json!(rv.to_string());
                object.clone()
            });
        object.map(|object| {
            let change = Arc::new(Change {
                rv,
                path: collection.to_string(),
                kind: "MODIFIED",
                object,
            });
            data.rv = rv;
            data.history.push(change.clone());
            change
        })
    };
    let Some(change) = change else {
        let body = status(404, "NotFound", format!("{collection}/{name} not found"));
        return respond(stream, "404 Not Found", &body).await;
    };
    let _ = shared.signals.send(Signal::Change(change.clone()));
    respond(stream, "200 OK", &change.object).await
}

/// A strategic merge patch as far as the tests need it: a JSON merge patch, except that the
/// lists Kubernetes declares `patchMergeKey: type` (`conditions`, `addresses`) merge entry by
/// entry on `type` (an entry of the patch replaces fields of the stored entry of its type, or
/// is appended).
fn strategic_merge_patch(target: &mut Value, patch: &Value) {
    let Value::Object(entries) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = json!({});
    }
    let Some(fields) = target.as_object_mut() else {
        return;
    };
    for (key, value) in entries {
        if value.is_null() {
            fields.remove(key);
        } else if matches!(key.as_str(), "conditions" | "addresses") && value.is_array() {
            let list = fields.entry(key.clone()).or_insert_with(|| json!([]));
            if !list.is_array() {
                *list = json!([]);
            }
            let Some(stored) = list.as_array_mut() else {
                continue;
            };
            for item in value.as_array().into_iter().flatten() {
                match stored.iter_mut().find(|s| s["type"] == item["type"]) {
                    Some(existing) => merge_patch(existing, item),
                    None => stored.push(item.clone()),
                }
            }
        } else {
            strategic_merge_patch(fields.entry(key.clone()).or_insert(Value::Null), value);
        }
    }
}

/// Stores `object` under `collection`/`name` with a new resourceVersion; returns the change
/// (not yet sent to watchers).
fn store(shared: &Shared, collection: &str, name: &str, mut object: Value) -> Arc<Change> {
    let mut data = lock(&shared.data);
    data.rv += 1;
    let rv = data.rv;
    object["metadata"]["name"] = json!(name);
    object["metadata"]["resourceVersion"] = json!(rv.to_string());
    let objects = data.collections.entry(collection.to_string()).or_default();
    let kind = if objects.contains_key(name) {
        "MODIFIED"
    } else {
        "ADDED"
    };
    objects.insert(name.to_string(), object.clone());
    let change = Arc::new(Change {
        rv,
        path: collection.to_string(),
        kind,
        object,
    });
    data.history.push(change.clone());
    change
}

/// `PUT <collection>/<name>`: replace, refused with 409 when the body's resourceVersion is
/// not the stored one.
async fn put(
    stream: &mut TcpStream,
    shared: &Shared,
    path: &str,
    body: &[u8],
) -> std::io::Result<()> {
    let path = path.strip_suffix("/status").unwrap_or(path);
    let Some((collection, name)) = split_object_path(path) else {
        return respond(stream, "404 Not Found", &not_found(path)).await;
    };
    let Ok(object) = serde_json::from_slice::<Value>(body) else {
        let body = status(400, "BadRequest", "the body is not JSON".into());
        return respond(stream, "400 Bad Request", &body).await;
    };
    // A concurrent writer the test set up wins the race first.
    let interference = lock(&shared.data)
        .interfere
        .get_mut(path)
        .and_then(|list| (!list.is_empty()).then(|| list.remove(0)));
    if let Some(patch) = interference
        && let Some(mut current) = get_object(shared, path)
    {
        merge_patch(&mut current, &patch);
        let change = store(shared, collection, name, current);
        let _ = shared.signals.send(Signal::Change(change));
    }
    let stored_rv = get_object(shared, path).map(|o| o["metadata"]["resourceVersion"].clone());
    let Some(stored_rv) = stored_rv else {
        let body = status(404, "NotFound", format!("{collection}/{name} not found"));
        return respond(stream, "404 Not Found", &body).await;
    };
    let sent_rv = &object["metadata"]["resourceVersion"];
    if !sent_rv.is_null() && *sent_rv != stored_rv {
        *lock(&shared.data)
            .conflicts
            .entry(collection.to_string())
            .or_default() += 1;
        let msg = format!(
            "Operation cannot be fulfilled on {collection} \"{name}\": the object has been modified; \
             please apply your changes to the latest version and try again"
        );
        return respond(stream, "409 Conflict", &status(409, "Conflict", msg)).await;
    }
    let change = store(shared, collection, name, object);
    let _ = shared.signals.send(Signal::Change(change.clone()));
    respond(stream, "200 OK", &change.object).await
}

/// `POST <collection>`: create, 409 AlreadyExists when the name is taken.
async fn post(
    stream: &mut TcpStream,
    shared: &Shared,
    collection: &str,
    body: &[u8],
) -> std::io::Result<()> {
    let Ok(object) = serde_json::from_slice::<Value>(body) else {
        let body = status(400, "BadRequest", "the body is not JSON".into());
        return respond(stream, "400 Bad Request", &body).await;
    };
    let Some(name) = object["metadata"]["name"].as_str().map(str::to_string) else {
        let body = status(422, "Invalid", "metadata.name: Required value".into());
        return respond(stream, "422 Unprocessable Entity", &body).await;
    };
    if get_object(shared, &format!("{collection}/{name}")).is_some() {
        let msg = format!("{collection} \"{name}\" already exists");
        return respond(stream, "409 Conflict", &status(409, "AlreadyExists", msg)).await;
    }
    let change = store(shared, collection, &name, object);
    let _ = shared.signals.send(Signal::Change(change.clone()));
    respond(stream, "201 Created", &change.object).await
}

/// `DELETE <collection>/<name>`.
async fn delete(stream: &mut TcpStream, shared: &Shared, path: &str) -> std::io::Result<()> {
    let Some((collection, name)) = split_object_path(path) else {
        return respond(stream, "404 Not Found", &not_found(path)).await;
    };
    let change = {
        let mut data = lock(&shared.data);
        let removed = data
            .collections
            .get_mut(collection)
            .and_then(|c| c.remove(name));
        removed.map(|mut object| {
            data.rv += 1;
            let rv = data.rv;
            object["metadata"]["resourceVersion"] = json!(rv.to_string());
            let change = Arc::new(Change {
                rv,
                path: collection.to_string(),
                kind: "DELETED",
                object,
            });
            data.history.push(change.clone());
            change
        })
    };
    let Some(change) = change else {
        let body = status(404, "NotFound", format!("{collection}/{name} not found"));
        return respond(stream, "404 Not Found", &body).await;
    };
    let _ = shared.signals.send(Signal::Change(change.clone()));
    respond(stream, "200 OK", &change.object).await
}
