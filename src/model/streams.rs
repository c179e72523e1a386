//! The audio and the video encoder on two threads side by side: MBT's own parallelism.
//!
//! In MBT the two encoders never read each other's tokens: the unimodal layers are
//! independent, and each fusion layer meets the other modality only in the bottleneck average
//! (`shared/MBT.md`). A [`StreamPlan`] runs the optimized graph in two lanes, each on its own
//! thread and each running its ops on that one thread: lane 1 takes the audio encoder's
//! nodes, lane 0 the video encoder's and the few joint ones (the bottleneck averages, the
//! fused logits). A node's stream comes from its inputs': a node reading audio and video is
//! joint, and one reading one encoder's tokens and a joint value (a fusion layer reading the
//! bottleneck) stays with that encoder; a node computed from no input (a constant) goes with
//! its first consumer. Each lane runs its nodes in the graph's evaluation order and waits
//! only where it reads a value the other lane makes, once per fusion layer. Both lanes follow
//! one topological order, so neither can wait on a node the other has yet to reach through
//! it: no deadlock.
//!
//! Per-op splitting (`kernel::split_rows`, tract's own multithreaded products) pays where
//! ops are big (the paper-size model: 1.8x on 2 threads) and costs where they are small: at
//! edge-small's size (d = 128, 129 tokens) waking the pool for each of some 150 ops made 2
//! threads slower than 1 on an Emerald Rapids Xeon, and 1.45x faster on a Zen 4 EPYC, where
//! the lanes give 1.8x (BENCHMARKS.md). Two lanes synchronise a few times per window. Two
//! lanes gain at most the sum of their work over the busier one's: 2x for encoders of
//! one size (edge-small: 128 video and 128 audio tokens), 1.25x for the paper's (1568 video
//! tokens against 400 audio). [`Parallelism`] picks one per plan: `auto` takes the lanes
//! where the largest weight product at that batch is below [`STREAMS_BELOW`] multiply-adds
//! and the busier lane has at most [`STREAMS_SHARE`] of the products' work, else splits
//! the ops; `MBT_EDGE_PARALLEL=ops|streams|auto` forces one.
//!
//! The values between ops are freed as soon as their last reader has taken them, as in
//! tract's own plan. An error in one lane stops the other at its next wait or node.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Condvar, Mutex};
use std::time::Duration;

use tract_linalg::multithread::{Executor, multithread_tract_scope};
use tract_onnx::prelude::*;
use tract_onnx::tract_core::internal::*;
use tract_onnx::tract_core::ops::Cost;

/// The environment variable that forces how a model uses its threads.
pub const PARALLEL_ENV: &str = "MBT_EDGE_PARALLEL";

/// Below this many multiply-adds in the largest weight product (at the plan's batch), and
/// with the busier lane at most [`STREAMS_SHARE`] of the work, `auto` runs the two encoders
/// side by side rather than splitting each op. edge-small (2 threads, an AVX-512 EPYC): the
/// lanes were faster than split ops at every batch from 1 (fc1: 8.5 M) to 16 (135 M).
pub const STREAMS_BELOW: u64 = 256 << 20;

/// The busier lane's largest share of the work for `auto` to take the lanes: 1 / 0.6, a
/// 1.67x bound, against about 1.7x for split ops where these pay.
pub const STREAMS_SHARE: f64 = 0.6;

/// How a model with more than one thread uses them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Parallelism {
    /// Per plan: [`Parallelism::Streams`] for small ops, [`Parallelism::Ops`] for big ones.
    Auto,
    /// Each op split over the threads (rows, columns or heads).
    Ops,
    /// The audio and the video encoder on two threads, each op on one.
    Streams,
}

/// A value of `MBT_EDGE_PARALLEL` that is none of `auto`, `ops` and `streams`.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{PARALLEL_ENV}={0:?} is not a parallelism; use auto, ops or streams")]
pub struct ParallelismError(pub String);

impl Parallelism {
    /// What `MBT_EDGE_PARALLEL` asks for (unset or empty: `auto`).
    pub fn from_env() -> Result<Parallelism, ParallelismError> {
        Parallelism::parse(std::env::var(PARALLEL_ENV).ok().as_deref())
    }

