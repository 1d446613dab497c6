//! Running a daemon in the foreground under a tiny `sh` watchdog: the watchdog starts the
//! daemon in the background (stdin from /dev/null, output appended to a log file), prints
//! its pid, then blocks reading our pipe. When the pipe closes — because we dropped the
//! handle or because the test process died (nextest timeout, SIGKILL) — it SIGKILLs the
//! daemon. So no daemon outlives its test.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::time::{Duration, Instant};

use super::{HarnessError, Result};

const WATCHDOG: &str = r#"out="$1"; shift
"$@" </dev/null >>"$out" 2>&1 &
pid=$!
echo "$pid"
read _line
kill -9 "$pid" 2>/dev/null
wait "$pid" 2>/dev/null
exit 0"#;

pub(crate) struct Daemon {
    watchdog: Child,
    stdin: Option<ChildStdin>,
    pub pid: u32,
    name: String,
}

impl Daemon {
    /// Start `program args...` with stdout/stderr appended to `out`.
    pub fn spawn(name: &str, program: &Path, args: &[String], out: &Path) -> Result<Daemon> {
        let mut child = Command::new("sh")
            .arg("-c")
            .arg(WATCHDOG)
            .arg("watchdog")
            .arg(out)
            .arg(program)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(|e| HarnessError(format!("spawn {name} ({}): {e}", program.display())))?;
        let stdout = child.stdout.take().expect("piped stdout");
        let mut line = String::new();
        BufReader::new(stdout)
            .read_line(&mut line)
            .map_err(|e| HarnessError(format!("{name}: reading pid from watchdog: {e}")))?;
        let pid: u32 = line
            .trim()
            .parse()
            .map_err(|_| HarnessError(format!("{name}: watchdog printed {line:?}, not a pid")))?;
        let stdin = child.stdin.take();
        Ok(Daemon {
            watchdog: child,
            stdin,
            pid,
            name: name.to_string(),
        })
    }

    /// True while the daemon process exists and is not a zombie.
    pub fn is_running(&self) -> bool {
        match std::fs::read_to_string(format!("/proc/{}/stat", self.pid)) {
            Ok(stat) => {
                // "pid (comm) S ..." — state follows the last ')'.
                let state = stat
                    .rsplit_once(')')
                    .map(|(_, r)| r.trim_start())
                    .unwrap_or("");
                !(state.starts_with('Z') || state.starts_with('X'))
            }
            Err(_) => false,
        }
    }

    /// Send a signal to the daemon (e.g. "TERM", "KILL").
    pub fn signal(&self, sig: &str) {
        let _ = Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(self.pid.to_string())
            .stderr(Stdio::null())
            .status();
    }

    /// SIGKILL the daemon (like a crash) and reap the watchdog.
    pub fn kill(&mut self) {
        if self.stdin.is_none() {
            return;
        }
        self.signal("KILL");
        // Closing the pipe lets the watchdog finish (it SIGKILLs again, harmlessly).
        self.stdin.take();
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            match self.watchdog.try_wait() {
                Ok(Some(_)) => break,
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(10))
                }
                _ => {
                    let _ = self.watchdog.kill();
                    let _ = self.watchdog.wait();
                    break;
                }
            }
        }
        let _ = &self.name;
    }

    /// SIGTERM, wait up to `grace` for exit, then SIGKILL.
    pub fn stop(&mut self, grace: Duration) {
        if self.stdin.is_none() {
            return;
        }
        self.signal("TERM");
        let deadline = Instant::now() + grace;
        while self.is_running() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        self.kill();
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill();
    }
}
