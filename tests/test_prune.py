"""Unstructured pruners on float, fp16 and int8 models (quantize_then_prune), the random control, iterative pruning."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from torch import nn
from torch.ao.nn.quantized import dynamic as nnqd

from pqsweep import measure, pipeline, weights
from pqsweep.pruning import iterative, unstructured
from pqsweep.quantization import cast
from pqsweep.train import Context

from nets import RecordingContext, batches, compose_cfg, context, loader, option, quantize, small_cnn, top1, wide_convnet


def pruning(name: str, *overrides: str):
    """The `pruning=<name>` option as a run composes it."""
    return option("pruning", name, *overrides)


def zero_count(model: nn.Module) -> tuple[int, int]:
    """(stored prunable weights, of which zero): int8 layers count their integers equal to the zero-point."""
    return weights.footprint(model)


def finetuning(digits, seed: int = 0, kind: type[Context] = Context, **train) -> Context:
    """A Context with the shuffled digits training loader and the `train` group (`train.<key>=<value>` overrides)."""
    cfg = compose_cfg(f"train.seed={seed}", *(f"train.{k}={v}" for k, v in train.items()))
    return context(loader(digits.train, shuffle=True), cfg.train, kind=kind)


# --- float models ----------------------------------------------------------------------------------------------


def test_magnitude_beats_random_at_90_percent(trained_wide, digits):
    dense = top1(trained_wide, digits.test)
    magnitude = top1(unstructured.global_magnitude(copy.deepcopy(trained_wide), pruning("global_magnitude", "amount=0.9")),
                     digits.test)
    randoms = [top1(unstructured.random_weights(copy.deepcopy(trained_wide), pruning("random", "amount=0.9"),
                                        finetuning(digits, seed)), digits.test) for seed in range(3)]
    print(f"\ndigits top-1 at 90 % sparsity, no fine-tuning: dense {dense:.1f}, global magnitude {magnitude:.1f}, "
          f"random (seeds 0-2) {', '.join(f'{r:.1f}' for r in randoms)}")
    # measured: dense 96.9, magnitude 92.8, random 10.0-10.3 (chance is 10 %)
    assert magnitude >= dense - 6
    assert magnitude >= max(randoms) + 75


@pytest.mark.parametrize("amount", [0.5, 0.9])
def test_random_reaches_the_exact_amount_and_depends_on_the_seed(digits, amount):
    def pruned(seed):
        model = small_cnn()
        unstructured.random_weights(model, pruning("random", f"amount={amount}"), finetuning(digits, seed))
        return model

    original = small_cnn()
    runs = {0: pruned(0), "again": pruned(0), 1: pruned(1)}
    total, zeros = zero_count(runs[0])
    assert zeros == round(amount * total)
    for (_, before), (_, after) in zip(weights.prunable_layers(original), weights.prunable_layers(runs[0])):
        kept = after.weight != 0
        torch.testing.assert_close(after.weight[kept], before.weight[kept])

    def mask(model):
        return torch.cat([m.weight.flatten() == 0 for _, m in weights.prunable_layers(model)])

    assert torch.equal(mask(runs[0]), mask(runs["again"]))
    assert not torch.equal(mask(runs[0]), mask(runs[1]))
    # uniform over layers: each layer ends near the amount (unlike global magnitude, which follows weight scales)
    for name, m in weights.prunable_layers(runs[1]):
        assert (m.weight == 0).float().mean().item() == pytest.approx(amount, abs=0.15), name


def test_random_without_a_context_uses_seed_zero(digits):
    a, b = small_cnn(), small_cnn()
    unstructured.random_weights(a, pruning("random"), None)
    unstructured.random_weights(b, pruning("random"), finetuning(digits, seed=0))
    assert all(torch.equal(x.weight, y.weight) for (_, x), (_, y) in zip(weights.prunable_layers(a),
                                                                          weights.prunable_layers(b)))


@pytest.mark.parametrize("method", ["global_magnitude", "layer_magnitude"])
def test_ties_are_broken_deterministically_to_the_exact_count(method):
    def pruned():
        model = small_cnn()
        with torch.no_grad():
            for _, m in weights.prunable_layers(model):
                m.weight.copy_(m.weight.sign() * 0.5)  # every weight ties with every other
        return getattr(unstructured, method)(model, pruning(method, "amount=0.3"))

    first, second = pruned(), pruned()
    total, zeros = zero_count(first)
    if method == "global_magnitude":
        assert zeros == round(0.3 * total)
    else:
        assert zeros == sum(round(0.3 * m.weight.numel()) for _, m in weights.prunable_layers(first))
    assert all(torch.equal(x.weight, y.weight) for (_, x), (_, y) in zip(weights.prunable_layers(first),
                                                                          weights.prunable_layers(second)))


# --- quantize_then_prune: the stored (int8 / fp16) weights --------------------------------------------------------


def int8_model(trained: nn.Module, digits, granularity: str = "per_channel") -> nn.Module:
    """`trained` through static_int8 (FX), calibrated on two training batches."""
    return quantize("static_int8", trained, context(batches(digits.train, 2)), f"granularity={granularity}",
                    "calibration_batches=2")


def qweights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {w.name: w.tensor() for w in weights.stored_weights(model) if w.tensor().is_quantized}


def qparams(weight: torch.Tensor) -> tuple:
    if weight.qscheme() in (torch.per_channel_affine, torch.per_channel_symmetric):
        return (weight.q_per_channel_scales(), weight.q_per_channel_zero_points(), weight.q_per_channel_axis())
    return (weight.q_scale(), weight.q_zero_point())


# torch.load rebuilds quantized tensors through the TypedStorage API, which warns about itself
@pytest.mark.filterwarnings("ignore:TypedStorage is deprecated")
@pytest.mark.parametrize("granularity", ["per_channel", "per_tensor"])
@pytest.mark.parametrize("amount", [0.5, 0.9])
def test_static_int8_pruned_in_the_integer_domain(trained_wide, digits, amount, granularity):
    dense = int8_model(trained_wide, digits, granularity)
    model = unstructured.global_magnitude(copy.deepcopy(dense), pruning("global_magnitude", f"amount={amount}"))
    before, after = qweights(dense), qweights(model)
    assert len(after) == 4 and all(w.dtype == torch.qint8 for w in after.values())
    survivors, pruned = [], []
    for name, w in after.items():
        assert w.qscheme() == before[name].qscheme()
        for x, y in zip(qparams(w), qparams(before[name])):
            assert torch.equal(torch.as_tensor(x), torch.as_tensor(y)), name
        kept = w.int_repr() != 0  # symmetric int8 weights: the zero-point is 0
        assert torch.equal(w.int_repr()[kept], before[name].int_repr()[kept])  # survivors keep their integers
        survivors.append(before[name].dequantize()[kept].abs())
        pruned.append(before[name].dequantize()[~kept].abs())
    # one ranking over every layer, by the value each integer stands for
    assert torch.cat(survivors).min() >= torch.cat(pruned).max()
    total, zeros = zero_count(model)
    assert zeros == round(amount * total)
    assert measure.parameter_counts(model)["sparsity"] >= amount

    accuracy, reference = top1(model, digits.test), top1(dense, digits.test)
    print(f"\nstatic int8 {granularity}, pruned to {amount:.0%} in the integer domain: top-1 {accuracy:.1f} "
          f"(int8 dense {reference:.1f}, no fine-tuning)")
    # measured: 96.9 -> 96.9 at 0.5 (both granularities), 94.4 (per channel) and 95.0 (per tensor) at 0.9
    assert accuracy >= reference - (1 if amount == 0.5 else 4)

    # the pruned int8 model is permanent: its state reloads into an unpruned one with identical outputs
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    buffer.seek(0)
    fresh = copy.deepcopy(dense)
    fresh.load_state_dict(torch.load(buffer, weights_only=True))
    x = next(iter(loader(digits.test)))[0]
    assert torch.equal(fresh(x), model(x))


def test_dynamic_int8_prunes_float_convs_and_int8_linears_in_one_ranking(trained_wide, digits):
    dense = quantize("dynamic_int8", trained_wide, None)
    model = unstructured.global_magnitude(copy.deepcopy(dense), pruning("global_magnitude", "amount=0.5"))
    kinds = {w.name: type(w.module) for w in weights.stored_weights(model)}
    assert list(kinds.values()).count(nnqd.Linear) == 2 and list(kinds.values()).count(nn.Conv2d) == 2
    total, zeros = zero_count(model)
    assert zeros == round(0.5 * total)
    for name, w in qweights(model).items():
        assert w.dtype == torch.qint8 and qparams(w) == qparams(qweights(dense)[name])
        assert (w.int_repr() == 0).any()
    assert top1(model, digits.test) >= top1(dense, digits.test) - 1  # measured: no change (96.9)


def test_fp16_weights_are_pruned_as_fp16(trained_wide, digits):
    dense = cast.fp16(trained_wide, None, None)
    model = unstructured.layer_magnitude(copy.deepcopy(dense), pruning("layer_magnitude", "amount=0.5"))
    assert isinstance(model, weights.CastInputs)
    names = [w.name for w in weights.stored_weights(model)]
    assert names == [name for name, _ in weights.prunable_layers(trained_wide)]  # named as in the float model
    for weight in weights.stored_weights(model):
        assert weight.tensor().dtype == torch.float16
        assert (weight.tensor() == 0).sum().item() == round(0.5 * weight.tensor().numel())
    assert top1(model, digits.test) >= top1(dense, digits.test) - 3  # measured 96.9 -> 95.0, per layer at 50 %


def test_pipeline_quantize_then_prune_keeps_the_int8_format(trained_wide, digits):
    cfg = compose_cfg("pruning=random", "pruning.amount=0.5", "quantization=static_int8",
                      "quantization.order=quantize_then_prune", "quantization.calibration_batches=2")
    deployed, float_model = pipeline.compress(cfg, pipeline.stages_of(cfg), copy.deepcopy(trained_wide),
                                              finetuning(digits))
    assert len(qweights(deployed)) == 4 and all(w.dtype == torch.qint8 for w in qweights(deployed).values())
    assert measure.parameter_counts(deployed)["sparsity"] == pytest.approx(0.5, abs=1e-4)  # int8 zeros count first
    assert weights.footprint(float_model)[1] == 0  # the float model is not pruned


# --- per-layer amounts ------------------------------------------------------------------------------------------


def test_layer_amounts_from_a_yaml_file(tmp_path, trained_wide, digits):
    path = tmp_path / "amounts.yaml"
    path.write_text("'0': 0.8\n'8': 0.25\n")
    cfg = pruning("layer_magnitude", "amount=0.5", f"layer_amounts={path}")
    for model in (copy.deepcopy(trained_wide), cast.fp16(trained_wide, None, None), int8_model(trained_wide, digits)):
        unstructured.layer_magnitude(model, cfg)
        sparsity = {w.name: (w.magnitude() == 0).float().mean().item() for w in weights.stored_weights(model)}
        expected = {"0": 0.8, "4": 0.5, "8": 0.25, "10": 0.5}
        assert sparsity == pytest.approx(expected, abs=0.005), type(model).__name__


def test_unknown_layer_in_layer_amounts_is_a_clear_error(tmp_path):
    path = tmp_path / "amounts.yaml"
    path.write_text("conv9: 0.5\n")
    with pytest.raises(ValueError, match=r"pruning\.layer_amounts=.*no prunable layer named conv9"):
        unstructured.layer_magnitude(small_cnn(), pruning("layer_magnitude", f"layer_amounts={path}"))
    with pytest.raises(ValueError, match=r"pruning\.layer_amounts=.*layer_magnitude"):
        unstructured.global_magnitude(small_cnn(), pruning("global_magnitude", f"layer_amounts={path}"))


# --- iterative --------------------------------------------------------------------------------------------------


def recording_context(digits, model: nn.Module) -> RecordingContext:
    ctx = finetuning(digits, kind=RecordingContext, finetune_epochs=1)
    ctx.initial_state = copy.deepcopy(model.state_dict())
    return ctx


def test_round_targets_follow_the_schedules():
    geometric = iterative.round_targets(0.9, 3, "geometric")
    kept = [1.0] + [1 - s for s in geometric]
    # Han et al.: every round keeps the same fraction of what was left, and the last reaches the target
    assert [kept[t + 1] / kept[t] for t in range(3)] == pytest.approx([0.1 ** (1 / 3)] * 3)
    assert geometric[-1] == pytest.approx(0.9)
    # Zhu & Gupta: s_t = 0.9 (1 - (1 - t/3)^3) = 0.9 * (19/27, 26/27, 1)
    assert iterative.round_targets(0.9, 3, "gradual") == pytest.approx([0.9 * 19 / 27, 0.9 * 26 / 27, 0.9])


@pytest.mark.parametrize("schedule", ["geometric", "gradual"])
def test_iterative_reaches_the_target_through_the_scheduled_rounds(digits, schedule):
    model = small_cnn()
    ctx = recording_context(digits, model)
    cfg = pruning("iterative", "amount=0.9", "rounds=3", f"schedule={schedule}", "scope=global")
    iterative.iterative(model, cfg, ctx)
    assert len(ctx.seen) == 2  # between rounds only: the pipeline fine-tunes after the last

    def zeros(state):
        return sum(int((state[f"{name}.weight"] == 0).sum()) for name, _ in weights.prunable_layers(model))

    total = zero_count(model)[0]
    targets = iterative.round_targets(0.9, 3, schedule)
    assert [zeros(seen.state_dict()) for seen in ctx.seen] == [round(s * total) for s in targets[:2]]
    assert zero_count(model)[1] == round(0.9 * total)


def test_iterative_scope_layer_prunes_each_layer_on_schedule(digits):
    model = small_cnn()
    ctx = recording_context(digits, model)
    iterative.iterative(model, pruning("iterative", "amount=0.8", "rounds=2", "schedule=gradual", "scope=layer"), ctx)
    first = iterative.round_targets(0.8, 2, "gradual")[0]
    for name, layer in weights.prunable_layers(model):
        n = layer.weight.numel()
        assert int((ctx.seen[0].get_submodule(name).weight == 0).sum()) == round(first * n), name
        assert int((layer.weight == 0).sum()) == round(0.8 * n), name


def test_iterative_reinit_rewinds_survivors_to_their_initial_values(digits):
    model = wide_convnet()
    initial = copy.deepcopy(model.state_dict())
    ctx = recording_context(digits, model)
    iterative.iterative(model, pruning("iterative", "amount=0.75", "rounds=3", "rewind=reinit"), ctx)
    assert len(ctx.seen) == 2
    for state in [seen.state_dict() for seen in ctx.seen] + [model.state_dict()]:
        for key, value in initial.items():
            if key.endswith("num_batches_tracked"):
                continue
            kept = state[key] != 0
            assert torch.equal(state[key][kept], value[kept]), key  # every survivor is back at its initial value
            if key.endswith(("bias", "running_mean", "running_var")) or key.startswith(("1.", "5.")):
                assert torch.equal(state[key], value), key  # BatchNorm and biases too
    # fine-tuning did move the survivors away from their initial values, so each rewind had work to do
    for tuned in ctx.tuned:
        kept = tuned[8].weight != 0
        assert not torch.equal(tuned[8].weight[kept], initial["8.weight"][kept])
    assert zero_count(model)[1] == round(0.75 * zero_count(model)[0])

    plain = wide_convnet()
    iterative.iterative(plain, pruning("iterative", "amount=0.75", "rounds=3", "rewind=finetune"),
                    recording_context(digits, plain))
    kept = plain[8].weight != 0
    assert not torch.equal(plain[8].weight[kept], initial["8.weight"][kept])


def test_iterative_needs_a_context_between_rounds():
    with pytest.raises(ValueError, match=r"pruning\.rounds=3"):
        iterative.iterative(small_cnn(), pruning("iterative"), None)
    with pytest.raises(ValueError, match=r"pruning\.rewind=reinit"):
        iterative.iterative(small_cnn(), pruning("iterative", "rounds=1", "rewind=reinit"), None)


# --- PT2E (torchao) int8 graphs -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pt2e_model(trained_wide, digits):
    """`trained_wide` through torchao's PT2E flow (strict export, x86 Inductor quantizer, 16 calibration images)."""
    import torchao.quantization.pt2e.quantizer.x86_inductor_quantizer as xiq
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    images = next(iter(loader(digits.train, batch_size=16)))[0]
    exported = torch.export.export(copy.deepcopy(trained_wide), (images[:1],), strict=True).module()
    quantizer = xiq.X86InductorQuantizer().set_global(xiq.get_default_x86_inductor_quantization_config())
    prepared = prepare_pt2e(exported, quantizer)
    for image in images:  # the exported graph is specialised to batch 1
        prepared(image[None])
    return convert_pt2e(prepared)


