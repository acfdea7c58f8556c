"""Recovery after compression: distillation from the baseline, BatchNorm re-estimation, and the pruning criteria.

Each method is checked not to be a no-op (distilling changes the weights a fine-tune ends at, re-estimation moves the
running statistics to the data's), each criterion to score a constructed layer as its definition says, and each
option that says how many batches a step draws to draw exactly that many.
"""

from __future__ import annotations

import copy

import pytest
import torch
from hydra.utils import get_method
from torch import nn
from torch.nn import functional as F

from pqsweep import pipeline
from pqsweep.options import Importance
from pqsweep.pruning import structured
from pqsweep.train import batches, distillation_loss, reestimate_batchnorm

from nets import CONF_DIR, compose_cfg, context, loader, option, options, wide_convnet


class Counting:
    """A loader that counts the batches drawn from it."""

    def __init__(self, inner):
        self.inner, self.drawn = inner, 0

    def __iter__(self):
        for batch in self.inner:
            self.drawn += 1
            yield batch

    def __len__(self):
        return len(self.inner)


def finetuning(digits, *train: str, counting: bool = False):
    """A Context over the shuffled digits training loader with the train group's `train.<key>=<value>` overrides."""
    cfg = compose_cfg(*train)
    ctx = context(loader(digits.train, shuffle=True), cfg.train)
    if counting:  # after the context took its example input
        ctx.loaders["train"] = Counting(ctx.loaders["train"])
    return ctx


# --- distillation ------------------------------------------------------------------------------------------------


def test_the_distillation_loss_is_hintons():
    torch.manual_seed(0)
    student, teacher, labels = torch.randn(6, 4), torch.randn(6, 4), torch.randint(0, 4, (6,))
    assert torch.allclose(distillation_loss(student, teacher, labels, 0.0, 4.0), F.cross_entropy(student, labels))
    # alpha=1: T^2 KL(p_teacher || p_student) at temperature T, over the batch
    t = 3.0
    p, q = F.softmax(teacher / t, 1), F.softmax(student / t, 1)
    kl = (p * (p.log() - q.log())).sum(1).mean()
    assert torch.allclose(distillation_loss(student, teacher, labels, 1.0, t), t * t * kl, atol=1e-6)
    assert distillation_loss(teacher, teacher, labels, 1.0, t).abs() < 1e-6  # a student that agrees learns nothing


def pruned_and_tuned(trained, digits, *train: str) -> nn.Module:
    ctx = finetuning(digits, "train.seed=0", "train.finetune_epochs=1", *train)
    ctx.teacher = copy.deepcopy(trained)
    model = get_method("pqsweep.pruning.unstructured.global_magnitude")(copy.deepcopy(trained),
                                                                         option("pruning", "global_magnitude",
                                                                                "amount=0.9"), ctx)
    torch.manual_seed(0)
    ctx.finetune(model)
    return model


def test_distilling_changes_where_a_finetune_ends_and_alpha_0_does_not(trained_wide, digits):
    plain = pruned_and_tuned(trained_wide, digits)
    taught = pruned_and_tuned(trained_wide, digits, "train.distill.enabled=true")
    labels_only = pruned_and_tuned(trained_wide, digits, "train.distill.enabled=true", "train.distill.alpha=0")
    differs = [name for name, p in plain.state_dict().items() if not torch.equal(p, taught.state_dict()[name])]
    assert differs, "distillation left the fine-tune where plain fine-tuning ends"
    for name, p in plain.state_dict().items():  # alpha=0: the labels alone, so exactly the plain fine-tune
        assert torch.equal(p, labels_only.state_dict()[name]), name


def test_a_distilled_prune_stage_is_its_own_and_the_run_is_taught_by_its_baseline(make_cfg, monkeypatch):
    taught = []
    real = pipeline.Context.finetune

    def finetune(self, model, *args, **kwargs):
        taught.append(self.teacher)
        return real(self, model, *args, **kwargs)

    monkeypatch.setattr(pipeline.Context, "finetune", finetune)
    base = ("dataset=digits", "dataset.num_samples=300", "pruning=global_magnitude", "pruning.amount=0.8")
    plain = pipeline.run(make_cfg(*base))
    distilled = pipeline.run(make_cfg(*base, "train.distill.enabled=true"))
    assert distilled.baseline.cached and not distilled.stages_cached["prune"]  # one baseline, two prune stages
    assert taught[0] is None and taught[1] is not None
    for name, p in taught[1].state_dict().items():  # the teacher is the trial's own baseline
        assert torch.equal(p, distilled.baseline.state[name]), name
    assert plain.metrics["top1"] != distilled.metrics["top1"] or plain.metrics != distilled.metrics


