//! The exact search of the memory plan: which layers keep everything, recompute a part, are
//! checkpointed or offloaded, at the least estimated time that fits a budget.

use super::PassMemory;
use crate::device::GpuRates;
use crate::model::stack::{Keep, Parts, Recompute};
use crate::model::{LayerMemory, StepMemory};

/// What offloading a layer's state costs a pass (`nn::offload`): the copies' issue, in hundredths
/// of a layer forward, and the layer forwards a copy needs beside it to stay hidden: the next
/// offloaded layer (whose stash frees this one's device copy once it is on the host), or the end
/// of the forward, at least [`OffloadPrice::spacing`] layers above. Backward fetches a layer
/// while the layers between run their backward, twice their forward, so the forward binds.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(super) struct OffloadPrice {
    pub(super) issue_pct: usize,
    /// Bytes the copies move while one layer runs its forward.
    pub(super) bytes_per_forward: f64,
}

impl OffloadPrice {
    /// The price on a GPU of `rates` for a pass of `rows` x `seq` tokens through layers of width
    /// `hidden` with activations of `act` bytes. None where the pass is launch-bound: there the
    /// host issues the copies on the step's critical path, and measured at MiniLM's shape on an
    /// H100 moving a layer cost about a layer's forward, no less than recomputing it.
    pub(super) fn of(
        rates: &GpuRates,
        hidden: usize,
        rows: usize,
        seq: usize,
        act: usize,
    ) -> Option<Self> {
        let tokens = (rows * seq) as f64;
        if tokens < crate::model::memory::launch_bound_tokens(hidden) {
            return None;
        }
        // A layer's forward: its projections (about 24 hidden^2 FLOP a token: BERT's and GPT-2's
        // exactly, LLaMA-7B's within 1%) and its attention's two products.
        let h = hidden as f64;
        let flops = tokens * (24.0 * h * h + 4.0 * seq as f64 * h);
        let rate = match act {
            4.. => rates.f32_flops_per_s,
            _ => rates.half_flops_per_s,
        };
        let forward_s = (flops / rate).max(rates.layer_launch_s);
        Some(Self {
            issue_pct: (100.0 * rates.offload_issue_s / forward_s).ceil() as usize,
            bytes_per_forward: rates.host_bytes_per_s * forward_s,
        })
    }

    /// Layer forwards the copy of `bytes` takes: at least 1.
    pub(super) fn spacing(&self, bytes: usize) -> usize {
        (bytes as f64 / self.bytes_per_forward).ceil().max(1.0) as usize
    }
}

/// What a pass recomputes, the pass's estimated bytes, and the recomputation's cost in hundredths
/// of a layer forward per token.
pub(super) struct Chosen {
    pub recompute: Recompute,
    pub estimate: usize,
    pub cost_pct: usize,
}

/// All a layer can recompute short of its whole forward: the parts that hold bytes.
fn every_part(m: &LayerMemory) -> Parts {
    Parts {
        ffn: m.ffn_input > 0,
        attention: m.attention_state > 0,
    }
}

/// What a layer may keep, with its cost in percent of the layer's forward: everything; less its
/// feed-forward input, its attention's state or both (where they hold bytes); or only its input
/// (checkpointed whole).
pub(super) fn choices(m: &LayerMemory) -> Vec<(Keep, usize)> {
    let parts = |ffn: bool, attention: bool| Keep::State(Parts { ffn, attention });
    let mut c = vec![(Keep::ALL, 0)];
    let Parts { ffn, attention } = every_part(m);
    if ffn {
        c.push((parts(true, false), m.ffn_cost_pct));
    }
    if attention {
        c.push((parts(false, true), m.attention_cost_pct));
    }
    if ffn && attention {
        c.push((parts(true, true), m.ffn_cost_pct + m.attention_cost_pct));
    }
    c.push((Keep::Nothing, m.checkpoint_cost_pct));
    c
}

