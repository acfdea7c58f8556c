"""Model factories: shapes for every data set's channels, small_cnn's size, and pretrained weights from the cache."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.fx
import torchvision

from pqsweep import models

FACTORIES = ["small_cnn", "resnet18", "resnet18_cifar", "vgg16_bn", "alexnet", "mobilenet_v2", "shufflenet_v2"]
INPUT_SIZES = {"alexnet": [64], "small_cnn": [8, 28, 32]}  # alexnet needs >= 63 px; the rest run at 32


@pytest.fixture
def hub_dir(tmp_path, monkeypatch):
    """An empty torch hub dir for the test, through $TORCH_HOME (torch.hub.get_dir() is $TORCH_HOME/hub). Not
    torch.hub.set_dir: restoring the previous dir with it pins that dir for the rest of the process, and later tests
    that point TORCH_HOME elsewhere were refused as if no checkpoint were there."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    yield tmp_path / "hub"


@pytest.mark.parametrize("in_channels", [1, 3])
@pytest.mark.parametrize("name", FACTORIES)
def test_forward_shape_and_fx_trace(name, in_channels):
    model = getattr(models, name)(num_classes=10, in_channels=in_channels).eval()
    traced = torch.fx.symbolic_trace(model)
    with torch.no_grad():
        for size in INPUT_SIZES.get(name, [32]):
            x = torch.randn(2, in_channels, size, size)
            out = model(x)
            assert out.shape == (2, 10)
            torch.testing.assert_close(traced(x), out)


def test_train_eval_modes():
    model = models.resnet18_cifar(num_classes=10, in_channels=3)
    assert not model.eval().training
    assert all(m.training for m in model.train().modules())


def test_small_cnn_parameter_count_matches_docstring():
    # The paper's CNN is about 19.5 k fp32 parameters (78,170 bytes gzipped); ours is documented as 18,346.
    model = models.small_cnn(num_classes=10, in_channels=1)
    assert sum(p.numel() for p in model.parameters()) == 18_346


def test_small_cnn_has_no_pretrained_weights():
    with pytest.raises(ValueError, match="small_cnn has no pretrained weights"):
        models.small_cnn(num_classes=10, in_channels=1, pretrained=True)


def test_pretrained_missing_from_cache_says_where_to_put_it(hub_dir):
    with pytest.raises(FileNotFoundError) as excinfo:
        models.resnet18(num_classes=10, in_channels=3, pretrained=True)
    message = str(excinfo.value)
    expected = hub_dir / "checkpoints" / Path(torchvision.models.ResNet18_Weights.DEFAULT.url).name
    assert "\n" not in message
    assert str(expected) in message
    assert "model.pretrained=false" in message


@pytest.fixture
def cached_resnet18(hub_dir):
    """A random ResNet-18 state dict saved where torchvision's ImageNet download would have put it."""
    torch.manual_seed(0)
    state = torchvision.models.resnet18(weights=None).state_dict()
    path = hub_dir / "checkpoints" / Path(torchvision.models.ResNet18_Weights.DEFAULT.url).name
    path.parent.mkdir(parents=True)
    torch.save(state, path)
    return state


def test_pretrained_loads_from_cache(cached_resnet18):
    model = models.resnet18(num_classes=10, in_channels=3, pretrained=True)
    torch.testing.assert_close(model.layer1[0].conv1.weight.detach(), cached_resnet18["layer1.0.conv1.weight"])
    torch.testing.assert_close(model.conv1.weight.detach(), cached_resnet18["conv1.weight"])
    assert model.fc.out_features == 10


def test_pretrained_stem_for_grey_images_averages_rgb_filters(cached_resnet18):
    model = models.resnet18(num_classes=10, in_channels=1, pretrained=True)
    rgb = cached_resnet18["conv1.weight"]
    assert model.conv1.weight.shape == (64, 1, 7, 7)
    # Summed filters: a grey image gives the response of the RGB image with three equal channels.
    torch.testing.assert_close(model.conv1.weight.detach(), rgb.sum(dim=1, keepdim=True))


def test_pretrained_cifar_stem_is_new_but_the_rest_is_loaded(cached_resnet18):
    model = models.resnet18_cifar(num_classes=10, in_channels=3, pretrained=True)
    assert model.conv1.kernel_size == (3, 3) and model.conv1.stride == (1, 1)
    assert isinstance(model.maxpool, torch.nn.Identity)
    torch.testing.assert_close(model.layer4[1].bn2.running_var, cached_resnet18["layer4.1.bn2.running_var"])
