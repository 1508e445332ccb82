//! Threads, CPU pinning and the run's time line, shared by every load target.
//!
//! A target splits its work into [`Task`]s (one per connection), and [`spawn`] runs them on
//! threads. A thread that owns one task lets it block on its socket (with a short timeout); a
//! thread that owns several polls them in turn on non-blocking sockets, and backs off when a
//! whole pass made no progress.

use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

/// When each part of a run begins and ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Schedule {
    /// Load starts.
    pub(crate) start: Instant,
    /// Warm-up ends, measurement begins.
    pub(crate) warm_end: Instant,
    /// Measurement ends; senders stop and wait for their outstanding acknowledgements.
    pub(crate) measure_end: Instant,
    /// Whatever is not finished by now is abandoned and reported.
    pub(crate) hard_stop: Instant,
}

impl Schedule {
    /// How long past the end of measurement a run may take to drain.
    pub(crate) const GRACE: Duration = Duration::from_secs(10);

    /// A schedule that starts at `start`.
    pub(crate) fn new(start: Instant, warmup: Duration, duration: Duration) -> Self {
        let warm_end = start + warmup;
        let measure_end = warm_end + duration;
        Self {
            start,
            warm_end,
            measure_end,
            hard_stop: measure_end + Self::GRACE,
        }
    }

    /// True when `now` falls in the measured window.
    pub(crate) fn measuring(&self, now: Instant) -> bool {
        now >= self.warm_end && now < self.measure_end
    }
}

/// One unit of work driven by a load thread, typically one connection.
pub(crate) trait Task: Send {
    /// Does what can be done now: write, read, react. A task on a blocking socket may wait for
    /// input up to its read timeout. Returns true when anything moved.
    fn step(&mut self) -> bool;

    /// True once the task has nothing more to do.
    fn done(&self) -> bool;
}

/// Runs each group of tasks on its own thread, the i-th pinned to `cpus[i % cpus.len()]` when
/// `cpus` is not empty. Join the handles to get the tasks back.
pub(crate) fn spawn<T: Task + 'static>(
    groups: Vec<Vec<T>>,
    cpus: &[usize],
) -> Result<Vec<JoinHandle<Vec<T>>>> {
    let mut handles = Vec::with_capacity(groups.len());
    for (i, group) in groups.into_iter().enumerate() {
        let cpu = (!cpus.is_empty()).then(|| cpus[i % cpus.len()]);
        let handle = std::thread::Builder::new()
            .name(format!("load-{i}"))
            .spawn(move || {
                if let Some(cpu) = cpu {
                    // Checked up front by `check_cpus`; a failure here leaves the thread unpinned.
                    let _ = core_affinity::set_for_current(core_affinity::CoreId { id: cpu });
                }
                run(group)
            })
            .context("spawning a load thread")?;
        handles.push(handle);
    }
    Ok(handles)
}

fn run<T: Task>(mut tasks: Vec<T>) -> Vec<T> {
    let mut idle_passes = 0u32;
    loop {
        let mut progress = false;
        let mut live = false;
        for task in tasks.iter_mut().filter(|t| !t.done()) {
            progress |= task.step();
            live = true;
        }
        if !live {
            return tasks;
        }
        if progress || tasks.len() == 1 {
            idle_passes = 0;
        } else {
            idle_passes = idle_passes.saturating_add(1);
            if idle_passes < 1_000 {
                std::thread::yield_now();
            } else {
                std::thread::sleep(Duration::from_micros(50));
            }
        }
    }
}

/// Deals `items` round-robin into `groups` groups (none left empty when there are enough).
pub(crate) fn deal<T>(items: Vec<T>, groups: usize) -> Vec<Vec<T>> {
    let groups = groups.clamp(1, items.len().max(1));
    let mut out: Vec<Vec<T>> = (0..groups).map(|_| Vec::new()).collect();
    for (i, item) in items.into_iter().enumerate() {
        out[i % groups].push(item);
    }
    out
}

/// Parses a CPU list such as `1`, `0,2` or `0-3,6`.
pub(crate) fn parse_cpus(list: &str) -> Result<Vec<usize>> {
    let mut cpus = Vec::new();
    for part in list.split(',').map(str::trim) {
        let (first, last) = match part.split_once('-') {
            Some((a, b)) => (a.trim(), b.trim()),
            None => (part, part),
        };
        let first: usize = first
            .parse()
            .with_context(|| format!("bad CPU '{first}' in '{list}'"))?;
        let last: usize = last
            .parse()
            .with_context(|| format!("bad CPU '{last}' in '{list}'"))?;
        if first > last || last - first > 4096 {
            bail!("bad CPU range '{part}' in '{list}'");
        }
        for cpu in first..=last {
            if !cpus.contains(&cpu) {
                cpus.push(cpu);
            }
        }
    }
    Ok(cpus)
}

/// Fails unless every CPU in `cpus` is one this process may run on.
pub(crate) fn check_cpus(cpus: &[usize]) -> Result<()> {
    if cpus.is_empty() {
        return Ok(());
    }
    let allowed: Vec<usize> = core_affinity::get_core_ids()
        .unwrap_or_default()
        .into_iter()
        .map(|c| c.id)
        .collect();
    for cpu in cpus {
        if !allowed.contains(cpu) {
            bail!("CPU {cpu} is not available to this process (allowed: {allowed:?})");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_lists() {
        assert_eq!(parse_cpus("1").unwrap(), vec![1]);
        assert_eq!(parse_cpus("0-3,6, 2").unwrap(), vec![0, 1, 2, 3, 6]);
        assert!(parse_cpus("").is_err());
        assert!(parse_cpus("3-1").is_err());
        assert!(parse_cpus("a").is_err());
    }

    #[test]
    fn dealing_spreads_items() {
        assert_eq!(
            deal(vec![1, 2, 3, 4, 5], 2),
            vec![vec![1, 3, 5], vec![2, 4]]
        );
        assert_eq!(deal(vec![1, 2], 8), vec![vec![1], vec![2]]);
        assert_eq!(deal(vec![1, 2], 0), vec![vec![1, 2]]);
    }

    #[test]
    fn schedule_window() {
        let start = Instant::now();
        let s = Schedule::new(start, Duration::from_secs(1), Duration::from_secs(5));
        assert!(!s.measuring(start));
        assert!(s.measuring(start + Duration::from_secs(1)));
        assert!(!s.measuring(start + Duration::from_secs(6)));
        assert_eq!(s.hard_stop, start + Duration::from_secs(16));
    }
}
