"""Backend selection, the pure part: candidates, cost-model pruning, budget, choice, cache keys."""

from __future__ import annotations

import math

import pytest

from tether.agent import selection
from tether.agent.selection import Candidate, Device, Measurement, ModelStats

CPU4 = Device(cores=4, backends=frozenset({"mnn/cpu", "onnxruntime/cpu"}), gflops_per_core=50.0)
BOTH = frozenset({"mnn", "onnxruntime"})


def test_thread_counts_are_powers_of_two_up_to_the_cores() -> None:
    assert selection.thread_counts(1) == (1,)
    assert selection.thread_counts(2) == (1, 2)
    assert selection.thread_counts(6) == (1, 2, 4, 6)
    assert selection.thread_counts(64) == (1, 2, 4, 8)  # capped at MAX_THREADS


def test_enumerate_covers_engine_backend_threads_precision() -> None:
    device = Device(cores=2, backends=frozenset({"mnn/cpu", "onnxruntime/cpu", "onnxruntime/cuda"}))
    keys = {c.key for c in selection.enumerate_candidates(engines=BOTH, device=device)}
    assert keys == {
        "mnn/cpu/t1/high",
        "mnn/cpu/t1/low",
        "mnn/cpu/t2/high",
        "mnn/cpu/t2/low",
        "onnxruntime/cpu/t1/fp32",
        "onnxruntime/cpu/t2/fp32",
        "onnxruntime/cuda/t1/fp32",  # the probe found CUDA for ONNX Runtime: a candidate, one host thread
    }
    only_mnn = {c.engine for c in selection.enumerate_candidates(engines={"mnn"}, device=device)}
    assert only_mnn == {"mnn"}


def test_structural_pruning_reasons() -> None:
    device = Device(cores=2, backends=frozenset({"mnn/cpu"}))
    candidates = [
        Candidate("mnn", "opencl", 1, "high"),  # not found by the probe (MNN would fall back to CPU)
        Candidate("mnn", "cpu", 1, "low"),  # no fp16 arithmetic on this CPU
        Candidate("mnn", "cpu", 8, "high"),  # more threads than cores
        Candidate("onnxruntime", "cpu", 1, "fp32"),  # the bundle carries no ONNX model
        Candidate("mnn", "cpu", 1, "high"),
    ]
    survivors, pruned = selection.prune(candidates, model=ModelStats(engines=frozenset({"mnn"})), device=device)
    assert [c.key for c, _ in survivors] == ["mnn/cpu/t1/high"]
    reasons = {p.candidate.key: p.reason for p in pruned}
    assert "fall back to cpu" in reasons["mnn/opencl/t1/high"]
    assert "fp16" in reasons["mnn/cpu/t1/low"]
    assert "cores" in reasons["mnn/cpu/t8/high"]
    assert "no onnxruntime model" in reasons["onnxruntime/cpu/t1/fp32"]


def test_fp16_candidates_survive_on_a_cpu_with_fp16() -> None:
    device = Device(cores=1, backends=frozenset({"mnn/cpu"}), fp16=True)
    cands = selection.enumerate_candidates(engines={"mnn"}, device=device)
    stats = ModelStats(engines=frozenset({"mnn"}), flops=5e8)
    survivors, _ = selection.prune(cands, model=stats, device=device)
    assert survivors[0][0].key == "mnn/cpu/t1/low"  # the cost model expects fp16 to be faster


def test_cost_model_prunes_threads_for_a_tiny_model_and_keeps_them_for_a_big_one() -> None:
    cands = selection.enumerate_candidates(engines=BOTH, device=CPU4)
    tiny = ModelStats(engines=BOTH, flops=5e3)  # the digits MLP: microseconds; thread wake-ups dominate
    survivors, pruned = selection.prune(cands, model=tiny, device=CPU4)
    kept = [c.key for c, _ in survivors]
    assert kept[0] == "mnn/cpu/t1/high" and "onnxruntime/cpu/t1/fp32" in kept
    assert "mnn/cpu/t4/high" in {p.candidate.key for p in pruned if "cost model" in p.reason}

    big = ModelStats(engines=BOTH, flops=8e8)  # EfficientNet-Lite0 scale: threads pay off
    survivors, _ = selection.prune(cands, model=big, device=CPU4)
    assert survivors[0][0].threads == 4
    estimates = [e for _, e in survivors]
    assert estimates == sorted(estimates)


def test_every_engine_keeps_its_best_candidate_and_the_cap_holds() -> None:
    cands = selection.enumerate_candidates(engines=BOTH, device=CPU4)
    survivors, pruned = selection.prune(
        cands, model=ModelStats(engines=BOTH, flops=8e8), device=CPU4, slack=1.0, max_measured=1
    )
    assert {c.engine for c, _ in survivors} == {"mnn", "onnxruntime"}
    assert len(survivors) + len(pruned) == len(cands)


def test_unknown_flops_keeps_single_thread_candidates_first() -> None:
    cands = selection.enumerate_candidates(engines=BOTH, device=CPU4)
    survivors, pruned = selection.prune(cands, model=ModelStats(engines=BOTH), device=CPU4, max_measured=3)
    assert [c.threads for c, _ in survivors[:2]] == [1, 1] and all(e is None for _, e in survivors)
    assert len(survivors) == 3 and any("limit" in p.reason for p in pruned)


