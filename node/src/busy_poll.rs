//! Busy polling: keeps the node's async worker awake for a short window after each request.
//!
//! Why: a sequential request waits several times for another thread (the Raft log writer's
//! `fdatasync`, the state machine's apply on the blocking pool, the next request's packet).
//! An idle tokio worker parks in the kernel, and waking a parked thread costs tens of
//! microseconds on a virtual machine (a halted vCPU must be woken), several times per write.
//! Measured on the 2-core benchmark machine (BENCHMARKS.md, "Busy polling"): a sequential
//! put's p50 fell from 0.51 to 0.39-0.41 ms on one node and from 1.33 to 1.11-1.17 ms on
//! three.
//!
//! What it costs: while the window is open, one worker thread spins (a task that yields
//! again and again; each turn also polls the I/O driver, so nothing waits for it). Each
//! request served for an authorized caller (client protocol, etcd API, automerge-repo sync
//! messages) and each Raft message with entries to or from a member opens the window for
//! [`BusyPoll::window`] more, and a write's log flush and the start of its apply keep an open
//! window open (the store calls [`keep_open`] through `aspen_kv::set_activity_hook`; they
//! never open a closed one, so the node's own background writes do not start the spinner): a
//! lone put outlasts the window its request opened, and the worker would otherwise park just
//! before the apply's answer arrives (BENCHMARKS.md, "Busy polling follows a write through
//! the store": a sequential put's p50 about 33 µs lower at one node, measured in one cluster
//! with the hook switched on and off; no change shown at three). An idle node never spins
//! (heartbeats do not count: they flush nothing), and a
//! stranger's refused requests never open it (a cheap packet must not buy a core's time). A
//! busy node spins for at most the window after its last request. [`WINDOWS`] and
//! [`SPIN_SECONDS`] show what it costs.
//!
//! A spinner must never hold a CPU another thread needs. A spinning worker is runnable all
//! the time, so on a machine whose cores are all busy (a build, another service) the
//! scheduler treats it like any CPU-bound thread: when its work arrives it waits for its turn,
//! milliseconds, where a parked worker would have been woken at once. Measured: a sequential
//! put's p50 went from 0.42 ms to 3.5-4 ms on one node with two busy loops beside it. So the
//! spinner watches for it: every few turns it compares the wall time that passed with the CPU
//! time its thread got, and if its thread waited more than [`CONTENDED_AFTER`] for a CPU, it
//! stops and does not spin again for [`BACKOFF`] ([`BACKOFFS`] counts these).
//!
//! One spinner per process keeps one worker awake: with more workers, a task woken from
//! another thread may still wake a parked worker. On a single core there is no spinner (the
//! threads the worker waits for would share the core with it). `aspen node run
//! --busy-poll-us 0` turns it off. Nodes started in-process (tests) have no spinner.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, LazyLock, OnceLock};
use std::time::{Duration, Instant};

use prometheus_client::metrics::counter::Counter;
use tokio::sync::Notify;

/// The default window: long enough to cover the gap between two steps of a write (the
/// request and the answer open it; the log flush and the apply's start keep it open), or
/// between an answer and a sequential client's next request.
pub const DEFAULT_WINDOW: Duration = Duration::from_micros(300);
/// The longest window `--busy-poll-us` accepts.
pub const MAX_WINDOW: Duration = Duration::from_millis(10);

/// The spinner gives its CPU to any other thread that wants it every this many turns (a
/// turn, one poll of the I/O driver, takes about a microsecond).
const YIELD_CPU_EVERY: u32 = 8;

/// If the spinner's thread waited this long for a CPU between two checks, other threads
/// want the cores: the spinner backs off. (Beside a busy loop the waits measured 1.5-7 ms, its
/// time slices; with no other load they stayed below 0.6 ms, with rare exceptions.)
pub const CONTENDED_AFTER: Duration = Duration::from_millis(1);
/// How long the spinner stays off after it found the cores contended. One such wait per
/// back-off is what a busy machine costs the node's requests.
pub const BACKOFF: Duration = Duration::from_secs(1);