# --- BatchNorm re-estimation -------------------------------------------------------------------------------------


def test_bn_reestimation_moves_the_running_statistics_to_the_datas_and_nothing_else(trained_wide, digits):
    model = copy.deepcopy(trained_wide)
    bn = model[1]
    with torch.no_grad():
        bn.running_mean.fill_(7.0)
        bn.running_var.fill_(50.0)
    weights = {k: v.clone() for k, v in model.state_dict().items() if "running" not in k and "batches" not in k}
    data = Counting(loader(digits.train, batch_size=32))
    assert reestimate_batchnorm(model, data, 3) == 2  # both BatchNorm layers
    assert data.drawn == 3 and not model.training  # eval mode kept
    first = list(batches(loader(digits.train, batch_size=32), 3))
    with torch.no_grad():  # the cumulative average over those 3 batches of each batch's channel means
        means = torch.stack([model[0](x).mean((0, 2, 3)) for x, _ in first]).mean(0)
    assert torch.allclose(bn.running_mean, means, atol=1e-5)
    assert bn.momentum == 0.1  # its momentum restored
    for k, v in weights.items():
        assert torch.equal(model.state_dict()[k], v), k


@pytest.mark.parametrize("n", [0, 5, 40])
def test_the_finetune_draws_exactly_bn_batches_before_it_trains(trained_wide, digits, n):
    ctx = finetuning(digits, f"train.bn_batches={n}", "train.finetune_epochs=0", counting=True)
    ctx.finetune(copy.deepcopy(trained_wide))
    assert ctx.loaders["train"].drawn == n  # 40 is more than an epoch of digits (23 batches): it goes round again


def test_a_prune_stage_with_no_finetune_still_reestimates(trained_wide, digits, make_cfg):
    cfg = make_cfg("pruning=l1_filter", "pruning.amount=0.5", "train.finetune_epochs=0", "train.bn_batches=4")
    ctx = finetuning(digits, "train.bn_batches=4", "train.finetune_epochs=0", counting=True)
    pipeline.prune_and_finetune(cfg, copy.deepcopy(trained_wide), ctx)
    assert ctx.loaders["train"].drawn == 4


# --- the pruning criteria ----------------------------------------------------------------------------------------


def mlp(rows: list[list[float]], head: float = 1.0) -> nn.Sequential:
    """Linear(4, n) -> ReLU -> Linear(n, 2), the hidden layer's filters given, the classifier's weights all `head`."""
    model = nn.Sequential(nn.Linear(4, len(rows)), nn.ReLU(), nn.Linear(len(rows), 2))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor(rows))
        model[2].weight.fill_(head)
    return model


def scores(model: nn.Module, name: str, data=None) -> torch.Tensor:
    importance = structured.CRITERIA[name]()
    if name in structured.GRADIENTS:
        structured.GRADIENTS[name](model, data, "cpu")
    x = torch.zeros(1, *next(model.parameters()).shape[1:2]) if data is None else data[0][0][:1]
    (unit,) = structured._graph_units(model, x, importance)
    return unit.scores


ROWS = [[3.0, 0, 0, 0], [1.0, 1, 1, 1], [0.5, 0, 0, 0]]  # L1 3, 4, 0.5; squared L2 9, 4, 0.25


def test_l1_scores_each_filters_own_l1_norm():
    assert torch.allclose(scores(mlp(ROWS), "l1"), torch.tensor([3.0, 4.0, 0.5]))


def test_l2_scores_the_mean_squared_norm_over_the_group():
    # the filter's squared L2 norm and the classifier's column that consumes it (2 weights of 1), averaged
    assert torch.allclose(scores(mlp(ROWS), "l2"), torch.tensor([(9 + 2) / 2, (4 + 2) / 2, (0.25 + 2) / 2]))