def test_gpu_estimate_wins_for_big_models_only() -> None:
    device = Device(cores=4, backends=frozenset({"onnxruntime/cpu", "onnxruntime/cuda"}), gflops_per_core=50.0)
    gpu, cpu = Candidate("onnxruntime", "cuda", 1, "fp32"), Candidate("onnxruntime", "cpu", 4, "fp32")
    big = ModelStats(engines=frozenset({"onnxruntime"}), flops=8e8, io_bytes=600_000)
    small = ModelStats(engines=frozenset({"onnxruntime"}), flops=5e3, io_bytes=300)
    assert selection.estimate_ms(gpu, big, device) < selection.estimate_ms(cpu, big, device)
    assert selection.estimate_ms(gpu, small, device) > selection.estimate_ms(cpu, small, device)


@pytest.mark.parametrize(
    ("time_left", "left", "run_s", "expected"),
    [(1.0, 1, 0.001, 200), (1.0, 4, 0.001, 200), (0.1, 4, 0.001, 25), (0.0, 3, 0.5, 5), (1.0, 2, 0.0, 200)],
)
def test_reps_spread_the_budget(time_left, left, run_s, expected) -> None:
    assert selection.reps_for(time_left_s=time_left, candidates_left=left, run_s=run_s) == expected


def _m(key: str, ms: float | None, error: str = "") -> Measurement:
    return Measurement(Candidate.parse(key), ms, reps=10, error=error)


def test_choose_fastest_and_cheaper_within_the_tie() -> None:
    ms = [_m("mnn/cpu/t1/high", 1.00), _m("mnn/cpu/t2/high", 0.99), _m("onnxruntime/cpu/t1/fp32", 1.5)]
    assert selection.choose(ms).candidate.key == "mnn/cpu/t1/high"  # 1 % slower, half the threads
    ms = [_m("mnn/cpu/t1/high", 1.00), _m("mnn/cpu/t2/high", 0.6)]
    assert selection.choose(ms).candidate.key == "mnn/cpu/t2/high"
    ms = [_m("onnxruntime/cuda/t1/fp32", 0.99), _m("onnxruntime/cpu/t4/fp32", 1.0)]
    assert selection.choose(ms).candidate.key == "onnxruntime/cpu/t4/fp32"  # a tie goes to the CPU
    ms = [_m("onnxruntime/cuda/t1/fp32", 0.2), _m("onnxruntime/cpu/t4/fp32", 1.0)]
    assert selection.choose(ms).candidate.key == "onnxruntime/cuda/t1/fp32"


def test_choose_skips_failures_and_raises_when_all_failed() -> None:
    ms = [_m("mnn/cpu/t1/high", None, "InvalidArgument: bad"), _m("onnxruntime/cpu/t1/fp32", 2.0)]
    assert selection.choose(ms).candidate.engine == "onnxruntime"
    with pytest.raises(selection.NoUsableCandidate, match="bad"):
        selection.choose(iter([_m("mnn/cpu/t1/high", None, "InvalidArgument: bad")]))
    with pytest.raises(selection.NoUsableCandidate):
        selection.choose([_m("mnn/cpu/t1/high", math.nan)])


def test_candidate_key_round_trip_and_bad_keys() -> None:
    c = Candidate("onnxruntime", "cuda", 1, "fp32")
    assert Candidate.parse(c.key) == c and c.backend_name == "onnxruntime/cuda" and c.on_gpu
    for bad in ("mnn/cpu/high", "mnn/cpu/x2/high", ""):
        with pytest.raises(ValueError):
            Candidate.parse(bad)


def test_cache_key_changes_with_model_shapes_and_device() -> None:
    key = selection.model_key({"mnn": "sha256:aa", "onnxruntime": "sha256:bb"}, {"input": (1, 64)})
    assert key == selection.model_key({"onnxruntime": "sha256:bb", "mnn": "sha256:aa"}, {"input": [1, 64]})
    assert key != selection.model_key({"mnn": "sha256:ab", "onnxruntime": "sha256:bb"}, {"input": (1, 64)})
    assert key != selection.model_key({"mnn": "sha256:aa", "onnxruntime": "sha256:bb"}, {"input": (8, 64)})
    sel = selection.Selection(
        model_key=key, fingerprint="sha256:dev", chosen=Candidate("mnn", "cpu", 1, "high"), latency_ms=0.1
    )
    assert sel.is_valid_for(model_key=key, fingerprint="sha256:dev")
    assert not sel.is_valid_for(model_key=key, fingerprint="sha256:other")
    assert sel.cache_key != selection.cache_key(key, "sha256:other")


def test_selection_json_round_trip() -> None:
    sel = selection.Selection(
        model_key="sha256:m",
        fingerprint="sha256:d",
        chosen=Candidate("mnn", "cpu", 2, "high"),
        latency_ms=0.25,
        measurements=(_m("mnn/cpu/t2/high", 0.25), _m("onnxruntime/cpu/t1/fp32", None, "boom")),
        pruned=(selection.Pruned(Candidate("mnn", "cpu", 1, "low"), "no fp16"),),
        seconds=0.5,
        created_at=1.0,
    )
    assert selection.Selection.from_json(sel.to_json()) == sel
