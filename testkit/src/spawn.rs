//! Starting child processes that never outlive this process, and signalling them.
//!
//! Every process the kit starts (nats-server, crm-node) goes through
//! [`spawn_tied_to_test_process`]: the child gets `PR_SET_PDEATHSIG = SIGKILL`, so even a test
//! binary or a bench killed with SIGKILL takes its servers and nodes with it. Callers still
//! stop their children on `Drop` ([`stop_child`], [`kill_child`]); this is the safety net for
//! when `Drop` never runs. Nothing here knows the CRM.

use std::os::unix::process::CommandExt;
use std::process::{Child, Command, ExitStatus};
use std::sync::mpsc;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

/// Pause between two checks whether a signalled child has exited.
const EXIT_POLL: Duration = Duration::from_millis(20);

/// Spawns `command` so that the child gets SIGKILL when this process dies, however it dies.
/// The spawn happens on a kit thread that lives until the process exits, because
/// `PR_SET_PDEATHSIG` fires when the *thread* that forked the child ends.
pub fn spawn_tied_to_test_process(mut command: Command) -> std::io::Result<Child> {
    type Request = (Command, mpsc::Sender<std::io::Result<Child>>);
    static SPAWNER: OnceLock<Mutex<Option<mpsc::Sender<Request>>>> = OnceLock::new();
    let spawner = SPAWNER.get_or_init(|| {
        let (sender, requests) = mpsc::channel::<Request>();
        let thread = std::thread::Builder::new()
            .name("kit-process-spawner".to_string())
            .spawn(move || {
                for (mut command, reply) in requests {
                    let _ = reply.send(command.spawn());
                }
            });
        // Without the thread every spawn fails below, naming the cause.
        Mutex::new(thread.ok().map(|_| sender))
    });
    // SAFETY: the closure runs in the forked child before exec and only calls async-signal-
    // safe functions (prctl, getppid).
    unsafe {
        command.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            // The parent may have died between fork and prctl.
            if libc::getppid() == 1 {
                return Err(std::io::Error::other(
                    "the parent process exited during spawn",
                ));
            }
            Ok(())
        });
    }
    let gone = || std::io::Error::other("the kit's spawner thread could not start or is gone");
    let (reply, result) = mpsc::channel();
    spawner
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
        .as_ref()
        .ok_or_else(gone)?
        .send((command, reply))
        .map_err(|_| gone())?;
    result.recv().map_err(|_| gone())?
}

/// Sends `signal` to our own child `child` (not yet reaped); an error when it cannot.
pub fn signal_child(child: &Child, signal: libc::c_int) -> std::io::Result<()> {
    let pid = libc::pid_t::try_from(child.id())
        .map_err(|_| std::io::Error::other(format!("pid {} does not fit pid_t", child.id())))?;
    // SAFETY: plain kill(2) on our own child, which has not been reaped yet.
    if unsafe { libc::kill(pid, signal) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// SIGTERM, then waits up to `grace` for the child to exit; SIGKILL after that. Always reaps
/// the child. Returns its exit status when it exited within `grace`, `None` when it had to be
/// killed.
pub fn stop_child(child: &mut Child, grace: Duration) -> Option<ExitStatus> {
    let _ = signal_child(child, libc::SIGTERM);
    let deadline = Instant::now() + grace;
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return Some(status),
            Ok(None) if Instant::now() < deadline => std::thread::sleep(EXIT_POLL),
            _ => break,
        }
    }
    kill_child(child);
    None
}

/// SIGKILL, as a crash would; waits for the child.
pub fn kill_child(child: &mut Child) {
    let _ = child.kill();
    let _ = child.wait();
}

/// Whether `child` is still running.
pub fn is_running(child: &mut Child) -> bool {
    matches!(child.try_wait(), Ok(None))
}
