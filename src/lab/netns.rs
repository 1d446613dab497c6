//! Network namespaces and commands inside them: `ip -n NS ...`, `ip netns exec NS ...`, and
//! plain HTTP requests from a thread that entered a namespace (sockets stay in the namespace
//! they were created in).

use std::fs::File;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use super::LabError;

/// Where iproute2 keeps named namespaces.
pub const NETNS_DIR: &str = "/run/netns";

/// Runs `program args...`; `Err` with the command line and its output when it fails.
pub fn run(program: &str, args: &[&str]) -> Result<String, LabError> {
    let out = output(program, args)?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(LabError::Command {
            command: command_line(program, args),
            output: combined(&out),
        })
    }
}

/// Runs `program args...`; success and the combined output, whatever the exit status.
pub fn try_run(program: &str, args: &[&str]) -> Result<(bool, String), LabError> {
    let out = output(program, args)?;
    Ok((out.status.success(), combined(&out)))
}

fn output(program: &str, args: &[&str]) -> Result<Output, LabError> {
    Command::new(program)
        .args(args)
        .output()
        .map_err(|source| LabError::Spawn {
            command: command_line(program, args),
            source,
        })
}

fn command_line(program: &str, args: &[&str]) -> String {
    std::iter::once(program)
        .chain(args.iter().copied())
        .collect::<Vec<_>>()
        .join(" ")
}

