//! How the scheduler is asked to treat hookd's threads (Linux; best effort elsewhere).
//!
//! A trigger's answer passes through three threads (an async worker, the journal writer, an
//! async worker again), and on a machine busy delivering each wake-up can wait for a core
//! held by fan-out or delivery. So:
//! - fan-out and delivery threads are [`background`]: nice 10 (under contention the
//!   scheduler gives intake about nine tenths of the CPU) and `SCHED_BATCH` (their wake-ups
//!   never preempt a running thread);
//! - intake threads ask for a [`short_slice`], which on Linux 6.12 and later (EEVDF custom
//!   slices) lets a waking intake thread take a core at once instead of at the end of the
//!   running thread's slice.
//!
//! This module only sets scheduling attributes of the calling thread; it never needs, or asks
//! for, privileges: where the kernel refuses, the thread keeps the defaults.

/// Niceness of background (fan-out and delivery) threads.
const BACKGROUND_NICE: i32 = 10;

/// Makes the calling thread a background one (see the module docs). Best effort.
pub fn background() {
    #[cfg(target_os = "linux")]
    // SAFETY: the pointer is to a live `sched_param`; gettid and setpriority take no pointers.
    // Pid 0 and the thread id both name this thread; failure leaves its scheduling as is.
    unsafe {
        let param = libc::sched_param { sched_priority: 0 };
        libc::sched_setscheduler(0, libc::SCHED_BATCH, &raw const param);
        let thread = libc::syscall(libc::SYS_gettid) as libc::id_t;
        libc::setpriority(libc::PRIO_PROCESS, thread, BACKGROUND_NICE);
    }
}

/// The slice intake threads ask for: the shortest the kernel accepts (0.1 ms).
const INTAKE_SLICE_NS: u64 = 100_000;

/// `struct sched_attr` of `sched_setattr(2)`, version 1 (56 bytes).
#[cfg(target_os = "linux")]
#[repr(C)]
#[derive(Default)]
struct SchedAttr {
    size: u32,
    policy: u32,
    flags: u64,
    nice: i32,
    priority: u32,
    runtime: u64,
    deadline: u64,
    period: u64,
    util_min: u32,
    util_max: u32,
}

/// Asks for a short time slice for the calling thread (see the module docs); false where
/// the kernel refused.
pub fn short_slice() -> bool {
    #[cfg(target_os = "linux")]
    {
        let attr = SchedAttr {
            size: std::mem::size_of::<SchedAttr>() as u32,
            // SCHED_OTHER at nice 0: only the slice changes.
            policy: 0,
            flags: 0,
            nice: 0,
            priority: 0,
            runtime: INTAKE_SLICE_NS,
            deadline: 0,
            period: 0,
            util_min: 0,
            util_max: 0,
        };
        // SAFETY: the pointer is to a live, correctly sized `sched_attr`; pid 0 is this thread.
        let refused = unsafe { libc::syscall(libc::SYS_sched_setattr, 0, &raw const attr, 0) } != 0;
        if refused {
            tracing::debug!(error = %std::io::Error::last_os_error(), "the kernel keeps its default time slice");
        }
        !refused
    }
    #[cfg(not(target_os = "linux"))]
    false
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;

    #[test]
    fn the_kernel_reads_the_slice_asked_for() {
        std::thread::spawn(|| {
            let mut read = SchedAttr::default();
            let size = std::mem::size_of::<SchedAttr>() as u32;
            // SAFETY: `read` is a live `sched_attr` of `size` bytes; pid 0 is this thread.
            let got = |read: &mut SchedAttr| unsafe {
                libc::syscall(libc::SYS_sched_getattr, 0, std::ptr::from_mut(read), size, 0)
            };
            assert_eq!(got(&mut read), 0);
            let default = read.runtime;
            if !short_slice() {
                // Kernels before custom slices refuse; the thread keeps its default.
                assert_eq!(got(&mut read), 0);
                assert_eq!(read.runtime, default);
                return;
            }
            assert_eq!(got(&mut read), 0);
            assert_eq!((read.policy, read.nice, read.runtime), (0, 0, INTAKE_SLICE_NS));
        })
        .join()
        .unwrap();
    }

    #[test]
    fn background_threads_are_batch_at_nice_10() {
        std::thread::spawn(|| {
            background();
            // SAFETY: no pointers; pid 0 is this thread.
            let policy = unsafe { libc::sched_getscheduler(0) };
            assert_eq!(policy, libc::SCHED_BATCH);
            // SAFETY: no pointers; the thread id names this thread.
            let nice = unsafe {
                let thread = libc::syscall(libc::SYS_gettid) as libc::id_t;
                libc::getpriority(libc::PRIO_PROCESS, thread)
            };
            assert_eq!(nice, BACKGROUND_NICE);
        })
        .join()
        .unwrap();
    }
}