/// The cheapest recomputation with which a pass of `rows` rows fits `budget`: the least total
/// cost over every layer's [`choices`]. Pass-through layers (`through`: no weight gradients to
/// compute, only the gradient to pass down) come first: a trained layer recomputes a part only
/// once every pass-through layer recomputes both or is checkpointed, and is checkpointed only once
/// every pass-through layer is. None when even every layer checkpointed does not fit.
pub(super) fn cheapest_recompute(
    model: &impl StepMemory,
    through: &[usize],
    rows: usize,
    seq: usize,
    measure: usize,
    budget: usize,
    offload: Option<&OffloadPrice>,
) -> Option<Chosen> {
    let pass = PassMemory::of(model, rows, seq);
    let trained = |l: usize| !through.contains(&l);
    // Pass-through layers alone; then with trained layers' parts; then with trained layers whole.
    let stages: [&dyn Fn(usize, Keep) -> bool; 3] = [
        &|l, k| !trained(l) || k == Keep::ALL,
        &|l, k| match trained(l) {
            true => k.saves(),
            false => k == Keep::State(every_part(&pass.layer(l))) || !k.saves(),
        },
        &|l, k| trained(l) || !k.saves(),
    ];
    let stages = if through.is_empty() {
        &stages[2..]
    } else {
        &stages[..]
    };
    // An offload whose copy outlasts the pass's forward (or the spacing the search tracks) cannot
    // hide.
    let most = pass.layers.len().min(MAX_SPACING);
    let spacing = |bytes: usize| offload.map_or(1, |p| p.spacing(bytes));
    let mut best: Option<(usize, Vec<Choice>)> = None;
    for allowed in stages {
        let options: Vec<Vec<(Choice, usize)>> = (pass.layers.iter())
            .map(|(l, m)| {
                let keeps = choices(m).into_iter().filter(|&(k, _)| allowed(*l, k));
                let kept = |k: Keep| pass.kept(m, k);
                keeps
                    .flat_map(|(keep, cost)| {
                        let hides = |p: &&OffloadPrice| p.spacing(kept(keep)) <= most;
                        let moved = (offload.filter(|p| keep.saves() && hides(p))).map(|p| {
                            (
                                Choice {
                                    keep,
                                    offload: true,
                                },
                                cost + p.issue_pct,
                            )
                        });
                        [(
                            Choice {
                                keep,
                                offload: false,
                            },
                            cost,
                        )]
                        .into_iter()
                        .chain(moved)
                    })
                    .collect()
            })
            .collect();
        if let Some((cost, picked)) = least_cost(&pass, measure, budget, &options, &spacing) {
            if best.as_ref().is_none_or(|(c, _)| cost < *c) {
                best = Some((cost, picked));
            }
        }
    }
    let (cost_pct, picked) = best?;
    let layers = pass.layers.iter().map(|(l, _)| *l);
    let recompute = Recompute::from_keeps(layers.clone().zip(picked.iter().map(|c| c.keep)))
        .with_offload(
            layers
                .zip(&picked)
                .filter(|(_, c)| c.offload)
                .map(|(l, _)| l),
        );
    Some(Chosen {
        estimate: pass.peak(&recompute, measure),
        recompute,
        cost_pct,
    })
}

/// One layer's part of a plan: what it keeps, and whether that goes to host memory until its
/// backward (`nn::offload`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Choice {
    keep: Keep,
    offload: bool,
}

/// The most layer forwards an offloaded layer's copy may need beside it: the search's table grows
/// with it, and a copy that slow frees little (one layer's state in that many).
const MAX_SPACING: usize = 8;

/// How the search reached a state: the layer's option, and the state before it (the bytes the
/// nearest offloaded layer held, and the layers run since), its cost implied by the option's.
#[derive(Clone, Copy, Default)]
struct Step {
    option: u8,
    held: u16,
    run: u8,
}