def test_lamp_divides_each_score_by_the_sum_of_those_not_smaller():
    group = torch.tensor([5.5, 3.0, 1.125])  # l2's group scores
    assert torch.allclose(scores(mlp(ROWS), "lamp"), torch.tensor([5.5 / 5.5, 3.0 / 8.5, 1.125 / 9.625]))


def test_fpgm_ranks_the_filter_nearest_the_others_lowest_though_it_is_the_largest():
    rows = [[1.0, 0, 0, 0], [0, 1.0, 0, 0], [0, 0, 1.0, 0], [0.6, 0.6, 0.6, 0]]
    assert scores(mlp(rows), "fpgm").argmin() == 3
    assert scores(mlp(rows), "l2").argmax() == 3


def test_bn_scale_scores_the_batchnorm_gamma():
    model = nn.Sequential(nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(3, 2))
    with torch.no_grad():
        model[1].weight.copy_(torch.tensor([0.1, -2.0, 0.5]))
    importance = structured.CRITERIA["bn_scale"]()
    (unit,) = structured._graph_units(model, torch.zeros(1, 1, 6, 6), importance)
    assert torch.allclose(unit.scores, torch.tensor([0.1, 2.0, 0.5]))


def one_batch():
    torch.manual_seed(0)
    return [(torch.randn(8, 4), torch.randint(0, 2, (8,)))]


def test_taylor_scores_the_first_order_change_of_the_loss():
    torch.manual_seed(1)
    model, data = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2)), one_batch()
    reference = copy.deepcopy(model)
    F.cross_entropy(reference(data[0][0]), data[0][1]).backward()
    (w1, g1), (w2, g2) = [(m.weight.detach(), m.weight.grad) for m in (reference[0], reference[2])]
    expected = ((w1 * g1).abs().sum(1) + (w2 * g2).abs().sum(0)) / 2  # |w dL/dw| of the filter and its consumer
    assert torch.allclose(scores(model, "taylor", data), expected)


def test_hessian_scores_w_squared_times_the_mean_squared_per_sample_gradient():
    torch.manual_seed(1)
    model, data = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2)), one_batch()
    reference = copy.deepcopy(model)
    fisher = [torch.zeros_like(reference[i].weight) for i in (0, 2)]
    x, y = data[0]
    for i in range(len(y)):  # one sample at a time
        reference.zero_grad()
        F.cross_entropy(reference(x[i:i + 1]), y[i:i + 1]).backward()
        for total, layer in zip(fisher, (reference[0], reference[2])):
            total += layer.weight.grad ** 2
    w1, w2 = reference[0].weight.detach(), reference[2].weight.detach()
    expected = ((w1 ** 2 * fisher[0] / 8).sum(1) + (w2 ** 2 * fisher[1] / 8).sum(0)) / 2
    assert torch.allclose(scores(model, "hessian", data), expected, rtol=1e-4)


def test_random_scores_are_drawn_from_the_seeded_generator():
    torch.manual_seed(0)
    first = scores(mlp(ROWS), "random")
    torch.manual_seed(0)
    assert torch.equal(scores(mlp(ROWS), "random"), first)
    assert not torch.equal(scores(mlp(ROWS), "random"), first)


def test_every_criterion_is_named_by_the_option_and_has_its_scorer():
    assert set(structured.CRITERIA) == {i.value for i in Importance}


@pytest.mark.parametrize("name", [i.value for i in Importance])
def test_each_criterion_prunes_half_the_filters_and_draws_exactly_its_batches(trained_wide, digits, name):
    cfg = option("pruning", "l1_filter", "amount=0.5", f"importance={name}",
                 "importance_batches=3")
    ctx = finetuning(digits, counting=True)
    model = structured.l1_filter(copy.deepcopy(trained_wide), cfg, ctx)
    hidden = 256 if name == "bn_scale" else 128  # no BatchNorm follows the hidden Linear: bn_scale leaves it whole
    assert [model[0].out_channels, model[4].out_channels, model[8].out_features] == [16, 32, hidden]
    assert ctx.loaders["train"].drawn == (3 if name in ("taylor", "hessian") else 0)
    assert all(p.grad is None for p in model.parameters())  # the gradients it scored by are not left behind


