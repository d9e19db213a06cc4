import pytest
import torch

from models import ACTIVATION_NAMES, ModelConfigError, build_cnn, canonical_activation, filter_counts, summarize


@pytest.mark.parametrize("activation", ACTIVATION_NAMES)
@pytest.mark.parametrize("filter_org", ["same", "double", "half", 1.5])
@pytest.mark.parametrize("filter_size", [3, [5, 5, 3, 3, 3], [2, 4, 6, 1, 7]])
def test_every_activation_org_and_kernel_builds_and_runs(activation, filter_org, filter_size):
    model = build_cnn(10, 64, num_filters=8, filter_org=filter_org, filter_size=filter_size,
                      activation=activation, batch_norm=True, dropout=0.1, dense_neurons=16)
    out = model(torch.randn(2, 3, 64, 64))
    assert out.shape == (2, 10)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("kernel", [1, 2, 3, 4, 5, 6, 7])
def test_conv_padding_keeps_spatial_size_for_odd_and_even_kernels(kernel):
    model = build_cnn(10, 64, num_filters=4, filter_size=kernel, dense_neurons=8)
    block = model.features[0]
    x = torch.randn(1, 3, 37, 41)
    assert block.conv(block.pad(x)).shape[-2:] == (37, 41)


def test_parameter_count_matches_hand_count():
    # 5 blocks, filters 4,8,16,32,64, kernel 3, with BN (no conv bias), image 64 -> 2x2x64 = 256.
    model = build_cnn(10, 64, num_filters=4, filter_org="double", filter_size=3, batch_norm=True, dense_neurons=32)
    channels = [3, 4, 8, 16, 32, 64]
    conv = sum(channels[i] * channels[i + 1] * 9 for i in range(5))
    bn = sum(2 * c for c in channels[1:])
    dense = 256 * 32 + 32 + 32 * 10 + 10
    assert sum(p.numel() for p in model.parameters()) == conv + bn + dense
    summary = summarize(model, (3, 64, 64))
    assert summary.total_params == conv + bn + dense
    # Multiply-adds of the first conv: 64*64 output pixels x 4 filters x (3 in-channels x 3 x 3).
    first = next(r for r in summary.rows if r.name == "features.0.conv")
    assert first.macs == 64 * 64 * 4 * 27
    assert first.output_shape == (4, 64, 64)


def test_without_batch_norm_convs_have_bias():
    model = build_cnn(10, 32, num_filters=4, batch_norm=False, dense_neurons=8)
    assert model.features[0].conv.bias is not None
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())


def test_filter_counts():
    assert filter_counts(32, "double", 5) == [32, 64, 128, 256, 512]
    assert filter_counts(64, "half", 5) == [64, 32, 16, 8, 4]
    assert filter_counts(16, "same", 3) == [16, 16, 16]
    assert filter_counts([8, 8, 16, 16, 32], "double", 5) == [8, 8, 16, 16, 32]
    with pytest.raises(ModelConfigError, match="lists 3 values for 5 blocks"):
        filter_counts([8, 8, 16], "same", 5)
    with pytest.raises(ModelConfigError, match="filter_org"):
        filter_counts(8, "triple", 5)


def test_activation_names_are_case_insensitive_and_unknown_lists_choices():
    assert canonical_activation("gelu") == "GELU"
    assert canonical_activation("leaky_relu") == "LeakyReLU"
    with pytest.raises(ModelConfigError, match="ReLU, GELU, SiLU, Mish, LeakyReLU"):
        canonical_activation("swishy")


def test_image_too_small_for_the_pools_is_a_clear_error():
    with pytest.raises(ModelConfigError, match=r"image_size=16 is too small .*\(need >= 32\)"):
        build_cnn(10, 16)
    build_cnn(10, 32, num_filters=2, dense_neurons=4)  # the smallest that works


def test_dense_layer_size_follows_image_size():
    for size, spatial in ((32, 1), (100, 3), (224, 7)):
        model = build_cnn(10, size, num_filters=[2, 2, 2, 2, 3], dense_neurons=5)
        assert model.classifier[1].in_features == 3 * spatial * spatial


@pytest.mark.parametrize("kernel", [3, 4])
def test_deeper_blocks_add_same_width_convs_and_keep_the_map_size(kernel):
    model = build_cnn(10, 64, num_filters=4, filter_size=kernel, batch_norm=True, dense_neurons=8, convs_per_block=3)
    block = model.features[1]  # 4 -> 8 channels, then two 8 -> 8 convs, each with BN and activation
    convs = [m for m in block.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [(c.in_channels, c.out_channels) for c in convs] == [(4, 8), (8, 8), (8, 8)]
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in block.modules()) == 3
    assert sum(isinstance(m, torch.nn.SiLU) for m in block.modules()) == 0  # ReLU is the builder's default
    assert sum(isinstance(m, torch.nn.ReLU) for m in block.modules()) == 3
    x = torch.randn(2, 4, 32, 32)
    assert block(x).shape == (2, 8, 16, 16)
    assert model(torch.randn(2, 3, 64, 64)).shape == (2, 10)
    # Parameters: the one-conv network plus two kernel x kernel x 8 x 8 convs and their BN per block, scaled.
    one = build_cnn(10, 64, num_filters=4, filter_size=kernel, batch_norm=True, dense_neurons=8)
    extra = sum(2 * (c * c * kernel * kernel + 2 * c) for c in (4, 8, 16, 32, 64))
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in one.parameters()) + extra


def test_one_conv_per_block_keeps_the_parameter_names_of_old_checkpoints():
    names = list(build_cnn(10, 32, num_filters=2, dense_neurons=4, batch_norm=True).state_dict())
    assert names[:5] == ["features.0.conv.weight", "features.0.norm.weight", "features.0.norm.bias",
                         "features.0.norm.running_mean", "features.0.norm.running_var"]
    assert not any(".more." in name for name in names)
    with pytest.raises(ModelConfigError, match="convs_per_block=0 must be >= 1"):
        build_cnn(10, 32, convs_per_block=0)