    pub fn parse(value: Option<&str>) -> Result<Parallelism, ParallelismError> {
        match value.map(str::trim).unwrap_or("").to_ascii_lowercase().as_str() {
            "" | "auto" => Ok(Parallelism::Auto),
            "ops" => Ok(Parallelism::Ops),
            "streams" => Ok(Parallelism::Streams),
            _ => Err(ParallelismError(value.unwrap_or("").to_string())),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Parallelism::Auto => "auto",
            Parallelism::Ops => "ops",
            Parallelism::Streams => "streams",
        }
    }
}

/// The multiply-adds node `n` of `model` declares (`TypedOp::cost`: tract's products and
/// the fused weight products; 0 for the rest).
fn multiply_adds(model: &TypedModel, n: usize) -> u64 {
    let Ok(facts) = model.node_input_facts(n) else { return 0 };
    let Ok(costs) = model.node(n).op.cost(&facts) else { return 0 };
    let fma: i64 = costs
        .iter()
        .filter(|(cost, _)| matches!(cost, Cost::FMA(_)))
        .filter_map(|(_, count)| count.to_i64().ok())
        .sum();
    fma.max(0) as u64
}

/// The most multiply-adds any one node of `model` declares, 0 if none does.
pub fn largest_product(model: &TypedModel) -> u64 {
    (0..model.nodes().len()).map(|n| multiply_adds(model, n)).max().unwrap_or(0)
}

/// A node's place in a [`StreamPlan`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Place {
    /// A model input: set before the lanes start.
    Input,
    Lane(usize),
}

/// An optimized graph cut into two lanes; see the module doc.
#[derive(Debug)]
pub struct StreamPlan {
    model: TypedModel,
    /// Each lane's nodes, in the graph's evaluation order.
    lanes: [Vec<usize>; 2],
    /// How many times each node's outputs are read (by the other nodes' inputs and the
    /// model's outputs): its values are freed when the last read is done.
    reads: Vec<usize>,
    /// Whether another lane reads the node: its producer then wakes the waiting lane.
    crossing: Vec<bool>,
    inputs: Vec<usize>,
    outputs: Vec<OutletId>,
    /// The multiply-adds of each lane's products.
    work: [u64; 2],
    /// This plan's own session: ops key their scratch by (session, node), so two plans may
    /// not share one (tract's products memoise their output layout per node id).
    session: SessionId,
}

impl Drop for StreamPlan {
    /// Releases the scratch the ops keep for this plan's session on this thread (the calling
    /// thread, lane 0's; the pool's threads drop theirs with the pool).
    fn drop(&mut self) {
        for (ix, node) in self.model.nodes().iter().enumerate() {
            node.op.drop_session(self.session, ix);
        }
    }
}

/// A session id of its own, which only tract hands out (`SessionId::next` is private): the
/// one its plan gives the single node of a throwaway model, read in that node's evaluation.
fn new_session() -> TractResult<SessionId> {
    let mut model = TypedModel::default();
    let source = model.add_source("x", f32::fact([1]))?;
    model.select_output_outlets(&[source])?;
    let plan = TypedSimplePlan::new(model)?;
    let mut state = plan.spawn()?;
    let mut session = None;
    state.run_plan_with_eval(tvec!(tensor1(&[0f32]).into_tvalue()), |ctx, _, _, inputs| {
        session = Some(ctx.session);
        Ok::<_, anyhow::Error>(inputs)
    })?;
    session.context("tract evaluated no node")
}

/// What a lane returns when it stopped because the other failed.
#[derive(Debug, thiserror::Error)]
#[error("the other lane failed")]
struct OtherLaneFailed;

/// The lanes' shared state for one run.
struct Turn<'p> {
    plan: &'p StreamPlan,
    values: Vec<Mutex<Option<TVec<TValue>>>>,
    ready: Vec<AtomicBool>,
    left: Vec<AtomicUsize>,
    failed: AtomicBool,
    signal: (Mutex<()>, Condvar),
}

