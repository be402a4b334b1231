//! What the benches that compare contenders share: interleaved rounds and their medians. On a
//! shared machine, load that comes and goes then hits every contender alike, and ratios taken
//! within a round cancel it.

#![allow(dead_code, reason = "each bench uses the part it needs")]

/// The median of `values` (the upper one of an even count).
pub fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

/// Runs `contenders` contenders in `rounds` rounds, the order rotating each round so that none
/// always runs first or after the same neighbour; `run(i)` runs contender `i` once and returns
/// its measure. Returns the measures by round: `[round][contender]`.
pub fn interleaved(rounds: usize, contenders: usize, mut run: impl FnMut(usize) -> f64) -> Vec<Vec<f64>> {
    (0..rounds)
        .map(|round| {
            let mut measures = vec![0.0; contenders];
            for k in 0..contenders {
                let i = (round + k) % contenders;
                measures[i] = run(i);
            }
            measures
        })
        .collect()
}

/// [`interleaved`], keeping only the rounds whose every run was followed by a near core-to-core
/// hop ([`quick_core_hop`] at most [`NEAR`]), as long as there are any: a round run partly on far
/// cores does not compare with the others. Returns the rounds kept and how many of them were near
/// (0: none was, and all are kept).
pub fn interleaved_near(
    rounds: usize,
    contenders: usize,
    mut run: impl FnMut(usize) -> f64,
) -> (Vec<Vec<f64>>, usize) {
    let mut near = vec![true; rounds];
    let mut round = 0;
    let mut runs = 0;
    let by_round = interleaved(rounds, contenders, |i| {
        let measure = run(i);
        near[round] &= quick_core_hop() <= NEAR;
        runs += 1;
        if runs % contenders == 0 {
            round += 1;
        }
        measure
    });
    let kept: Vec<Vec<f64>> =
        by_round.iter().zip(&near).filter(|(_, near)| **near).map(|(measures, _)| measures.clone()).collect();
    if kept.is_empty() {
        (by_round, 0)
    } else {
        let count = kept.len();
        (kept, count)
    }
}

/// The most a hop may take for the run before it to count as near. Hosts of the machine kind
/// differ in what near is: the EPYC hosts' two vCPUs are 21–25 ns apart near and 170–210 ns far,
/// a Xeon host's (model 167) were 56–72 ns in every run of a day.
pub const NEAR: std::time::Duration = std::time::Duration::from_nanos(100);

/// Each contender's median measure over the rounds.
pub fn medians(by_round: &[Vec<f64>]) -> Vec<f64> {
    let contenders = by_round.first().map_or(0, Vec::len);
    (0..contenders).map(|i| median(&mut by_round.iter().map(|round| round[i]).collect::<Vec<_>>())).collect()
}

/// The median over the rounds of contender `a`'s measure divided by contender `b`'s.
pub fn median_ratio(by_round: &[Vec<f64>], a: usize, b: usize) -> f64 {
    median(&mut by_round.iter().map(|round| round[a] / round[b]).collect::<Vec<_>>())
}

/// One way of a cache-line hand-off between two threads, on the first two cores this process may
/// run on: the median of 9 runs of 20 000 round trips.
///
/// The figure tells which placement a run had: a 2-vCPU guest's two vCPUs are sometimes put on
/// cores far apart (on the project's machine kind, 21–25 ns one way near, 170–210 ns far), and
/// everything that passes events between threads then runs at half speed or less. Benches print it
/// beside their figures so that runs are compared within one placement.
pub fn core_hop() -> std::time::Duration {
    hop(9, 20_000)
}

/// [`core_hop`] in a few milliseconds (the median of 3 runs of 5 000 round trips): cheap enough to
/// take between the rounds of a profile run.
pub fn quick_core_hop() -> std::time::Duration {
    hop(3, 5_000)
}

