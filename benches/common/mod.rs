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

/// Each contender's median measure over the rounds.
pub fn medians(by_round: &[Vec<f64>]) -> Vec<f64> {
    let contenders = by_round.first().map_or(0, Vec::len);
    (0..contenders).map(|i| median(&mut by_round.iter().map(|round| round[i]).collect::<Vec<_>>())).collect()
}

/// The median over the rounds of contender `a`'s measure divided by contender `b`'s.
pub fn median_ratio(by_round: &[Vec<f64>], a: usize, b: usize) -> f64 {
    median(&mut by_round.iter().map(|round| round[a] / round[b]).collect::<Vec<_>>())
}