/// The least-cost choice per layer (one of each layer's `options`, with its cost) whose pass fits
/// `budget`, and its cost. Exact: each of the pass's peaks ([`PassMemory::peak`]) is what the
/// layers below one keep on the device, plus what the nearest offloaded layer below holds, plus a
/// term of the layer alone; so for every total cost so far, bytes the nearest offloaded layer
/// holds and layers run since it, it is enough to know the least the layers so far keep on the
/// device (a table over the three, layer by layer, bottom up). An offloaded layer of `bytes`
/// needs the next offloaded layer, or the end of the forward, at least `spacing(bytes)` layers
/// above it.
fn least_cost(
    pass: &PassMemory,
    measure: usize,
    budget: usize,
    options: &[Vec<(Choice, usize)>],
    spacing: &dyn Fn(usize) -> usize,
) -> Option<(usize, Vec<Choice>)> {
    if pass.below > budget {
        return None;
    }
    let max_cost: usize = (options.iter())
        .map(|o| o.iter().map(|&(_, c)| c).max().unwrap_or(0))
        .sum();
    // What an offloaded layer may hold (the first: none offloaded yet).
    let mut helds = vec![0];
    for ((_, m), options) in pass.layers.iter().zip(options) {
        for (choice, _) in options.iter().filter(|(c, _)| c.offload) {
            let bytes = pass.kept(m, choice.keep);
            if !helds.contains(&bytes) {
                helds.push(bytes);
            }
        }
    }
    let gaps: Vec<usize> = helds.iter().map(|&b| spacing(b)).collect();
    // Layers run since the nearest offloaded one, counted up to the widest gap any needs.
    let depth = gaps.iter().max().copied().unwrap_or(1) + 1;
    let width = helds.len();
    let at = |c: usize, h: usize, d: usize| (c * width + h) * depth + d;
    // least[at(c, h, d)]: the least the layers so far keep on the device at total cost c, with
    // the nearest offloaded one holding helds[h] and d layers run above it; came_from[i][...]:
    // layer i's option and the state before it.
    let mut least: Vec<Option<usize>> = vec![None; (max_cost + 1) * width * depth];
    least[at(0, 0, 0)] = Some(0);
    let mut came_from = Vec::with_capacity(options.len());
    for ((_, m), options) in pass.layers.iter().zip(options) {
        let mut next: Vec<Option<usize>> = vec![None; least.len()];
        let mut from = vec![Step::default(); least.len()];
        for (state, below) in least.iter().enumerate() {
            let Some(below) = *below else { continue };
            let (c, h, d) = (
                state / (width * depth),
                state / depth % width,
                state % depth,
            );
            for (o, &(choice, cost)) in options.iter().enumerate() {
                if below + helds[h] + pass.at_layer(m, choice.keep, measure) > budget {
                    continue;
                }
                let bytes = pass.kept(m, choice.keep);
                let (kept, h_next, d_next) = match choice.offload {
                    // The copy of the one below has run beside this layer too.
                    true if h > 0 && d + 1 < gaps[h] => continue,
                    true => (
                        below,
                        helds.iter().position(|&b| b == bytes).unwrap_or(0),
                        0,
                    ),
                    false if h == 0 => (below + bytes, 0, 0),
                    false => (below + bytes, h, (d + 1).min(depth - 1)),
                };
                let k = at(c + cost, h_next, d_next);
                if next[k].is_none_or(|x| kept < x) {
                    next[k] = Some(kept);
                    from[k] = Step {
                        option: o as u8,
                        held: h as u16,
                        run: d as u8,
                    };
                }
            }
        }
        least = next;
        came_from.push(from);
    }
    let top = pass.x + pass.head;
    let fits = |c: usize| {
        (0..width * depth).find(|&hd| {
            let (h, d) = (hd / depth, hd % depth);
            (h == 0 || d >= gaps[h])
                && least[c * width * depth + hd].is_some_and(|k| k + top <= budget)
        })
    };
    let (cost, hd) = (0..=max_cost).find_map(|c| fits(c).map(|hd| (c, hd)))?;
    let mut state = cost * width * depth + hd;
    let mut picked = vec![
        Choice {
            keep: Keep::ALL,
            offload: false
        };
        options.len()
    ];
    for i in (0..options.len()).rev() {
        let Step { option, held, run } = came_from[i][state];
        let (o, c) = (option as usize, state / (width * depth));
        picked[i] = options[i][o].0;
        state = at(c - options[i][o].1, held as usize, run as usize);
    }
    Some((cost, picked))
}