/// Times the spinner found the cores contended and backed off (metric
/// `aspen_busy_poll_backoffs_total`).
pub static BACKOFFS: LazyLock<Counter> = LazyLock::new(Counter::default);
/// Times the window opened after it had closed (metric `aspen_busy_poll_windows_total`).
pub static WINDOWS: LazyLock<Counter> = LazyLock::new(Counter::default);
/// Seconds the spinner spent spinning (metric `aspen_busy_poll_spin_seconds_total`), counted
/// when each window closes.
pub static SPIN_SECONDS: LazyLock<Counter<f64, AtomicU64>> = LazyLock::new(Counter::default);

/// The process's spinner, once started.
static SPINNER: OnceLock<Arc<BusyPoll>> = OnceLock::new();

/// A window during which one task keeps an async worker awake.
pub struct BusyPoll {
    window_us: u64,
    /// [`CONTENDED_AFTER`], but for tests.
    contended_after: Duration,
    /// When the window closes, in microseconds since `epoch`.
    until_us: AtomicU64,
    /// Until when the window may not open (the cores were contended), in microseconds since
    /// `epoch`.
    backoff_until_us: AtomicU64,
    epoch: Instant,
    /// Wakes the spinner when the window opens again after it closed.
    opened: Notify,
}

impl BusyPoll {
    fn new(window: Duration) -> Self {
        BusyPoll {
            window_us: window.as_micros() as u64,
            contended_after: CONTENDED_AFTER,
            until_us: AtomicU64::new(0),
            backoff_until_us: AtomicU64::new(0),
            epoch: Instant::now(),
            opened: Notify::new(),
        }
    }

    /// How long each request keeps the worker awake.
    pub fn window(&self) -> Duration {
        Duration::from_micros(self.window_us)
    }

    fn now_us(&self) -> u64 {
        self.epoch.elapsed().as_micros() as u64
    }

    /// Keeps the window open for at least [`Self::window`] from now, unless backing off.
    fn extend(&self) {
        let now = self.now_us();
        if now < self.backoff_until_us.load(Ordering::Relaxed) {
            return;
        }
        let before = self
            .until_us
            .fetch_max(now + self.window_us, Ordering::AcqRel);
        if before <= now {
            WINDOWS.inc();
            // The spinner may be asleep (or about to be): a stored permit wakes it either way.
            self.opened.notify_one();
        }
    }

    /// Like [`Self::extend`], but only while the window is open: a step of work already
    /// under way keeps it open, and never opens a closed one.
    fn extend_open(&self) {
        if self.is_open() {
            self.extend();
        }
    }

    /// Whether the window is open now.
    fn is_open(&self) -> bool {
        self.now_us() < self.until_us.load(Ordering::Acquire)
    }

    /// Closes the window and keeps it closed for [`BACKOFF`]: other threads want the cores.
    fn back_off(&self) {
        let now = self.now_us();
        self.backoff_until_us
            .store(now + BACKOFF.as_micros() as u64, Ordering::Relaxed);
        self.until_us.store(0, Ordering::Release);
        BACKOFFS.inc();
    }

    /// The spinning task: yields while the window is open, sleeps while it is closed.
    async fn spin(self: Arc<Self>) {
        let mut turns = 0u32;
        let mut since: Option<Instant> = None;
        let mut waits = CpuWaits::default();
        loop {
            if self.is_open() {
                since.get_or_insert_with(Instant::now);
                turns = turns.wrapping_add(1);
                if turns.is_multiple_of(YIELD_CPU_EVERY) {
                    // Lets a thread waiting for this CPU run first (this node's log writer
                    // or blocking pool, another process): without it, three spinning nodes
                    // on two cores made a 3-node put slower, not faster.
                    std::thread::yield_now();
                    if waits.waited_since_last() > self.contended_after {
                        self.back_off();
                        continue;
                    }
                }
                tokio::task::yield_now().await;
            } else {
                if let Some(since) = since.take() {
                    SPIN_SECONDS.inc_by(since.elapsed().as_secs_f64());
                }
                self.opened.notified().await;
                waits = CpuWaits::default();
            }
        }
    }
}