/// A profile run's rounds: `run` publishes `events` and returns how long it took; each round's
/// rate (million events/s) is printed with a [`quick_core_hop`] after it, then the [`core_hop`]
/// before and after all of them.
pub fn profile_rounds(rounds: usize, events: u64, mut run: impl FnMut() -> std::time::Duration) {
    let hop_before = core_hop();
    for _ in 0..rounds {
        let took = run();
        #[allow(clippy::cast_precision_loss, reason = "a rate for a log line")]
        let rate = events as f64 / took.as_secs_f64() / 1e6;
        println!("{rate:.2} {}", quick_core_hop().as_nanos());
    }
    println!("core-to-core hop before and after: {}/{} ns", hop_before.as_nanos(), core_hop().as_nanos());
}

fn hop(runs: usize, trips: u64) -> std::time::Duration {
    use std::sync::atomic::{AtomicU64, Ordering};
    let cores = first_two_cores();
    // Both sides on threads of their own: a pinned thread's affinity passes to the threads it
    // spawns, and the caller's go on to run the bench.
    let mut runs: Vec<f64> = (0..runs)
        .map(|_| {
            let flag = AtomicU64::new(0);
            // Named, so that profiles of the bench tell them from its own threads.
            let side = || std::thread::Builder::new().name("core-hop".into());
            std::thread::scope(|s| {
                side()
                    .spawn_scoped(s, || {
                        pin(cores.map(|c| c[1]));
                        for i in 0..trips {
                            while flag.load(Ordering::Acquire) != 2 * i + 1 {
                                std::hint::spin_loop();
                            }
                            flag.store(2 * i + 2, Ordering::Release);
                        }
                    })
                    .expect("a thread starts");
                side()
                    .spawn_scoped(s, || {
                        pin(cores.map(|c| c[0]));
                        let start = std::time::Instant::now();
                        for i in 0..trips {
                            flag.store(2 * i + 1, Ordering::Release);
                            while flag.load(Ordering::Acquire) != 2 * i + 2 {
                                std::hint::spin_loop();
                            }
                        }
                        #[allow(clippy::cast_precision_loss, reason = "a duration in nanoseconds")]
                        let one_way = start.elapsed().as_nanos() as f64 / (2 * trips) as f64;
                        one_way
                    })
                    .expect("a thread starts")
                    .join()
                    .expect("the timing side does not panic")
            })
        })
        .collect();
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss, reason = "a few hundred ns")]
    std::time::Duration::from_nanos(median(&mut runs) as u64)
}

/// The first two CPUs in this process's affinity mask (Linux), for [`core_hop`] to pin to.
#[cfg(target_os = "linux")]
fn first_two_cores() -> Option<[usize; 2]> {
    // SAFETY: `set` is a valid, writable `cpu_set_t`; the call writes nothing else.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: as above; pid 0 is this thread.
    if unsafe { libc::sched_getaffinity(0, size_of::<libc::cpu_set_t>(), &raw mut set) } != 0 {
        return None;
    }
    // SAFETY: `set` was filled by `sched_getaffinity`.
    let mut allowed = (0..libc::CPU_SETSIZE as usize).filter(|&cpu| unsafe { libc::CPU_ISSET(cpu, &set) });
    Some([allowed.next()?, allowed.next()?])
}

#[cfg(not(target_os = "linux"))]
fn first_two_cores() -> Option<[usize; 2]> {
    None
}

/// Pins the calling thread to `cpu` (Linux); without one, leaves it where it may run.
fn pin(cpu: Option<usize>) {
    #[cfg(target_os = "linux")]
    if let Some(cpu) = cpu {
        // SAFETY: `set` is a valid `cpu_set_t`, zeroed then given one CPU below `CPU_SETSIZE`.
        unsafe {
            let mut set: libc::cpu_set_t = std::mem::zeroed();
            libc::CPU_SET(cpu, &mut set);
            libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &raw const set);
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = cpu;
}