def test_criteria_choose_different_filters(trained_wide, digits):
    kept = {}
    for name in ("l1", "l2", "fpgm", "taylor", "random"):
        cfg = option("pruning", "l1_filter", "amount=0.5", f"importance={name}")
        torch.manual_seed(0)
        model = structured.l1_filter(copy.deepcopy(trained_wide), cfg, finetuning(digits))
        kept[name] = model[0].weight.detach().sum().item()
    assert len(set(kept.values())) == len(kept), kept


# --- the facts the checks read -----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", options("model"))
def test_each_models_batchnorm_fact_is_true(name):
    cfg = option("model", name)
    model = get_method(cfg._target_)(num_classes=10, in_channels=3, pretrained=False)
    has = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    assert cfg.batchnorm == has, f"conf/model/{name}.yaml says batchnorm: {cfg.batchnorm}"


# --- rewinding ---------------------------------------------------------------------------------------------------


def test_the_rewind_stage_holds_the_baselines_weights_at_that_epoch(make_cfg):
    from nets import stage_entry

    data = ("dataset=digits", "dataset.num_samples=300", "measure.warmup=0", "measure.repeats=2")
    cfg = make_cfg(*data, "train.epochs=3", "pruning=global_magnitude", "pruning.amount=0.5",
                   "pruning.rewind=weights", "pruning.rewind_epoch=1")
    pipeline.run(cfg)
    one_epoch = pipeline.run(make_cfg(*data, "train.epochs=1"))  # the same training, stopped after its first epoch
    replayed = stage_entry(cfg, "rewind")["state_dict"]
    for name, value in one_epoch.baseline.state.items():
        assert torch.equal(replayed[name], value), name


def rewinding(digits, rewind: str, epochs: int, k: int, trained, *train: str):
    ctx = finetuning(digits, f"train.epochs={epochs}", *train)
    ctx.rewind, ctx.rewind_epoch = rewind, k
    ctx.rewind_state = {name: v + 1.0 for name, v in trained.state_dict().items()}  # recognisable weights
    model = get_method("pqsweep.pruning.unstructured.global_magnitude")(
        copy.deepcopy(trained), option("pruning", "global_magnitude", "amount=0.5"), ctx)
    masks = [p == 0 for p in (model[0].weight, model[8].weight)]
    pruned = copy.deepcopy(model)
    ctx.retrain(model)
    return pruned, model, masks


def test_weight_rewinding_puts_the_survivors_at_epoch_k_and_keeps_the_pruned_at_zero(trained_wide, digits):
    _, model, masks = rewinding(digits, "weights", 2, 2, trained_wide)  # epochs - k = 0: nothing trained after
    expected = trained_wide.state_dict()
    for layer, mask, index in zip((model[0], model[8]), masks, (0, 8)):
        assert (layer.weight[mask] == 0).all()
        assert torch.equal(layer.weight[~mask], expected[f"{index}.weight"][~mask] + 1.0)


def test_lr_rewinding_keeps_the_pruned_weights_and_retrains_the_remaining_epochs(trained_wide, digits):
    pruned, kept, _ = rewinding(digits, "lr", 2, 2, trained_wide)
    assert all(torch.equal(a, b) for a, b in zip(pruned.state_dict().values(), kept.state_dict().values()))
    pruned, retrained, masks = rewinding(digits, "lr", 3, 2, trained_wide)  # one epoch: it trains
    assert not torch.equal(pruned[8].weight, retrained[8].weight) and (retrained[8].weight[masks[1]] == 0).all()


def test_retraining_starts_the_schedule_at_epoch_k(digits):
    from pqsweep.train import fit

    def first_step(k: int) -> torch.Tensor:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
        cfg = compose_cfg("train.optimizer._target_=torch.optim.SGD", "train.optimizer.lr=0.1",
                          "+train.scheduler={_target_: torch.optim.lr_scheduler.StepLR, step_size: 1, gamma: 0.1}")
        before = model[1].weight.detach().clone()
        steps = []
        fit(model, loader(digits.train), cfg.train, 1, after_step=lambda: steps.append(
            (model[1].weight.detach() - before).clone()) if not steps else None, start_epoch=k)
        return steps[0]

    assert torch.allclose(first_step(2), first_step(0) * 0.01, atol=1e-7)  # lr 0.1 x 0.1^2 from epoch 2 on