/// How long the current thread waited for a CPU: wall time that passed minus the CPU time
/// the thread got, between two calls on the same thread.
#[derive(Default)]
struct CpuWaits {
    last: Option<(std::thread::ThreadId, Instant, Duration)>,
}

impl CpuWaits {
    /// The wait since the last call (zero on the first call, or if the task moved to another
    /// worker thread since).
    fn waited_since_last(&mut self) -> Duration {
        let Some(cpu) = thread_cpu_time() else {
            return Duration::ZERO;
        };
        let now = (std::thread::current().id(), Instant::now(), cpu);
        let waited = match self.last {
            Some((thread, wall, cpu)) if thread == now.0 => {
                (now.1 - wall).saturating_sub(now.2.saturating_sub(cpu))
            }
            _ => Duration::ZERO,
        };
        self.last = Some(now);
        waited
    }
}

/// The CPU time the calling thread has used (`None` if the clock cannot be read).
fn thread_cpu_time() -> Option<Duration> {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid timespec to write; CLOCK_THREAD_CPUTIME_ID exists on every
    // Linux and macOS this builds for.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    if rc != 0 {
        return None;
    }
    Some(Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32))
}

/// Starts the process's spinner on the current runtime with `window` (zero: none). Later
/// calls do nothing. On a single core nothing starts: the threads the worker waits for
/// would have to share the one core with the spinner. Returns whether a spinner runs.
pub fn start(window: Duration) -> bool {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    if !window.is_zero() && cores > 1 {
        SPINNER.get_or_init(|| {
            let poll = Arc::new(BusyPoll::new(window));
            tokio::spawn(poll.clone().spin());
            // A write's log flush and apply keep an open window open (they end in answers
            // the worker must pick up); writes nobody asked for (the node's own) open none.
            aspen_kv::set_activity_hook(keep_open);
            poll
        });
    }
    SPINNER.get().is_some()
}

/// A step of work already under way (a write's log flush, its apply): keeps an open window
/// open for the window from now, and opens none (if the window closed in between, `extend`
/// reopens it and wakes the spinner, as a touch would). Does nothing without a spinner.
pub fn keep_open() {
    if let Some(poll) = SPINNER.get() {
        poll.extend_open();
    }
}