def top1_batch1(model: nn.Module, digits) -> float:
    images, labels = next(iter(loader(digits.test, batch_size=len(digits.test))))
    with torch.no_grad():
        predictions = torch.stack([model(image[None]).argmax(1)[0] for image in images])
    return 100.0 * (predictions == labels).float().mean().item()


def test_pt2e_int8_graph_is_pruned_in_the_integer_domain(pt2e_model, digits):
    dense = weights.stored_weights(pt2e_model)
    assert [w.name for w in dense] == ["0", "4", "8", "10"]  # named after the float layers
    model = unstructured.global_magnitude(copy.deepcopy(pt2e_model), pruning("global_magnitude", "amount=0.5"))
    for before, after in zip(dense, weights.stored_weights(model)):
        assert after.ints.dtype == torch.int8 and after.axis == before.axis == 0
        assert torch.equal(after.scale, before.scale) and torch.equal(after.zero_point, before.zero_point)
        kept = after.ints != after.zero_point.view(-1, *[1] * (after.ints.dim() - 1))
        assert torch.equal(after.ints[kept], before.ints[kept])
    total, zeros = zero_count(model)
    assert zeros == round(0.5 * total)
    accuracy, reference = top1_batch1(model, digits), top1_batch1(pt2e_model, digits)
    print(f"\nPT2E int8 pruned to 50 % in the integer domain: top-1 {accuracy:.1f} (int8 dense {reference:.1f})")
    assert accuracy >= reference - 1  # measured: no change (96.9)