impl StreamPlan {
    /// Cuts `model` (optimized, every dimension known) into the video lane (0) and the audio
    /// lane (1), given the indices of those inputs among the model's inputs. `None` when the
    /// cut gives nothing to run side by side (one input, or a lane with no node), or when a
    /// node keeps state between runs (MBT has none; such a graph stays with tract's plan).
    pub fn new(model: TypedModel, video_input: usize, audio_input: usize) -> TractResult<Option<StreamPlan>> {
        let order = model.eval_order()?;
        let input_nodes: Vec<usize> = model.input_outlets()?.iter().map(|outlet| outlet.node).collect();
        let (Some(&video), Some(&audio)) = (input_nodes.get(video_input), input_nodes.get(audio_input)) else {
            return Ok(None);
        };
        if video == audio {
            return Ok(None);
        }
        for &n in &order {
            if model.node(n).op.state(&EvalContext::out_of_plan())?.is_some() {
                return Ok(None);
            }
        }
        // Each node's stream: bit 0 video, bit 1 audio, from its inputs' streams; a node that
        // reads both (a bottleneck average, the fused logits) is joint (3), and a joint input
        // does not make a node joint: a fusion layer's audio half reads the audio tokens and
        // the joint bottleneck, and stays audio. 0: a constant, placed below.
        let mut stream = vec![0u8; model.nodes().len()];
        stream[video] = 1;
        stream[audio] = 2;
        for &n in &order {
            let node = model.node(n);
            if node.inputs.is_empty() {
                continue;
            }
            let inputs: Vec<u8> = node.inputs.iter().map(|input| stream[input.node]).collect();
            let own = inputs.iter().filter(|&&s| s != 3).fold(0, |bits, s| bits | s);
            stream[n] = if own == 0 && inputs.contains(&3) { 3 } else { own };
        }
        let mut place = vec![None; model.nodes().len()];
        for &n in &input_nodes {
            place[n] = Some(Place::Input);
        }
        // The audio lane takes the audio nodes, the video lane the rest; a constant goes
        // with its first consumer (decided from the outputs back).
        for &n in order.iter().rev() {
            if place[n].is_some() {
                continue;
            }
            place[n] = Some(match stream[n] {
                2 => Place::Lane(1),
                0 => {
                    let first = model.node(n).outputs.iter().flat_map(|o| o.successors.iter()).map(|s| s.node).min();
                    match first.and_then(|s| place[s]) {
                        Some(Place::Lane(lane)) => Place::Lane(lane),
                        _ => Place::Lane(0),
                    }
                }
                _ => Place::Lane(0),
            });
        }
        let mut lanes = [Vec::new(), Vec::new()];
        for &n in &order {
            if let Some(Place::Lane(lane)) = place[n] {
                lanes[lane].push(n);
            }
        }
        if lanes.iter().any(Vec::is_empty) {
            return Ok(None);
        }
        let outputs = model.output_outlets()?.to_vec();
        let mut reads = vec![0usize; model.nodes().len()];
        let mut crossing = vec![false; model.nodes().len()];
        for &n in &order {
            for input in &model.node(n).inputs {
                reads[input.node] += 1;
                if place[input.node] != place[n] {
                    crossing[input.node] = true;
                }
            }
        }
        for output in &outputs {
            reads[output.node] += 1;
        }
        let work = [0, 1].map(|lane: usize| lanes[lane].iter().map(|&n| multiply_adds(&model, n)).sum());
        let session = new_session()?;
        Ok(Some(StreamPlan { model, lanes, reads, crossing, inputs: input_nodes, outputs, work, session }))
    }

    /// The busier lane's share of the products' multiply-adds: 0.5 for encoders of one size
    /// (the most two lanes can gain, 2x), 0.8 for the paper's video and audio (1.25x).
    pub fn busiest_share(&self) -> f64 {
        let total = self.work[0] + self.work[1];
        if total == 0 { 1.0 } else { self.work[0].max(self.work[1]) as f64 / total as f64 }
    }