fn combined(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// The named namespaces whose names start with `prefix`, sorted.
pub fn namespaces_with_prefix(prefix: &str) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(NETNS_DIR)
        .map(|entries| {
            entries
                .filter_map(Result::ok)
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with(prefix))
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

/// `ip netns add NAME` and `lo` up.
pub fn add(name: &str) -> Result<(), LabError> {
    run("ip", &["netns", "add", name])?;
    ip(name, &["link", "set", "lo", "up"])?;
    Ok(())
}

/// `ip netns del NAME`; a namespace that is already gone is not an error.
pub fn delete(name: &str) -> Result<(), LabError> {
    if !Path::new(NETNS_DIR).join(name).exists() {
        return Ok(());
    }
    run("ip", &["netns", "del", name]).map(drop)
}

/// `ip -n NS args...`
pub fn ip(ns: &str, args: &[&str]) -> Result<String, LabError> {
    let mut all = vec!["-n", ns];
    all.extend_from_slice(args);
    run("ip", &all)
}

/// `ip netns exec NS program args...`: success and combined output.
pub fn exec(ns: &str, program: &str, args: &[&str]) -> Result<(bool, String), LabError> {
    let mut all = vec!["netns", "exec", ns, program];
    all.extend_from_slice(args);
    try_run("ip", &all)
}

/// Sets the sysctl `KEY=VALUE` (e.g. `net.ipv4.ip_forward=1`) inside `ns`: writes
/// `/proc/sys/KEY` from a thread that entered the namespace (`/proc/sys/net` shows the
/// writing thread's namespace), so the lab needs no `sysctl` program.
pub fn sysctl(ns: &str, key_value: &str) -> Result<(), LabError> {
    let (key, value) = key_value
        .split_once('=')
        .ok_or_else(|| LabError::Spec(format!("sysctl {key_value:?}: not KEY=VALUE")))?;
    // As sysctl(8): dots separate the levels, unless the key uses slashes (an interface
    // name with a dot, `net/ipv4/conf/vxlan.calico/rp_filter`).
    let key = key.trim();
    let path = if key.contains('/') {
        Path::new("/proc/sys").join(key)
    } else {
        Path::new("/proc/sys").join(key.replace('.', "/"))
    };
    let value = value.trim().to_string();
    let written = path.clone();
    in_namespace(ns, move || std::fs::write(&written, value))?.map_err(|source| LabError::Io {
        path: PathBuf::from(format!("{} (namespace {ns})", path.display())),
        source,
    })
}

/// A veth pair with one end `a_if` in `a` and the other `b_if` in `b`; both ends up. No
/// interface is ever created in the caller's own namespace.
pub fn veth(a: &str, a_if: &str, b: &str, b_if: &str) -> Result<(), LabError> {
    ip(
        a,
        &[
            "link", "add", a_if, "type", "veth", "peer", "name", b_if, "netns", b,
        ],
    )?;
    ip(a, &["link", "set", a_if, "up"])?;
    ip(b, &["link", "set", b_if, "up"])?;
    Ok(())
}

/// The PIDs of the processes inside `ns` (`ip netns pids`).
pub fn pids(ns: &str) -> Vec<i32> {
    run("ip", &["netns", "pids", ns])
        .map(|out| {
            out.split_whitespace()
                .filter_map(|p| p.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// Runs `f` on a new thread that entered the namespace `ns`.
pub fn in_namespace<R: Send + 'static>(
    ns: &str,
    f: impl FnOnce() -> R + Send + 'static,
) -> Result<R, LabError> {
    let path = Path::new(NETNS_DIR).join(ns);
    let ns_name = ns.to_string();
    let handle = std::thread::spawn(move || -> Result<R, LabError> {
        let file = File::open(&path).map_err(|source| LabError::Namespace {
            ns: ns_name.clone(),
            source,
        })?;
        // SAFETY: setns with a namespace file descriptor we own changes only this thread's
        // network namespace; the thread ends after `f`.
        if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            return Err(LabError::Namespace {
                ns: ns_name,
                source: std::io::Error::last_os_error(),
            });
        }
        Ok(f())
    });
    handle
        .join()
        .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
}

/// Starts a thread that enters the namespace `ns` and runs `f` there (for long-running work
/// such as a prober or a sampler); the handle's result is `Err` when the namespace could not
/// be entered. Sockets `f` creates belong to `ns`.
pub fn spawn_in_namespace<R: Send + 'static>(
    ns: &str,
    name: &str,
    f: impl FnOnce() -> R + Send + 'static,
) -> Result<std::thread::JoinHandle<Result<R, LabError>>, LabError> {
    let path = Path::new(NETNS_DIR).join(ns);
    let ns_name = ns.to_string();
    std::thread::Builder::new()
        .name(name.to_string())
        .spawn(move || -> Result<R, LabError> {
            let file = File::open(&path).map_err(|source| LabError::Namespace {
                ns: ns_name.clone(),
                source,
            })?;
            // SAFETY: as in `in_namespace`: only this thread's network namespace changes.
            if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                return Err(LabError::Namespace {
                    ns: ns_name,
                    source: std::io::Error::last_os_error(),
                });
            }
            Ok(f())
        })
        .map_err(|source| LabError::Spawn {
            command: format!("thread {name} in namespace {ns}"),
            source,
        })
}

/// `GET path` from `addr` inside namespace `ns` (HTTP/1.0, so no chunked body): the status
/// code and the body.
pub fn http_get(
    ns: &str,
    addr: SocketAddr,
    path: &str,
    timeout: Duration,
) -> Result<(u16, String), LabError> {
    let request = format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\nAccept: */*\r\n\r\n");
    let what = format!("GET http://{addr}{path} in namespace {ns}");
    let result = in_namespace(ns, move || -> std::io::Result<Vec<u8>> {
        let mut stream = TcpStream::connect_timeout(&addr, timeout)?;
        stream.set_read_timeout(Some(timeout))?;
        stream.set_write_timeout(Some(timeout))?;
        stream.write_all(request.as_bytes())?;
        let mut response = Vec::new();
        stream.read_to_end(&mut response)?;
        Ok(response)
    })?;
    let response = result.map_err(|source| LabError::Http {
        what: what.clone(),
        message: source.to_string(),
    })?;
    parse_response(&response).map_err(|message| LabError::Http { what, message })
}

fn parse_response(response: &[u8]) -> Result<(u16, String), String> {
    let text = String::from_utf8_lossy(response);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| format!("no end of headers in {} bytes", response.len()))?;
    let status = head
        .lines()
        .next()
        .and_then(|line| line.split_whitespace().nth(1))
        .and_then(|code| code.parse().ok())
        .ok_or_else(|| format!("bad status line: {:?}", head.lines().next()))?;
    let chunked = head.lines().any(|l| {
        let l = l.to_ascii_lowercase();
        l.starts_with("transfer-encoding:") && l.contains("chunked")
    });
    let body = if chunked {
        dechunk(body)?
    } else {
        body.to_string()
    };
    Ok((status, body))
}

fn dechunk(mut body: &str) -> Result<String, String> {
    let mut out = String::new();
    loop {
        let (size, rest) = body.split_once("\r\n").ok_or("truncated chunked body")?;
        let size = usize::from_str_radix(size.split(';').next().unwrap_or("").trim(), 16)
            .map_err(|e| format!("bad chunk size {size:?}: {e}"))?;
        if size == 0 {
            return Ok(out);
        }
        let chunk = rest.get(..size).ok_or("truncated chunk")?;
        out.push_str(chunk);
        body = rest.get(size..).unwrap_or("").trim_start_matches("\r\n");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn responses_plain_and_chunked() {
        let plain = b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhello";
        assert_eq!(parse_response(plain).unwrap(), (200, "hello".into()));
        let chunked =
            b"HTTP/1.1 503 Service Unavailable\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n";
        assert_eq!(parse_response(chunked).unwrap(), (503, "abcde".into()));
        assert!(parse_response(b"garbage").is_err());
    }
}