/// Work arrived or was answered for a caller allowed to ask: keep the worker awake for the
/// window. Cheap (an atomic or two); does nothing without a spinner.
pub fn touch() {
    if let Some(poll) = SPINNER.get() {
        poll.extend();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "current_thread", start_paused = false)]
    async fn the_window_opens_on_touch_and_closes_after_it() {
        // Never backing off: on a loaded machine this test's thread may well wait for a CPU.
        let poll = Arc::new(BusyPoll {
            contended_after: Duration::MAX,
            ..BusyPoll::new(Duration::from_millis(20))
        });
        assert!(!poll.is_open(), "closed before any request");
        poll.extend();
        assert!(poll.is_open(), "open right after a request");
        // The spinner takes the permit the first extension stored and keeps yielding while
        // the window is open, so this task (on the same one-thread runtime) still runs, and
        // the timer below still fires: a spinner that never yielded would hang the test.
        let spun_before = SPIN_SECONDS.get();
        let spinner = tokio::spawn(poll.clone().spin());
        tokio::time::sleep(Duration::from_millis(25)).await;
        assert!(!poll.is_open(), "closed once the window passed");
        // Closed: the spinner counts the time it spun and goes to sleep.
        let counted = async {
            while SPIN_SECONDS.get() <= spun_before {
                tokio::task::yield_now().await;
            }
        };
        tokio::time::timeout(Duration::from_secs(30), counted)
            .await
            .expect("the spinner never counted its spinning (it never saw the window close)");
        poll.extend();
        assert!(
            poll.is_open(),
            "a request after the window closed opens it again"
        );
        spinner.abort();
    }

    /// The first CPU the calling thread may run on (machines and containers need not
    /// offer CPU 0).
    #[cfg(target_os = "linux")]
    fn first_allowed_cpu() -> usize {
        // SAFETY: a zeroed cpu_set_t is a valid empty set; sched_getaffinity fills it and
        // CPU_ISSET only reads it, within its size.
        unsafe {
            let mut set: libc::cpu_set_t = std::mem::zeroed();
            let rc = libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set);
            assert_eq!(
                rc,
                0,
                "sched_getaffinity: {}",
                std::io::Error::last_os_error()
            );
            (0..libc::CPU_SETSIZE as usize)
                .find(|&cpu| libc::CPU_ISSET(cpu, &set))
                .expect("a thread may run on some CPU")
        }
    }

    /// Pins the calling thread to one CPU.
    #[cfg(target_os = "linux")]
    fn pin_to_cpu(cpu: usize) {
        // SAFETY: a zeroed cpu_set_t is a valid empty set; the calls only write to it and
        // pass it by pointer with its size.
        unsafe {
            let mut set: libc::cpu_set_t = std::mem::zeroed();
            libc::CPU_SET(cpu, &mut set);
            let rc = libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
            assert_eq!(
                rc,
                0,
                "sched_setaffinity: {}",
                std::io::Error::last_os_error()
            );
        }
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn the_spinner_backs_off_when_another_thread_wants_its_cpu() {
        // A busy thread and the spinner's runtime on the same CPU: each time the spinner
        // gives the CPU up, it waits for the busy thread's time slice.
        let cpu = first_allowed_cpu();
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let hog = {
            let stop = stop.clone();
            std::thread::spawn(move || {
                pin_to_cpu(cpu);
                while !stop.load(Ordering::Relaxed) {
                    std::hint::spin_loop();
                }
            })
        };
        let tested = std::thread::spawn(move || {
            pin_to_cpu(cpu);
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async {
                let poll = Arc::new(BusyPoll::new(Duration::from_millis(50)));
                let spinner = tokio::spawn(poll.clone().spin());
                let deadline = Instant::now() + Duration::from_secs(30);
                while poll.backoff_until_us.load(Ordering::Relaxed) == 0 {
                    assert!(Instant::now() < deadline, "the spinner never backed off");
                    poll.extend();
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                assert!(!poll.is_open(), "backing off closes the window");
                poll.extend();
                assert!(
                    !poll.is_open(),
                    "a request does not open it while backing off"
                );
                let until = poll.backoff_until_us.load(Ordering::Relaxed);
                while poll.now_us() < until {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                poll.extend();
                assert!(
                    poll.is_open(),
                    "a request opens it again after the back-off"
                );
                spinner.abort();
            });
        })
        .join();
        stop.store(true, Ordering::Relaxed);
        hog.join().unwrap();
        if let Err(panic) = tested {
            std::panic::resume_unwind(panic);
        }
    }

    /// A write's steps keep an open window open, and never open a closed one (the node's
    /// own background writes must not start the spinner).
    #[test]
    fn keep_open_extends_only_an_open_window() {
        let poll = BusyPoll::new(Duration::from_secs(60));
        poll.extend_open();
        assert!(!poll.is_open(), "a closed window was opened");
        assert_eq!(poll.until_us.load(Ordering::Acquire), 0);
        poll.extend();
        let opened = poll.until_us.load(Ordering::Acquire);
        std::thread::sleep(Duration::from_millis(2));
        poll.extend_open();
        assert!(poll.is_open());
        assert!(
            poll.until_us.load(Ordering::Acquire) > opened,
            "an open window was not extended"
        );
    }

    #[test]
    fn extending_never_shortens_the_window() {
        let poll = BusyPoll::new(Duration::from_secs(60));
        poll.extend();
        let until = poll.until_us.load(Ordering::Acquire);
        let short = BusyPoll {
            window_us: 1,
            contended_after: CONTENDED_AFTER,
            until_us: AtomicU64::new(until),
            backoff_until_us: AtomicU64::new(0),
            epoch: poll.epoch,
            opened: Notify::new(),
        };
        short.extend();
        assert_eq!(short.until_us.load(Ordering::Acquire), until);
    }
}