    /// How many nodes each lane runs (video, audio).
    pub fn lane_sizes(&self) -> [usize; 2] {
        [self.lanes[0].len(), self.lanes[1].len()]
    }

    /// Runs the graph on `inputs` (in the model's input order): lane 0 on this thread, lane 1
    /// on a thread of `executor`'s pool, which must not be this thread's pool and must have
    /// nothing else to do (the model's own pool).
    pub fn run(&self, executor: &Executor, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let Executor::MultiThread(pool) = executor else { bail!("two lanes need a thread pool") };
        ensure!(inputs.len() == self.inputs.len(), "{} inputs for a model of {}", inputs.len(), self.inputs.len());
        let nodes = self.model.nodes().len();
        let turn = Turn {
            plan: self,
            values: (0..nodes).map(|_| Mutex::new(None)).collect(),
            ready: (0..nodes).map(|_| AtomicBool::new(false)).collect(),
            left: self.reads.iter().map(|&reads| AtomicUsize::new(reads)).collect(),
            failed: AtomicBool::new(false),
            signal: (Mutex::new(()), Condvar::new()),
        };
        for (&node, value) in self.inputs.iter().zip(inputs) {
            turn.set(node, tvec!(value));
        }
        let mut audio = Ok(());
        // The calling thread runs lane 0; lane 1 goes to the pool, whose threads are idle (the
        // model's own pool), so it starts at once and the two never share a thread.
        let video = pool.in_place_scope(|scope| {
            scope.spawn(|_| audio = turn.lane(1));
            turn.lane(0)
        });
        match (video, audio) {
            (Ok(()), Ok(())) => {}
            // The lane that failed first; the other only stopped for it.
            (Err(video), Err(audio)) if video.is::<OtherLaneFailed>() => return Err(audio),
            (Err(err), _) | (_, Err(err)) => return Err(err),
        }
        self.outputs
            .iter()
            .map(|outlet| {
                let values = turn.values[outlet.node].lock().map_err(|_| anyhow!("a lane panicked"))?;
                let values = values.as_ref().context("an output was not computed")?;
                Ok(values[outlet.slot].clone())
            })
            .collect()
    }
}