def test_iterative_pruning_rewinds_and_retrains_after_every_round(trained_wide, digits, monkeypatch, make_cfg):
    retrained = []
    monkeypatch.setattr(pipeline.Context, "retrain", lambda self, model, desc="retrain": retrained.append(desc))
    cfg = make_cfg("pruning=iterative", "pruning.rounds=3", "pruning.rewind=lr", "pruning.rewind_epoch=1")
    ctx = finetuning(digits)
    ctx.rewind = "lr"
    pipeline.prune_and_finetune(cfg, copy.deepcopy(trained_wide), ctx)
    assert retrained == ["retrain round 1/3", "retrain round 2/3", "retrain"]  # the last round's, by the pipeline


# --- group-norm sparse learning ----------------------------------------------------------------------------------


def sparse_learned(trained, digits, reg: float, epochs: int = 1, amount: float = 0.5):
    from pqsweep.pruning.group_norm import group_norm

    cfg = option("pruning", "group_norm", f"amount={amount}", f"reg={reg}", f"sparse_epochs={epochs}")
    ctx = finetuning(digits, "train.seed=0", counting=True)
    torch.manual_seed(0)
    return group_norm(copy.deepcopy(trained), cfg, ctx), ctx


def test_group_norm_learning_shrinks_the_weights_and_the_pruner_halves_each_layer(trained_wide, digits):
    strong, ctx = sparse_learned(trained_wide, digits, 1e-1, amount=0.0)
    weak, _ = sparse_learned(trained_wide, digits, 1e-9, amount=0.0)
    norm = lambda m: sum(p.detach().norm() for n, p in m.named_parameters() if n.endswith("weight"))  # noqa: E731
    assert norm(strong) < 0.98 * norm(weak)  # measured 0.963: the regulariser pulls the groups toward zero
    assert ctx.loaders["train"].drawn == len(ctx.loaders["train"])  # sparse_epochs=1: one pass over the data
    pruned, _ = sparse_learned(trained_wide, digits, 1e-4, epochs=0)
    assert [pruned[0].out_channels, pruned[4].out_channels, pruned[8].out_features] == [16, 32, 128]


def test_lamp_ranks_all_layers_by_its_own_scores_where_others_are_normalised_per_layer():
    torch.manual_seed(0)  # a net on which the two rankings differ (found by trying seeds)
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 8), nn.ReLU(), nn.Linear(8, 2))
    x = torch.zeros(1, 4)
    units = structured._graph_units(model, x, structured.CRITERIA["lamp"]())
    sizes = [len(u.scores) for u in units]
    raw = torch.cat([u.scores for u in units])
    per_layer = torch.cat([u.scores / u.scores.mean() for u in units])
    lowest = raw.argsort()[:4].tolist()
    assert set(lowest) != set(per_layer.argsort()[:4].tolist())
    pruned = structured.prune_filters(copy.deepcopy(model), x, 0.36, "global", importance=structured.CRITERIA["lamp"]())
    expected = [sizes[0] - sum(i < sizes[0] for i in lowest), sizes[1] - sum(i >= sizes[0] for i in lowest)]
    assert sorted([pruned[0].out_features, pruned[2].out_features]) == sorted(expected), (sizes, lowest)


def test_the_feature_term_pulls_the_penultimate_features_toward_the_teachers(trained_wide, digits):
    plain = pruned_and_tuned(trained_wide, digits, "train.distill.enabled=true")
    featured = pruned_and_tuned(trained_wide, digits, "train.distill.enabled=true", "train.distill.feature=10")
    x = list(batches(loader(digits.train), 3))
    gap = lambda student: sum(F.mse_loss(student[:10](xb), trained_wide[:10](xb)).item()  # noqa: E731
                              for xb, _ in x)  # the classifier's inputs
    with torch.no_grad():
        assert gap(featured) < 0.95 * gap(plain)  # measured 0.925 (2.93 against 3.17), one epoch at lr 1e-4


def test_the_feature_term_is_refused_where_pruning_changes_the_feature_width():
    from pqsweep.checks import ConfigError
    from pqsweep.validate import validate

    with pytest.raises(ConfigError, match=r"^train.distill.feature=1.0 is not allowed: must be 0 with pruning=l1_filter"):
        validate(compose_cfg("pruning=l1_filter", "train.distill.enabled=true", "train.distill.feature=1"))
    validate(compose_cfg("pruning=global_magnitude", "train.distill.enabled=true", "train.distill.feature=1"))