impl Turn<'_> {
    fn set(&self, node: usize, values: TVec<TValue>) {
        *self.values[node].lock().unwrap_or_else(|poison| poison.into_inner()) = Some(values);
        self.ready[node].store(true, Ordering::Release);
        if self.plan.crossing[node] {
            self.wake();
        }
    }

    /// Wakes a lane waiting in [`Turn::take`], after a value it may wait for is ready or the
    /// run has failed: under the lock, so a lane between its check and its wait cannot miss it.
    fn wake(&self) {
        let _guard = self.signal.0.lock().unwrap_or_else(|poison| poison.into_inner());
        self.signal.1.notify_all();
    }

    /// Output `outlet` once it is there (made by this lane, or waited for from the other);
    /// frees the node's values after their last read.
    fn take(&self, outlet: OutletId) -> TractResult<TValue> {
        let node = outlet.node;
        if !self.ready[node].load(Ordering::Acquire) {
            let mut guard = self.signal.0.lock().unwrap_or_else(|poison| poison.into_inner());
            while !self.ready[node].load(Ordering::Acquire) {
                if self.failed.load(Ordering::Acquire) {
                    return Err(OtherLaneFailed.into());
                }
                // A bound on the wait keeps a missed wake-up (there should be none) from
                // hanging the run.
                guard = self
                    .signal
                    .1
                    .wait_timeout(guard, Duration::from_millis(50))
                    .unwrap_or_else(|poison| poison.into_inner())
                    .0;
            }
        }
        let mut values = self.values[node].lock().unwrap_or_else(|poison| poison.into_inner());
        let value = values.as_ref().context("a value read after it was freed")?[outlet.slot].clone();
        if self.left[node].fetch_sub(1, Ordering::AcqRel) == 1 {
            *values = None;
        }
        Ok(value)
    }

    /// Runs lane `lane`'s nodes in order, each op on this thread.
    fn lane(&self, lane: usize) -> TractResult<()> {
        // Tells the other lane to stop if this one returns an error or unwinds.
        struct Stop<'t, 'p>(&'t Turn<'p>, bool);
        impl Drop for Stop<'_, '_> {
            fn drop(&mut self) {
                if !self.1 {
                    self.0.failed.store(true, Ordering::Release);
                    self.0.wake();
                }
            }
        }
        let mut stop = Stop(self, false);
        let result = multithread_tract_scope(Executor::SingleThread, || {
            let state = TurnState::default();
            for &n in &self.plan.lanes[lane] {
                if self.failed.load(Ordering::Acquire) {
                    return Err(OtherLaneFailed.into());
                }
                let node = self.plan.model.node(n);
                let inputs = node.inputs.iter().map(|&input| self.take(input)).collect::<TractResult<TVec<_>>>()?;
                let values = node.op.eval(&state.context(self.plan.session, n), inputs).with_context(|| {
                    format!("evaluating {node} in the {} lane", if lane == 0 { "video" } else { "audio" })
                })?;
                self.set(n, values);
            }
            Ok(())
        });
        stop.1 = result.is_ok();
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tract_onnx::tract_core::ops::math;

    /// An op that fails when evaluated: where a lane breaks.
    #[derive(Clone, Debug, PartialEq, Eq)]
    struct Fails;

    impl Op for Fails {
        fn name(&self) -> StaticName {
            "Fails".into()
        }
        op_as_typed_op!();
    }

    impl EvalOp for Fails {
        not_out_of_plan!();

        fn eval(&self, _ctx: &EvalContext, _inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
            bail!("this op fails")
        }
    }

    impl TypedOp for Fails {
        as_op!();

        fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
            Ok(tvec!(inputs[0].without_value()))
        }
    }

    /// MBT's shape in six nodes: each stream's own op (`v1`, `a1`, the audio one `fails`
    /// where asked), a joint "bottleneck" `j = v1 + a1`, each stream reading it (`v2`, `a2`),
    /// and joint logits `out = v2 + a2`; outputs `out` and `a2`.
    fn graph(audio_fails: bool) -> TypedModel {
        let mut model = TypedModel::default();
        let video = model.add_source("video", f32::fact([3])).unwrap();
        let audio = model.add_source("audio", f32::fact([3])).unwrap();
        let one = model.add_const("one", tensor1(&[1f32, 1.0, 1.0])).unwrap();
        let v1 = model.wire_node("v1", math::add(), &[video, one]).unwrap()[0];
        let a1 = if audio_fails {
            model.wire_node("a1", Fails, &[audio]).unwrap()[0]
        } else {
            model.wire_node("a1", math::mul(), &[audio, audio]).unwrap()[0]
        };
        let j = model.wire_node("j", math::add(), &[v1, a1]).unwrap()[0];
        let v2 = model.wire_node("v2", math::mul(), &[v1, j]).unwrap()[0];
        let a2 = model.wire_node("a2", math::sub(), &[a1, j]).unwrap()[0];
        let out = model.wire_node("out", math::add(), &[v2, a2]).unwrap()[0];
        model.select_output_outlets(&[out, a2]).unwrap();
        model
    }

    fn names(plan: &StreamPlan, lane: usize) -> Vec<String> {
        plan.lanes[lane].iter().map(|&n| plan.model.node(n).name.clone()).collect()
    }

    #[test]
    fn parallelism_values_parse() {
        assert_eq!(Parallelism::parse(None), Ok(Parallelism::Auto));
        assert_eq!(Parallelism::parse(Some(" Streams ")), Ok(Parallelism::Streams));
        assert_eq!(Parallelism::parse(Some("ops")), Ok(Parallelism::Ops));
        assert_eq!(Parallelism::parse(Some("both")), Err(ParallelismError("both".into())));
    }

    #[test]
    fn the_audio_lane_keeps_its_nodes_through_a_joint_value_and_both_give_tracts_values() {
        let model = graph(false);
        let plan = StreamPlan::new(model.clone(), 0, 1).unwrap().expect("two lanes");
        assert_eq!(names(&plan, 1), ["a1", "a2"]);
        assert_eq!(names(&plan, 0), ["one", "v1", "j", "v2", "out"]);
        let pool = Executor::multithread(2);
        let tract = TypedSimplePlan::new(model).unwrap();
        for round in 0..20 {
            let x = round as f32;
            let inputs = || tvec!(tensor1(&[x, 1.0, -2.0]).into_tvalue(), tensor1(&[0.5, x, 3.0]).into_tvalue());
            let got = plan.run(&pool, inputs()).unwrap();
            let want = tract.run(inputs()).unwrap();
            assert_eq!(got.len(), 2);
            for (got, want) in got.iter().zip(&want) {
                let (got, want) =
                    (got.to_plain_array_view::<f32>().unwrap(), want.to_plain_array_view::<f32>().unwrap());
                assert_eq!(got, want, "round {round}");
            }
        }
    }

    #[test]
    fn each_plan_has_a_session_of_its_own() {
        // Ops key their scratch by (session, node id): two plans of like graphs on one thread
        // must not share it.
        let (a, b) = (
            StreamPlan::new(graph(false), 0, 1).unwrap().unwrap(),
            StreamPlan::new(graph(false), 0, 1).unwrap().unwrap(),
        );
        assert_ne!(a.session, b.session);
        assert_ne!(a.session, SessionId::NONE);
    }

    #[test]
    fn a_failing_lane_ends_the_run_with_its_error() {
        // The video lane waits for `a1` (through `j`): it must stop, not wait for ever.
        let plan = StreamPlan::new(graph(true), 0, 1).unwrap().expect("two lanes");
        let pool = Executor::multithread(2);
        let inputs = tvec!(tensor1(&[1f32, 2.0, 3.0]).into_tvalue(), tensor1(&[1f32, 2.0, 3.0]).into_tvalue());
        let err = plan.run(&pool, inputs).expect_err("the audio lane fails");
        assert!(format!("{err:#}").contains("this op fails"), "{err:#}");
        // One thread alone cannot run two lanes: refused, not deadlocked.
        let inputs = tvec!(tensor1(&[1f32, 2.0, 3.0]).into_tvalue(), tensor1(&[1f32, 2.0, 3.0]).into_tvalue());
        assert!(plan.run(&Executor::SingleThread, inputs).is_err());
    }

    #[test]
    fn the_busier_lanes_share_counts_each_lanes_products() {
        use tract_onnx::tract_core::ops::einsum::EinSum;
        // A product of 4 x 16 x 64 for video, 4 x 16 x 16 for audio: video has 4/5.
        let mut model = TypedModel::default();
        let video = model.add_source("video", f32::fact([4, 16])).unwrap();
        let audio = model.add_source("audio", f32::fact([4, 16])).unwrap();
        let wide = model.add_const("wide", Tensor::zero::<f32>(&[16, 64]).unwrap()).unwrap();
        let square = model.add_const("square", Tensor::zero::<f32>(&[16, 16]).unwrap()).unwrap();
        let product = || EinSum::new("mk,kn->mn".parse().unwrap(), f32::datum_type());
        let v = model.wire_node("v", product(), &[video, wide]).unwrap()[0];
        let a = model.wire_node("a", product(), &[audio, square]).unwrap()[0];
        model.select_output_outlets(&[v, a]).unwrap();
        assert_eq!(largest_product(&model), 4 * 16 * 64);
        let plan = StreamPlan::new(model, 0, 1).unwrap().expect("two lanes");
        assert_eq!(plan.busiest_share(), 0.8);
        assert!(plan.busiest_share() > STREAMS_SHARE, "auto keeps such a model on split ops");
    }

    #[test]
    fn a_graph_with_one_stream_is_not_cut() {
        let mut model = TypedModel::default();
        let video = model.add_source("video", f32::fact([3])).unwrap();
        let _audio = model.add_source("audio", f32::fact([3])).unwrap();
        let out = model.wire_node("v", math::add(), &[video, video]).unwrap()[0];
        model.select_output_outlets(&[out]).unwrap();
        assert!(StreamPlan::new(model, 0, 1).unwrap().is_none());
    }
}
